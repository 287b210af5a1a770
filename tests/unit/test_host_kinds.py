"""Host kinds without a fleet: self-building hosts, offline_ok, image hosts and image plans, the
offline status in the run summary and nixpush-run's report."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from operations.builder import image
from operations.builder.connector import ImageConnector, refusal
from operations.builder.nix_commands import system_build_attr
from operations.core.failures import DeployFailed
from operations.core.models import Builder, ImagePlan
from operations.data.fleet import check_fleet, fleet_errors
from operations.run import report
from tests.unit.fake_host import FakeHost
from tests.unit.test_fleet import fleet, only_problem

ISO = ("@image/iso", {"nix_system": "x86_64-linux", "builder_host": "nas", "flake": "path:/f"})


def with_image(member=ISO):
    groups = fleet()
    groups["images"] = [member]
    return groups


def test_image_host_is_named_without_the_connector_and_is_no_target(write_inventory):
    inventory = write_inventory(with_image())
    assert fleet_errors(inventory) == []
    iso = inventory.get_host("iso")
    assert iso.connector_cls is ImageConnector
    spec = check_fleet(inventory)["iso"]
    assert spec.is_image and not spec.is_target and spec.pushed_by is None
    assert image.requested_attr(spec) == "isoImage"  # the default for x86_64


def test_image_host_refuses_every_command(write_inventory):
    iso = write_inventory(with_image()).get_host("iso")
    connector = ImageConnector(None, iso)  # type: ignore[arg-type]
    ok, output = connector.run_shell_command("touch /tmp/anything")
    assert not ok and output.output_lines == [refusal("iso")]
    assert "never runs anything on it" in refusal("iso")
    assert connector.put_file("a", "b") is False and connector.get_file("a", "b") is False


def test_image_host_building_itself_is_refused(write_inventory):
    member = ("@image/iso", {"nix_system": "x86_64-linux"})
    problem = only_problem(write_inventory(with_image(member)))
    assert problem.startswith("iso: builder_host is None, but an image is built on another host")
    assert "set builder_host to the host that builds it" in problem


def test_images_group_holds_only_image_hosts(write_inventory):
    groups = fleet()
    groups["images"] = [("pi", {})]
    problem = only_problem(write_inventory(groups))
    assert problem.startswith("pi: group 'images' is not a root;")


@pytest.mark.parametrize(
    ("key", "value", "fix"),
    [
        ("offline_ok", "maybe", "set it to True or False"),
        ("image_attr", "sdImage; rm -rf /", "set it to one under config.system.build"),
        ("image_dest", "images/iso", "set it to an absolute path on the controller"),
    ],
)
def test_bad_new_keys_name_host_key_and_fix(write_inventory, key, value, fix):
    problem = only_problem(write_inventory(fleet(pi={key: value})))
    assert problem.startswith(f"pi: {key} ") and fix in problem


def test_offline_ok_from_data_and_from_the_command_line(write_inventory):
    specs = check_fleet(write_inventory(fleet(pi={"offline_ok": True})))
    assert specs["pi"].offline_ok and not specs["nas"].offline_ok
    specs = check_fleet(write_inventory(fleet(), override_data={"offline_ok": "true"}))
    assert specs["pi"].offline_ok and specs["nas"].offline_ok


def test_image_requested_for_an_ordinary_host_only_by_data(write_inventory):
    specs = check_fleet(write_inventory(fleet(pi={"image_attr": "sdImage"})))
    assert image.requested_attr(specs["pi"]) == "sdImage"
    assert image.requested_attr(specs["nas"]) is None
    assert image.needed_hosts(specs, {"pi", "nas"}) == {"nas"}
    assert image.default_image_attr("aarch64-linux") == "sdImage"


def test_system_build_attr_quotes_odd_configuration_names():
    assert system_build_attr("path:/f", "pi4", "sdImage") == (
        "path:/f#nixosConfigurations.pi4.config.system.build.sdImage"
    )
    assert system_build_attr("path:/f", "my host", "isoImage") == (
        'path:/f#nixosConfigurations."my host".config.system.build.isoImage'
    )


def test_image_plan_says_what_a_run_does():
    plan = ImagePlan("iso", "nas", "f#iso", "/nix/store/abc-iso", built=False, dest="/srv/iso")
    assert not plan.up_to_date
    assert plan.todo == "build f#iso (/nix/store/abc-iso) on nas, copy its image file to /srv/iso"
    done = ImagePlan("iso", "nas", "f#iso", "/nix/store/abc-iso", True, "/srv/iso", True)
    assert done.up_to_date
    assert done.noop_reason == "nas has already built /nix/store/abc-iso, and /srv/iso holds it"
    assert ImagePlan("iso", "nas", "f#iso", "/nix/store/abc-iso", built=True).up_to_date


def test_built_image_file_fact_finds_the_file_nixos_names(tmp_path):
    # Run the fact's command with the machine's sh on an image laid out like NixOS's.
    out = tmp_path / "weird name; $(touch pwned)"
    (out / "iso").mkdir(parents=True)
    (out / "nix-support").mkdir()
    iso = out / "iso" / "nixos.iso"
    iso.write_bytes(b"x" * 3000)
    (out / "nix-support" / "hydra-build-products").write_text(f"file iso {iso}\n")
    fact = image.BuiltImageFile()
    command = fact.command(path=str(out)).get_raw_value()
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    found = fact.process(result.stdout.splitlines())
    assert found is not None
    assert (found.path, found.size) == (str(iso), 3000)
    assert found.sha256 == image.sha256_of(iso)
    assert found.size_text == "2.9 KiB"
    assert not (Path.cwd() / "pwned").exists()
    assert fact.process([]) is None and fact.process(["not an answer"]) is None


def test_destination_is_the_file_or_a_directory(tmp_path):
    assert image.destination(str(tmp_path), "/nix/store/x/iso/a.iso") == tmp_path / "a.iso"
    assert image.destination("/srv/images/", "/nix/store/x/iso/a.iso") == Path("/srv/images/a.iso")
    assert image.destination("/srv/my.iso", "/nix/store/x/iso/a.iso") == Path("/srv/my.iso")
    assert image.sha256_of(tmp_path / "missing") is None


def test_report_offline_is_neither_failure_nor_change():
    summary = {"hosts": {"laptop": {"status": "offline", "cause": "unreachable, and offline_ok"}}}
    hosts = report.host_outcomes(summary, None, "", executed=True)
    assert hosts["laptop"].status == "offline"
    deploy = report.DeployResult("deploys/pi.py", 0, 1.0, hosts)
    merged = report.merge_hosts([deploy])
    assert merged["laptop"]["status"] == "offline"
    assert report.exit_code("deploy", [deploy], merged) == report.ExitCode.OK
    # A failure in another deploy of the run wins over offline.
    failed = report.DeployResult("deploys/nas.py", 1, 1.0, {"laptop": report.HostOutcome("failed")})
    merged = report.merge_hosts([deploy, failed])
    assert merged["laptop"]["status"] == "failed"


def test_an_image_build_is_bounded_by_its_builders_build_timeout(monkeypatch):
    asked: dict[str, object] = {}

    def run_on(host, command, **kwargs):  # type: ignore[no-untyped-def]
        asked.update(kwargs)
        raise DeployFailed("stopped here")

    monkeypatch.setattr(image, "run_on", run_on)
    builder = Builder(host=FakeHost("nas"), sudo=True, build_timeout=123)  # type: ignore[arg-type]
    plan = ImagePlan("iso", "nas", "f#iso", "/nix/store/abc-iso", built=False)
    with pytest.raises(DeployFailed):
        image._build.__wrapped__(None, FakeHost("iso"), plan, builder)
    assert (asked["timeout"], asked["sudo"]) == (123, True)
