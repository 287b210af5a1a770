# Package set 23 of the stand-in library (one of many files, merged as overlays).
{ lib, n, size }:
prev:
let
  earlier = builtins.attrNames prev;
  package = i: lib.mkPackage {
    pname = "set23-pkg${toString i}";
    version = lib.padVersion (i + 23);
    deps = if earlier == [ ] then [ ] else [ prev.${lib.pick earlier (i * 26)} ];
    meta = { tags = [ "set23" "generated" (toString (lib.lib_mod i 5)) ]; license = "mit"; };
  };
in
builtins.listToAttrs (builtins.genList (i: {
  name = "set23-pkg${toString i}";
  value = package i;
}) size)
