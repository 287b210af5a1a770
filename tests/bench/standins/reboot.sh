#!/bin/sh
# The bench's stand-in for `systemctl reboot` (the bench inventory's reboot_command): ends
# every process of the host's namespaces (its init, and with it the whole PID namespace), and
# the bench's launcher starts the host again: an empty /run, the boot loader's choice
# (boot.sh). It asks the launcher by a file in the host's /boot, and never calls reboot(2):
# bench hosts run without CAP_SYS_BOOT, and this refuses to run anywhere that has it.
set -eu
cap_sys_boot=22
bounding=$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status)
if [ $(( 0x$bounding >> cap_sys_boot & 1 )) -ne 0 ] || [ ! -f /etc/nixpush-bench-host ]; then
  echo "bench reboot: not inside a bench host (CAP_SYS_BOOT is in the bounding set): refused" >&2
  exit 1
fi
touch /boot/bench-reboot-requested
if [ -d /run/systemd/system ]; then
  # What `systemctl reboot` does without logind (masked here): systemd stops its units, then
  # its shutdown program's reboot(2) fails (no CAP_SYS_BOOT) and, in a container, it exits:
  # the PID namespace ends.
  exec systemctl --no-block start reboot.target
fi
# The init is sshd: SIGTERM ends it (it handles the signal, so the kernel delivers it from
# inside its namespace). A second later, so this session's answer gets out first.
setsid sh -c 'sleep 1; kill -TERM 1' </dev/null >/dev/null 2>&1 &
echo "bench reboot: $(cat /etc/nixpush-bench-host) goes down in 1 s"
