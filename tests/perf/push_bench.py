"""
Wall time of nixpush's push deploy on the bench, next to the same steps done by hand with bare
ssh and nix commands one Pi after another, in the same run.

    .venv/bin/python -m tests.perf.push_bench [--rounds 3]
    .venv/bin/python -m tests.perf.push_bench --pis 8 [--max-sessions 10] [--rounds 3]
    .venv/bin/python -m tests.perf.push_bench --scale 1,2,4,8,16 [--weight heavy] [--rounds 3]

Without ``--pis``: cold deploy and no-change run of 1 and 2 Pis. With ``--pis N`` the bench is
brought up with N Pis on its one builder (``python -m tests.bench up --pis N``) and the cases
are: cold with every Pi's configuration distinct, cold with one configuration shared (one per
Nix system: the aarch64 Pis share one, the armv7l Pis another), and no change.
``--max-sessions`` sets the builder's sshd MaxSessions first (OpenSSH's default is 10).
``--scale`` runs those cases, and no change with an empty evaluation cache (the first run after
the flake changed, with every target already on its system), for each fleet size in turn, with
the test flake's shared
library at ``--weight`` (default heavy: about a second and a few hundred MB to evaluate), and
also times the builder's evaluation alone: one ``nix eval`` of 1 target's toplevel and one of
all N, under ``/usr/bin/time`` on the builder (wall seconds, peak RSS).

A no-change case with the cache follows one untimed nixpush run (the run before, whose
evaluation the cache keeps). Per case it prints the median wall time of each way, their ratio
(only when every run passed), whether EVERY run passed (exit code 0 and every Pi on its desired
system afterwards) and the pyinfra controller's peak RSS (largest over the rounds), then why
runs failed. Only public
tools are timed: the pyinfra CLI, ssh and nix. Needs the bench's Debian packages; prepares the
NAS and the push keys itself. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from operations.push.commands import batch_eval_command
from operations.trust.ssh import BUILDER_KNOWN_HOSTS
from tests.bench import fleet
from tests.bench import sops as bench_sops
from tests.bench.client import BENCH_INVENTORY, REPO, prepare_push, pyinfra_argv, ssh

NIX = "nix --extra-experimental-features 'nix-command flakes'"
# Which configuration each Pi deploys: Pi name -> attribute under nixosConfigurations.
Configs = Mapping[str, str]


@dataclass
class Run:
    """One timed run of one way of deploying."""

    seconds: float
    passed: bool
    why: list[str] = field(default_factory=list)
    peak_rss_kib: int | None = None


@dataclass(frozen=True)
class Case:
    label: str
    pis: tuple[str, ...]
    cold: bool
    shared: bool = False
    # The controller's evaluation cache (operations/push/evalcache.py): kept from run to run,
    # as a user has it, or empty for every run (the first run after the flake changed).
    cache: bool = True


def own_configs(pis: Sequence[str]) -> dict[str, str]:
    return {pi: pi for pi in pis}


def shared_configs(pis: Sequence[str]) -> dict[str, str]:
    """One configuration per Nix system, shared by every Pi of that system."""
    return {pi: f"shared-{fleet.host(pi).system}" for pi in pis}


def bump(configs: Configs) -> None:
    """A never-built version of each configuration used: the next deploy of them is cold."""
    flake = fleet.flake_configs()
    run_id = uuid.uuid4().hex[:8]
    for pi, config in configs.items():
        current = flake.get(config, {"system": fleet.host(pi).system})
        flake[config] = {**current, "version": f"perf-{run_id}"}
    fleet.set_flake_configs(flake)


def desired_systems(configs: Configs) -> dict[str, str]:
    """Each Pi's desired toplevel, as the builder evaluates the flake (one nix eval)."""
    apply = "cs: builtins.mapAttrs (n: c: c.config.system.build.toplevel.outPath) cs"
    command = [
        *shlex.split(NIX), "eval", "--json",
        f"{fleet.flake_ref()}#nixosConfigurations", "--apply", apply,
    ]  # fmt: skip
    paths = json.loads(ssh(fleet.BUILDER, shlex.join(command)).stdout)
    return {pi: paths[config] for pi, config in configs.items()}


def current_system(pi: str) -> str:
    return ssh(pi, "readlink -f /run/current-system || true", check=False).stdout.strip()


