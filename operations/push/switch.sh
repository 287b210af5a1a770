# nixpush activation (operations/push/switch.sh), detached from the SSH session.
# shellcheck shell=sh
# POSIX sh, run as root, every value positional: dir action new generation rollback
# confirm_timeout activation_timeout. `generation` (a number) switches the profile to an
# existing generation (deploy_action=rollback) instead of adding one for `new`.
dir=$1 action=$2 new=$3 generation=$4 rollback=$5 confirm_timeout=$6 activation_timeout=$7
profile=/nix/var/nix/profiles/system
PATH=$PATH:/run/current-system/sw/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
export PATH
cd /
status() {
  { echo "state=$1"; shift; for line in "$@"; do echo "$line"; done; } > "$dir/status.new"
  mv -f "$dir/status.new" "$dir/status"
}
generation_of() { g=${1#system-}; echo "${g%-link}"; }
prev_current=$(readlink -f /run/current-system 2>/dev/null)
prev_profile=$(readlink -f "$profile" 2>/dev/null)
prev_gen=$(generation_of "$(readlink "$profile" 2>/dev/null)")
new_gen=
status activating
echo "nixpush: $action $new (was ${prev_current:-nothing})"
stc() { timeout "$activation_timeout" "$1/bin/switch-to-configuration" "$2"; }
roll_back() {
  status rolling-back "cause=$1"
  echo "nixpush: rolling back: $1"
  ok=1
  if [ "$action" != test ]; then
    if [ -n "$prev_gen" ]; then
      nix-env -p "$profile" --switch-generation "$prev_gen" || ok=0
      if [ -z "$generation" ] && [ -n "$new_gen" ] && [ "$new_gen" != "$prev_gen" ]; then
        nix-env -p "$profile" --delete-generations "$new_gen" || ok=0
      fi
    else
      echo "nixpush: no previous generation of $profile"; ok=0
    fi
  fi
  if [ -n "$prev_current" ] && [ -x "$prev_current/bin/switch-to-configuration" ]; then
    if [ "$action" = test ] || [ "$prev_current" != "$prev_profile" ]; then
      stc "$prev_current" test || ok=0
      if [ "$action" != test ] && [ -x "$prev_profile/bin/switch-to-configuration" ]; then
        stc "$prev_profile" boot || ok=0
      fi
    else
      stc "$prev_current" switch || ok=0
    fi
  else
    echo "nixpush: no previous system to activate"; ok=0
  fi
  now=$(readlink -f /run/current-system 2>/dev/null)
  echo "nixpush: now running ${now:-nothing}"
  if [ "$ok" = 1 ] && [ "$now" = "$prev_current" ]; then
    status rolled-back "cause=$1"
  else
    status rollback-failed "cause=$1"
  fi
  exit 0
}
case $action in
  switch|boot)
    if [ -n "$generation" ]; then
      nix-env -p "$profile" --switch-generation "$generation"
    else
      nix-env -p "$profile" --set "$new"
    fi
    rc=$?
    if [ "$rc" != 0 ]; then
      status failed "cause=setting the system profile failed (nix-env exited $rc)"
      exit 0
    fi
    new_gen=$(generation_of "$(readlink "$profile" 2>/dev/null)")
    ;;
esac
stc "$new" "$action"
rc=$?
if [ "$rc" != 0 ]; then
  why="switch-to-configuration $action exited $rc"
  [ "$rc" = 124 ] && why="switch-to-configuration $action timed out after ${activation_timeout}s"
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
deadline=$(( $(date +%s) + confirm_timeout ))
polls=0  # the clock is read once a second, not at every poll
while [ -e "$dir/awaiting" ]; do
  polls=$((polls + 1))
  if [ $((polls % 5)) = 0 ] && [ "$(date +%s)" -ge "$deadline" ]; then break; fi
  sleep 0.2
done
if mv "$dir/awaiting" "$dir/expired" 2>/dev/null; then
  roll_back "no confirmation within ${confirm_timeout}s"
fi
if [ -e "$dir/confirmed" ]; then
  echo "nixpush: confirmed"
  status confirmed
  exit 0
fi
roll_back "$(cat "$dir/reject-cause" 2>/dev/null || echo rejected)"
