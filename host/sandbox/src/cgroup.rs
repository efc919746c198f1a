//! The host cgroup (v2) of a sandbox's husk-vmm, and the limits written to it.
//!
//! Both front ends place husk-vmm in a cgroup: the OCI runtime in the one `linux.cgroupsPath`
//! names (its supervisor joins it too), the shim in the pod sandbox's (the sandbox container's
//! `linux.cgroupsPath`, as containerd's CRI plugin derives it from the pod's cgroup parent).
//! husk-vmm starts inside it (`clone3` with `CLONE_INTO_CGROUP`, so none of its memory is charged
//! elsewhere), and [`HostLimits`] are written first:
//!
//! - `memory.max`: the guest's memory plus `vmm.host_memory_mib` (husk-vmm's own code, data and
//!   KVM's page tables; for the runtime also the supervisor). A guest cannot make its monitor
//!   use more of the host than that: the kernel reclaims, then OOM-kills inside the cgroup.
//! - `pids.max`: [`PIDS_MAX`], husk's own bound on the monitor's (and supervisor's) threads; the
//!   spec's `pids.limit` is the container's and is applied in the guest.
//! - `cpu.max`: the spec's (or pod's) CPU quota and period, when one is set, so the vCPU threads
//!   get what the container would have had under runc.
//!
//! The controllers these need are enabled in `cgroup.subtree_control` of each ancestor, as runc
//! does. The guest's own cgroups (written by the agent) apply the same limits to the container
//! inside the VM.
//!
//! Paths:
//! - cgroupfs paths (`/libpod_parent/libpod-ID`, or relative `a/b`) are directories under
//!   `/sys/fs/cgroup`;
//! - systemd paths, `slice:prefix:name`, are `<slice hierarchy>/<prefix>-<name>.scope`, where
//!   `a-b.slice` lies in `a.slice/a-b.slice` (systemd's naming); the directory is created
//!   directly, without asking systemd over D-Bus.
//!
//! No component may be empty, `.` or `..`, so the path stays under the cgroup root.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxResources, Spec};
use serde::{Deserialize, Serialize};

use crate::sizing::{VmSize, DEFAULT_CPU_PERIOD};

const MIB: u64 = 1024 * 1024;

/// Where the unified hierarchy is mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// The longest `cgroupsPath` accepted.
pub const MAX_PATH: usize = 4096;

/// Errors about the host cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A `cgroupsPath` that cannot name a cgroup under the root.
    #[error("linux.cgroupsPath {path:?}: {reason}")]
    Invalid { path: String, reason: &'static str },
    /// A controller the limits need is not available to the cgroup.
    #[error("the {controller} controller is not available in cgroup {dir} (cgroup.controllers): husk writes its limits there")]
    Missing {
        controller: &'static str,
        dir: PathBuf,
    },
    /// Creating, limiting, joining or removing the cgroup failed.
    #[error("cannot {action} cgroup {dir}: {source}")]
    Io {
        action: &'static str,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The cgroup directory (under `root`) that `cgroups_path` names.
pub fn resolve(root: &Path, cgroups_path: &str, systemd: bool) -> Result<PathBuf, CgroupError> {
    let invalid = |reason| CgroupError::Invalid {
        path: cgroups_path.chars().take(256).collect(),
        reason,
    };
    if cgroups_path.is_empty() || cgroups_path.len() > MAX_PATH {
        return Err(invalid("empty or too long"));
    }
    let relative = if systemd {
        let mut parts = cgroups_path.split(':');
        let (Some(slice), Some(prefix), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(
                "with --systemd-cgroup it must be slice:prefix:name",
            ));
        };
        let slice = if slice.is_empty() {
            "system.slice"
        } else {
            slice
        };
        let Some(stem) = slice.strip_suffix(".slice") else {
            return Err(invalid("the slice must end with .slice"));
        };
        if name.is_empty() {
            return Err(invalid("the scope name is empty"));
        }
        if name.contains('/') || prefix.contains('/') || slice.contains('/') {
            return Err(invalid("slice, prefix and name must not contain /"));
        }
        let mut dir = PathBuf::new();
        let mut so_far = String::new();
        for piece in stem.split('-') {
            if piece.is_empty() {
                return Err(invalid("the slice has an empty component"));
            }
            if !so_far.is_empty() {
                so_far.push('-');
            }
            so_far.push_str(piece);
            dir.push(format!("{so_far}.slice"));
        }
        let scope = if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        };
        dir.join(scope)
    } else {
        PathBuf::from(cgroups_path.trim_start_matches('/'))
    };
    let mut clean = PathBuf::new();
    for component in relative.components() {
        match component {
            Component::Normal(part) => clean.push(part),
            _ => return Err(invalid("it must not contain . or .. components")),
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(invalid("it names the root cgroup"));
    }
    Ok(root.join(clean))
}

/// The cgroup directory (under [`CGROUP_ROOT`]) that `spec`'s `linux.cgroupsPath` names, if it
/// names one. `systemd` is the runtime's `--systemd-cgroup`; `None` (the shim) infers the form
/// from the path ([`is_systemd_path`]).
pub fn of_spec(spec: &Spec, systemd: Option<bool>) -> Result<Option<PathBuf>, CgroupError> {
    spec.linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|path| {
            let path = path.to_string_lossy();
            let systemd = systemd.unwrap_or_else(|| is_systemd_path(&path));
            resolve(Path::new(CGROUP_ROOT), &path, systemd)
        })
        .transpose()
}

