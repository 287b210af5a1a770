# Builds a stand-in kernel package: a kernel image, an initrd and a modules directory.
set -e
bb="$builder"
$bb mkdir -p "$out/lib/modules/$version"
echo "bench kernel $version" > "$out/bzImage"
echo "bench initrd $version" > "$out/initrd"
