{
  description = "nixpush bench: stand-in NixOS systems, built from a static busybox";

  # No inputs: the bench is offline. hosts.nix (written by the bench) says which
  # configurations exist, their system and a version that tests bump to make a change.
  outputs = { self }:
    let
      hosts = import ./hosts.nix;
      # The shared library every configuration imports (a stand-in for nixpkgs' evaluation
      # cost): light unless the bench wrote library-weight.nix ("heavy"; tests/bench/fleet.py).
      library = import ./library {
        weight = if builtins.pathExists ./library-weight.nix then import ./library-weight.nix else "light";
      };
      busybox = {
        "aarch64-linux" = ./bb/aarch64;
        "armv7l-linux" = ./bb/armv7l;
        "x86_64-linux" = ./bb/x86_64;
      };
      # The kernel, initrd and modules a system boots with, a package of their own as in
      # nixpkgs: systems of one kernel version (the `kernel` knob, default "1") share it, so
      # only a new version (or kernelParams) needs a reboot (tests/bench/flake/build-kernel.sh).
      kernel = system: version: derivation {
        name = "bench-linux-${version}";
        inherit system version;
        builder = "${busybox.${system}}/busybox";
        args = [ "sh" ./build-kernel.sh ];
      };
      # A 4 MiB package of its own (random bytes: no compression helps), shared by every
      # configuration of one system naming the same `blob` tag: what a binary cache near the
      # target can serve instead of the builder (tests/bench/cache.py, substitute_on_target).
      blob = system: tag: derivation {
        name = "bench-blob-${tag}";
        inherit system tag;
        builder = "${busybox.${system}}/busybox";
        args = [ "sh" ./build-blob.sh ];
      };
      toplevel = name: cfg: derivation {
        name = "nixos-system-${name}-${cfg.version}";
        system = cfg.system;
        # Debian's busybox only runs when argv[0]'s basename is "busybox".
        builder = "${busybox.${cfg.system}}/busybox";
        args = [ "sh" ./build-toplevel.sh ];
        hostName = name;
        version = cfg.version;
        # Failure knobs (tests/bench/fleet.py set_flake_configs): a configuration whose
        # dry activation fails, whose activation fails after making itself current, is slow,
        # takes the host's network down, or makes sshd refuse new logins. Each one changes the toplevel, like a real
        # configuration change would.
        failActivation = if cfg.failActivation or false then "1" else "";
        failDryActivation = if cfg.failDryActivation or false then "1" else "";
        slowActivation = cfg.slowActivation or "";
        breakNetwork = if cfg.breakNetwork or false then "1" else "";
        breakSsh = if cfg.breakSsh or false then "1" else "";
        # oddBytes: dry-activate and the activation each print a line that is not UTF-8.
        oddBytes = if cfg.oddBytes or false then "1" else "";
        # failBoot: the system does not boot (the bench's boot loader, tests/bench/standins/
        # boot.sh, falls back from a one-shot entry, or the host stays down); systemdBoot: its
        # switch-to-configuration installs systemd-boot entries (UEFI hosts) instead of
        # extlinux's layout.
        failBoot = if cfg.failBoot or false then "1" else "";
        systemdBoot = if cfg.systemdBoot or false then "1" else "";
        # Makes the closure a few MB, so a slowed link can be cut in the middle of a copy.
        padding = if cfg.padding or false then "1" else "";
        blob = if (cfg.blob or "") != "" then blob cfg.system cfg.blob else "";
        kernel = kernel cfg.system (cfg.kernel or "1");
        kernelParams = cfg.kernelParams or "console=ttyS0";
        # Device trees (a dtbs directory of 768 KiB) for the boot loader to copy to /boot.
        dtbs = if cfg.dtbs or false then "1" else "";
        switchScript = ./switch-to-configuration.sh;
        # Depending on the whole library and the host's own part makes evaluating the toplevel
        # force them, as a real toplevel forces nixpkgs. failEval: "throw" (caught by
        # builtins.tryEval) or "missing" (an attribute typo: it is not).
        library = library.digest;
        hostPart = if (cfg.failEval or "") == "throw"
          then throw "bench: ${name} fails to evaluate (failEval)"
          else if (cfg.failEval or "") != "" then cfg.noSuchOption
          else library.hostPart name;
        # failBuild: the build exits non-zero; slowBuild: it sleeps this many seconds first.
        failBuild = if cfg.failBuild or false then "1" else "";
        slowBuild = cfg.slowBuild or "";
      };
      # Stand-in images (deploys/image.py): a small file where NixOS's iso-image.nix and
      # sd-image.nix put theirs, built by the configuration's own system.
      image = kind: dir: file: name: cfg: derivation {
        name = "nixos-${kind}-${name}-${cfg.version}";
        system = cfg.system;
        builder = "${busybox.${cfg.system}}/busybox";
        args = [ "sh" ./build-image.sh ];
        hostName = name;
        version = cfg.version;
        imageKind = kind;
        imageDir = dir;
        imageName = "nixos-${name}-${cfg.version}.${file}";
        # imageProduct: the file hydra-build-products names instead (a path outside the image).
        imageProduct = cfg.imageProduct or "";
      };
    in {
      nixosConfigurations = builtins.mapAttrs
        (name: cfg: {
          config.system.build = {
            toplevel = toplevel name cfg;
            isoImage = image "iso" "iso" "iso" name cfg;
            sdImage = image "sd-image" "sd-image" "img" name cfg;
          };
        })
        hosts;
    };
}
