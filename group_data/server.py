"""
server root: the NAS, which builds for the Pis (modules/nix/server.nix): QEMU binfmt emulation
and a higher max-jobs. deploys/nas.py applies these.
"""

# Systems built under QEMU user-mode emulation; add "armv7l-linux" for 32-bit Pis.
binfmt_emulated_systems = ["aarch64-linux"]
# nix.conf max-jobs
nix_max_jobs = 8
