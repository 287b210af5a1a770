# Behaves like NixOS's switch-to-configuration for the parts nixpush relies on:
#   switch: activate now and make it the boot default
#   boot:   make it the boot default only
#   test:   activate now only
#   dry-activate: report what would change, change nothing
action="$1"
case "$action" in
  switch|boot|test|dry-activate) ;;
  *) echo "Usage: $0 [switch|boot|test|dry-activate]" >&2; exit 1 ;;
esac
if [ "$($bb id -u)" != 0 ]; then
  echo "switch-to-configuration: this program must be run as root" >&2
  exit 1
fi
current=$($bb readlink /run/current-system 2>/dev/null || true)
if [ "$action" = dry-activate ]; then
  echo "would activate the configuration $top (version $($bb cat "$top/nixos-version"))"
  echo "would replace ${current:-no running system}"
  if [ "$current" != "$top" ]; then
    echo "would restart the following units: bench-app.service"
  fi
  exit 0
fi
if [ -n "$fail_activation" ]; then
  echo "activation script failed: bench-app.service did not start" >&2
  exit 4
fi
if [ "$action" = switch ] || [ "$action" = test ]; then
  $bb ln -sfn "$top" /run/current-system
  echo "$action $top $($bb uname -m)" >> /run/bench-activations
fi
if [ "$action" = switch ] || [ "$action" = boot ]; then
  echo "$top" > /boot/default-system
fi
echo "$action: done"
