//! A containerd of a test's own: Debian 12's containerd 1.6, or the containerd 2.x that
//! `tests/e2e/run` unpacks from Debian sid ([`Line`]), started with its own configuration, root,
//! state and sockets under a temporary directory, the husk shim and husk-vmm of this checkout on
//! its `PATH`, and a busybox image built here and imported (no registry, no network).
//!
//! ```no_run
//! use husk_e2e::containerd::{Containerd, Line, Options, HUSK_RUNTIME, IMAGE};
//!
//! let containerd = Containerd::start(); // or Containerd::start_with(Options { cri: true, line: Line::V2, ..Options::default() })
//! let out = containerd.ctr(&["run", "--rm", "--runtime", HUSK_RUNTIME, IMAGE, "id1", "true"]);
//! assert!(out.status.success());
//! containerd.assert_clean();
//! ```
//!
//! Everything here panics on failure with the details needed (ctr's output, containerd's log).

// Test support: a failed step is a panic that names it.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::{
    clean_up, guest_initramfs, guest_kernel, processes_naming, require_program, require_real_kvm,
    TempDir, Watched,
};

/// containerd's runtime type for husk (the shim binary `containerd-shim-husk-v2`).
pub const HUSK_RUNTIME: &str = "io.containerd.husk.v2";
/// containerd's runtime type for runc (Debian 12's `runc`, through the containerd line's own
/// [`RUNC_SHIM`]).
pub const RUNC_RUNTIME: &str = "io.containerd.runc.v2";
/// containerd's runc shim program, shipped with each containerd line.
pub const RUNC_SHIM: &str = "containerd-shim-runc-v2";
/// The variable naming the bin directory (containerd, ctr, [`RUNC_SHIM`]) of the containerd 2.x
/// that [`Line::V2`] runs. `tests/e2e/run` sets it: Debian sid's package, unpacked into the cache
/// by scripts/lib.sh's `need_containerd2` (never installed).
pub const CONTAINERD2_BIN_VAR: &str = "HUSK_CONTAINERD2_BIN";
/// The busybox image every containerd started here has (default command `sh`).
pub const IMAGE: &str = "docker.io/library/husk-busybox:e2e";
/// The same layer with `sleep` as its command: the CRI plugin's sandbox ("pause") image.
pub const PAUSE_IMAGE: &str = "docker.io/library/husk-pause:e2e";
/// The containerd namespace the CRI plugin uses; both images are imported there too.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The husk shim's program name.
pub const SHIM: &str = "containerd-shim-husk-v2";
/// The CRI runtime handler names configured with [`Options::cri`].
pub const HUSK_HANDLER: &str = "husk";
/// See [`HUSK_HANDLER`].
pub const RUNC_HANDLER: &str = "runc";
/// Applets linked in the image's /bin.
pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "true", "false", "ls", "uname", "hostname", "id", "kill", "ps",
    "test", "mkdir", "touch",
];

/// The directory holding the workspace's binaries (the test binary is in its `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target directory")
        .to_path_buf()
}

/// The SHA-256 of a file, in hex.
pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    assert!(out.status.success(), "sha256sum {} failed", path.display());
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// Writes `file` into the OCI layout's blobs; returns (digest, size).
pub fn add_blob(layout: &Path, file: &Path) -> (String, u64) {
    let digest = sha256(file);
    let size = fs::metadata(file).unwrap().len();
    let dir = layout.join("blobs/sha256");
    fs::create_dir_all(&dir).unwrap();
    fs::copy(file, dir.join(&digest)).unwrap();
    (format!("sha256:{digest}"), size)
}

