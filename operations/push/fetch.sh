# nixpush URL health check (operations/push/fetch.sh): one GET on the target.
# shellcheck shell=sh
# POSIX sh, run by `sh -c`, every value positional: url seconds.
# curl where there is one (NixOS usually), else wget (busybox has one).
if command -v curl >/dev/null 2>&1; then exec curl -fsS -o /dev/null --max-time "$2" -- "$1"; fi
exec wget -q -O /dev/null -T "$2" -- "$1"
