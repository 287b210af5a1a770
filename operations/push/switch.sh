# nixpush activation (operations/push/switch.sh), detached from the SSH session.
# shellcheck shell=sh
# POSIX sh, run as root, every value positional: dir action new generation rollback
# confirm_timeout activation_timeout controller copied. `generation` (a number) switches the
# profile to an existing generation (deploy_action=rollback) instead of adding one for `new`;
# `copied` names the GC root the copy made for `new` (under <gcroots>/nixpush-copied), removed
# once this run pins `new` itself.
#
# The whole program is one function, called on the last line: sh parses a function whole
# before it runs any of it, so a truncated copy runs nothing (the launch checks its checksum
# first too).
nixpush_switch() {
if [ "$#" != 9 ]; then echo "nixpush: 9 arguments expected, $# given" >&2; exit 2; fi
dir=$1 action=$2 new=$3 generation=$4 rollback=$5 confirm_timeout=$6 activation_timeout=$7
controller=$8 copied=$9
case $copied in */*|.*) copied='' ;; esac  # a name, never a path
# The fixed paths, overridable by the environment for the tests (neither sudo nor
# systemd-run passes such variables on).
profile=${NIXPUSH_PROFILE:-/nix/var/nix/profiles/system}
running=${NIXPUSH_RUNNING:-/run/current-system}
gcroots=${NIXPUSH_GCROOTS:-/nix/var/nix/gcroots}
# One activation per host: the run directories' parent holds the host's lock (flock: the
# kernel releases it when the program ends, however it ends); what it says names the holder.
# shellcheck disable=SC2034 # l (and me) are read by handed_over (handover.sh)
lock=${dir%/*}/lock l=$lock me=${dir##*/}
roots=$gcroots/nixpush-${dir##*/} copies=$gcroots/nixpush-copied
PATH=$PATH:/run/current-system/sw/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
export PATH
cd /
state='' locked='' created='' profile_set=''
status() {
  state=$1
  { echo "state=$1"; shift; for line in "$@"; do echo "$line"; done
    echo "previous=$prev_current"; echo "previous-profile=$prev_profile"
  } > "$dir/status.new"
  mv -f "$dir/status.new" "$dir/status"
}
generation_of() { g=${1##*/}; g=${g#system-}; echo "${g%-link}"; }
generations() {
  for link in "$profile"-*-link; do [ -L "$link" ] && generation_of "$link"; done
}
# Deadlines from the time since boot: the wall clock steps (a Pi has no RTC; NTP sets it).
now() { read -r up _ < /proc/uptime; now=${up%.*}; }
# Every child runs without the lock's descriptor: a daemon an activation leaves behind must
# not hold the host's lock.
stc() { timeout "$activation_timeout" "$1/bin/switch-to-configuration" "$2" 9>&-; }
prev_current='' prev_profile='' prev_gen=''
echo "$$" > "$dir/pid"
# shellcheck disable=SC2317  # called by the EXIT trap
release() {
  rm -rf "$roots"
  if [ "$locked" = 1 ]; then : > "$lock"; fi
}
trap release EXIT
# A stop (`systemctl stop`, a hangup, a TERM) once anything changed rolls back, as a missing
# confirmation does: the new system was never confirmed. A confirmation racing the stop finds
# `awaiting` gone and is too late. Before (starting) nothing changed; during a rollback the
# rollback goes on (stop_later: its children must still take TERM, so it is not ignored).
# shellcheck disable=SC2317  # called by the traps
stopped() {
  why="the activation program was stopped (a signal) while $state"
  case $state in activating|awaiting-confirmation|committing)
    if [ "$rollback" = 1 ]; then
      mv "$dir/awaiting" "$dir/stopped" 2>/dev/null
      roll_back "$why"
    fi ;;
  esac
  status failed "cause=$why"
  exit 0
}
# shellcheck disable=SC2317  # called by the traps
stop_later() { echo "nixpush: a signal during the rollback: rolling back goes on"; }
trap stopped HUP INT TERM
# The lock, just taken, may still be handed to a live program (handed_over: handover.sh).
# nixpush: include handover.sh
taken() {
  flock -n 9 || return 1
  handed_over || return 0
  flock -u 9; return 1
}
status starting
# The launch (install.sh) held the lock from its look until it started this program: started
# by setsid, the program inherits that descriptor (9) and so the lock; a systemd unit cannot,
# and takes it once the launch lets go (the holder says handover=1 meanwhile: see handed_over).
if [ "$(readlink "/proc/$$/fd/9" 2>/dev/null)" != "$(readlink -f "$lock")" ]; then
  exec 9>>"$lock"
fi
tries=0
# A moment's wait: another launch's or a prune's look at the lock holds it for an instant.
until taken; do
  tries=$((tries + 1))
  if [ "$tries" -ge 25 ]; then
    holder=$(tr '\n' ' ' < "$lock")
    status failed "cause=another activation is pending on the target: ${holder:-unknown}"
    exit 0
  fi
  sleep 0.2
done
locked=1
# What ran and booted before, read once no other run can change it.
prev_current=$(readlink -f "$running" 2>/dev/null)
prev_profile=$(readlink -f "$profile" 2>/dev/null)
prev_gen=$(generation_of "$(readlink "$profile" 2>/dev/null)")
printf 'id=%s\nstarted=%s\ncontroller=%s\npid=%s\n' "${dir##*/}" \
  "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$controller" "$$" > "$lock"
# Holding the lock, no other run is alive: another run's GC roots are left over (its program
# was killed, or the host restarted).
# The copies' roots are not runs': only one a day old is a dead one's (a copy whose
# activation never launched: held, failed, stopped), and the rest wait for their programs.
for other in "$gcroots"/nixpush-*; do
  if [ "$other" != "$roots" ] && [ "$other" != "$copies" ] && [ -d "$other" ]; then
    rm -rf "$other"
  fi
done
mkdir -p "$roots"
for pin in "previous:$prev_current" "previous-profile:$prev_profile" "new:$new"; do
  if [ -n "${pin#*:}" ]; then ln -sfn "${pin#*:}" "$roots/${pin%%:*}"; fi
done
# `new` is pinned by this run now: the copy's root is no longer needed.
if [ -n "$copied" ]; then rm -f "$copies/$copied"; fi
if [ -d "$copies" ]; then find "$copies" -type l -mtime +0 -exec rm -f {} \; 9>&-; fi
# What survives a reboot (profile, boot default) points at the new system only once it is
# confirmed: with a rollback armed, `switch` activates as `test` first.
first=$action
commit=''
if [ "$action" = switch ] && [ "$rollback" = 1 ]; then first=test commit=1; fi
# The generation this run created, if any: `--set` reuses the newest generation when it holds
# the same system (not this run's to delete).
created_generation() {
  for g in $(generations); do case $before in *" $g "*) ;; *) echo "$g" ;; esac; done
}
set_profile() {
  before=" $(generations | tr '\n' ' ') "
  # Marked before nix-env runs: a stop (the trap runs once nix-env returns) still restores it.
  profile_set=1
  if [ -n "$generation" ]; then
    nix-env -p "$profile" --switch-generation "$generation" 9>&-
  else
    nix-env -p "$profile" --set "$new" 9>&-
  fi
  rc=$?
  created=$(created_generation)
  return "$rc"
}
roll_back() {
  trap stop_later HUP INT TERM
  status rolling-back "cause=$1"
  echo "nixpush: rolling back: $1"
  ok=1
  if [ -n "$profile_set" ]; then
    [ -n "$created" ] || created=$(created_generation)
    if [ -n "$prev_gen" ]; then
      nix-env -p "$profile" --switch-generation "$prev_gen" 9>&- || ok=0
      if [ -n "$created" ]; then
        nix-env -p "$profile" --delete-generations "$created" 9>&- || ok=0
      fi
    else
      echo "nixpush: no previous generation of $profile"; ok=0
    fi
    if [ -x "$prev_profile/bin/switch-to-configuration" ]; then
      stc "$prev_profile" boot || ok=0
    fi
  fi
  if [ -n "$prev_current" ] && [ -x "$prev_current/bin/switch-to-configuration" ]; then
    stc "$prev_current" test || ok=0
  else
    echo "nixpush: no previous system to activate"; ok=0
  fi
  back=$(readlink -f "$running" 2>/dev/null)
  echo "nixpush: now running ${back:-nothing}"
  if [ "$ok" = 1 ] && [ "$back" = "$prev_current" ]; then
    status rolled-back "cause=$1"
  else
    status rollback-failed "cause=$1"
  fi
  exit 0
}
status activating
echo "nixpush: $action $new (was ${prev_current:-nothing})"
if [ -z "$commit" ] && { [ "$action" = switch ] || [ "$action" = boot ]; }; then
  set_profile
  rc=$?
  if [ "$rc" != 0 ]; then
    status failed "cause=setting the system profile failed (nix-env exited $rc)"
    exit 0
  fi