/// Adds an image manifest (config with `cmd`, the one layer) to the layout; returns its index
/// entry, named `name`.
fn add_manifest(
    layout: &Path,
    dir: &Path,
    name: &str,
    cmd: &[&str],
    layer: (&str, u64),
) -> serde_json::Value {
    let tag = name.rsplit(':').next().unwrap_or("latest");
    let (layer_digest, layer_size) = layer;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let config_file = dir.join("config.json");
    fs::write(&config_file, serde_json::to_vec(&config).unwrap()).unwrap();
    let (config_digest, config_size) = add_blob(layout, &config_file);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest, "size": layer_size}],
    });
    let manifest_file = dir.join("manifest.json");
    fs::write(&manifest_file, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let (manifest_digest, manifest_size) = add_blob(layout, &manifest_file);
    serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": manifest_digest, "size": manifest_size,
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": tag},
    })
}

/// An OCI image tarball with /bin/busybox (Debian's busybox-static) and applet links, holding
/// two images of that one layer: [`IMAGE`] (command `sh`) and [`PAUSE_IMAGE`] (a long `sleep`).
pub fn build_image(dir: &Path) -> PathBuf {
    let rootfs = dir.join("image-rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("copy /bin/busybox");
    for applet in APPLETS {
        symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    fs::write(rootfs.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(rootfs.join("etc/group"), "root:x:0:\n").unwrap();
    let layer = dir.join("layer.tar");
    let status = Command::new("tar")
        .args(["--owner=0", "--group=0", "--numeric-owner", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg(".")
        .status()
        .expect("tar");
    assert!(status.success(), "tar of the image layer failed");

    let layout = dir.join("oci");
    fs::create_dir_all(&layout).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let (layer_digest, layer_size) = add_blob(&layout, &layer);
    let layer = (layer_digest.as_str(), layer_size);
    let manifests = [
        add_manifest(&layout, dir, IMAGE, &["sh"], layer),
        add_manifest(&layout, dir, PAUSE_IMAGE, &["sleep", "2147483647"], layer),
    ];
    let index = serde_json::json!({"schemaVersion": 2, "manifests": manifests});
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let tarball = dir.join("image.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tarball)
        .args(["oci-layout", "index.json", "blobs"])
        .status()
        .expect("tar");
    assert!(status.success(), "tar of the OCI layout failed");
    tarball
}

/// Mount points (from /proc/self/mountinfo) at or under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    crate::mounts_under(dir)
        .iter()
        .map(|p| p.display().to_string())
        .collect()
}

/// PIDs of every process on the machine whose program (argv[0]'s file name) is `program`,
/// whoever started it. Leak checks use [`Containerd::processes`] instead, which counts only what
/// the test's own containerd started.
pub fn processes_named(program: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let name = Path::new(std::str::from_utf8(argv0).unwrap_or_default()).file_name();
        if name.is_some_and(|n| n == program) {
            pids.push(pid);
        }
    }
    pids
}

/// The entries of a directory (none when it does not exist).
pub fn entries(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The shim sockets in containerd's socket directory, `/run/containerd/s` whatever containerd's
/// state directory: fixed in the shim library of containerd 1.6 and 2.x (the runc shim's
/// sockets) and of the Rust containerd-shim crate (husk's).
pub fn shim_sockets() -> Vec<PathBuf> {
    entries(Path::new("/run/containerd/s"))
}

/// A fresh path `/run/husk-e2e-<pid>-<n>` (not created: the shim creates its root).
fn short_dir() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("/run/husk-e2e-{}-{n}", std::process::id()));
        if !path.exists() {
            return path;
        }
    }
}

/// A command's status and output, for assertion messages.
pub fn describe(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The containerd line a test starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Line {
    /// Debian 12's containerd 1.6 (the system's `containerd`, `ctr` and [`RUNC_SHIM`]), configured
    /// with a `version = 2` file.
    #[default]
    V1_6,
    /// The containerd 2.x in [`CONTAINERD2_BIN_VAR`] (Debian sid's, from `tests/e2e/run`),
    /// configured with a native `version = 3` file.
    V2,
}

impl Line {
    /// The plugins disabled when the CRI plugin is not wanted: in 2.x the CRI is split into the
    /// images and runtime plugins, the CRI gRPC service, and the pod sandbox controller with its
    /// gRPC service (which needs the runtime plugin).
    fn cri_plugins(self) -> &'static [&'static str] {
        match self {
            Line::V1_6 => &["io.containerd.grpc.v1.cri"],
            Line::V2 => &[
                "io.containerd.grpc.v1.cri",
                "io.containerd.cri.v1.images",
                "io.containerd.cri.v1.runtime",
                "io.containerd.podsandbox.controller.v1.podsandbox",
                "io.containerd.grpc.v1.sandbox-controllers",
            ],
        }
    }

    /// The directory with this line's `containerd`, `ctr` and [`RUNC_SHIM`]: for 1.6 where
    /// `containerd` is on `PATH`, for 2.x [`CONTAINERD2_BIN_VAR`]. Panics loudly when it is not
    /// set or a program is missing: a test of a containerd line never skips.
    pub fn bin_dir(self) -> PathBuf {
        let dir = match self {
            Line::V1_6 => {
                let containerd = require_program("containerd", "containerd");
                containerd
                    .parent()
                    .expect("containerd's directory")
                    .to_path_buf()
            }
            Line::V2 => match std::env::var_os(CONTAINERD2_BIN_VAR) {
                Some(dir) if !dir.is_empty() => PathBuf::from(dir),
                _ => panic!(
                    "\n\n*** {CONTAINERD2_BIN_VAR} is not set: this test runs containerd 2.x. Run it \
                     with `tests/e2e/run` (or `make test-e2e`), which unpacks Debian sid's containerd \
                     into the cache (scripts/lib.sh need_containerd2) and sets it.\n\n"
                ),
            },
        };
        for program in ["containerd", "ctr", RUNC_SHIM] {
            assert!(
                dir.join(program).is_file(),
                "\n\n*** containerd {self:?}: {} is missing (from {}).\n\n",
                dir.join(program).display(),
                match self {
                    Line::V1_6 => "Debian 12's containerd package: apt-get install containerd",
                    Line::V2 => "HUSK_CONTAINERD2_BIN, set by tests/e2e/run",
                }
            );
        }
        dir
    }

    /// The major version `containerd --version` must report for this line.
    fn major(self) -> &'static str {
        match self {
            Line::V1_6 => "1",
            Line::V2 => "2",
        }
    }
}

/// `program`'s first match on `path` (a `PATH` value), canonicalized.
fn on_path(path: &str, program: &str) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
        .and_then(|found| found.canonicalize().ok())
}

