"""What builds: Nix, QEMU emulation, pull builds, images, the schedule's timers."""
