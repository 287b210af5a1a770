"""
main root: the three primary machines (desktop, laptop, server). Brings Syncthing
(modules/services/syncthing/main.nix) and Opencode (modules/cli/opencode/main.nix), both
configured by the flake; nixpush needs no data for them yet.
"""