/// How [`Containerd::start_with`] configures containerd.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Which containerd to start (default: Debian 12's 1.6).
    pub line: Line,
    /// Enables the CRI plugin (off: the CRI plugins are in `disabled_plugins`), serving
    /// on containerd's socket, with runtime handlers [`HUSK_HANDLER`] ([`HUSK_RUNTIME`]) and
    /// [`RUNC_HANDLER`] ([`RUNC_RUNTIME`]), the sandbox image [`PAUSE_IMAGE`] (imported, never
    /// pulled), and CNI directories of its own that are empty (pods use the node's network).
    pub cri: bool,
    /// The program the shim starts as husk-vmm (default: the workspace's husk-vmm).
    pub vmm: Option<PathBuf>,
}

/// A containerd of the test's own, with the husk shim on its PATH and the busybox images
/// imported (in the `default` namespace, and in [`CRI_NAMESPACE`] with [`Options::cri`]).
/// Dropping it stops containerd and kills whatever shim or husk-vmm is left, and detaches mounts
/// under its directory.
#[derive(Debug)]
pub struct Containerd {
    dir: TempDir,
    ctr: PathBuf,
    version: String,
    socket: PathBuf,
    shim_root: PathBuf,
    console_dir: PathBuf,
    options: Options,
    daemon: Option<Watched>,
}

