# nixpush's Python environment from nixpkgs: pyinfra 3.9 or later (nixpush's floor), PyYAML,
# and the entry point of nixpush's pyinfra connector (@image). nixpush's own code is the
# checkout's: pyinfra and `python -m operations.run.runner` import it from the directory they
# run in. The checkout's default.nix imports this file (shell.nix uses that); `pyinfra @local
# deploys/nixos_config.py` writes it as env/default.nix beside the fragments, which the NixOS
# timer units run nixpush with.
{
  pkgs ? import <nixpkgs> { },
}:
let
  python = pkgs.python3;
  ps = python.pkgs;
  # nixpkgs-unstable's pyinfra is 3.9.2 or later; 25.05 ships 3.2 and 25.11 ships 3.4.1, which
  # lack pyinfra.api.hiddenvalue. Then 3.9.2 is built from nixpkgs' own older recipe, given
  # what 3.9.2's recipe (nixpkgs-unstable) has: its source, build system and dependencies.
  # Its tests need packages 25.05 lacks (pyinfra-testgen): not run.
  pyinfra =
    if pkgs.lib.versionAtLeast ps.pyinfra.version "3.9" then
      ps.pyinfra
    else
      ps.pyinfra.overridePythonAttrs (_: rec {
        version = "3.9.2";
        src = pkgs.fetchFromGitHub {
          owner = "pyinfra-dev";
          repo = "pyinfra";
          tag = "v${version}";
          hash = "sha256-5qgPfBtPqysEtNCLFAgGAxlVK/CRH9VYmiC/98VWomI=";
        };
        # uv-dynamic-versioning reads the version from git, which a source tarball lacks.
        UV_DYNAMIC_VERSIONING_BYPASS = version;
        build-system = [
          ps.hatchling
          ps.uv-dynamic-versioning
        ];
        dependencies = [
          ps.click
          ps.distro
          ps.gevent
          ps.jinja2
          ps.packaging
          ps.paramiko
          ps.pydantic
          ps.python-dateutil
          ps.typeguard
          ps.types-paramiko
        ];
        pythonRelaxDeps = [
          "paramiko"
          "types-paramiko"
        ];
        doCheck = false;
      });
  # Metadata only: pyinfra finds connectors by their entry point; the code is the checkout's.
  nixpush = ps.buildPythonPackage {
    pname = "nixpush";
    version = "0.1.0";
    format = "other";
    dontUnpack = true;
    installPhase = ''
      dist=$out/${python.sitePackages}/nixpush-0.1.0.dist-info
      mkdir -p $dist
      printf 'Metadata-Version: 2.1\nName: nixpush\nVersion: 0.1.0\n' > $dist/METADATA
      printf '[pyinfra.connectors]\nimage = operations.builder.connector:ImageConnector\n' \
        > $dist/entry_points.txt
    '';
  };
in
python.withPackages (_: [
  pyinfra
  ps.pyyaml
  nixpush
])
