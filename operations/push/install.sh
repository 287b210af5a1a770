# nixpush launch (operations/push/install.sh): install the activation program and start it.
# shellcheck shell=sh
# POSIX sh, run as root by `sh -c`, every value positional: dir sha256 wait controller handover
# starter...
# Takes the host's lock (polled with `flock -n`: busybox's flock has no -w), waiting up to
# `wait` s while another activation holds it, else prints @@nixpush-pending@@ and its holder
# and fails; and holds it from that look until the program holds it, so no two launches pass
# together. Holding it, it names itself the holder (`handover=1`), installs the program (stdin)
# in a new root-only run directory, checks it against its SHA-256 (an upload cut short starts
# nothing), and runs the starter (the remaining arguments) with no tie to the session's
# stdin/stdout. A setsid program inherits the held descriptor (9): the lock is its from the
# start. A systemd unit cannot inherit it (handover=1): the launch lets go once the program
# has started (its pid file), and until the program takes the lock, whoever takes it in
# between finds the holder marked `handover=1` with a live program and lets go again
# (handed_over). The lock file and its directory are world-readable: the planner reads the
# holder without sudo.
set -e; umask 077; d=$1 sum=$2 wait=$3 controller=$4 handover=$5; shift 5
mkdir -p "${d%/*}"; chmod 0755 "${d%/*}"; l=${d%/*}/lock
[ -e "$l" ] || { : >> "$l"; chmod 0644 "$l"; }
command -v flock >/dev/null || { echo "nixpush: the target has no flock command"; exit 3; }
# The lock, just taken, may still be handed to a live program (handed_over: handover.sh).
# nixpush: include handover.sh
taken() {
  flock -n 9 || return 1
  handed_over || return 0
  flock -u 9; return 1
}
exec 9>>"$l"
i=0
until taken; do
  if [ "$i" -ge "$wait" ]; then echo "@@nixpush-pending@@"; cat "$l"; exit 3; fi
  sleep 1; i=$((i + 1))
done
printf 'id=%s\nstarted=%s\ncontroller=%s\npid=%s\nhandover=1\n' "${d##*/}" \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$controller" "$$" > "$l"
mkdir -m 0700 "$d"; cat > "$d/program"
got=$(sha256sum < "$d/program")
if [ "${got%% *}" != "$sum" ]; then
  echo "nixpush: the program arrived cut short ($(wc -c < "$d/program") bytes): nothing started"
  rm -rf "$d"; : > "$l"; exit 3
fi
"$@" </dev/null >>"$d/output" 2>&1 || { rc=$?; : > "$l"; exit "$rc"; }
# A unit's program: held until it has started (up to 20 s), then it is alive for handed_over.
i=0
while [ "$handover" = 1 ] && [ ! -s "$d/pid" ] && [ "$i" -lt 100 ]; do
  sleep 0.2; i=$((i + 1))
done
