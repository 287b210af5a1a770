"""Image files confined to their store path, and copies to the controller that leave no
world-readable file, no leftovers and no misleading error."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pyinfra.api.util import get_file_io

from operations.builder import image
from operations.core import process
from operations.core.failures import DeployFailed
from operations.core.models import Builder, ImagePlan
from operations.core.runstate import summary_for
from tests.unit.fake_host import FakeState


def read_fact(path: Path) -> Any:
    """The BuiltImageFile fact, its command run by the machine's sh as the builder would."""
    fact = image.BuiltImageFile()
    command = fact.command(path=str(path)).get_raw_value()
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    return fact.process(result.stdout.splitlines()), result.stdout


def store_path(root: Path, product: str | None = None) -> Path:
    """A built image laid out like NixOS's, its hydra-build-products naming ``product``
    (default: its own iso file)."""
    out = root / "store" / "abc-nixos.iso"
    (out / "iso").mkdir(parents=True)
    (out / "nix-support").mkdir()
    (out / "iso" / "nixos.iso").write_bytes(b"iso" * 1000)
    line = f"file iso {product or out / 'iso' / 'nixos.iso'}\n"
    (out / "nix-support" / "hydra-build-products").write_text(line)
    return out


@pytest.fixture
def shadow(tmp_path: Path) -> Path:
    """A file outside every store path, standing in for /etc/shadow."""
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret:19000::::::\n")
    return secret


def test_an_image_file_outside_its_store_path_is_refused_unread(tmp_path, shadow):
    out = store_path(tmp_path, product=str(shadow))
    found, printed = read_fact(out)
    assert found == image.OutsideFile(path=str(shadow), resolved=str(shadow))
    digest = hashlib.sha256(shadow.read_bytes()).hexdigest()
    assert digest not in printed and str(shadow.stat().st_size) not in printed.split()


def test_a_symlink_inside_that_leads_outside_is_refused(tmp_path, shadow):
    out = store_path(tmp_path)
    (out / "iso" / "nixos.iso").unlink()
    (out / "iso" / "nixos.iso").symlink_to(shadow)
    found, _ = read_fact(out)
    assert found == image.OutsideFile(path=str(out / "iso" / "nixos.iso"), resolved=str(shadow))


def test_a_store_path_that_is_a_symlink_to_a_file_outside_is_refused(tmp_path, shadow):
    link = tmp_path / "store" / "abc-image"
    link.parent.mkdir()
    link.symlink_to(shadow)
    found, _ = read_fact(link)
    assert found == image.OutsideFile(path=str(link), resolved=str(shadow))


def test_files_inside_are_found_by_their_resolved_path(tmp_path):
    out = store_path(tmp_path)
    (out / "iso" / "link.iso").symlink_to("nixos.iso")
    (out / "nix-support" / "hydra-build-products").write_text(f"file iso {out}/iso/link.iso\n")
    found, _ = read_fact(out)
    assert isinstance(found, image.ImageFile)
    assert found.path == str(out / "iso" / "nixos.iso") and found.size == 3000


def test_image_file_fails_the_image_naming_the_file(monkeypatch):
    outside = image.OutsideFile(path="/etc/shadow", resolved="/etc/shadow")
    monkeypatch.setattr(image, "read_on", lambda *args, **kwargs: outside)
    builder = Builder(host=type("H", (), {"name": "nas"})(), sudo=True)  # type: ignore[arg-type]
    with pytest.raises(DeployFailed) as failed:
        image.image_file(builder, "/nix/store/abc-iso")
    assert str(failed.value) == (
        "/nix/store/abc-iso on nas names /etc/shadow (resolving to /etc/shadow) as its image "
        "file, which is outside the store path: nixpush does not read or copy it; fix the "
        "image's nix-support/hydra-build-products, or set image_attr to an image"
    )


# -- the copy to the controller ---------------------------------------------------------


class BuilderHost:
    """A builder whose files are the machine's: get_file copies like pyinfra's SFTP download."""

    name = "nas"

    def __init__(self, source: Path, fail_after: int | None = None) -> None:
        self.source, self.fail_after = source, fail_after

    def get_file(self, remote: str, local: Any) -> bool:
        with get_file_io(local, "wb") as out, self.source.open("rb") as data:
            chunk, sent = data.read(1000), 0
            while chunk:
                out.write(chunk)
                sent += len(chunk)
                if self.fail_after is not None and sent >= self.fail_after:
                    raise EOFError()  # the connection dropped
                chunk = data.read(1000)
        return True


class Target:
    name = "iso"

    def __init__(self) -> None:
        self.state = FakeState()
        self.logged: list[str] = []

    def log_styled(self, message: str, **kwargs: Any) -> None:
        self.logged.append(message)


