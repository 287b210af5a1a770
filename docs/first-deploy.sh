# The commands of the README's "First deploy of your NixOS fleet", in order: the README shows
# this file, and tests/e2e/test_nixos.py runs every command of it on a bench fleet laid out
# like the owner's (each must exit 0). Run them from the nixpush checkout with
# SOPS_AGE_KEY_FILE exported; pyinfra shows its plan and asks before changing anything.

## 6. The fragments, written on the controller from inventory.py (no host needs to be up)
pyinfra @local deploys/nixos_config.py

## 7. After the bootstrap: nas and pi4 rebuilt with their fragments imported
pyinfra inventory.py deploys/nixos_check.py --limit nas --limit pi4

## 8. The push keys, the builder, then the first deploy: pi4 alone
pyinfra inventory.py deploys/secrets.py --limit nas --limit pi4
pyinfra inventory.py deploys/nas.py --limit nas
pyinfra inventory.py deploys/pi.py --limit pi4

## 9. The nightly timer: schedule enabled in group_data/server.py, nas rebuilt with its fragment
pyinfra @local deploys/nixos_config.py
pyinfra inventory.py deploys/schedule.py --limit nas

## 10. Later, grill and laptop: their ssh_host_key set in inventory.py
pyinfra @local deploys/nixos_config.py

## 11. After rebuilding grill and laptop with their fragments imported (laptop may sleep)
pyinfra inventory.py deploys/secrets.py --limit nas --limit grill --limit laptop
pyinfra inventory.py deploys/pi.py
