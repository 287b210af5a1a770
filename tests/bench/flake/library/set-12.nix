# Package set 12 of the stand-in library (one of many files, merged as overlays).
{ lib, n, size }:
prev:
let
  earlier = builtins.attrNames prev;
  package = i: lib.mkPackage {
    pname = "set12-pkg${toString i}";
    version = lib.padVersion (i + 12);
    deps = if earlier == [ ] then [ ] else [ prev.${lib.pick earlier (i * 15)} ];
    meta = { tags = [ "set12" "generated" (toString (lib.lib_mod i 5)) ]; license = "mit"; };
  };
in
builtins.listToAttrs (builtins.genList (i: {
  name = "set12-pkg${toString i}";
  value = package i;
}) size)