def fetch(tmp_path: Path, monkeypatch: Any, dest: Path, **host: Any) -> tuple[bool, Target]:
    iso = tmp_path / "built.iso"
    if not iso.exists():
        iso.write_bytes(b"x" * 5000)
    found = image.ImageFile(
        path="/nix/store/abc/iso/nixos.iso", size=5000, sha256=image.sha256_of(iso) or ""
    )
    monkeypatch.setattr(image, "image_file", lambda builder, path: found)
    plan = ImagePlan("iso", "nas", "f#iso", "/nix/store/abc", built=True, dest=str(dest))
    builder = Builder(host=BuilderHost(iso, **host), sudo=False)  # type: ignore[arg-type]
    target = Target()
    return image._fetch(target.state, target, plan, builder, str(dest)), target


def test_the_copy_takes_the_umask_not_0644(tmp_path, monkeypatch):
    dest = tmp_path / "images"
    dest.mkdir()
    old = os.umask(0o027)
    try:
        ok, _ = fetch(tmp_path, monkeypatch, dest)
    finally:
        os.umask(old)
    assert ok
    assert (dest / "nixos.iso").stat().st_mode & 0o777 == 0o640


def test_leftovers_of_a_killed_copy_are_swept_first(tmp_path, monkeypatch):
    dest = tmp_path / "images"
    dest.mkdir()
    leftovers = [dest / ".nixos.iso.k1ll3d.part", dest / ".nixos.iso.0ther.part"]
    for leftover in leftovers:
        leftover.write_bytes(b"half" * 1000)
    unrelated = [dest / ".other.iso.x.part", dest / "nixos.iso.part", dest / "keep.iso"]
    for path in unrelated:
        path.write_bytes(b"mine")
    ok, target = fetch(tmp_path, monkeypatch, dest)
    assert ok
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["nixos.iso", *(p.name for p in unrelated)]
    )
    assert f"removed 2 leftovers of an interrupted copy in {dest}" in target.logged[0]


def test_a_leftover_another_copy_is_writing_is_left_alone(tmp_path, monkeypatch):
    import fcntl

    dest = tmp_path / "images"
    dest.mkdir()
    busy = dest / ".nixos.iso.busy.part"
    with busy.open("wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        ok, _ = fetch(tmp_path, monkeypatch, dest)
        assert ok and busy.exists()


def test_a_full_controller_disk_is_a_local_write_error_with_the_path(tmp_path, monkeypatch):
    iso = tmp_path / "built.iso"
    iso.write_bytes(b"x" * 5000)
    with pytest.raises(DeployFailed) as failed:
        process.fetch_from(BuilderHost(iso), "/nix/store/abc/iso/nixos.iso", Path("/dev/full"),  # type: ignore[arg-type]
                           doing="copying /nix/store/abc/iso/nixos.iso to /dev/full")  # fmt: skip
    assert str(failed.value) == (
        "cannot write /dev/full on the controller ([Errno 28] No space left on device) while "
        "copying /nix/store/abc/iso/nixos.iso to /dev/full"
    )


def test_a_full_disk_fails_the_image_with_the_fix(tmp_path, monkeypatch):
    dest = tmp_path / "images"
    dest.mkdir()

    def to_a_full_disk(source: Any, remote: str, local: Path, *, doing: str) -> None:
        process.fetch_from(source, remote, Path("/dev/full"), doing=doing)

    monkeypatch.setattr(image, "fetch_from", to_a_full_disk)
    ok, target = fetch(tmp_path, monkeypatch, dest)
    assert not ok
    cause = summary_for(target.state).causes["iso"]
    assert cause.startswith(
        "cannot write /dev/full on the controller ([Errno 28] No space left on device) while "
        "copying /nix/store/abc/iso/nixos.iso to "
    )
    assert cause.endswith("; free space there, or set image_dest to another directory")
    assert list(dest.iterdir()) == []


def test_a_lost_connection_is_still_named_as_one(tmp_path):
    iso = tmp_path / "built.iso"
    iso.write_bytes(b"x" * 5000)
    with pytest.raises(DeployFailed) as failed:
        process.fetch_from(
            BuilderHost(iso, fail_after=2000), "/x", tmp_path / "copy", doing="copying /x"
        )  # type: ignore[arg-type]
    assert str(failed.value) == "lost the SSH connection to nas (EOFError) while copying /x"


def test_a_failed_copy_fails_the_image_and_leaves_no_part_file(tmp_path, monkeypatch):
    dest = tmp_path / "images"
    dest.mkdir()
    ok, target = fetch(tmp_path, monkeypatch, dest, fail_after=2000)
    assert not ok
    assert summary_for(target.state).causes["iso"].startswith("lost the SSH connection to nas")
    assert list(dest.iterdir()) == []
