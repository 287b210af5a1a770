# Package set 13 of the stand-in library (one of many files, merged as overlays).
{ lib, n, size }:
prev:
let
  earlier = builtins.attrNames prev;
  package = i: lib.mkPackage {
    pname = "set13-pkg${toString i}";
    version = lib.padVersion (i + 13);
    deps = if earlier == [ ] then [ ] else [ prev.${lib.pick earlier (i * 16)} ];
    meta = { tags = [ "set13" "generated" (toString (lib.lib_mod i 5)) ]; license = "mit"; };
  };
in
builtins.listToAttrs (builtins.genList (i: {
  name = "set13-pkg${toString i}";
  value = package i;
}) size)
