# Package set 2 of the stand-in library (one of many files, merged as overlays).
{ lib, n, size }:
prev:
let
  earlier = builtins.attrNames prev;
  package = i: lib.mkPackage {
    pname = "set2-pkg${toString i}";
    version = lib.padVersion (i + 2);
    deps = if earlier == [ ] then [ ] else [ prev.${lib.pick earlier (i * 5)} ];
    meta = { tags = [ "set2" "generated" (toString (lib.lib_mod i 5)) ]; license = "mit"; };
  };
in
builtins.listToAttrs (builtins.genList (i: {
  name = "set2-pkg${toString i}";
  value = package i;
}) size)
