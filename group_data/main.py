"""
main root: the three primary machines (desktop, laptop, server). Brings Syncthing
(modules/services/syncthing/main.nix) and Opencode (modules/cli/opencode/main.nix), both
configured by the flake; nixpush checks Syncthing's health after a switch.
"""

# Safe switching: Syncthing answers its unauthenticated health endpoint once it runs
# (modules/services/syncthing/main.nix keeps the GUI on 127.0.0.1:8384). It starts a few
# seconds after the switch, hence the retries: 33 s at worst, with minimal's and network's
# checks 57 s, so these machines wait a minute for the confirmation (no other root sets it).
health_checks = [
    {
        "name": "syncthing",
        "url": "http://127.0.0.1:8384/rest/noauth/health",
        "timeout": 5,
        "retries": 4,
    },
]
confirm_timeout = 60
