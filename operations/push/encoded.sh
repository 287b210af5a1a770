# nixpush encoded output (operations/push/encoded.sh): a command's output as hex.
# shellcheck shell=sh
# POSIX sh, run by `sh -c`: the command and its arguments, positional.
# Runs the command (stdin empty, stderr into stdout) and prints @@nixpush-bytes@@, then its
# output as hex (`od`, POSIX): the controller's SSH reader takes only UTF-8, and a line of any
# other bytes would end its reading there, losing every line after it (the marks and the
# status with them). Exits with the command's status.
exec 3>&1
echo "@@nixpush-bytes@@"
rc=$( { { "$@" </dev/null 2>&1; echo "$?" >&4; } | od -An -v -tx1 >&3; } 4>&1 )
exit "$rc"
