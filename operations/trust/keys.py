"""
The keys of the push and pull flows: where each host keeps them, and their public halves,
derived in memory on the controller from the sops values (never from a host, never written).

.. code:: python

    trust = builder_trust(specs, "nas", for_host="pi4")
    trust.ssh_public_key, trust.nix_public_key   # what pi4 authorizes and trusts
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from operations.core.process import find_program, run_local
from operations.core.runstate import current_run
from operations.trust.secrets import DEPLOY_KEY_PATH as DEPLOY_KEY_PATH
from operations.trust.secrets import SIGNING_KEY_PATH as SIGNING_KEY_PATH
from operations.trust.secrets import SecretError, decrypt_secret
from operations.trust.sops import Plaintext

if TYPE_CHECKING:
    from operations.data.fleet import HostSpec

# DEPLOY_KEY_PATH and SIGNING_KEY_PATH, where the builder keeps what it pushes with, are defined
# with the secrets (which decrypt them from nixpush's own sops file). Nix's `secret-key-files`
# is not set on the builder: the push deploy signs each closure explicitly
# (`nix store sign -k SIGNING_KEY_PATH`), so the daemon never needs the key.
# Where a target keeps its builder-client key for pull builds (its `secrets` data installs it).
PULL_KEY_PATH = "/root/.ssh/nixpush_builder"
# Ends each pulling target's key line on its builder: the key's owner, and nixpush's mark.
PULL_KEY_COMMENT = "nixpush-pull:"
# Where a builder with a pool (remote_builders) keeps its client key for the members (its
# `secrets` data installs it). Its line on a member ends in PULL_KEY_COMMENT too: the member's
# restricted account serves pulling targets and pool builders alike.
POOL_KEY_PATH = "/root/.ssh/nixpush_pool"

_KEY_TYPE = re.compile(r"(ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+)")
_SSH_KEY_FIX = "store an OpenSSH ed25519 private key there (ssh-keygen -t ed25519 -N '')"


def parse_public_key(line: str) -> tuple[str, str] | None:
    """``(type, base64)`` of the first key in an authorized_keys or known_hosts line, or None."""
    tokens = line.split()
    for index, token in enumerate(tokens[:-1]):
        if _KEY_TYPE.fullmatch(token):
            return token, tokens[index + 1]
    return None


def ssh_public_key(private_key: Plaintext) -> str:
    """
    The public key line (``ssh-ed25519 AAAA...``) of an OpenSSH private key, derived on the
    controller by ``ssh-keygen -y`` reading the key from its stdin. Raises ValueError.
    """
    # Kept on the run by digest: every target of a builder asks for the same one.
    derived = current_run().ssh_public_keys
    digest = hashlib.sha256(private_key.reveal().encode()).hexdigest()
    if digest in derived:
        return derived[digest]
    keygen = find_program("ssh-keygen")
    if keygen is None:
        raise ValueError("ssh-keygen is not installed on the controller; install OpenSSH's client")
    # -P "": a passphrase-protected key fails here instead of prompting mid-run.
    result = run_local(
        [keygen, "-y", "-P", "", "-f", "/dev/stdin"], input=private_key.reveal(), timeout=30
    )
    public = result.stdout.strip()
    if result.returncode != 0 or parse_public_key(public) is None:
        # ssh-keygen's stderr describes the format problem, never the key.
        raise ValueError(
            f"{private_key} is not an unencrypted OpenSSH private key ({result.stderr.strip()})"
        )
    derived[digest] = public
    return public


def nix_public_key(secret_key: Plaintext) -> str:
    """
    The public key of a Nix signing secret key (``name:base64``), computed in memory:
    what ``nix key convert-secret-to-public`` prints. A Nix secret key is libsodium's Ed25519
    secret key, seed then public key, so the public key is its last 32 bytes.
    Raises ValueError (without the key's text).
    """
    name, _, encoded = secret_key.reveal().strip().partition(":")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if not name or len(raw) != 64:
        raise ValueError(f"{secret_key} is not a Nix signing secret key (name:base64 of 64 bytes)")
    return f"{name}:{base64.b64encode(raw[32:]).decode()}"


def installed_secret(
    specs: Mapping[str, HostSpec], name: str, dest: str, for_host: str, missing: str, fix: str
) -> Plaintext:
    """
    The decrypted value of host ``name``'s secret installed at ``dest``; ``SecretError``
    naming ``for_host`` with ``missing`` and ``fix`` when ``name`` has none there.
    """
    for secret in specs[name].secrets:
        if secret.dest == dest:
            return decrypt_secret(specs[name], specs, secret)
    raise SecretError(for_host, dest, missing, fix)


def _derived(
    for_host: str, where: str, fix: str, derive: Callable[[Plaintext], str], value: Plaintext
) -> str:
    """``derive(value)``, a ValueError turned into ``SecretError`` naming the secret and fix."""
    try:
        return derive(value)
    except ValueError as e:
        raise SecretError(for_host, where, str(e), fix) from None


@dataclass(frozen=True)
class BuilderTrust:
    """What a target trusts of its builder, derived from the builder's secrets in memory."""

    ssh_public_key: str  # of the deploy key, for the target user's authorized_keys
    nix_public_key: str  # of the signing key, for the target's trusted-public-keys


def builder_trust(specs: Mapping[str, HostSpec], builder: str, for_host: str) -> BuilderTrust:
    """
    The public halves of ``builder``'s deploy key (``DEPLOY_KEY_PATH``) and Nix signing key
    (``SIGNING_KEY_PATH``), computed on the controller from their decrypted values. Raises
    ``SecretError`` naming ``for_host``, the secret and the fix.

    + specs: the fleet's specs (``check_fleet``)
    + builder: the target's builder (``spec.pushed_by``)
    + for_host: the target's name, for messages
    """

    def secret(dest: str) -> Plaintext:
        return installed_secret(
            specs,
            builder,
            dest,
            for_host,
            f"its builder {builder} has no secret installed at {dest}",
            f"add one to {builder}'s secrets (group_data/server.py, for the server root)",
        )

    deploy, signing = secret(DEPLOY_KEY_PATH), secret(SIGNING_KEY_PATH)
    return BuilderTrust(
        _derived(for_host, f"{deploy.label} (on {builder})", _SSH_KEY_FIX,
                 ssh_public_key, deploy),
        _derived(
            for_host, f"{signing.label} (on {builder})",
            "store a key from `nix key generate-secret --key-name NAME` there",
            nix_public_key, signing,
        ),
    )  # fmt: skip


def pull_client_key(specs: Mapping[str, HostSpec], target: str, for_host: str) -> str:
    """
    The public half of ``target``'s builder-client key (its secret at ``PULL_KEY_PATH``),
    derived in memory on the controller: ``type base64 nixpush-pull:<target>``
    (``PULL_KEY_COMMENT`` names the target). ``SecretError`` naming ``for_host``, the target
    and the fix.
    """
    value = installed_secret(
        specs,
        target,
        PULL_KEY_PATH,
        for_host,
        f"{target} pulls builds (builder_user) but has no secret installed at {PULL_KEY_PATH}",
        f"add its builder-client key to {target}'s secrets with dest {PULL_KEY_PATH}, "
        "or remove builder_user",
    )
    public = _derived(for_host, f"{value.label} (of {target})", _SSH_KEY_FIX,
                      ssh_public_key, value)  # fmt: skip
    kind, blob = public.split()[:2]
    return f"{kind} {blob} {PULL_KEY_COMMENT}{target}"


def pool_client_key(specs: Mapping[str, HostSpec], builder: str, member: str) -> str:
    """
    The public half of ``builder``'s client key for its pool (its secret at ``POOL_KEY_PATH``),
    derived in memory on the controller: ``type base64 nixpush-pull:<builder>``. ``SecretError``
    naming ``member``, the builder and the fix.
    """
    value = installed_secret(
        specs,
        builder,
        POOL_KEY_PATH,
        member,
        f"{builder} builds on {member} (remote_builders) but has no secret installed at "
        f"{POOL_KEY_PATH}",
        f"add its pool client key to {builder}'s secrets with dest {POOL_KEY_PATH}, or "
        f"remove {member} from its remote_builders",
    )
    public = _derived(member, f"{value.label} (of {builder})", _SSH_KEY_FIX,
                      ssh_public_key, value)  # fmt: skip
    kind, blob = public.split()[:2]
    return f"{kind} {blob} {PULL_KEY_COMMENT}{builder}"
