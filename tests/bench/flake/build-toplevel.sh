# Builds a stand-in NixOS toplevel. Runs under the target system's busybox,
# so build-arch records the machine the build really ran as.
set -e
bb="$builder"
if [ -n "$slowBuild" ]; then
  echo "building $hostName slowly: $slowBuild s (slowBuild)"
  $bb sleep "$slowBuild"
fi
if [ -n "$failBuild" ]; then
  echo "bench: the build of $hostName fails (failBuild)" >&2
  exit 3
fi
$bb mkdir -p "$out/bin"
$bb uname -m > "$out/build-arch"
echo "$version" > "$out/nixos-version"
echo "$hostName" > "$out/hostname"
# What a real toplevel links to its kernel package: the boot loader installs kernel and initrd
# in /boot/nixos (nixpush checks they fit there before a switch or boot); a reboot is needed
# when they, the modules or kernel-params differ from the booted system's.
$bb ln -s "$kernel/bzImage" "$out/kernel"
$bb ln -s "$kernel/initrd" "$out/initrd"
$bb ln -s "$kernel/lib/modules" "$out/kernel-modules"
echo "$kernelParams" > "$out/kernel-params"
if [ -n "$failBoot" ]; then
  echo "bench: $hostName $version does not boot (failBoot)" > "$out/bench-does-not-boot"
fi
# dtbs: device trees, as a Pi's toplevel links its kernel's (the extlinux builder copies the
# directory to /boot/nixos too): 48 files of 16 KiB in two directories.
if [ -n "$dtbs" ]; then
  for d in broadcom overlays; do
    $bb mkdir -p "$out/dtbs/$d"
    for i in 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23; do
      $bb dd if=/dev/urandom of="$out/dtbs/$d/bench-$i.dtb" bs=1024 count=16 2>/dev/null
    done
  done
fi
if [ -n "$blob" ]; then
  $bb ln -s "$blob" "$out/blob"
fi
if [ -n "$padding" ]; then
  $bb dd if=/dev/urandom of="$out/padding" bs=1024 count=4096 2>/dev/null
fi
{
  echo "#!$bb sh"
  echo "bb=$bb"
  echo "top=$out"
  echo "fail_activation=$failActivation"
  echo "fail_dry_activation=$failDryActivation"
  echo "slow_activation=$slowActivation"
  echo "break_network=$breakNetwork"
  echo "break_ssh=$breakSsh"
  echo "odd_bytes=$oddBytes"
  echo "systemd_boot=$systemdBoot"
  $bb cat "$switchScript"
} > "$out/bin/switch-to-configuration"
$bb chmod 0555 "$out/bin/switch-to-configuration"
