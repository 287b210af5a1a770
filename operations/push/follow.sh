# nixpush follow (operations/push/follow.sh): how an activation run is doing.
# shellcheck shell=sh
# POSIX sh, run by `sh -c`, every value positional: dir seen known wait unit.
# Answers once the state is another than `known` and not transient, or after `wait` s with
# what there is: the output lines after the first `seen`, as hex (read after the state: the
# program writes its lines before the state they lead to), @@nixpush-status@@, the status and, once
# the run is over, what the links point at. Polled five times a second: shell builtins and
# sleep, nothing else (a real Pi pays for every process while it activates). The state names
# are switch.py's TRANSIENT and TERMINAL (a unit test compares them).
dir=$1 seen=$2 known=$3 wait=$4 unit=$5
running=${NIXPUSH_RUNNING:-/run/current-system}
profile=${NIXPUSH_PROFILE:-/nix/var/nix/profiles/system}
state() {
  text='' now=''
  if [ -f "$dir/status" ]; then
    while IFS= read -r line; do
      text="$text$line
"
      case $line in state=*) now=${line#state=} ;; esac
    done < "$dir/status"
  elif [ -d "$dir" ]; then now=starting; else now=missing; fi
}
polls=0
while :; do
  state
  case $now in
    starting|activating|committing|rolling-back) ;;
    *) [ "$now" != "$known" ] && break ;;
  esac
  [ "$polls" -ge $((wait * 5)) ] && break
  sleep 0.2; polls=$((polls + 1))
done
# The new lines as hex (od, POSIX) after @@nixpush-bytes@@: an activation may print bytes
# that are not UTF-8, and the controller's SSH reader stops at the first such line.
lines() {
  if [ -n "$unit" ]; then
    journalctl -q -u "$unit" -o cat --no-pager 2>/dev/null | sed -n "$((seen + 1)),\$p"
  elif [ -f "$dir/output" ]; then
    n=0
    while IFS= read -r line; do
      n=$((n + 1))
      [ "$n" -gt "$seen" ] && printf '%s\n' "$line"
    done < "$dir/output"
  fi
}
echo "@@nixpush-bytes@@"
lines | od -An -v -tx1
echo "@@nixpush-status@@"
if [ -n "$text" ]; then printf '%s' "$text"; else echo "state=$now"; fi
case $now in confirmed|done|failed|rolled-back|rollback-failed|missing)
  echo "current=$(readlink -f "$running" 2>/dev/null)"
  echo "profile=$(readlink -f "$profile" 2>/dev/null)" ;;
esac