def off_target(configs: Configs) -> list[str]:
    """Why the Pis are not all on their desired systems (nothing when they are)."""
    wanted = desired_systems(configs)
    wrong = [pi for pi in configs if current_system(pi) != wanted[pi]]
    return [f"not on their desired system: {', '.join(wrong)}"] if wrong else []


def shared_inventory(configs: Configs) -> str:
    """An inventory file: the bench's, with ``nixos_config`` set per Pi; returns its path."""
    groups = sorted({root for h in fleet.HOSTS for root in h.roots})
    extra = {pi: {"nixos_config": config} for pi, config in configs.items()}
    path = fleet.BENCH_DIR / "perf" / "shared_inventory.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '"""The bench inventory, Pis sharing configurations (tests/perf/push_bench.py)."""\n\n'
        "from tests.bench import inventory as _bench\n\n"
        f"_EXTRA = {extra!r}\n"
        + "".join(f"{g} = _bench._overlay(_bench.{g}, _EXTRA)\n" for g in groups)
    )
    return str(path)


def nixpush(
    configs: Configs,
    inventory: str,
    limit: bool,
    cache: bool = True,
    extra_env: Mapping[str, str] | None = None,
    command: Sequence[str] = ("deploys/pi.py",),
) -> Run:
    """``pyinfra -y <inventory> deploys/pi.py`` as a user runs it, timed, with its peak RSS;
    without ``cache``, with an empty evaluation cache; ``command`` instead of the deploy
    (``exec -- true``: pyinfra's own floor on the same hosts)."""
    limits = [arg for pi in configs for arg in ("--limit", pi)] if limit else []
    argv = pyinfra_argv("-y", inventory, *command, *limits)
    env = {**bench_sops.env(), **(extra_env or {})}
    with tempfile.TemporaryFile(mode="w+") as out, tempfile.TemporaryDirectory() as empty:
        if not cache:
            env["NIXPUSH_CACHE_DIR"] = empty
        start = time.perf_counter()
        child = subprocess.Popen(
            argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip
        # wait4, not wait: the child's own rusage (RUSAGE_CHILDREN of this process would
        # be the maximum over every child so far).
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read()
    why = [] if child.returncode == 0 else [f"exit code {child.returncode}", *causes(output)]
    return Run(seconds, child.returncode == 0, why, usage.ru_maxrss)


def causes(output: str) -> list[str]:
    """What a failed pyinfra run says went wrong: summary failures and SSH channel errors."""
    found = []
    for line in output.splitlines():
        line = line.strip()
        if (": failed: " in line or "ChannelException(" in line) and line not in found:
            found.append(line)
    return found


def bare(configs: Configs) -> Run:
    """The same flow with bare commands, one Pi after another, as a script would."""
    start = time.perf_counter()
    why = []
    for pi, config in configs.items():
        try:
            bare_deploy(pi, config)
        except subprocess.CalledProcessError as error:
            why.append(f"{pi}: {shlex.join(error.cmd)} exited {error.returncode}")
    return Run(time.perf_counter() - start, not why, why)


def bare_deploy(name: str, config: str) -> None:
    """Eval, build, sign, copy, dry-activate and switch one Pi with ssh and nix."""
    pi = fleet.host(name)
    attr = f"{fleet.flake_ref()}#nixosConfigurations.{config}.config.system.build.toplevel"
    path = ssh(fleet.BUILDER, f"{NIX} eval --raw {shlex.quote(attr + '.outPath')}").stdout.strip()
    if current_system(name) == path:
        return
    ssh(fleet.BUILDER, f"{NIX} build {shlex.quote(attr)} --no-link")
    ssh(fleet.BUILDER, f"{NIX} store sign -k /root/.nixpush/signing-key.sec -r {path}")
    opts = (
        f"-p {pi.port} -i /root/.nixpush/deploy_ed25519 -o IdentitiesOnly=yes "
        f"-o UserKnownHostsFile={BUILDER_KNOWN_HOSTS} -o StrictHostKeyChecking=yes"
    )
    ssh(
        fleet.BUILDER,
        f"NIX_SSHOPTS={shlex.quote(opts)} {NIX} copy --to ssh-ng://{pi.user}@{pi.ip} {path}",
    )
    ssh(name, f"sudo {path}/bin/switch-to-configuration dry-activate >/dev/null")
    ssh(name, f"sudo nix-env -p /nix/var/nix/profiles/system --set {path}")
    ssh(name, f"sudo {path}/bin/switch-to-configuration switch >/dev/null")


def measure(case: Case, rounds: int, limit: bool) -> tuple[list[Run], list[Run]]:
    """``rounds`` runs of each way, interleaved; each checked against the desired systems."""
    configs = shared_configs(case.pis) if case.shared else own_configs(case.pis)
    inventory = shared_inventory(configs) if case.shared else BENCH_INVENTORY
    ways: tuple[tuple[Callable[[], Run], list[Run]], ...] = (
        (lambda: nixpush(configs, inventory, limit, case.cache), []),
        (lambda: bare(configs), []),
    )
    if not case.cold and case.cache:
        bare(configs)
        nixpush(configs, inventory, limit)  # untimed: the run before, which the cache keeps
    for _ in range(rounds):
        for way, runs in ways:
            if case.cold:
                bump(configs)
            else:
                bare(configs)  # converge first, the reliable way
            run = way()
            wrong = off_target(configs)
            if wrong:
                run.passed = False
                run.why += wrong
            runs.append(run)
    return ways[0][1], ways[1][1]


def eval_cost(configs: Sequence[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one batched ``nix eval`` of ``configs`` on the
    builder, as nixpush runs it."""
    command = batch_eval_command(fleet.flake_ref(), list(configs)).get_raw_value()
    out = ssh(fleet.BUILDER, f"/usr/bin/time -f 'nixpush-time %e %M' {command} >/dev/null").stderr
    line = next(line for line in out.splitlines() if line.startswith("nixpush-time "))
    _, seconds, kib = line.split()
    return float(seconds), int(kib) / 1024


def scale(sizes: Sequence[int], rounds: int, weight: str) -> None:
    """Every case for each fleet size; then the builder's evaluation, 1 target vs N."""
    header = ("Pis", "case", "nixpush s", "bare s", "ratio", "ok", "pyinfra RSS")
    print(f"{header[0]:>4}  {header[1]:<21}{header[2]:>10}{header[3]:>8}{header[4]:>7}"
          f"{header[5]:>6}{header[6]:>13}")  # fmt: skip
    evaluations = []
    failures = []
    for size in sizes:
        fleet.up(pis=size)
        prepare_push()
        fleet.set_library_weight(weight)
        pis = tuple(h.name for h in fleet.PIS)
        for case in (
            Case("cold, distinct", pis, cold=True),
            Case("cold, shared", pis, cold=True, shared=True),
            Case("no change", pis, cold=False),
            Case("no change, no cache", pis, cold=False, cache=False),
        ):
            ours, theirs = measure(case, rounds, limit=False)
            a = statistics.median(r.seconds for r in ours)
            b = statistics.median(r.seconds for r in theirs)
            rss = max(r.peak_rss_kib or 0 for r in ours) / 1024
            ok = all(r.passed for r in (*ours, *theirs))
            print(
                f"{size:>4}  {case.label:<21}{a:>10.2f}{b:>8.2f}"
                f"{f'{a / b:.2f}' if ok else '-':>7}{'yes' if ok else 'NO':>6}{rss:>9.0f} MiB",
                flush=True,
            )
            failures += [
                f"{size} Pis, {case.label}, {way} run {n}: {'; '.join(r.why)}"
                for way, runs in (("nixpush", ours), ("bare", theirs))
                for n, r in enumerate(runs, 1)
                if not r.passed
            ]
        one = [eval_cost(pis[:1]) for _ in range(rounds)]
        many = [eval_cost(pis) for _ in range(rounds)]
        evaluations.append((size, one, many))
    print("\nbuilder evaluation (one nix eval process, medians):")
    print(f"{'Pis':>4}{'1 target s':>12}{'1 target MiB':>14}{'N targets s':>13}"
          f"{'N targets MiB':>15}{'wall x':>8}{'mem x':>7}")  # fmt: skip
    for size, one, many in evaluations:
        s1 = statistics.median(t for t, _ in one)
        m1 = statistics.median(m for _, m in one)
        sn = statistics.median(t for t, _ in many)
        mn = statistics.median(m for _, m in many)
        print(f"{size:>4}{s1:>12.2f}{m1:>14.0f}{sn:>13.2f}{mn:>15.0f}"
              f"{sn / s1:>8.2f}{mn / m1:>7.2f}")  # fmt: skip
    for failure in failures:
        print(f"failed: {failure}")


MIB = 1024**2


def substitution_bytes(rounds: int) -> list[tuple[int, int, int]]:
    """Per round: bytes the NAS sent to a Pi without ``substitute_on_target``, to one with it,
    and what the bench cache served that one. Both Pis' closures share a new 4 MiB package
    (the flake's ``blob``) only the NAS and the cache hold; the Pis swap roles each round."""
    from tests.bench import cache

    nas = fleet.host(fleet.BUILDER)
    pair = ("pi4", "pi5")
    cache.up()
    for pi in pair:
        cache.trust(fleet.host(pi))
    figures = []
    try:
        for n in range(rounds):
            plain, substituting = pair if n % 2 == 0 else pair[::-1]
            tag = uuid.uuid4().hex[:8]
            flake = fleet.flake_configs()
            for pi in pair:
                flake[pi] = {**flake[pi], "version": f"perf-{tag}", "blob": tag}
            fleet.set_flake_configs(flake)
            tops = desired_systems(own_configs(pair))
            attrs = " ".join(
                shlex.quote(f"{fleet.flake_ref()}#nixosConfigurations.{pi}.config.system.build"
                            ".toplevel") for pi in pair
            )  # fmt: skip
            ssh(fleet.BUILDER, f"{NIX} build --no-link {attrs}")
            closure = ssh(fleet.BUILDER, f"{NIX} path-info -r {tops[plain]}").stdout.split()
            cache.fill([p for p in closure if "-bench-blob-" in p])
            sent = []
            for pi, data in ((plain, []), (substituting, ["--data", "substitute_on_target=True"])):
                before, served = cache.sent_bytes(nas.veth), cache.sent_bytes()
                run = nixpush({pi: pi}, BENCH_INVENTORY, True, command=("deploys/pi.py", *data))
                if not run.passed or current_system(pi) != tops[pi]:
                    raise SystemExit(f"substitution round {n}: {pi} failed: {run.why}")
                sent.append((cache.sent_bytes(nas.veth) - before, cache.sent_bytes() - served))
            figures.append((sent[0][0], sent[1][0], sent[1][1]))
    finally:
        for pi in pair:
            cache.untrust(fleet.host(pi))
        cache.down()
    return figures


def floor(sizes: Sequence[int], rounds: int, weight: str) -> None:
    """The no-change run at each fleet size against pyinfra's own floor on the same hosts
    (``pyinfra -y INV exec -- true``), rounds interleaved, with both peak RSS."""
    print(f"{'Pis':>4}{'no change s':>13}{'floor s':>9}{'ratio':>7}{'ok':>5}"
          f"{'nixpush RSS':>13}{'floor RSS':>11}")  # fmt: skip
    for size in sizes:
        fleet.up(pis=size, pool=False)
        prepare_push()
        fleet.set_library_weight(weight)
        configs = own_configs(tuple(h.name for h in fleet.PIS))
        nixpush(configs, BENCH_INVENTORY, limit=False)  # untimed: the cache keeps its evaluation
        ours: list[Run] = []
        theirs: list[Run] = []
        for _ in range(rounds):
            ours.append(nixpush(configs, BENCH_INVENTORY, limit=False))
            theirs.append(nixpush(configs, BENCH_INVENTORY, False, command=("exec", "--", "true")))
        a = statistics.median(r.seconds for r in ours)
        b = statistics.median(r.seconds for r in theirs)
        ok = all(r.passed for r in (*ours, *theirs)) and not off_target(configs)
        rss_a = max(r.peak_rss_kib or 0 for r in ours) / 1024
        rss_b = max(r.peak_rss_kib or 0 for r in theirs) / 1024
        print(f"{size:>4}{a:>13.2f}{b:>9.2f}{a / b:>7.2f}{'yes' if ok else 'NO':>5}"
              f"{rss_a:>9.0f} MiB{rss_b:>7.0f} MiB", flush=True)  # fmt: skip
        for r in (*ours, *theirs):
            if not r.passed:
                print(f"  failed: {'; '.join(r.why)}")


def cold_shared(sizes: Sequence[int], rounds: int, weight: str) -> None:
    """A cold deploy of N Pis sharing one configuration (per Nix system), each size against
    the first."""
    medians = {}
    for size in sizes:
        fleet.up(pis=size, pool=False)
        prepare_push()
        fleet.set_library_weight(weight)
        pis = tuple(h.name for h in fleet.PIS)
        ours, _ = measure_nixpush(Case("cold, shared", pis, cold=True, shared=True), rounds)
        medians[size] = statistics.median(r.seconds for r in ours)
        ok = "yes" if all(r.passed for r in ours) else "NO"
        ratio = medians[size] / medians[sizes[0]]
        print(f"cold, shared, {size:>2} Pis: {medians[size]:.2f} s ({ratio:.2f}x {sizes[0]}), "
              f"ok {ok}", flush=True)  # fmt: skip


def measure_nixpush(
    case: Case,
    rounds: int,
    inventory: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> tuple[list[Run], Configs]:
    """``rounds`` cold runs of nixpush alone (no bare way), each checked."""
    configs = shared_configs(case.pis) if case.shared else own_configs(case.pis)
    if inventory is None:
        inventory = shared_inventory(configs) if case.shared else BENCH_INVENTORY
    runs = []
    for _ in range(rounds):
        bump(configs)
        run = nixpush(configs, inventory, False, extra_env=extra_env)
        wrong = off_target(configs)
        if wrong:
            run.passed = False
            run.why += wrong
        runs.append(run)
    return runs, configs


POOL_INVENTORY = "tests/bench/pool_inventory.py"


def pool(pis: int, rounds: int, slow_build: int) -> None:
    """A cold deploy of ``pis`` distinct Pis, each build sleeping ``slow_build`` s, with one
    job per machine: the NAS alone, then the NAS and the member ``bld``."""
    env = {"NIXPUSH_BENCH_NAS_MAX_JOBS": "1"}
    medians = {}
    for members in (False, True):
        fleet.up(pis=pis, pool=members)
        bench_sops.ensure()
        prepare_push()
        for deploy in ("deploys/secrets.py", "deploys/nas.py"):
            subprocess.run(
                pyinfra_argv("-y", POOL_INVENTORY, deploy), cwd=REPO, check=True,
                env={**bench_sops.env(), **env}, capture_output=True,
            )  # fmt: skip
        names = tuple(h.name for h in fleet.PIS)
        flake = fleet.flake_configs()
        for pi in names:
            flake[pi] = {**flake.get(pi, {"system": fleet.host(pi).system}),
                         "slowBuild": str(slow_build)}  # fmt: skip
        fleet.set_flake_configs(flake)
        runs, _ = measure_nixpush(
            Case("cold, distinct", names, cold=True), rounds,
            inventory=POOL_INVENTORY, extra_env=env,
        )  # fmt: skip
        label = "NAS + bld" if members else "NAS alone"
        medians[members] = statistics.median(r.seconds for r in runs)
        ok = "yes" if all(r.passed for r in runs) else "NO"
        print(f"cold, {pis} distinct Pis, slowBuild {slow_build} s, 1 job each, {label}: "
              f"{medians[members]:.2f} s, ok {ok}", flush=True)  # fmt: skip
        for r in runs:
            if not r.passed:
                print(f"  failed: {'; '.join(r.why)}")
    print(f"pool: {medians[True] / medians[False]:.2f}x the NAS alone")
    flake = fleet.flake_configs()
    for config in flake.values():
        config.pop("slowBuild", None)
    fleet.set_flake_configs(flake)
    fleet.up(pool=False)
    prepare_push()


def figures(args: argparse.Namespace) -> None:
    """The issue's figures in one run, each with its ratio."""
    steal = "the machine: 2 cores, shared with other benches while it ran"
    print(f"figures ({steal}); {args.rounds} rounds, medians")
    if "bytes" in args.figures:
        fleet.up(pool=False)
        prepare_push()
        rows = substitution_bytes(args.rounds)
        plain = statistics.median(r[0] for r in rows)
        sub = statistics.median(r[1] for r in rows)
        served = statistics.median(r[2] for r in rows)
        print(f"bytes the NAS sent a Pi: {plain / MIB:.2f} MiB without substitute_on_target, "
              f"{sub / MIB:.2f} MiB with it ({sub / plain:.2f}x; the cache served "
              f"{served / MIB:.2f} MiB)", flush=True)  # fmt: skip
    if "floor" in args.figures:
        floor([int(n) for n in args.floor_sizes.split(",")], args.rounds, args.weight)
    if "shared" in args.figures:
        cold_shared([int(n) for n in args.shared_sizes.split(",")], args.rounds, args.weight)
    if "pool" in args.figures:
        pool(8, args.rounds, args.slow_build)


def passed(runs: Sequence[Run]) -> str:
    ok = sum(r.passed for r in runs)
    return "yes" if ok == len(runs) else f"NO {ok}/{len(runs)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pis", type=int, help="the many-Pi cases with N Pis (e.g. 8)")
    parser.add_argument("--max-sessions", type=int, help="the builder's sshd MaxSessions")
    parser.add_argument("--scale", help="fleet sizes to run in turn, e.g. 1,2,4,8,16")
    parser.add_argument("--weight", default="heavy", choices=fleet.LIBRARY_WEIGHTS)
    parser.add_argument(
        "--figures",
        help="comma-separated: bytes (substitute_on_target), floor (no change against pyinfra's "
        "exec -- true), shared (cold, one shared configuration), pool (NAS alone vs with bld)",
    )
    parser.add_argument("--floor-sizes", default="1,16,64")
    parser.add_argument("--shared-sizes", default="1,8")
    parser.add_argument("--slow-build", type=int, default=3, help="seconds each pool build sleeps")
    args = parser.parse_args()
    if args.figures:
        figures(args)
        return
    if args.scale:
        scale([int(n) for n in args.scale.split(",")], args.rounds, args.weight)
        return
    fleet.up(pis=args.pis, max_sessions=args.max_sessions)
    prepare_push()
    if args.pis is None:
        cases = [
            Case(f"{kind}, {len(pis)} Pi{'s' if len(pis) > 1 else ''}", pis, kind == "cold")
            for pis in (("pi4",), ("pi4", "pi5"))
            for kind in ("cold", "no change")
        ]
    else:
        pis = tuple(h.name for h in fleet.PIS)
        cases = [
            Case(f"cold, {len(pis)} Pis, distinct", pis, cold=True),
            Case(f"cold, {len(pis)} Pis, shared", pis, cold=True, shared=True),
            Case(f"no change, {len(pis)} Pis", pis, cold=False),
        ]
    builder = fleet.host(fleet.BUILDER)
    systems = sorted({fleet.host(pi).system for case in cases for pi in case.pis})
    print(
        f"bench: {len(fleet.PIS)} Pis ({', '.join(systems)}) on builder {builder.name}, "
        f"sshd MaxSessions {fleet.sshd_options(builder)['MaxSessions']}, {args.rounds} rounds"
    )
    header = ("case", "nixpush s", "bare s", "ratio", "nixpush ok", "bare ok", "pyinfra RSS")
    print(f"{header[0]:<28}{header[1]:>10}{header[2]:>8}{header[3]:>7}"
          f"{header[4]:>12}{header[5]:>9}{header[6]:>13}")  # fmt: skip
    failures = []
    for case in cases:
        ours, theirs = measure(case, args.rounds, limit=args.pis is None)
        a = statistics.median(r.seconds for r in ours)
        b = statistics.median(r.seconds for r in theirs)
        rss = max(r.peak_rss_kib or 0 for r in ours) / 1024
        # A ratio of a failed way's times would flatter it: failures end runs early.
        ratio = f"{a / b:.2f}" if all(r.passed for r in (*ours, *theirs)) else "-"
        print(
            f"{case.label:<28}{a:>10.2f}{b:>8.2f}{ratio:>7}"
            f"{passed(ours):>12}{passed(theirs):>9}{rss:>9.0f} MiB"
        )
        for way, runs in (("nixpush", ours), ("bare", theirs)):
            failures += [
                f"{case.label}, {way} run {n}: {'; '.join(r.why)}"
                for n, r in enumerate(runs, 1)
                if not r.passed
            ]
    for failure in failures:
        print(f"failed: {failure}")


if __name__ == "__main__":
    main()
