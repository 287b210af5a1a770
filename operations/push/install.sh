# nixpush launch (operations/push/install.sh): install the activation program and start it.
# shellcheck shell=sh
# POSIX sh, run as root by `sh -c`, every value positional: dir sha256 wait starter...
# Waits up to `wait` s for the host's lock to be free (another activation's program holds it
# until it ends), else prints @@nixpush-pending@@ and its holder and fails; then installs the
# program (stdin) in a new root-only run directory, checks it against its SHA-256 (an upload
# cut short starts nothing), and execs the starter (the remaining arguments), with no tie to
# the session's stdin/stdout. The lock file and its directory are world-readable: the planner
# reads the holder without sudo. Polled with `flock -n` (busybox's flock has no -w).
set -e; umask 077; d=$1 sum=$2 wait=$3; shift 3
mkdir -p "${d%/*}"; chmod 0755 "${d%/*}"; l=${d%/*}/lock
[ -e "$l" ] || { : >> "$l"; chmod 0644 "$l"; }
command -v flock >/dev/null || { echo "nixpush: the target has no flock command"; exit 3; }
i=0
until flock -n "$l" true; do
  if [ "$i" -ge "$wait" ]; then echo "@@nixpush-pending@@"; cat "$l"; exit 3; fi
  sleep 1; i=$((i + 1))
done
mkdir -m 0700 "$d"; cat > "$d/program"
got=$(sha256sum < "$d/program")
if [ "${got%% *}" != "$sum" ]; then
  echo "nixpush: the program arrived cut short ($(wc -c < "$d/program") bytes): nothing started"
  rm -rf "$d"; exit 3
fi
exec "$@" </dev/null >>"$d/output" 2>&1
