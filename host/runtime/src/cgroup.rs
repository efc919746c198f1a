//! The host cgroup of a sandbox: `linux.cgroupsPath` names the cgroup (v2) in which the engine
//! wants the container's processes; on the host those are the supervisor and husk-vmm. The same
//! limits are applied inside the guest by the agent; here the cgroup groups and accounts.
//!
//! - cgroupfs paths (`/libpod_parent/libpod-ID`, or relative `a/b`) are directories under
//!   `/sys/fs/cgroup`;
//! - with `--systemd-cgroup`, `slice:prefix:name` is `<slice hierarchy>/<prefix>-<name>.scope`,
//!   where `a-b.slice` lies in `a.slice/a-b.slice` (systemd's naming); the directory is created
//!   directly, without asking systemd over D-Bus.
//!
//! No component may be empty, `.` or `..`, so the path stays under the cgroup root.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

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
    /// Creating or joining the cgroup failed.
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

/// Creates `dir` (and its parents) and moves the calling process into it; its children
/// (husk-vmm) start there.
pub fn enter(dir: &Path) -> Result<(), CgroupError> {
    let io_err = |action| {
        let dir = dir.to_path_buf();
        move |source| CgroupError::Io {
            action,
            dir,
            source,
        }
    };
    fs::create_dir_all(dir).map_err(io_err("create"))?;
    fs::write(dir.join("cgroup.procs"), "0").map_err(io_err("join"))
}

/// Removes `dir` once no process is left in it (for `delete`). A missing cgroup is fine.
pub fn remove(dir: &Path) -> Result<(), CgroupError> {
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CgroupError::Io {
            action: "remove",
            dir: dir.to_path_buf(),
            source,
        }),
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
}
