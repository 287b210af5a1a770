# nixpush URL health check (operations/push/fetch.sh): one GET on the target.
# shellcheck shell=sh
# POSIX sh, run by `sh -c`, every value positional: url seconds credentials.
# curl where there is one (NixOS usually), else wget (busybox has one). The URL carries no
# user or password: with credentials=1 they come on stdin as curl's config (`user = "u:p"`),
# never in a command line (/proc/*/cmdline shows it to every user, sudo logs it). busybox wget
# takes them only in its command line, so without curl such a check fails, naming why (the
# controller refuses it before the launch; this is for a new system that dropped curl).
url=$1 seconds=$2 credentials=$3
if command -v curl >/dev/null 2>&1; then
  if [ "$credentials" = 1 ]; then
    exec curl -fsS -o /dev/null --max-time "$seconds" -K - -- "$url"
  fi
  exec curl -fsS -o /dev/null --max-time "$seconds" -- "$url" </dev/null
fi
if [ "$credentials" = 1 ]; then
  echo "nixpush: the target has no curl, which a URL check with a user and password needs"
  exit 3
fi
exec wget -q -O /dev/null -T "$seconds" -- "$url" </dev/null