/// Whether `cgroups_path` is in systemd's `slice:prefix:name` form. The shim has no
/// `--systemd-cgroup` flag: containerd's CRI plugin writes this form exactly when the pod's
/// cgroup parent is a systemd slice, and a cgroupfs path never holds a `:`.
pub fn is_systemd_path(cgroups_path: &str) -> bool {
    let mut parts = cgroups_path.split(':');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(slice), Some(_), Some(_), None) if slice.is_empty() || slice.ends_with(".slice")
    )
}

/// husk's bound on the tasks (threads) of a sandbox's host cgroup: husk-vmm has one thread per
/// vCPU and its event loop, the supervisor a few more.
pub const PIDS_MAX: u64 = 256;

/// The limits written to a sandbox's host cgroup (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostLimits {
    /// `memory.max`, bytes.
    pub memory_max: u64,
    /// `pids.max`.
    pub pids_max: u64,
    /// `cpu.max` as (quota, period) in µs, when the spec sets a quota.
    pub cpu_max: Option<(u64, u64)>,
}

impl HostLimits {
    /// The limits for a VM of `size` whose spec (or pod) has `resources`, with `host_memory_mib`
    /// (configuration `vmm.host_memory_mib`) for the monitor itself.
    pub fn for_vm(size: VmSize, resources: Option<&LinuxResources>, host_memory_mib: u32) -> Self {
        let cpu_max = resources.and_then(|r| r.cpu().as_ref()).and_then(|cpu| {
            let quota = cpu.quota().filter(|q| *q > 0)?.unsigned_abs();
            let period = cpu.period().unwrap_or(DEFAULT_CPU_PERIOD);
            (period > 0).then_some((quota, period))
        });
        HostLimits {
            memory_max: (u64::from(size.memory_mib) + u64::from(host_memory_mib)) * MIB,
            pids_max: PIDS_MAX,
            cpu_max,
        }
    }
}

/// Where a sandbox's husk-vmm runs on the host, and with what limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// The cgroup directory (under [`CGROUP_ROOT`]).
    pub dir: PathBuf,
    pub limits: HostLimits,
}

fn io_err(action: &'static str, dir: &Path) -> impl FnOnce(io::Error) -> CgroupError {
    let dir = dir.to_path_buf();
    move |source| CgroupError::Io {
        action,
        dir,
        source,
    }
}

/// The controllers [`HostLimits`] need.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Creates `placement.dir` (and its parents) under `root`, enables the controllers its limits
/// need in every ancestor's `cgroup.subtree_control`, and writes the limits. Processes join it
/// afterwards ([`enter`], or [`crate::launch`] for husk-vmm).
pub fn prepare(root: &Path, placement: &Placement) -> Result<(), CgroupError> {
    let dir = &placement.dir;
    let relative = dir.strip_prefix(root).map_err(|_| CgroupError::Invalid {
        path: dir.display().to_string(),
        reason: "it is not under the cgroup root",
    })?;
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let limits = &placement.limits;
    let mut wanted = vec!["memory", "pids"];
    if limits.cpu_max.is_some() {
        wanted.push("cpu");
    }
    let mut ancestor = root.to_path_buf();
    for component in relative.components() {
        enable_controllers(&ancestor, &wanted)?;
        ancestor.push(component);
    }
    let write = |file: &str, action: &'static str, value: String| {
        fs::write(dir.join(file), value).map_err(io_err(action, dir))
    };
    write(
        "memory.max",
        "write memory.max of",
        limits.memory_max.to_string(),
    )?;
    write("pids.max", "write pids.max of", limits.pids_max.to_string())?;
    if let Some((quota, period)) = limits.cpu_max {
        write("cpu.max", "write cpu.max of", format!("{quota} {period}"))?;
    }
    Ok(())
}

