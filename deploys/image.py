"""
Build the inventory's images on their builders; keep each image file on the controller where
``image_dest`` says.

    pyinfra inventory.py deploys/image.py                    # every image host (the iso)
    pyinfra inventory.py deploys/image.py --dry              # what would be built and copied
    pyinfra inventory.py deploys/image.py --limit pi4 --data image_attr=sdImage   # pi4's SD image

Image hosts (``@image/NAME`` in the inventory, operations/builder/connector.py) are never
connected to; any other host gets its image built only when its data names one
(``image_attr``), and nothing runs on it either: everything runs on the builder (evaluate,
build, hash) and the controller (the file's copy, checked against the builder's sha256,
renamed into place). A second run finds the image built and the file in place, and does nothing.
"""

from pyinfra.context import host, state

from operations.builder import image
from operations.core.failures import or_unable, report_unable
from operations.core.models import Builder, ImagePlan
from operations.push import plan
from operations.push.start import start_deploy

deploy = start_deploy(state)
spec = deploy.specs[host.name]
deploy.summary.forgive(
    image.needed_hosts(deploy.specs, {h.name for h in state.inventory if state.is_host_in_limit(h)})
)


def _plan() -> tuple[ImagePlan, Builder]:
    """The image's plan and builder; raises when planning fails (this image then fails alone:
    ``or_unable``)."""
    builder = plan.reach_builder(host, spec, deploy.cache)
    plan.check_builds_system(builder, spec, deploy.cache)
    return image.plan_image(host, spec, builder, deploy.summary), builder


if image.requested_attr(spec) is None:
    deploy.summary.skip(host.name, "no image asked for (image_attr)")
elif spec.builder_host is None:
    report_unable(f"{host.name} has no builder_host to build its image on; set builder_host")
else:
    planned = or_unable(f"planning {host.name}'s image", _plan)
    if planned is not None:
        image_plan, builder = planned
        image.build_image(name="Build the image on its builder", plan=image_plan, builder=builder)
        image.fetch_image(
            name="Copy the image file to the controller", plan=image_plan, builder=builder
        )
