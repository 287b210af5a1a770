# Builds a stand-in NixOS image (config.system.build.isoImage or sdImage): a small file where
# NixOS puts the real one, named in nix-support/hydra-build-products as NixOS's image modules do.
set -e
bb="$builder"
$bb mkdir -p "$out/$imageDir" "$out/nix-support"
file="$out/$imageDir/$imageName"
{
  echo "nixpush bench stand-in $imageKind of $hostName, version $version, built as $($bb uname -m)"
  $bb dd if=/dev/zero bs=1024 count=256 2>/dev/null
} > "$file"
echo "file $imageKind ${imageProduct:-$file}" > "$out/nix-support/hydra-build-products"
