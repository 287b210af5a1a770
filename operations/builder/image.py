"""
Images: a configuration's ``config.system.build.<image_attr>`` (``isoImage``, ``sdImage``, ...)
built on its builder, and its image file kept on the controller when ``image_dest`` says where.

The image host itself is never asked anything (an ``@image`` host cannot be: see
operations/builder/connector.py). Everything runs on the builder (``run_on``, ``read_on``) or on the
controller, where the file arrives over the builder's connection into a temp file beside
``image_dest``, is checked against the sha256 the builder computed, and only then renamed into
place. A second run finds the store path built and ``image_dest`` holding the same bytes, and
does nothing.

.. code:: python

    plan = image.plan_image(host, spec, builder, summary)
    image.build_image(name="Build the image", plan=plan, builder=builder)
    image.fetch_image(name="Copy the image file to the controller", plan=plan, builder=builder)
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import tempfile
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyinfra import logger
from pyinfra.api.command import FunctionCommand, PyinfraCommand, QuoteString, StringCommand
from pyinfra.api.facts import FactBase
from pyinfra.api.operation import operation
from pyinfra.context import host
from typing_extensions import override

from operations.builder.nix_commands import (
    build_command,
    built_paths,
    eval_command,
    nix_error,
    path_info_command,
    system_build_attr,
)
from operations.core.failures import DeployFailed, fail, host_step
from operations.core.models import Builder, ImagePlan
from operations.core.process import LocalWriteError, fetch_from, read_on, run_on
from operations.core.runstate import summary_for
from operations.core.summary import RunSummary
from operations.data.fleet import HostSpec

if TYPE_CHECKING:
    from pyinfra.api.host import Host
    from pyinfra.api.state import State

# Systems that boot from an SD card (Raspberry Pis and friends) rather than an ISO.
SD_CARD_SYSTEMS = ("aarch64-linux", "armv7l-linux", "armv6l-linux")


def default_image_attr(nix_system: str) -> str:
    """``sdImage`` for a Pi's system, else ``isoImage``: ``default_image_attr("aarch64-linux")``."""
    return "sdImage" if nix_system in SD_CARD_SYSTEMS else "isoImage"


def requested_attr(spec: HostSpec) -> str | None:
    """The image to build for ``spec``: an image host always has one (``image_attr``, else the
    default for its system); any other host only when its data asks (``image_attr``)."""
    if spec.is_image:
        return spec.image_attr or default_image_attr(spec.nix_system)
    return spec.image_attr


def needed_hosts(specs: Mapping[str, HostSpec], active: set[str]) -> set[str]:
    """Hosts an image run needs reachable: the builders of the requested images (never the
    image hosts, and never a host whose image is asked for)."""
    return {
        spec.builder_host
        for name in active
        if (spec := specs[name]).builder_host and requested_attr(spec)
    }


@dataclass(frozen=True)
class ImageFile:
    """The image file inside a built image: its path, size in bytes and sha256 (hex)."""

    path: str
    size: int
    sha256: str

    @property
    def size_text(self) -> str:
        """``1.4 MiB``."""
        size = float(self.size)
        for unit in ("B", "KiB", "MiB", "GiB"):
            if size < 1024 or unit == "GiB":
                return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
            size /= 1024
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class OutsideFile:
    """An image file named outside its store path (``file iso /etc/shadow`` in
    hydra-build-products, or a symlink out): never read, hashed nor copied."""

    path: str
    resolved: str


OUTSIDE_MARK = "nixpush: image file outside its store path"
# For the store path in $p: its image file resolved (readlink -f), and "SIZE SHA256 FILE" when
# that is inside the store path; the mark, the resolved file and the named one when it is not
# (nothing is read from it); nothing when there is no image file. The store path's own
# location is resolved without following it: a store path that is a symlink is outside.
_IMAGE_FILE_SCRIPT = (
    '; f="$p"; if [ -d "$p" ] && [ ! -L "$p" ]; then'
    ' f=$(awk \'$1 == "file" { sub(/^file [^ ]+ /, ""); print; exit }\''
    ' "$p/nix-support/hydra-build-products"'
    ' 2>/dev/null); fi; if [ -n "$f" ] && { [ -e "$f" ] || [ -L "$f" ]; }; then'
    ' r=$(readlink -f -- "$f"); base="$(readlink -f -- "${p%/*}")/${p##*/}";'
    ' case "$r" in "$base"|"$base"/*) inside=1;; *) inside=;; esac;'
    ' if [ -L "$p" ] || [ -z "$inside" ]; then'
    f" printf '%s\\n' '{OUTSIDE_MARK}' \"$r\" \"$f\";"
    ' elif [ -f "$r" ]; then'
    ' echo "$(stat -c %s "$r") $(sha256sum < "$r" | cut -d " " -f 1) $r"; fi; fi'
)


