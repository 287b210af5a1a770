"""nixpush's own sops file on the bench: the builder's push and signing keys (the same values
as the bench's shared ``secrets.yaml``) in a file of their own, encrypted with the real sops to
the bench's age key (the owner's) and, to test the refusal, to a pushed host's key too.

.. code:: python

    write_push_keys(OWN_FILE)                                   # the owner's key only
    write_push_keys(path, [ssh_to_age(pi4_host_key)])           # pi4 could decrypt it
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from operations.core.process import run_local
from tests.bench import sops as bench_sops

OWN_FILE = bench_sops.SOPS_DIR / "nixpush-secrets.yaml"
PUSH_KEYS = ("ssh/nas_deploy", "nix/nas_signing_key")


def write_push_keys(path: Path, extra_recipients: Sequence[str] = ()) -> None:
    """Write ``path``: the push and signing keys, encrypted to the bench's age key and
    ``extra_recipients`` (age recipients), atomically."""
    bench_sops.ensure()
    document: dict[str, dict[str, str]] = {}
    for key in PUSH_KEYS:
        section, name = key.split("/")
        document.setdefault(section, {})[name] = bench_sops.value(key)
    recipients = [bench_sops.age_recipient(bench_sops.AGE_KEY_FILE), *extra_recipients]
    result = run_local(
        [
            bench_sops.sops_program(), "--disable-version-check", "--encrypt",
            "--age", ",".join(recipients),
            "--input-type", "yaml", "--output-type", "yaml", "/dev/stdin",
        ],
        input=json.dumps(document),
        check=True,
    )  # fmt: skip
    partial = path.with_name(path.name + ".partial")
    partial.write_text(result.stdout)
    partial.replace(path)