impl Containerd {
    /// Starts containerd 1.6 with the CRI plugin off.
    pub fn start() -> Containerd {
        Containerd::start_with(Options::default())
    }

    /// Starts containerd of `line` with the CRI plugin off.
    pub fn start_on(line: Line) -> Containerd {
        Containerd::start_with(Options {
            line,
            ..Options::default()
        })
    }

    /// Starts containerd configured by `options` and imports the images.
    pub fn start_with(options: Options) -> Containerd {
        require_real_kvm();
        let line = options.line;
        let line_bins = line.bin_dir();
        let version = Command::new(line_bins.join("containerd"))
            .arg("--version")
            .output()
            .expect("containerd --version");
        let version = String::from_utf8_lossy(&version.stdout).trim().to_owned();
        // "containerd github.com/containerd/containerd/v2 2.1.9+unknown" (or "v2.3.4 <commit>").
        let number = version.split_whitespace().nth(2).unwrap_or_default();
        assert!(
            number.trim_start_matches('v').split('.').next() == Some(line.major()),
            "{} is not containerd {line:?}: `containerd --version` says {version:?}",
            line_bins.join("containerd").display()
        );
        eprintln!("containerd {line:?}: {version}");
        assert!(
            Path::new("/bin/busybox").is_file(),
            "/bin/busybox missing: apt-get install busybox-static"
        );
        let bins = bin_dir();
        for bin in [SHIM, "husk-vmm"] {
            assert!(
                bins.join(bin).is_file(),
                "{} missing: cargo build --workspace",
                bins.join(bin).display()
            );
        }
        if options.cri {
            require_program("runc", "runc");
        }
        let dir = TempDir::new(if options.cri { "cri" } else { "shim" });
        let root = dir.path();
        let socket = root.join("containerd.sock");
        // CRI's IDs are 64 characters and the sandbox's socket must fit in a Unix socket path
        // (107 bytes): the shim root is short, outside the (long) temporary directory.
        let shim_root = short_dir();
        let console_dir = root.join("console");
        let husk_config = root.join("husk.toml");
        fs::write(
            &husk_config,
            format!(
                "[guest]\nkernel = {:?}\ninitramfs = {:?}\n[vmm]\npath = {:?}\n[console]\nlog_dir = {:?}\n",
                guest_kernel(),
                guest_initramfs(),
                options.vmm.clone().unwrap_or_else(|| bins.join("husk-vmm")),
                console_dir,
            ),
        )
        .unwrap();
        let cri_dirs = options.cri.then(|| {
            let cni_bin = root.join("cni/bin");
            let cni_conf = root.join("cni/conf");
            fs::create_dir_all(&cni_bin).unwrap();
            fs::create_dir_all(&cni_conf).unwrap();
            (cni_bin, cni_conf)
        });
        let config = config_toml(line, root, &socket, cri_dirs.as_ref());
        let config_file = root.join("containerd.toml");
        fs::write(&config_file, config).unwrap();
        // The line's own runc shim first (containerd looks its shims up on PATH first), then
        // the workspace's husk shim and husk-vmm, then the rest.
        let path = format!(
            "{}:{}:{}",
            line_bins.display(),
            bins.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        for (program, want) in [
            (RUNC_SHIM, line_bins.join(RUNC_SHIM)),
            (SHIM, bins.join(SHIM)),
        ] {
            let found = on_path(&path, program);
            assert_eq!(
                found,
                want.canonicalize().ok(),
                "containerd {line:?} would not run {} as {program} (PATH {path})",
                want.display()
            );
        }
        let mut daemon = Watched::spawn(
            "containerd",
            Command::new(line_bins.join("containerd"))
                .arg("--config")
                .arg(&config_file)
                .arg("--log-level")
                .arg("debug")
                .env("PATH", &path)
                .env("HUSK_CONFIG", &husk_config)
                .env("HUSK_SHIM_ROOT", &shim_root)
                .env("HUSK_LOG", "info"),
        );
        daemon.expect_marker("containerd successfully booted", Duration::from_secs(60));
        let this = Containerd {
            dir,
            ctr: line_bins.join("ctr"),
            version,
            socket,
            shim_root,
            console_dir,
            options,
            daemon: Some(daemon),
        };
        if line == Line::V2 {
            this.assert_config_accepted();
        }
        let tarball = build_image(this.dir.path());
        let mut namespaces = vec!["default"];
        if this.options.cri {
            namespaces.push(CRI_NAMESPACE);
        }
        for namespace in namespaces {
            let tarball = tarball.to_str().unwrap();
            this.ctr_ok(&["--namespace", namespace, "image", "import", tarball]);
            let listed = this.ctr_ok(&["--namespace", namespace, "image", "ls", "-q"]);
            assert!(
                listed.contains(IMAGE) && listed.contains(PAUSE_IMAGE),
                "imported images not listed in namespace {namespace}: {listed}"
            );
        }
        this
    }

    /// containerd 2.x takes every key of the configuration (no "Ignoring unknown key"), loads
    /// every plugin it is not told to skip, and reports no deprecated setting in use.
    fn assert_config_accepted(&self) {
        let log = self.log();
        for complaint in ["Ignoring unknown key", "failed to load plugin"] {
            assert!(
                !log.contains(complaint),
                "containerd {:?} complains about its configuration ({complaint:?}):\n{log}",
                self.options.line
            );
        }
        let deprecations = self.ctr_ok(&["deprecations", "list"]);
        assert!(
            deprecations.trim().is_empty(),
            "containerd {:?} reports deprecated settings:\n{deprecations}",
            self.options.line
        );
    }

    /// The containerd line this containerd is of.
    pub fn line(&self) -> Line {
        self.options.line
    }

    /// `containerd --version`'s line.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The line's `ctr` (for commands run by hand; [`Containerd::ctr`] runs it with the socket).
    pub fn ctr_program(&self) -> &Path {
        &self.ctr
    }

    /// The test's directory (containerd's root and state, husk's shim root, ... are in it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's gRPC socket (also the CRI socket with [`Options::cri`]).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// containerd's root directory.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// containerd's state directory.
    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// husk's shim root (`HUSK_SHIM_ROOT`): one directory per sandbox.
    pub fn shim_root(&self) -> &Path {
        &self.shim_root
    }

    /// Where husk-vmm writes the guests' console logs.
    pub fn console_dir(&self) -> &Path {
        &self.console_dir
    }

    /// `ctr --address SOCKET ARGS...` (namespace `default` unless ARGS say otherwise).
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new(&self.ctr)
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run ctr")
    }

