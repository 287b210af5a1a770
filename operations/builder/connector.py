"""
The ``@image`` connector: how an image (a configuration that is built, never booted where we
could reach it, e.g. the owner's ``iso``) is an inventory host without being connected to.

Why a connector of its own: an image must be in the inventory to have data (its builder, its
system, ``image_attr``, ``image_dest``) and to be picked by ``--limit``, and pyinfra connects to
every inventory host before any deploy code runs. Giving it an ssh address would try to reach a
machine that does not exist; pyinfra's ``@local`` would make the controller the image host, so
any operation that forgot to skip images would run on the controller. This connector connects
to nothing and runs nothing: every command, fact and file transfer on an image host fails that
host with one line saying so. deploys/image.py never asks it for anything: it builds on the
image's builder (``run_on``) and keeps files on the controller through the process seam.

.. code:: python

    # inventory.py
    images = [("@image/iso", {"nix_system": "x86_64-linux", "builder_host": "nas"})]

``@image/iso`` makes a host named ``iso`` in the connector's group ``@image``
(``operations.data.fleet.IMAGE_CONNECTOR_GROUP``). Registered as a pyinfra connector by nixpush's
package metadata (``pyproject.toml``, entry point ``image``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pyinfra.connectors.base import BaseConnector
from pyinfra.connectors.util import CommandOutput, OutputLine
from typing_extensions import override

from operations.data.fleet import IMAGE_CONNECTOR_GROUP


def refusal(host_name: str) -> str:
    """What an image host answers to anything asked of it."""
    return (
        f"{host_name} is an image (@image): nixpush never runs anything on it; "
        "deploys/image.py builds it on its builder_host"
    )


class ImageConnector(BaseConnector):
    """Connects to nothing; refuses every command and file transfer (see the module's doc)."""

    handles_execution = True

    @override
    @staticmethod
    def make_names_data(name: str | None = None) -> Iterator[tuple[str, dict[Any, Any], list[str]]]:
        if not name:
            raise ValueError("an image host needs a name: @image/NAME")
        yield name, {}, [IMAGE_CONNECTOR_GROUP]

    @override
    def connect(self) -> None:
        return None

    @override
    def run_shell_command(self, *args: Any, **kwargs: Any) -> tuple[bool, CommandOutput]:
        return False, CommandOutput([OutputLine("stderr", refusal(self.host.name))])

    @override
    def put_file(self, *args: Any, **kwargs: Any) -> bool:
        return False

    @override
    def get_file(self, *args: Any, **kwargs: Any) -> bool:
        return False
