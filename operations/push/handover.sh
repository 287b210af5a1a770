# nixpush: one function of install.sh, switch.sh and prune.sh (each holds the line
# `# nixpush: include handover.sh`, which operations/push/programs.py replaces with this file).
# The host's lock ($l), just taken, is still being handed to the program of run `id` (not
# `me`), which is alive.
# shellcheck disable=SC2154 # l and me are the including program's
handed_over() {
  h='' o=''
  while IFS= read -r x; do
    case $x in id=*) h=${x#id=} ;; handover=1) o=1 ;; esac
  done < "$l"
  [ -n "$o" ] && [ -n "$h" ] && [ "$h" != "${me:-}" ] && [ -f "${l%/*}/$h/pid" ] || return 1
  read -r p < "${l%/*}/$h/pid" || return 1
  [ -n "$p" ] && [ -d "/proc/$p" ]
}
