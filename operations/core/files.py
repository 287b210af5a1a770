"""
Files nixpush writes, on hosts and on the controller, always atomically: the facts that read
them back (one marker line for "a file is here"), the commands that replace them through
stdin, and ``lines_in_file``, the one way a small line-based file is kept in shape.

.. code:: python

    yield write_file("/root/.nixpush/known_hosts", text, "root", "root", 0o644)
    yield from lines_in_file(path, lines, owner="root", group="root", mode=0o644, what="...")
"""

from __future__ import annotations

import base64
import os
import posixpath
import tempfile
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pyinfra.api.command import PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.facts import FactBase
from pyinfra.context import host
from typing_extensions import override

# Account names' grammar lives in operations.core.grammar; modules import it from here too.
from operations.core.grammar import ACCOUNT_NAME as ACCOUNT_NAME

# What a fact command prints before a file's details, and for a path that is not a regular
# file: the line that tells "here it is" from output that merely looks like a file.
FILE_MARK = "nixpush: file"
OTHER_MARK = "nixpush: not a regular file"
# First line of every file nixpush generates on a host (binfmt.d confs, machines, units).
MANAGED_HEADER = "# managed by nixpush"


# -- facts -----------------------------------------------------------------------------


class LinesFact(FactBase[list[str]]):
    """A fact whose answer is the command's output lines; no output (or a missing command) is
    the empty list. Subclasses give ``command()`` and may filter in ``process()``."""

    @override
    @staticmethod
    def default() -> list[str]:
        return []

    @override
    def process(self, output: list[str]) -> list[str]:
        return output


@dataclass(frozen=True)
class FileState:
    """What a destination is now: a regular file's mode, owner, group and content hash."""

    regular: bool
    mode: int | None = None
    owner: str | None = None
    group: str | None = None
    sha256: str | None = None


class SecretFile(FactBase[FileState | None]):
    """
    A destination's state without its content: ``FileState(regular=True, mode=0o600,
    owner="root", group="root", sha256="...")``; ``regular=False`` for a directory, symlink or
    other non-file; None when nothing is there.
    """

    @override
    def command(self, path: str) -> StringCommand:
        p = QuoteString(path)
        return StringCommand(
            "if [ -L", p, "] || { [ -e", p, "] && [ ! -f", p, "]; }; then echo",
            QuoteString(OTHER_MARK),
            "; elif [ -f", p, "]; then echo", QuoteString(FILE_MARK),
            "&& stat -c '%a %U %G'", p, "&& sha256sum <", p,
            "; fi || true",
        )  # fmt: skip

    @override
    def process(self, output: list[str]) -> FileState | None:
        if not output:
            return None
        if output[0] == OTHER_MARK:
            return FileState(regular=False)
        if output[0] != FILE_MARK or len(output) < 3:
            return None
        mode, owner, group = output[1].split()
        return FileState(
            regular=True, mode=int(mode, 8), owner=owner, group=group, sha256=output[2].split()[0]
        )


@dataclass(frozen=True)
class LineFile:
    """A small text file: its mode, owner, group and lines."""

    mode: int
    owner: str
    group: str
    lines: tuple[str, ...]


class LinesOfFile(FactBase[LineFile | None]):
    """A regular file's ``LineFile``; None when it is missing, a symlink or not a regular file.

    ``as_user`` reads it as that account (``runuser``), for a file in a directory the account
    owns: root never follows a link the account put there (to ``/etc/shadow``, say)."""

    @override
    def command(self, path: str, as_user: str | None = None) -> StringCommand:
        p = QuoteString(path)
        return as_account(
            as_user,
            StringCommand(
                "if [ -f", p, "] && [ ! -L", p, "]; then echo", QuoteString(FILE_MARK),
                "&& stat -c '%a %U %G'", p, "&& cat", p, "; fi || true",
            ),
        )  # fmt: skip

    @override
    def process(self, output: list[str]) -> LineFile | None:
        if len(output) < 2 or output[0] != FILE_MARK:
            return None
        mode, owner, group = output[1].split()
        return LineFile(int(mode, 8), owner, group, tuple(output[2:]))


