# One configuration's own part: a module list over the shared packages, smaller than them.
{ lib, pkgs, name, size }:
let
  names = builtins.attrNames pkgs;
  modules = builtins.genList (i: lib.mkPackage {
    pname = "${name}-module-${toString i}";
    version = lib.padVersion i;
    deps = [ pkgs.${lib.pick names (i * 13)} pkgs.${lib.pick names (i * 31 + 7)} ];
    meta.tags = [ name "module" ];
  }) size;
in
builtins.hashString "sha256" (builtins.concatStringsSep "\n" (map (m: m.id) modules))