    /// Runs `ctr ARGS` and asserts it succeeded; returns its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let started = Instant::now();
        let out = self.ctr(args);
        eprintln!("ctr {args:?}: {:?} in {:?}", out.status, started.elapsed());
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}\ncontainerd log:\n{}",
            describe(&out),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr run --rm --runtime io.containerd.husk.v2 IMAGE ID ARGS...`.
    pub fn run(&self, id: &str, args: &[&str]) -> Output {
        let mut all = vec!["run", "--rm", "--runtime", HUSK_RUNTIME, IMAGE, id];
        all.extend_from_slice(args);
        self.ctr(&all)
    }

    /// The status column of `ctr task ls` for task `id` (`absent` when not listed).
    pub fn task_status(&self, id: &str) -> String {
        let out = self.ctr_ok(&["task", "ls"]);
        out.lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("absent")
            .to_owned()
    }

    /// Waits (at most 60 s) until task `id`'s status is `want`.
    pub fn wait_status(&self, id: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = self.task_status(id);
            if status == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} is {status}, not {want}\ncontainerd log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The test's own directories: where containerd, its shims and their VMs are named from
    /// (containerd's socket and the configuration in [`Containerd::dir`], the sandboxes under
    /// [`Containerd::shim_root`], also in the `HUSK_SHIM_ROOT` every shim inherits).
    fn marks(&self) -> [&Path; 2] {
        [self.dir.path(), &self.shim_root]
    }

    /// PIDs of the running processes named `program` (argv[0]'s file name: [`SHIM`],
    /// `husk-vmm`, [`RUNC_SHIM`]) that this containerd started: those whose command line or
    /// environment names the test's directory or its shim root ([`crate::processes_naming`]).
    /// What another test (or a failed one before it) left running is not counted.
    pub fn processes(&self, program: &str) -> Vec<u32> {
        processes_naming(&self.marks())
            .into_iter()
            .filter(|p| p.program == program)
            .map(|p| p.pid)
            .collect()
    }

    /// What husk left that it should not have: this containerd's shims and husk-vmm processes,
    /// sandbox directories, console logs, mounts under the shim root. Empty when clean.
    pub fn husk_leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        let mut add = |what: &str, items: Vec<String>| {
            if !items.is_empty() {
                left.push(format!("{what} {items:?}"));
            }
        };
        let shown = |paths: Vec<PathBuf>| paths.iter().map(|p| p.display().to_string()).collect();
        let pids = |pids: Vec<u32>| pids.iter().map(u32::to_string).collect();
        add("shims", pids(self.processes(SHIM)));
        add("husk-vmm", pids(self.processes("husk-vmm")));
        add("sandboxes", shown(entries(&self.shim_root)));
        add("console logs", shown(entries(&self.console_dir)));
        add("mounts", mounts_under(&self.shim_root));
        left
    }

    /// Waits (at most 20 s: the shim exits after containerd's Shutdown) until
    /// [`Containerd::husk_leftovers`] is empty; panics naming what is left.
    pub fn assert_clean(&self) {
        self.wait_until_empty(Duration::from_secs(20), || self.husk_leftovers());
    }

    /// Everything a pod or task may leave once deleted: [`Containerd::husk_leftovers`], shim
    /// sockets (containerd's `/run/containerd/s/`, minus those in `sockets_before`), task bundles
    /// under containerd's state, the CRI plugins' sandbox and container directories (any
    /// `<plugin>/sandboxes/*` and `<plugin>/containers/*` under containerd's root and state: 1.6
    /// and 2.x keep them in different plugins' directories), and any mount under the test's
    /// directory. Empty when clean.
    pub fn leftovers(&self, sockets_before: &[PathBuf]) -> Vec<String> {
        let mut left = self.husk_leftovers();
        let mut add = |what: &str, paths: Vec<PathBuf>| {
            if !paths.is_empty() {
                let shown: Vec<_> = paths.iter().map(|p| p.display().to_string()).collect();
                left.push(format!("{what} {shown:?}"));
            }
        };
        let sockets: Vec<_> = shim_sockets()
            .into_iter()
            .filter(|s| !sockets_before.contains(s))
            .collect();
        add("shim sockets", sockets);
        for namespace in ["default", CRI_NAMESPACE] {
            add(
                "task bundles",
                entries(
                    &self
                        .state()
                        .join("io.containerd.runtime.v2.task")
                        .join(namespace),
                ),
            );
        }
        add("CRI directories", self.cri_directories());
        let mounts: Vec<PathBuf> = mounts_under(self.dir.path())
            .into_iter()
            .map(PathBuf::from)
            .collect();
        add("mounts", mounts);
        left
    }

    /// What is in the `sandboxes` and `containers` directories of containerd's plugins (root and
    /// state).
    pub fn cri_directories(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for base in [self.root(), self.state()] {
            for plugin in entries(&base) {
                for kind in ["sandboxes", "containers"] {
                    found.extend(entries(&plugin.join(kind)));
                }
            }
        }
        found
    }

    /// Waits (at most 30 s) until [`Containerd::leftovers`] is empty; panics naming what is
    /// left.
    pub fn assert_nothing_left(&self, sockets_before: &[PathBuf]) {
        self.wait_until_empty(Duration::from_secs(30), || self.leftovers(sockets_before));
    }

    /// Polls `leftovers` until it is empty, for at most `patience`; then panics naming what is
    /// left, with containerd's log.
    fn wait_until_empty(&self, patience: Duration, leftovers: impl Fn() -> Vec<String>) {
        let started = Instant::now();
        loop {
            let left = leftovers();
            if left.is_empty() {
                eprintln!("nothing left after {:?}", started.elapsed());
                return;
            }
            assert!(
                started.elapsed() < patience,
                "left behind: {}\ncontainerd log:\n{}",
                left.join(", "),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// containerd's output so far (its debug log).
    pub fn log(&self) -> String {
        self.daemon
            .as_ref()
            .map(Watched::output)
            .unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.signal(libc::SIGTERM);
            let _ = daemon.wait_exit(Duration::from_secs(20));
        }
        // Whatever a failed test left, and only what this containerd started: its shims, VMs
        // and runc shims killed, mounts under its directories detached, the shim root removed
        // (the temporary directory goes with `dir`).
        let [dir, shim_root] = self.marks();
        clean_up(&[dir, shim_root], &[shim_root]);
    }
}

/// containerd's configuration for `line`: a `version = 2` file for 1.6, a native `version = 3`
/// one for 2.x (the CRI plugin's keys moved to the `io.containerd.cri.v1.images`,
/// `io.containerd.cri.v1.runtime` and `io.containerd.grpc.v1.cri` plugins). Root, state and the
/// sockets under `root`; the CRI plugins disabled unless `cri` gives the CNI directories (bin,
/// conf).
fn config_toml(line: Line, root: &Path, socket: &Path, cri: Option<&(PathBuf, PathBuf)>) -> String {
    let version = match line {
        Line::V1_6 => 2,
        Line::V2 => 3,
    };
    // Top-level keys first, then the tables.
    let mut config = format!(
        "version = {version}\nroot = {:?}\nstate = {:?}\n",
        root.join("root"),
        root.join("state"),
    );
    if cri.is_none() {
        config.push_str(&format!("disabled_plugins = {:?}\n", line.cri_plugins()));
    }
    config.push_str(&format!(
        "[grpc]\n  address = {socket:?}\n[ttrpc]\n  address = {:?}\n",
        root.join("containerd.sock.ttrpc"),
    ));
    // containerd gives a dead shim's `delete` command 5 s by default; in the emulated test
    // host, exec'ing the 180 MB debug shim over 9p alone can take that long on a loaded
    // machine (natively the command takes ~15 ms).
    config.push_str("[timeouts]\n  \"io.containerd.timeout.shim.cleanup\" = \"60s\"\n");
    let Some((cni_bin, cni_conf)) = cri else {
        return config;
    };
    config.push_str(&match line {
        Line::V1_6 => format!(
            r#"[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = {PAUSE_IMAGE:?}
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = {cni_bin:?}
    conf_dir = {cni_conf:?}
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = {RUNC_HANDLER:?}
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HUSK_HANDLER}]
      runtime_type = {HUSK_RUNTIME:?}
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{RUNC_HANDLER}]
      runtime_type = {RUNC_RUNTIME:?}
"#
        ),
        Line::V2 => format!(
            r#"[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = {PAUSE_IMAGE:?}
[plugins."io.containerd.cri.v1.runtime"]
  enable_selinux = false
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = [{cni_bin:?}]
    conf_dir = {cni_conf:?}
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = {RUNC_HANDLER:?}
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{HUSK_HANDLER}]
      runtime_type = {HUSK_RUNTIME:?}
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.{RUNC_HANDLER}]
      runtime_type = {RUNC_RUNTIME:?}
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#
        ),
    });
    config
}
