"""NixOS hosts: the generated fragments, and the checks of what they already run."""
