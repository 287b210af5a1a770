# A stand-in for nixpkgs: one shared library every bench configuration imports. Many files
# (set-*.nix), many attributes, merged like overlays; `digest` forces every package, and each
# toplevel depends on it, so evaluating any configuration really evaluates the whole library.
#
# weight: "light" (the default: CI's many deploys stay fast) or "heavy" (about a second of CPU
# and well over 100 MB in one nix eval process: the perf harness and the batched-evaluation
# tests). The bench writes it to ../library-weight.nix (tests/bench/fleet.py).
{ weight ? "light" }:
let
  # Packages per file.
  perFile = { light = 8; heavy = 2600; }.${weight};
  files = 24;
  lib = import ./lib.nix;
  sets = builtins.genList
    (n: import (./. + "/set-${toString n}.nix") { inherit lib n; size = perFile; })
    files;
  # Overlays: each set sees everything before it, like nixpkgs' fixpoint.
  pkgs = builtins.foldl' (prev: set: prev // set prev) { } sets;
  names = builtins.attrNames pkgs;
in
{
  inherit lib pkgs;
  count = builtins.length names;
  digest = builtins.hashString "sha256"
    (builtins.concatStringsSep "\n" (map (name: pkgs.${name}.id) names));
  # A host's own, smaller part: a few modules of its own over the shared packages.
  hostPart = name: import ./host.nix { inherit lib pkgs name; size = perFile; };
}