class UnsafeDirectories(LinesFact):
    """
    The directories above ``path`` (symlinks resolved) that someone other than root could
    change: not owned by root, or writable by group or others (sticky or not), each as
    ``"/srv/drop (owner nobody, mode 0777)"``; ``[]`` when only root can. sshd's StrictModes
    rule: whoever can write a directory can swap a file in it for a symlink while root writes.
    """

    @override
    def command(self, path: str) -> StringCommand:
        return StringCommand(
            "d=$(readlink -m --", QuoteString(posixpath.dirname(path)), ");",
            'while :; do if [ -e "$d" ]; then stat -L -c', QuoteString("%u %U %a %n"),
            '-- "$d"; fi; [ "$d" = / ] && break; d=$(dirname -- "$d"); done',
        )  # fmt: skip

    @override
    def process(self, output: list[str]) -> list[str]:
        unsafe = []
        for line in output:
            parts = line.split(maxsplit=3)
            if len(parts) != 4 or not parts[0].isdecimal():
                continue
            uid, owner, mode, path = parts
            if uid != "0" or int(mode, 8) & 0o022:
                unsafe.append(f"{path} (owner {owner}, mode {int(mode, 8):04o})")
        return unsafe


class FileText(FactBase[str | None]):
    """The exact text of a file, None if it is missing: base64 keeps it byte for byte
    (trailing spaces, a missing final newline)."""

    @override
    def command(self, path: str) -> StringCommand:
        return StringCommand(
            "if [ -f", QuoteString(path), "]; then echo", QuoteString(FILE_MARK),
            "&& base64", QuoteString(path), "; fi || true",
        )  # fmt: skip

    @override
    def process(self, output: list[str]) -> str | None:
        if not output or output[0] != FILE_MARK:
            return None
        return base64.b64decode("".join(output[1:])).decode()


# -- commands --------------------------------------------------------------------------


def _owner_spec(owner: str, group: str | None) -> str:
    # `user:` (empty group) is chown's "the user's login group".
    return f"{owner}:{group or ''}"


def as_account(user: str | None, command: StringCommand) -> StringCommand:
    """``command`` run as ``user`` (``runuser -u USER -- sh -c ...``), or as is for None: for
    files in a directory ``user`` owns, so the account can only ever harm itself."""
    if user is None:
        return command
    return StringCommand("runuser -u", QuoteString(user), "-- sh -c", QuoteString(command))


def temp_prefix(dest: str) -> str:
    """Where nixpush's temp files for ``dest`` start: ``/run/s/.key.nixpush-``."""
    return posixpath.join(posixpath.dirname(dest), f".{posixpath.basename(dest)}.nixpush-")


def replace_file(
    dest: str,
    content: str,
    settle: StringCommand,
    *,
    parent_mode: int = 0o700,
    backup: str | None = None,
    as_user: str | None = None,
) -> StringCommand:
    """
    Replace ``dest`` atomically with ``content``, which travels on the command's stdin only.

    + settle: what makes the temp file (``"$tmp"``) right before the rename: chown, chmod
    + parent_mode: mode of parent directories it creates (owned by whoever runs it)
    + backup: hard-link the previous ``dest`` here first (removed when there was none)
    + as_user: run all of it as this account (``as_account``)

    Leftovers of an earlier write that was cut off (``temp_prefix(dest)`` + six characters)
    are removed first. The temp file is created in ``dest``'s directory under umask 077, so
    it is never readable by others, settled, flushed to disk (``sync FILE``: fsync), then
    renamed over ``dest``. The command line holds paths, never the content: base64 on stdin
    keeps it byte for byte (pyinfra appends a newline to stdin that doesn't end in one).
    """
    parent = posixpath.dirname(dest)
    prefix = temp_prefix(dest)
    encoded = base64.b64encode(content.encode()).decode()
    keep: list[object] = []
    if backup is not None:
        d, b = QuoteString(dest), QuoteString(backup)
        keep = ["&& { if [ -e", d, "]; then ln -fT", d, b, "; else rm -f --", b, "; fi; }"]
    command = StringCommand(
        f"umask {0o777 & ~parent_mode:03o} && mkdir -p --", QuoteString(parent),
        "&& umask 077 && rm -f --", StringCommand(QuoteString(prefix), "??????", _separator=""),
        "&& tmp=$(mktemp", QuoteString(f"{prefix}XXXXXX"), ") && {",
        'base64 -d > "$tmp"', "&&", settle, '&& sync -- "$tmp"', *keep,
        '&& mv -fT "$tmp"', QuoteString(dest),
        '|| { rm -f "$tmp"; exit 1; }; }',
    )  # fmt: skip
    return StringCommand(as_account(as_user, command), _stdin=encoded)


