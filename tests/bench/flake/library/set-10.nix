# Package set 10 of the stand-in library (one of many files, merged as overlays).
{ lib, n, size }:
prev:
let
  earlier = builtins.attrNames prev;
  package = i: lib.mkPackage {
    pname = "set10-pkg${toString i}";
    version = lib.padVersion (i + 10);
    deps = if earlier == [ ] then [ ] else [ prev.${lib.pick earlier (i * 13)} ];
    meta = { tags = [ "set10" "generated" (toString (lib.lib_mod i 5)) ]; license = "mit"; };
  };
in
builtins.listToAttrs (builtins.genList (i: {
  name = "set10-pkg${toString i}";
  value = package i;
}) size)