fi
stc "$new" "$first"
rc=$?
if [ "$rc" != 0 ]; then
  why="switch-to-configuration $first exited $rc"
  [ "$rc" = 124 ] && why="switch-to-configuration $first timed out after ${activation_timeout}s"
  [ "$rollback" = 1 ] && roll_back "$why"
  status failed "cause=$why"
  exit 0
fi
if [ "$rollback" != 1 ]; then
  status "done"
  exit 0
fi
: > "$dir/awaiting"
echo "nixpush: activated; rolling back unless confirmed within ${confirm_timeout}s"
status awaiting-confirmation "timeout=$confirm_timeout"
now
deadline=$((now + confirm_timeout))
polls=0  # the clock is read once a second, not at every poll
while [ -e "$dir/awaiting" ]; do
  polls=$((polls + 1))
  if [ $((polls % 5)) = 0 ]; then
    now
    [ "$now" -ge "$deadline" ] && break
  fi
  sleep 0.2
done
if mv "$dir/awaiting" "$dir/expired" 2>/dev/null; then
  roll_back "no confirmation within ${confirm_timeout}s"
fi
if [ ! -e "$dir/confirmed" ]; then
  roll_back "$(cat "$dir/reject-cause" 2>/dev/null || echo rejected)"
fi
echo "nixpush: confirmed"
if [ -n "$commit" ]; then
  status committing
  set_profile
  rc=$?
  [ "$rc" = 0 ] || roll_back "confirmed, but setting the system profile failed (nix-env exited $rc)"
  stc "$new" boot
  rc=$?
  [ "$rc" = 0 ] || roll_back "confirmed, but switch-to-configuration boot exited $rc"
  echo "nixpush: $new is the boot default"
fi
status confirmed
exit 0
}
nixpush_switch "$@"
