#!/bin/sh
# The bench's stand-in for systemd-boot's bootctl, on bench hosts' PATH (/usr/local/sbin):
# the EFI variables it would write are files in the host's /boot/loader, which boot.sh reads.
# The machine has no EFI: nothing here could touch its firmware.
set -eu
loader=/boot/loader
case "${1:-}" in
  is-installed)
    if [ -f "$loader/loader.conf" ]; then echo yes; else echo no; exit 1; fi ;;
  --print-esp-path|--print-boot-path)
    echo /boot ;;
  set-oneshot|set-default)
    [ $# -eq 2 ] || { echo "usage: bootctl $1 ENTRY" >&2; exit 1; }
    file=$loader/oneshot
    [ "$1" = set-default ] && file=$loader/efi-default
    if [ -z "$2" ]; then
      rm -f "$file"
    elif [ -f "$loader/entries/$2" ]; then
      echo "$2" > "$file.new" && mv "$file.new" "$file"
    else
      echo "bootctl: no boot entry $2" >&2
      exit 1
    fi ;;
  *)
    echo "bench bootctl: unsupported: $*" >&2
    exit 1 ;;
esac
