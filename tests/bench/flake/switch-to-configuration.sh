# Behaves like NixOS's switch-to-configuration for the parts nixpush relies on:
#   switch: activate now and make it the boot default
#   boot:   make it the boot default only
#   test:   activate now only
#   dry-activate: report what would change, change nothing
# Failure knobs (set per configuration in hosts.nix, see flake.nix), applied when activating:
#   slow_activation=N: the activation takes N seconds (after making itself current)
#   break_network:     takes eth0 down (the host's only link)
#   break_ssh:         sshd refuses new logins (authorized_keys moved aside), running sessions stay
#   fail_activation:   exits 4 after making itself current, like a unit that failed to start
#   fail_dry_activation: dry-activate exits 2, like an activation script that cannot even
#                      tell what it would do
#   odd_bytes:         dry-activate and the activation each print a line that is not UTF-8
#                      (Latin-1 and stray bytes, as a unit's own output may hold)
# A configuration without them repairs what they broke (and only that), as activating a good
# NixOS generation re-applies its network and sshd settings.
action="$1"
case "$action" in
  switch|boot|test|dry-activate) ;;
  *) echo "Usage: $0 [switch|boot|test|dry-activate]" >&2; exit 1 ;;
esac
# Shell builtins where they do: each busybox applet is a new emulated process, which a
# real NixOS activation (one native program) does not pay for; the bench's Pis share its cores.
if [ ! -w /run ]; then  # root's alone: what an activation writes
  echo "switch-to-configuration: this program must be run as root" >&2
  exit 1
fi
current=$($bb readlink /run/current-system 2>/dev/null || true)
if [ -n "$odd_bytes" ]; then
  printf '%s: caf\351 \377\376 odd bytes\n' "$action"
fi
if [ "$action" = dry-activate ]; then
  if [ -n "$fail_dry_activation" ]; then
    echo "error: dry-activate: cannot read the units of $top" >&2
    exit 2
  fi
  read -r version < "$top/nixos-version"
  echo "would activate the configuration $top (version $version)"
  echo "would replace ${current:-no running system}"
  if [ "$current" != "$top" ]; then
    echo "would restart the following units: bench-app.service"
  fi
  exit 0
fi
if [ "$action" = switch ] || [ "$action" = boot ]; then
  echo "$top" > /boot/default-system
  if [ -n "$systemd_boot" ]; then
    # Like NixOS's systemd-boot builder: an entry per system generation, loader.conf's default
    # the profile's generation (bootctl set-default and set-oneshot override it).
    $bb mkdir -p /boot/loader/entries
    for link in /nix/var/nix/profiles/system-*-link; do
      [ -e "$link" ] || continue
      g=${link##*/system-}
      g=${g%-link}
      printf 'title NixOS\nversion Generation %s\noptions init=%s/init\n' \
        "$g" "$($bb readlink -f "$link")" > "/boot/loader/entries/nixos-generation-$g.conf"
    done
    for entry in /boot/loader/entries/nixos-generation-*.conf; do
      g=${entry##*/nixos-generation-}
      g=${g%.conf}
      [ -e "/nix/var/nix/profiles/system-$g-link" ] || $bb rm -f "$entry"
    done
    profile=$($bb readlink /nix/var/nix/profiles/system 2>/dev/null || true)
    g=${profile#system-}
    g=${g%-link}
    [ -n "$g" ] && echo "default nixos-generation-$g.conf" > /boot/loader/loader.conf
  fi
  # Like NixOS's extlinux: the kernel and initrd under their store path's name, slashes as dashes.
  $bb mkdir -p -m 0755 /boot/nixos
  for f in kernel initrd; do
    real=$($bb readlink -f "$top/$f")
    name=${real#/nix/store/}
    $bb cp "$real" "/boot/nixos/$(echo "$name" | $bb tr / -)"
  done
  # ... and the device trees, a directory, under the system's store path's name.
  if [ -e "$top/dtbs" ]; then
    [ -e "/boot/nixos/${top#/nix/store/}-dtbs" ] || $bb cp -r "$top/dtbs" "/boot/nixos/${top#/nix/store/}-dtbs"
  fi
fi
if [ "$action" = boot ]; then
  echo "$action: done"
  exit 0
fi
$bb ln -sfn "$top" /run/current-system
echo "$action $top $($bb uname -m)" >> /run/bench-activations
echo "activating the configuration $top"
# The machine's iproute2 (x86_64, shared /usr): the host's network namespace is its own.
ip=/usr/sbin/ip
[ -x "$ip" ] || ip=/sbin/ip
keys_off() {
  for keys in /root/.ssh/authorized_keys /home/*/.ssh/authorized_keys; do
    [ -f "$keys" ] && $bb mv "$keys" "$keys.bench-off"
  done
}
keys_on() {
  for keys in /root/.ssh/authorized_keys.bench-off /home/*/.ssh/authorized_keys.bench-off; do
    [ -f "$keys" ] && $bb mv "$keys" "${keys%.bench-off}"
  done
}
if [ -n "$slow_activation" ]; then
  echo "starting bench-app.service (takes ${slow_activation}s)"
  $bb sleep "$slow_activation"
fi
if [ -n "$break_ssh" ]; then
  echo "reloading sshd.service"
  keys_off
else
  keys_on
fi
# Only what a knob broke is repaired (a link cut by a test stays cut); the times are for tests.
if [ -n "$break_network" ]; then
  echo "restarting network-setup.service"
  $bb date +%s > /run/bench-network-down-at
  "$ip" link set eth0 down
elif [ -e /run/bench-network-down-at ]; then
  "$ip" link set eth0 up
  $bb mv /run/bench-network-down-at /run/bench-network-broken-at
  $bb date +%s > /run/bench-network-up-at
fi
if [ -n "$fail_activation" ]; then
  echo "activation script failed: bench-app.service did not start" >&2
  exit 4
fi
echo "$action: done"