class BuiltImageFile(FactBase[ImageFile | OutsideFile | None]):
    """
    The image file of a built image on the builder: the file Nix's own
    ``nix-support/hydra-build-products`` names (NixOS's isoImage and sdImage write it), else the
    store path itself when it is a file, by its resolved path; ``OutsideFile`` when that
    resolves outside the store path (any flake input can write that line); None when there is
    none. ``read_on(builder, BuiltImageFile, path=..., ...)``.
    """

    @override
    def command(self, path: str) -> StringCommand:
        return StringCommand("p=", QuoteString(path), _IMAGE_FILE_SCRIPT, _separator="")

    @override
    def process(self, output: list[str]) -> ImageFile | OutsideFile | None:
        if output and output[0].strip() == OUTSIDE_MARK:
            resolved, named = (*output[1:3], "", "")[:2]
            return OutsideFile(path=named.strip(), resolved=resolved.strip())
        fields = output[0].strip().split(" ", 2) if output else []
        if len(fields) != 3 or not fields[0].isdecimal() or len(fields[1]) != 64:
            return None
        return ImageFile(path=fields[2], size=int(fields[0]), sha256=fields[1])


def sha256_of(path: Path) -> str | None:
    """The sha256 (hex) of a controller file, None when it does not exist."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
    except FileNotFoundError:
        return None
    return digest.hexdigest()


def destination(dest: str, image_file: str) -> Path:
    """Where the file goes: ``dest`` itself, or the image's own name inside ``dest`` when that
    is a directory (or ends with ``/``)."""
    path = Path(dest)
    if dest.endswith("/") or path.is_dir():
        return path / Path(image_file).name
    return path


# -- planning (deploy code, prepare time) -----------------------------------------------


def _evaluate(builder: Builder, attr: str) -> str:
    ok, lines = run_on(
        builder.host, eval_command(attr), sudo=builder.sudo, timeout=600,
        doing=f"evaluating {attr}",
    )  # fmt: skip
    path = lines[-1].strip() if ok and lines else ""
    if not path.startswith("/nix/store/"):
        raise DeployFailed(
            f"{builder.host.name} cannot evaluate {attr}: {nix_error(lines)}; check that the "
            "configuration imports the module that defines this image (e.g. "
            "installer/cd-dvd/iso-image.nix, sd-card/sd-image-aarch64.nix) or set image_attr"
        )
    return path


def image_file(builder: Builder, path: str) -> ImageFile:
    """The image file of the built ``path``; ``DeployFailed`` when it has none."""
    found = read_on(
        builder.host, BuiltImageFile, path=path, sudo=builder.sudo,
        doing=f"reading the image file of {path}",
    )  # fmt: skip
    if found is None:
        raise DeployFailed(
            f"{path} on {builder.host.name} holds no image file (neither "
            "nix-support/hydra-build-products nor a plain file); is image_attr an image?"
        )
    if isinstance(found, OutsideFile):
        raise DeployFailed(
            f"{path} on {builder.host.name} names {found.path} (resolving to {found.resolved}) "
            "as its image file, which is outside the store path: nixpush does not read or copy "
            "it; fix the image's nix-support/hydra-build-products, or set image_attr to an image"
        )
    return found


def plan_image(target: Host, spec: HostSpec, builder: Builder, summary: RunSummary) -> ImagePlan:
    """The image's ``ImagePlan``; logs what is there and what a run does (``--dry`` shows it)."""
    attr_name = requested_attr(spec)
    if attr_name is None or not spec.flake:
        raise DeployFailed(f"{spec.name} has no flake; set flake in its host or group data")
    attr = system_build_attr(spec.flake, spec.nixos_config, attr_name)
    path = _evaluate(builder, attr)
    built, _ = run_on(
        builder.host, path_info_command(path), sudo=builder.sudo, doing=f"looking up {path}"
    )
    found = image_file(builder, path) if built else None
    at_dest = False
    if spec.image_dest and found is not None:
        at_dest = sha256_of(destination(spec.image_dest, found.path)) == found.sha256
    plan = ImagePlan(
        name=spec.name, builder=builder.host.name, attr=attr, path=path, built=built,
        dest=spec.image_dest, at_dest=at_dest,
    )  # fmt: skip
    summary.image_planned(plan)
    if found is not None:
        text = f"image {found.path} ({found.size_text}, sha256 {found.sha256})"
        summary.image_done(spec.name, text)
        target.log_styled(text, log_func=logger.info)
    target.log_styled(
        plan.noop_reason if plan.up_to_date else f"would {plan.todo}", log_func=logger.info
    )
    return plan


