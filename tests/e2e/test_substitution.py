"""
Substitution on the target (``substitute_on_target``) against the bench's binary cache
(``tests/bench/cache.py``): two Pis whose closures share a 4 MiB package (the flake's ``blob``),
which only the cache and the NAS hold. The Pi that substitutes fetches it from the cache, and
the NAS's copy sends it fewer bytes; the Pi that does not gets everything from the NAS.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.bench import cache, fleet
from tests.bench import sops as bench_sops
from tests.bench.client import BENCH_INVENTORY, pyinfra, ssh
from tests.e2e.test_pi import current, desired_path, new_versions, output

PLAIN, SUBSTITUTING = "pi4", "pi5"
MIB = 1024**2


@pytest.fixture(scope="module")
def cached(push_ready: None) -> Iterator[None]:
    """The cache up, and both Pis' Nix using it (only the data key differs between them)."""
    cache.up()
    pis = [fleet.host(PLAIN), fleet.host(SUBSTITUTING)]
    for h in pis:
        cache.trust(h)
    yield
    for h in pis:
        cache.untrust(h)
    cache.down()


def in_store(host: str, path: str) -> bool:
    return ssh(host, f"nix path-info {path} >/dev/null 2>&1", check=False).returncode == 0


def deploy_measured(pi: str, *args: str) -> tuple[int, int, str]:
    """Deploy ``pi`` alone: (bytes the NAS sent, bytes the cache sent, the run's output)."""
    nas = fleet.host(fleet.BUILDER)
    nas_before, cache_before = cache.sent_bytes(nas.veth), cache.sent_bytes()
    result = pyinfra(
        "-y", BENCH_INVENTORY, "deploys/pi.py", "--limit", pi, *args, env=bench_sops.env()
    )
    text = output(result)
    assert result.returncode == 0, text[-3000:]
    return cache.sent_bytes(nas.veth) - nas_before, cache.sent_bytes() - cache_before, text


def test_a_target_that_substitutes_fetches_from_its_cache_and_the_nas_sends_less(cached):
    new_versions(PLAIN, SUBSTITUTING, blob=uuid.uuid4().hex[:8])
    tops = {pi: desired_path(pi) for pi in (PLAIN, SUBSTITUTING)}
    attrs = " ".join(
        f"'{fleet.flake_ref()}#nixosConfigurations.{pi}.config.system.build.toplevel'"
        for pi in tops
    )
    ssh("nas", f"nix build --no-link {attrs}")
    closure = ssh("nas", f"nix path-info --recursive {tops[PLAIN]}").stdout.split()
    (blob,) = [path for path in closure if "-bench-blob-" in path]
    assert blob in ssh("nas", f"nix path-info --recursive {tops[SUBSTITUTING]}").stdout
    cache.fill([blob])
    served_before = len(cache.fetched())

    plain_bytes, plain_cache, _ = deploy_measured(PLAIN)
    assert len(cache.fetched()) == served_before  # without the key, the cache is never asked
    sub_bytes, sub_cache, text = deploy_measured(
        SUBSTITUTING, "--data", "substitute_on_target=True"
    )
    print(
        f"\nthe NAS sent {plain_bytes / MIB:.2f} MiB to {PLAIN} (no substitution) and "
        f"{sub_bytes / MIB:.2f} MiB to {SUBSTITUTING} (substitute_on_target), which fetched "
        f"{sub_cache / MIB:.2f} MiB from the cache"
    )
    assert "(its substituters first)" in text
    for pi, top in tops.items():
        assert current(pi) == top
        assert in_store(pi, blob)
    fetched = cache.fetched()[served_before:]
    assert fetched, "the substituting Pi fetched nothing from the cache"
    # The blob is 4 MiB of random bytes: it came from the cache, not from the NAS.
    assert sub_cache > 4 * MIB > plain_cache
    assert plain_bytes - sub_bytes > 3.5 * MIB