/// Enables `wanted` controllers for the children of `dir`, those not enabled already.
fn enable_controllers(dir: &Path, wanted: &[&'static str]) -> Result<(), CgroupError> {
    let read = |file: &str| {
        fs::read_to_string(dir.join(file))
            .map_err(io_err("read the controllers of", dir))
            .map(|text| {
                text.split_whitespace()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
    };
    let available = read("cgroup.controllers")?;
    let enabled = read("cgroup.subtree_control")?;
    let mut missing = Vec::new();
    for controller in wanted {
        debug_assert!(CONTROLLERS.contains(controller));
        if enabled.iter().any(|c| c == controller) {
            continue;
        }
        if !available.iter().any(|c| c == controller) {
            return Err(CgroupError::Missing {
                controller,
                dir: dir.to_path_buf(),
            });
        }
        missing.push(format!("+{controller}"));
    }
    if missing.is_empty() {
        return Ok(());
    }
    fs::write(dir.join("cgroup.subtree_control"), missing.join(" "))
        .map_err(io_err("enable controllers in", dir))
}

/// Creates `dir` (and its parents) and moves the calling process into it; its children
/// (husk-vmm) start there.
pub fn enter(dir: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    fs::write(dir.join("cgroup.procs"), "0").map_err(io_err("join", dir))
}

/// Removes `dir` once no process is left in it. A missing cgroup is fine. The kernel may still
/// count a process that has just exited for a moment, so a busy cgroup is tried again for up to
/// about 100 ms.
pub fn remove(dir: &Path) -> Result<(), CgroupError> {
    let mut tries = 0;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) && tries < 10 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(source) => return Err(io_err("remove", dir)(source)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(path: &str, systemd: bool) -> Result<PathBuf, CgroupError> {
        resolve(Path::new("/sys/fs/cgroup"), path, systemd)
    }

    #[test]
    fn cgroupfs_paths() {
        assert_eq!(
            r("/libpod_parent/libpod-abc", false).unwrap(),
            Path::new("/sys/fs/cgroup/libpod_parent/libpod-abc")
        );
        assert_eq!(r("a/b", false).unwrap(), Path::new("/sys/fs/cgroup/a/b"));
    }

    #[test]
    fn systemd_paths() {
        assert_eq!(
            r("machine.slice:libpod:abc", true).unwrap(),
            Path::new("/sys/fs/cgroup/machine.slice/libpod-abc.scope")
        );
        assert_eq!(
            r("user-1000.slice:crio:x", true).unwrap(),
            Path::new("/sys/fs/cgroup/user.slice/user-1000.slice/crio-x.scope")
        );
        assert_eq!(
            r(":p:n", true).unwrap(),
            Path::new("/sys/fs/cgroup/system.slice/p-n.scope")
        );
    }

    #[test]
    fn escapes_and_malformed_paths_are_refused() {
        for (path, systemd) in [
            ("/a/../../etc", false),
            ("..", false),
            ("/", false),
            ("", false),
            ("a:b", true),
            ("a.slice:p:", true),
            ("notaslice:p:n", true),
            ("a--b.slice:p:n", true),
            ("a.slice:p:../x", true),
        ] {
            assert!(r(path, systemd).is_err(), "{path:?} {systemd}");
        }
    }

    /// A cgroup directory as the kernel shows it, in plain files.
    fn fake_cgroup(dir: &Path, controllers: &str, enabled: &str) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
        fs::write(dir.join("cgroup.subtree_control"), enabled).unwrap();
    }

    fn limits(cpu_max: Option<(u64, u64)>) -> HostLimits {
        HostLimits {
            memory_max: 96 * MIB,
            pids_max: PIDS_MAX,
            cpu_max,
        }
    }

    #[test]
    fn prepare_enables_the_controllers_down_the_path_and_writes_the_limits() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        fake_cgroup(root, "cpuset cpu io memory pids", "memory");
        fake_cgroup(&root.join("kubepods"), "cpu memory pids", "");
        let dir = root.join("kubepods/pod1");
        let placement = Placement {
            dir: dir.clone(),
            limits: limits(Some((150_000, 100_000))),
        };
        prepare(root, &placement).unwrap();
        let read = |p: &Path| fs::read_to_string(p).unwrap();
        // memory was on in the root already: only the others are asked for, in one write.
        assert_eq!(read(&root.join("cgroup.subtree_control")), "+pids +cpu");
        assert_eq!(
            read(&root.join("kubepods/cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
        assert_eq!(read(&dir.join("memory.max")), (96 * MIB).to_string());
        assert_eq!(read(&dir.join("pids.max")), "256");
        assert_eq!(read(&dir.join("cpu.max")), "150000 100000");
        // The leaf's own subtree is left alone (husk-vmm lives in it).
        assert!(!dir.join("cgroup.subtree_control").exists());
    }

    #[test]
    fn without_a_quota_no_cpu_controller_or_cpu_max_is_touched() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        fake_cgroup(root, "memory pids", "memory pids");
        let dir = root.join("solo");
        prepare(
            root,
            &Placement {
                dir: dir.clone(),
                limits: limits(None),
            },
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "memory pids",
            "nothing to enable"
        );
        assert!(!dir.join("cpu.max").exists());
        assert!(dir.join("memory.max").exists());
    }

    #[test]
    fn a_missing_controller_is_named() {
        let root = tempfile::tempdir().unwrap();
        fake_cgroup(root.path(), "cpu memory", "");
        let err = prepare(
            root.path(),
            &Placement {
                dir: root.path().join("x"),
                limits: limits(None),
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                CgroupError::Missing {
                    controller: "pids",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("pids controller is not available"));
    }

    #[test]
    fn a_directory_outside_the_root_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let err = prepare(
            &root.path().join("cg"),
            &Placement {
                dir: root.path().join("elsewhere"),
                limits: limits(None),
            },
        )
        .unwrap_err();
        assert!(matches!(err, CgroupError::Invalid { .. }), "{err}");
        assert!(!root.path().join("elsewhere").exists());
    }

    #[test]
    fn host_limits_follow_the_vm_size_and_the_quota() {
        use oci_spec::runtime::{LinuxCpuBuilder, LinuxResourcesBuilder};
        let size = VmSize {
            vcpus: 2,
            memory_mib: 320,
        };
        let none = HostLimits::for_vm(size, None, 32);
        assert_eq!(none.memory_max, 352 * MIB);
        assert_eq!(none.pids_max, PIDS_MAX);
        assert_eq!(none.cpu_max, None);
        let cpu = |quota: Option<i64>, period: Option<u64>| {
            let mut cpu = LinuxCpuBuilder::default();
            if let Some(q) = quota {
                cpu = cpu.quota(q);
            }
            if let Some(p) = period {
                cpu = cpu.period(p);
            }
            LinuxResourcesBuilder::default()
                .cpu(cpu.build().unwrap())
                .build()
                .unwrap()
        };
        let with = |r: &LinuxResources| HostLimits::for_vm(size, Some(r), 32).cpu_max;
        assert_eq!(with(&cpu(Some(50_000), None)), Some((50_000, 100_000)));
        assert_eq!(
            with(&cpu(Some(20_000), Some(10_000))),
            Some((20_000, 10_000))
        );
        assert_eq!(with(&cpu(Some(-1), None)), None, "-1 is no quota");
        assert_eq!(with(&cpu(Some(10), Some(0))), None);
        assert_eq!(with(&cpu(None, Some(10_000))), None);
    }

    #[test]
    fn the_systemd_form_is_recognised_by_its_shape() {
        for path in [
            "kubepods-besteffort-pod1.slice:cri-containerd:abc",
            ":cri-containerd:abc",
            "system.slice:docker:x",
        ] {
            assert!(is_systemd_path(path), "{path}");
        }
        for path in [
            "/kubepods/besteffort/pod1/abc",
            "a:b",
            "a.slice:b:c:d",
            "notslice:p:n",
        ] {
            assert!(!is_systemd_path(path), "{path}");
        }
    }

    #[test]
    fn of_spec_infers_the_form_unless_told() {
        let spec = |path: &str| -> Spec {
            serde_json::from_value(serde_json::json!({
                "ociVersion": "1.0.2",
                "linux": {"cgroupsPath": path},
            }))
            .unwrap()
        };
        assert_eq!(
            of_spec(&spec("machine.slice:libpod:abc"), None).unwrap(),
            Some(PathBuf::from(
                "/sys/fs/cgroup/machine.slice/libpod-abc.scope"
            ))
        );
        assert_eq!(
            of_spec(&spec("/default/abc"), None).unwrap(),
            Some(PathBuf::from("/sys/fs/cgroup/default/abc"))
        );
        assert!(of_spec(&spec("/default/abc"), Some(true)).is_err());
        let bare: Spec =
            serde_json::from_value(serde_json::json!({"ociVersion": "1.0.2"})).unwrap();
        assert_eq!(of_spec(&bare, None).unwrap(), None);
    }

    #[test]
    fn a_missing_cgroup_is_already_removed() {
        let root = tempfile::tempdir().unwrap();
        remove(&root.path().join("gone")).unwrap();
        let dir = root.path().join("empty");
        fs::create_dir(&dir).unwrap();
        remove(&dir).unwrap();
        assert!(!dir.exists());
    }
}
