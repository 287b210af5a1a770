# nixpush's Python environment from nixpkgs (pyinfra, PyYAML, the @image connector's entry
# point): operations/nixos/env.nix, the file deploys/nixos_config.py also writes beside the
# fragments as env/default.nix.
{
  pkgs ? import <nixpkgs> { },
}:
import ./operations/nixos/env.nix { inherit pkgs; }
