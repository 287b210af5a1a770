# The bench's stand-in for a boot loader and NixOS's stage 2, run by a bench host's init after
# its mounts (its own /boot, /nix and an empty /run): picks the system to boot and links
# /run/booted-system and /run/current-system to it.
#   systemd-boot (/boot/loader/loader.conf, written by a systemdBoot configuration): a one-shot
#     entry (bootctl set-oneshot) once, else the EFI default (bootctl set-default), else
#     loader.conf's default. Entries name their system in `options init=<system>/init`.
#   extlinux (the Pis): /boot/default-system, what switch-to-configuration boot made default.
# A system with `bench-does-not-boot` (the flake's failBoot knob) does not boot: after a
# one-shot entry the next boot takes the default (real firmware needs a watchdog or a power
# cycle for that; the bench does it at once), otherwise the host stays down (exit 1).
# Never on the machine itself: the host's init runs it inside the host's namespaces.
entry_system() {
  [ -n "$1" ] && [ -f "/boot/loader/entries/$1" ] || return 0
  sed -n 's|^options .*init=\(/nix/store/[^ ]*\)/init.*|\1|p' "/boot/loader/entries/$1"
}
boots() {
  [ -n "$1" ] && [ ! -e "$1/bench-does-not-boot" ]
}
system=
if [ -f /boot/loader/loader.conf ]; then
  if [ -f /boot/loader/oneshot ]; then
    entry=$(cat /boot/loader/oneshot)
    rm -f /boot/loader/oneshot
    candidate=$(entry_system "$entry")
    if boots "$candidate"; then
      system=$candidate
      echo "boot: the one-shot entry $entry: $system"
    else
      echo "boot: the one-shot entry $entry does not boot: booting the default"
    fi
  fi
  if [ -z "$system" ]; then
    entry=$(cat /boot/loader/efi-default 2>/dev/null || true)
    [ -n "$entry" ] || entry=$(sed -n 's/^default //p' /boot/loader/loader.conf)
    system=$(entry_system "$entry")
    echo "boot: the default entry $entry: $system"
  fi
elif [ -f /boot/default-system ]; then
  system=$(cat /boot/default-system)
  echo "boot: the default system: $system"
fi
if [ -n "$system" ]; then
  if ! boots "$system"; then
    echo "boot: $system does not boot: the host stays down"
    exit 1
  fi
  ln -sfn "$system" /run/booted-system
  ln -sfn "$system" /run/current-system
fi
exit 0
