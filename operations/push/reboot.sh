# POSIX sh, run as root, every value positional: the target's side of a reboot after a
# confirmed switch (operations/push/reboot.py). `$1` says what:
#   prepare MARK NEW PREVIOUS: leave MARK (in /run, which a reboot empties); where systemd-boot
#     has entries for both systems, boot NEW's entry once and make PREVIOUS's the default, so a
#     NEW that does not boot falls back to PREVIOUS at the next boot. Says which it did.
#   commit: NEW came back healthy: drop the EFI default, so loader.conf's (NEW's, which the
#     switch wrote) is the default again.
#   roll-back PREVIOUS: the host booted PREVIOUS: the profile's generation of it, and its boot
#     loader entries, are what boots next.
set -u
profile=/nix/var/nix/profiles/system
loader=$(bootctl --print-boot-path 2>/dev/null) || loader=''
systemd_boot() { [ -n "$loader" ] && [ -f "$loader/loader/loader.conf" ]; }
# The systemd-boot entry (its id) that boots system $1, if any.
entry_of() {
  for f in "$loader"/loader/entries/*.conf; do
    if [ -f "$f" ] && grep -qF "init=$1/init" "$f"; then
      basename "$f"
      return 0
    fi
  done
  return 1
}
case $1 in
  prepare)
    mark=$2 new=$3 previous=$4
    mkdir -p "${mark%/*}" && : > "$mark" || exit 1
    if systemd_boot && [ -n "$previous" ] && new_entry=$(entry_of "$new") \
      && previous_entry=$(entry_of "$previous"); then
      bootctl set-default "$previous_entry" || exit 1
      # Failed half way: loader.conf's default (the new system, confirmed) applies again.
      bootctl set-oneshot "$new_entry" || { bootctl set-default ''; exit 1; }
      echo "nixpush-reboot one-shot $new_entry $previous_entry"
    else
      echo "nixpush-reboot default"
    fi ;;
  commit)
    if systemd_boot; then bootctl set-oneshot '' && bootctl set-default ''; fi ;;
  roll-back)
    previous=$2
    generation=''
    for link in "$profile"-*-link; do
      [ "$(readlink -f "$link")" = "$previous" ] || continue
      n=${link#"$profile"-}
      n=${n%-link}
      if [ -z "$generation" ] || [ "$n" -gt "$generation" ]; then generation=$n; fi
    done
    if [ -n "$generation" ]; then
      nix-env -p "$profile" --switch-generation "$generation" || exit 1
    else
      nix-env -p "$profile" --set "$previous" || exit 1
    fi
    "$previous/bin/switch-to-configuration" boot || exit 1
    if systemd_boot; then bootctl set-default ''; fi
    echo "nixpush-reboot rolled back to $previous" ;;
  *)
    echo "nixpush-reboot: unknown step: $1" >&2
    exit 1 ;;
esac
