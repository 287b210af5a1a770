# Builds a stand-in package of 4 MiB of random bytes (the flake's `blob` knob).
set -e
bb="$builder"
$bb mkdir -p "$out"
$bb dd if=/dev/urandom of="$out/blob" bs=1024 count=4096 2>/dev/null