def write_file(
    dest: str,
    content: str,
    owner: str,
    group: str | None,
    mode: int,
    *,
    as_user: str | None = None,
) -> StringCommand:
    """
    Replace ``dest`` atomically with ``content`` (``replace_file``), owned by
    ``owner``:``group`` with ``mode``.

    Parent directories it creates belong to root: 0700 for a root-only file, 0711 otherwise
    (search only), so a non-root owner reaches its file by path and nobody can list them.
    ``as_user`` writes as that account instead, which then owns the file (``group`` unused).
    """
    if as_user is not None:
        return replace_file(dest, content, chmod_file('"$tmp"', mode, raw=True), as_user=as_user)
    settle = StringCommand(
        "chown --", QuoteString(_owner_spec(owner, group)), '"$tmp"',
        "&&", chmod_file('"$tmp"', mode, raw=True),
    )  # fmt: skip
    root_only = owner == "root" and group in ("root", None)
    return replace_file(dest, content, settle, parent_mode=0o700 if root_only else 0o711)


def chown_file(dest: str, owner: str, group: str | None) -> StringCommand:
    # -h: a symlink put in dest's place is changed itself, never what it points at.
    return StringCommand("chown -h --", QuoteString(_owner_spec(owner, group)), QuoteString(dest))


def chmod_file(dest: str, mode: int, *, raw: bool = False) -> StringCommand:
    return StringCommand(f"chmod {mode:04o}", dest if raw else QuoteString(dest))


def lines_in_file(
    path: str,
    lines: Sequence[str],
    current: LineFile | None,
    *,
    owner: str,
    group: str | None,
    mode: int,
    what: str,
    as_user: str | None = None,
) -> Generator[PyinfraCommand, None, None]:
    """
    Make ``path`` hold exactly ``lines``, owned by ``owner``:``group`` (None: the group is
    left as it is, or the owner's login group for a new file) with ``mode``. Equal: noop
    ``"{path} already {what}"``; only owner or mode differ: chown / chmod; else an atomic write.

    + current: what is there now, ``host.get_fact(LinesOfFile, path=path)`` (callers read it
      anyway, to compute ``lines``)
    + as_user: the account owning ``path``'s directory (its ``~/.ssh``): every change is made
      as that account, never by root through a link it put there; a file it does not own is
      replaced by one it does

    .. code:: python

        current = host.get_fact(LinesOfFile, path=path)
        yield from lines_in_file(path, [*kept, line], current, owner="root", group="root",
                                 mode=0o644, what="lists the builder")
    """
    if current is not None and current.lines == tuple(lines):
        owner_ok = current.owner == owner and (group is None or current.group == group)
        if owner_ok and current.mode == mode:
            host.noop(f"{path} already {what}")
            return
        if as_user is None:
            if not owner_ok:
                yield chown_file(path, owner, group)
            if current.mode != mode:
                yield chmod_file(path, mode)
            return
        if owner_ok:
            yield as_account(as_user, chmod_file(path, mode))
            return
    text = "".join(f"{line}\n" for line in lines)
    yield write_file(path, text, owner, group, mode, as_user=as_user)


# -- on the controller -----------------------------------------------------------------


def write_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace ``path`` on the controller with ``text`` so readers see the old or the new file,
    never a part."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def make_dirs(path: Path, mode: int) -> None:
    """Create ``path`` and its missing parents with ``mode`` exactly (whatever the umask);
    directories already there are left as they are."""
    missing = [d for d in (path, *path.parents) if not d.exists()]
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        os.chmod(directory, mode)


def create_text_file(path: Path, mode: int) -> IO[str]:
    """Open ``path`` for writing, created or emptied, with ``mode`` exactly (whatever the umask)."""
    handle = open(path, "w", encoding="utf-8")  # the caller closes it
    os.fchmod(handle.fileno(), mode)
    return handle
