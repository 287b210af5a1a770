# `nix-shell` in the checkout: nixpush's Python environment (default.nix) with the tools the
# deploys run on the controller: sops (decrypting), ssh and ssh-keygen, git (the report's
# revision). Then `pyinfra inventory.py deploys/pi.py`, and `python -m operations.run.runner`
# for nixpush-run, from this directory.
{
  pkgs ? import <nixpkgs> { },
}:
pkgs.mkShell {
  packages = [
    (import ./default.nix { inherit pkgs; })
    pkgs.sops
    pkgs.openssh
    pkgs.git
  ];
}
