"""The one place nixpush runs processes on the controller (where pyinfra runs).

Commands are argument lists, never shell strings, so no value is ever parsed by a shell.
Anything secret goes in ``input`` (the process's stdin): argv and the environment of a process
are visible to every user of the machine (``/proc/PID/cmdline``, ``ps e``).
Tests patch ``run_local`` to assert exact argument lists.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path


def run_local(
    args: Sequence[str],
    *,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = False,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """
    Run ``args`` on the controller and capture its output as text.

    + args: the program and its arguments; a list, never a shell string
    + input: text for the process's stdin (the only way to hand it a secret); else stdin is empty
    + env: variables added to (or replacing) the controller's environment for this process
    + check: raise ``subprocess.CalledProcessError`` on a non-zero exit
    + timeout: seconds before the process is killed and ``subprocess.TimeoutExpired`` raised

    .. code:: python

        result = run_local(["ssh-keygen", "-y", "-f", "/dev/stdin"], input=private_key)
        result.returncode, result.stdout
    """
    if isinstance(args, str):
        raise TypeError(f"run_local takes an argument list, not the string {args!r}")
    merged = None if env is None else {**os.environ, **env}
    return subprocess.run(
        list(args),
        input=input if input is not None else "",
        env=merged,
        text=True,
        capture_output=True,
        check=check,
        timeout=timeout,
    )


def find_program(name: str) -> str | None:
    """
    The path of program ``name``: on PATH, else next to the running Python (a virtualenv's
    ``bin``, which is not on PATH when the venv's pyinfra is run without activating it).

    .. code:: python

        find_program("sops")  # "/tmp/venv/bin/sops"
    """
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None
