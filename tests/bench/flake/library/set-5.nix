# Package set 5 of the stand-in library (one of many files, merged as overlays).
{ lib, n, size }:
prev:
let
  earlier = builtins.attrNames prev;
  package = i: lib.mkPackage {
    pname = "set5-pkg${toString i}";
    version = lib.padVersion (i + 5);
    deps = if earlier == [ ] then [ ] else [ prev.${lib.pick earlier (i * 8)} ];
    meta = { tags = [ "set5" "generated" (toString (lib.lib_mod i 5)) ]; license = "mit"; };
  };
in
builtins.listToAttrs (builtins.genList (i: {
  name = "set5-pkg${toString i}";
  value = package i;
}) size)
