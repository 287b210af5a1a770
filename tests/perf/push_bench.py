"""
Wall time of nixpush's push deploy on the bench, next to the same steps done by hand with bare
ssh and nix commands, in the same run: cold deploy and no-change run, for 1 and 2 Pis.

    .venv/bin/python -m tests.perf.push_bench [--rounds 3]

Needs the bench up, the NAS prepared and the push keys installed (tests/demo.sh does all
three). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import time
import uuid
from collections.abc import Callable, Sequence

from operations.ssh import BUILDER_KNOWN_HOSTS
from tests.bench import fleet
from tests.bench.client import BENCH_INVENTORY, prepare_push, pyinfra, ssh

NIX = "nix --extra-experimental-features 'nix-command flakes'"


def bump(names: Sequence[str]) -> None:
    """A never-built version for each named Pi: the next deploy of it is cold."""
    text = (fleet.FLAKE_DIR / "hosts.nix").read_text()
    configs = {h.name: {"system": h.system, "version": "1"} for h in fleet.PIS}
    configs["armv7"] = {"system": "armv7l-linux", "version": "1"}
    for line in text.splitlines():
        for name in configs:
            if line.strip().startswith(f"{name} = ") and 'version = "' in line:
                configs[name]["version"] = line.split('version = "', 1)[1].split('"', 1)[0]
    for name in names:
        configs[name]["version"] = f"perf-{uuid.uuid4().hex[:8]}"
    fleet.set_flake_configs(dict(configs))  # type: ignore[arg-type]


def nixpush(names: Sequence[str]) -> None:
    limit = [arg for name in names for arg in ("--limit", name)]
    result = pyinfra("-y", BENCH_INVENTORY, "deploys/pi.py", *limit)
    if result.returncode != 0:
        raise SystemExit(result.stdout + result.stderr)


def bare(names: Sequence[str]) -> None:
    """The same flow with bare commands, one after another per Pi, as a script would."""
    for name in names:
        pi = fleet.host(name)
        attr = f"{fleet.flake_ref()}#nixosConfigurations.{name}.config.system.build.toplevel"
        path = ssh("nas", f"{NIX} eval --raw {shlex.quote(attr + '.outPath')}").stdout.strip()
        now = ssh(name, "readlink -f /run/current-system || true", check=False).stdout.strip()
        if now == path:
            continue
        ssh("nas", f"{NIX} build {shlex.quote(attr)} --no-link")
        ssh("nas", f"{NIX} store sign -k /etc/nixpush/signing-key.sec -r {path}")
        opts = (
            f"-p {pi.port} -i /etc/nixpush/deploy_ed25519 -o IdentitiesOnly=yes "
            f"-o UserKnownHostsFile={BUILDER_KNOWN_HOSTS} -o StrictHostKeyChecking=yes"
        )
        ssh(
            "nas",
            f"NIX_SSHOPTS={shlex.quote(opts)} {NIX} copy --to ssh-ng://{pi.user}@{pi.ip} {path}",
        )
        ssh(name, f"sudo {path}/bin/switch-to-configuration dry-activate >/dev/null")
        ssh(name, f"sudo nix-env -p /nix/var/nix/profiles/system --set {path}")
        ssh(name, f"sudo {path}/bin/switch-to-configuration switch >/dev/null")


def timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    fleet.up()
    prepare_push()
    print(f"{'case':<26}{'nixpush s':>11}{'bare s':>9}{'ratio':>8}")
    for names in (["pi4"], ["pi4", "pi5"]):
        for case in ("cold", "no change"):
            ours, theirs = [], []
            for _ in range(rounds):
                for runner, into in ((nixpush, ours), (bare, theirs)):
                    if case == "cold":
                        bump(names)
                    else:
                        nixpush(names)  # converge first
                    into.append(timed(lambda r=runner, n=names: r(n)))
            a, b = statistics.median(ours), statistics.median(theirs)
            label = f"{case}, {len(names)} Pi{'s' if len(names) > 1 else ''}"
            print(f"{label:<26}{a:>11.2f}{b:>9.2f}{a / b:>8.2f}")


if __name__ == "__main__":
    main()
