# nixpush: prune old system generations (operations/push/prune.sh), after a confirmed switch.
# shellcheck shell=sh
# POSIX sh, run as root, every value positional: mode (prune, or dry: only say what would go),
# keep (the newest generations kept), gc (1: collect garbage afterwards).
# One function called on the last line: sh parses it whole before running any of it.
nixpush_prune() {
if [ "$#" != 3 ]; then echo "nixpush: 3 arguments expected, $# given" >&2; exit 2; fi
mode=$1 keep=$2 gc=$3
# keep: 1 to 10 digits, no leading zero (sh reads 010 as octal, and numbers past 2^63 differ
# from shell to shell), so every comparison below is exact in dash, bash and busybox sh alike.
case $keep in
  ''|0*|*[!0-9]*|???????????*) echo "nixpush: keep is '$keep', not a number from 1 to 9999999999" >&2; exit 2 ;;
esac
case $mode in
  prune|dry) ;;
  *) echo "nixpush: mode is '$mode', not prune or dry" >&2; exit 2 ;;
esac
# The fixed paths, overridable by the environment for the tests (as switch.sh's; sudo passes
# no such variables on).
profile=${NIXPUSH_PROFILE:-/nix/var/nix/profiles/system}
runs=${NIXPUSH_RUNS:-/run/nixpush}
# shellcheck disable=SC2034 # l (and me) are read by handed_over (handover.sh)
lock=$runs/lock l=$runs/lock
booted_link=${NIXPUSH_BOOTED:-/run/booted-system}
running_link=${NIXPUSH_RUNNING:-/run/current-system}
PATH=$PATH:/run/current-system/sw/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
export PATH
if [ "$mode" = prune ]; then
  # The host's activation lock (switch.sh's): no activation starts, and none awaits its
  # confirmation, while generations go. Polled: busybox's flock has no -w.
  # The lock, just taken, may still be handed to a live program (handed_over: handover.sh).
  # nixpush: include handover.sh
  taken() {
    flock -n 9 || return 1
    handed_over || return 0
    flock -u 9; return 1
  }
  mkdir -p "$runs"
  exec 9>>"$lock"
  tries=0
  until taken; do
    tries=$((tries + 1))
    if [ "$tries" -ge 50 ]; then echo "nixpush-busy $(tr '\n' ' ' < "$lock")"; exit 0; fi
    sleep 0.2
  done
else
  keep=$((keep - 1))  # the switch to come adds one
fi
booted=$(readlink -f "$booted_link" 2>/dev/null)
running=$(readlink -f "$running_link" 2>/dev/null)
chosen=$(readlink "$profile" 2>/dev/null)
chosen=${chosen#system-} chosen=${chosen%-link}
numbers=$(for link in "$profile"-*-link; do
  [ -L "$link" ] || continue
  g=${link##*/system-}; echo "${g%-link}"
done | sort -rn)
n=0 doomed=''
for g in $numbers; do
  n=$((n + 1))
  # Deleted only past a comparison that succeeded: one that fails (an error) keeps it.
  [ "$n" -gt "$keep" ] || continue
  system=$(readlink -f "$profile-$g-link")
  if [ "$g" = "$chosen" ]; then echo "nixpush-kept $g (the profile's)"; continue; fi
  if [ -n "$booted" ] && [ "$system" = "$booted" ]; then echo "nixpush-kept $g (booted)"; continue; fi
  if [ "$system" = "$running" ]; then echo "nixpush-kept $g (running)"; continue; fi
  doomed="$doomed $g"
done
echo "nixpush-doomed$doomed"
[ "$mode" = prune ] || exit 0
if [ -n "$doomed" ]; then
  # shellcheck disable=SC2086  # one argument per generation number
  nix-env -p "$profile" --delete-generations $doomed 9>&- || exit 1
fi
flock -u 9
if [ "$gc" = 1 ]; then
  # Nix's last line: "N store paths deleted, X MiB freed".
  nix-store --gc 9>&- 2>&1 | tail -n 1 | sed 's/^/nixpush-gc /'
fi
exit 0
}
nixpush_prune "$@"