# -- operations -----------------------------------------------------------------------


@operation()
def build_image(plan: ImagePlan, builder: Builder) -> Generator[PyinfraCommand, None, None]:
    """
    Build the image on its builder, unless it has it already.

    + plan: the image's ``ImagePlan`` (``plan_image``)
    + builder: its ``Builder``

    **Example:**

    .. code:: python

        image.build_image(name="Build the image", plan=plan, builder=builder)
    """
    if plan.built:
        host.noop(f"{plan.builder} has already built {plan.path}")
        return
    yield FunctionCommand(_build, (plan, builder), {})


@host_step
def _build(state: State, host: Host, plan: ImagePlan, builder: Builder) -> bool:
    ok, lines = run_on(
        builder.host, build_command(plan.attr), sudo=builder.sudo, timeout=builder.build_timeout,
        doing=f"building {plan.attr}",
    )  # fmt: skip
    if not ok or plan.path not in built_paths(lines):
        return fail(host, f"building {plan.attr} on {plan.builder} failed: {nix_error(lines)}")
    found = image_file(builder, plan.path)
    text = f"image {found.path} ({found.size_text}, sha256 {found.sha256})"
    host.log_styled(f"built {text} on {plan.builder}", log_func=logger.info)
    summary_for(state).image_done(plan.name, text)
    return True


@operation()
def fetch_image(plan: ImagePlan, builder: Builder) -> Generator[PyinfraCommand, None, None]:
    """
    Copy the image file from the builder to ``plan.dest`` on the controller: into a temp file
    beside it, checked against the builder's sha256, then renamed into place.

    + plan, builder: as for ``build_image``

    **Example:**

    .. code:: python

        image.fetch_image(name="Copy the image file to the controller", plan=plan,
                          builder=builder)
    """
    if plan.dest is None:
        host.noop(f"no image_dest: the image stays on {plan.builder}")
        return
    if plan.at_dest:
        host.noop(f"{plan.dest} already holds {plan.path}'s image file")
        return
    yield FunctionCommand(_fetch, (plan, builder, plan.dest), {})


def sweep_leftovers(target: Path) -> int:
    """
    Remove the temp files a killed copy to ``target`` left beside it (``.NAME.*.part``, often
    GBs); one a running copy holds (its ``flock``) stays. Returns how many went.

    .. code:: python

        sweep_leftovers(Path("/srv/images/nixos.iso"))  # 1
    """
    removed = 0
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.part"):
        if leftover.is_symlink() or not leftover.is_file():
            continue
        try:
            with leftover.open("rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                leftover.unlink()
        except (BlockingIOError, FileNotFoundError):
            continue  # a copy in progress, or one that just finished
        removed += 1
    return removed


def new_file_mode() -> int:
    """The mode a new file gets from the process's umask (``0o640`` under umask 027): what the
    image file gets, as if written in place."""
    # os.umask can only be read by setting it; deploy code runs in greenlets of one thread.
    umask = os.umask(0o077)
    os.umask(umask)
    return 0o666 & ~umask


@host_step
def _fetch(state: State, host: Host, plan: ImagePlan, builder: Builder, dest: str) -> bool:
    found = image_file(builder, plan.path)
    target = destination(dest, found.path)
    if not target.parent.is_dir():
        return fail(host, f"image_dest {dest}: {target.parent} is not a directory; create it")
    swept = sweep_leftovers(target)
    if swept:
        host.log_styled(
            f"removed {swept} leftover{'s' if swept != 1 else ''} of an interrupted copy in "
            f"{target.parent}",
            log_func=logger.info,
        )
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    temp = Path(temp_name)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # in use: another run's sweep leaves it
        try:
            fetch_from(builder.host, found.path, temp, doing=f"copying {found.path} to {temp}")
        except LocalWriteError as error:
            return fail(host, f"{error}; free space there, or set image_dest to another directory")
        got = sha256_of(temp)
        if got != found.sha256:
            return fail(
                host,
                f"the copy of {found.path} is corrupt (sha256 {got} on the controller, "
                f"{found.sha256} on {plan.builder}); {target} is left as it was",
            )
        temp.chmod(new_file_mode())
        os.replace(temp, target)
    finally:
        os.close(fd)
        temp.unlink(missing_ok=True)
    text = f"image {found.path} ({found.size_text}, sha256 {found.sha256}) at {target}"
    host.log_styled(f"copied {text}, checksum verified", log_func=logger.info)
    summary_for(state).image_done(plan.name, text)
    return True
