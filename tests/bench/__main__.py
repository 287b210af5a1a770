"""``python -m tests.bench install|up|down [--purge]|status|env|cache``: drive the bench fleet."""

from __future__ import annotations

import argparse
import sys

from tests.bench import fleet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="install Debian packages and busybox, register QEMU")
    up = sub.add_parser("up", help="bring every bench host up (idempotent)")
    up.add_argument(
        "--pis",
        type=int,
        metavar="N",
        help=f"run N Pis (1-{fleet.MAX_PIS}): pi4, pi5, then pi6... (every fourth from pi6 "
        f"armv7l); default: the fleet up brought up last, else {fleet.DEFAULT_PIS}",
    )
    up.add_argument(
        "--max-sessions",
        type=int,
        metavar="N",
        help="the NAS's sshd MaxSessions (sessions per SSH connection; OpenSSH's default is 10, "
        f"the bench's {dict(fleet.SSHD_DEFAULTS)['MaxSessions']}); default: as recorded",
    )
    up.add_argument(
        "--pool",
        action=argparse.BooleanOptionalAction,
        help=f"run the NAS's builder-pool member {fleet.POOL_MEMBER.name} (tests/bench/"
        "pool_inventory.py), or stop it; default: as recorded",
    )
    down = sub.add_parser("down", help="stop every host, remove namespaces and links")
    down.add_argument("--purge", action="store_true", help="also delete the bench's state")
    sub.add_parser("status", help="say which hosts are up")
    cache_parser = sub.add_parser(
        "cache", help="the bench's binary cache (tests/bench/cache.py): start, stop or show it"
    )
    cache_parser.add_argument("action", choices=("up", "down", "status"))
    sub.add_parser("env", help="print shell exports for using the bench by hand (age key too)")
    args = parser.parse_args(argv)

    if args.command == "install":
        fleet.install()
    elif args.command == "up":
        if args.pis is not None and not 1 <= args.pis <= fleet.MAX_PIS:
            parser.error(f"--pis must be 1 to {fleet.MAX_PIS}")
        if args.max_sessions is not None and args.max_sessions < 1:
            parser.error("--max-sessions must be at least 1")
        fleet.up(pis=args.pis, max_sessions=args.max_sessions, pool=args.pool)
        return _print_status()
    elif args.command == "down":
        fleet.down(purge=args.purge)
        left = fleet.leftovers()
        for item in left:
            print(f"left behind: {item}")
        return 1 if left else 0
    elif args.command == "status":
        return _print_status()
    elif args.command == "cache":
        from tests.bench import cache

        if args.action == "up":
            cache.up()
        elif args.action == "down":
            cache.down()
        state = f"up at {cache.URL}, key {cache.public_key()}" if cache.running() else "down"
        print(f"{cache.NAME}: {state}")
    elif args.command == "env":
        from tests.bench import sops

        if fleet.INSTANCE:
            print(f"export NIXPUSH_BENCH_INSTANCE={fleet.INSTANCE}")
        print(f"export NIXPUSH_BENCH_DIR={fleet.BENCH_DIR}")
        print(f"export NIX_SSHOPTS='-F {fleet.BENCH_DIR / 'ssh_config'}'")
        print(f"export SOPS_AGE_KEY_FILE={sops.AGE_KEY_FILE}")
    return 0


def _print_status() -> int:
    states = fleet.status()
    for name, state in states.items():
        print(f"{name}: {state}")
    builder = fleet.host(fleet.BUILDER)
    print(f"{builder.name} sshd MaxSessions: {fleet.sshd_options(builder)['MaxSessions']}")
    return 0 if all(s.startswith("up") for s in states.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
