//! The jail husk-vmm enters once the VM is built and before any vCPU runs: everything it will
//! ever open by path is open by then (/dev/kvm, kernel, initrd, console, disks, the shared
//! directory's root, the vsock listener), so from there on it needs almost nothing of the host.
//!
//! In order (each step needs the privileges the later ones drop):
//! 1. new mount, IPC, UTS and network namespaces (the network one holds only a loopback device
//!    that is down: husk-vmm's sockets are Unix sockets bound by path, which cross network
//!    namespaces); every mount made private, so nothing propagates back;
//! 2. a new root: an empty, read-only tmpfs holding only the directory of the vsock socket, bound
//!    at its own path (nosuid, nodev, noexec; writable, for the socket's removal on exit and the
//!    listeners of guest-initiated connections), entered with `pivot_root`; the host's root is
//!    detached, the working directory is `/`;
//! 3. resource limits: open files bounded (the virtio-fs device holds one fd per inode the guest
//!    has looked up: this is the bound on them), no core dumps (they would hold guest memory);
//! 4. `no_new_privs`, and every capability dropped from the bounding, inheritable and ambient
//!    sets; the effective and permitted sets keep only [`FS_CAPABILITIES`] when the VM has a
//!    virtio-fs share (its passthrough creates files as the guest's uid and gid, changes owners
//!    and modes, reads and writes whatever the guest's root may), nothing otherwise;
//! 5. without a share, umask 077 (with one, PassthroughFs has set it to 0: the guest's modes
//!    apply as sent).
//!
//! The jail is entered while the process has one thread, so each thread started later (the
//! vCPUs) inherits it. `--no-jail` skips it, for debugging only.

use std::path::{Component, Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use rustix::fs::{Mode, CWD};
use rustix::mount::{
    mount, mount_change, mount_remount, move_mount, open_tree, unmount, MountFlags,
    MountPropagationFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags,
};
use rustix::process::{chdir, pivot_root, setrlimit, umask, Resource, Rlimit};
use rustix::thread::{unshare_unsafe, UnshareFlags};

/// What the jail keeps visible and allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jail {
    /// A directory that stays visible, writable, at its own path (the vsock socket's).
    pub socket_dir: Option<PathBuf>,
    /// Whether a virtio-fs device serves a share (it keeps [`FS_CAPABILITIES`]).
    pub shares: bool,
}

/// Most open files in the jail (or the inherited hard limit if lower): the bound on inodes the
/// guest can make virtio-fs hold open, with room for the monitor's own fds.
pub const MAX_OPEN_FILES: u64 = 65_536;

/// What virtio-fs's passthrough needs, and only that: create files as the guest's uid and gid
/// (SETUID, SETGID: per-thread credential switches), change owners (CHOWN), act on files the
/// guest's root may touch whatever their modes (DAC_OVERRIDE, DAC_READ_SEARCH, FOWNER). Not
/// FSETID: without it the host kernel clears set-user-ID and set-group-ID bits on writes and
/// owner changes.
pub const FS_CAPABILITIES: [Capability; 6] = [
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_SETUID,
    Capability::CAP_SETGID,
];

/// Why the jail could not be entered (the VM does not run unconfined: it does not start).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A system call failed.
    #[error("cannot enter the jail: {what}: {err}{hint}")]
    Sys {
        /// What was being done.
        what: String,
        /// The error.
        err: std::io::Error,
        /// A hint for the usual cause.
        hint: &'static str,
    },
    /// The socket directory is not an absolute, plain path.
    #[error("cannot enter the jail: the vsock socket's directory {0} is not an absolute path without `..`")]
    BadPath(PathBuf),
    /// Capabilities could not be changed.
    #[error("cannot enter the jail: {what}: {err}")]
    Caps {
        /// What was being done.
        what: &'static str,
        /// The error.
        err: caps::errors::CapsError,
    },
}

const NEEDS_ROOT: &str =
    " (the jail needs root: run husk-vmm as root, or pass --no-jail to run it unconfined)";

fn sys(what: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> JailError {
    let what = what.into();
    move |errno| JailError::Sys {
        hint: if errno == rustix::io::Errno::PERM {
            NEEDS_ROOT
        } else {
            ""
        },
        what,
        err: errno.into(),
    }
}

fn caps_err(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> JailError {
    move |err| JailError::Caps { what, err }
}

impl Jail {
    /// The capabilities kept in the effective and permitted sets.
    pub fn kept_capabilities(&self) -> CapsHashSet {
        if self.shares {
            FS_CAPABILITIES.into_iter().collect()
        } else {
            CapsHashSet::new()
        }
    }

    /// Enters the jail; `fallback_mount_point` is any existing directory (the kernel's) where
    /// the new root is built when there is no socket directory.
    pub fn enter(&self, fallback_mount_point: &Path) -> Result<(), JailError> {
        let socket_dir = match &self.socket_dir {
            Some(dir) => Some((dir.clone(), plain_relative(dir)?)),
            None => None,
        };
        // SAFETY: no file-descriptor table is unshared (no CLONE_FILES), and the process has one
        // thread (unshare(CLONE_NEWNS) fails otherwise), so no thread can observe a change.
        unsafe {
            unshare_unsafe(
                UnshareFlags::NEWNS
                    | UnshareFlags::NEWIPC
                    | UnshareFlags::NEWUTS
                    | UnshareFlags::NEWNET,
            )
        }
        .map_err(sys("unshare(mount, IPC, UTS and network namespaces)"))?;
        mount_change(
            "/",
            MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
        )
        .map_err(sys("making every mount private"))?;
        // A detached copy of the socket directory, taken before anything covers it.
        let socket_tree = match &socket_dir {
            Some((dir, _)) => Some(
                open_tree(
                    CWD,
                    dir,
                    OpenTreeFlags::OPEN_TREE_CLONE | OpenTreeFlags::OPEN_TREE_CLOEXEC,
                )
                .map_err(sys(format!("open_tree({})", dir.display())))?,
            ),
            None => None,
        };
        let new_root = socket_dir
            .as_ref()
            .map(|(dir, _)| dir.as_path())
            .unwrap_or(fallback_mount_point);
        let hidden = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        mount(
            "husk-vmm-jail",
            new_root,
            "tmpfs",
            hidden,
            Some(c"size=64k,nr_inodes=64,mode=0755"),
        )
        .map_err(sys(format!(
            "mounting the jail's root on {}",
            new_root.display()
        )))?;
        if let (Some((dir, rel)), Some(tree)) = (&socket_dir, socket_tree) {
            let at = new_root.join(rel);
            create_parents(new_root, rel)?;
            move_mount(tree, "", CWD, &at, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
                .map_err(sys(format!("binding {} into the jail", dir.display())))?;
            mount_remount(&at, MountFlags::BIND | hidden, "").map_err(sys(format!(
                "making {} nosuid, nodev, noexec",
                dir.display()
            )))?;
        }
        chdir(new_root).map_err(sys("entering the jail's root"))?;
        pivot_root(".", ".").map_err(sys("pivot_root"))?;
        unmount(".", UnmountFlags::DETACH).map_err(sys("detaching the host's root"))?;
        chdir("/").map_err(sys("chdir /"))?;
        mount_remount("/", MountFlags::RDONLY | hidden, "")
            .map_err(sys("making the jail's root read-only"))?;
        self.limit_resources()?;
        if !self.shares {
            umask(Mode::from_raw_mode(0o077));
        }
        rustix::thread::set_no_new_privs(true).map_err(sys("no_new_privs"))?;
        self.drop_capabilities()
    }

    fn limit_resources(&self) -> Result<(), JailError> {
        // Never above what the caller allowed.
        let inherited = rustix::process::getrlimit(Resource::Nofile).maximum;
        let bound = inherited.map_or(MAX_OPEN_FILES, |max| max.min(MAX_OPEN_FILES));
        let open_files = Rlimit {
            current: Some(bound),
            maximum: Some(bound),
        };
        setrlimit(Resource::Nofile, open_files).map_err(sys("setrlimit(RLIMIT_NOFILE)"))?;
        let none = Rlimit {
            current: Some(0),
            maximum: Some(0),
        };
        setrlimit(Resource::Core, none).map_err(sys("setrlimit(RLIMIT_CORE)"))
    }

    fn drop_capabilities(&self) -> Result<(), JailError> {
        // Bounding first: it needs CAP_SETPCAP, which the sets below drop.
        caps::clear(None, CapSet::Bounding).map_err(caps_err("clearing the bounding set"))?;
        caps::clear(None, CapSet::Ambient).map_err(caps_err("clearing the ambient set"))?;
        caps::clear(None, CapSet::Inheritable).map_err(caps_err("clearing the inheritable set"))?;
        let keep = self.kept_capabilities();
        caps::set(None, CapSet::Effective, &keep).map_err(caps_err("setting the effective set"))?;
        caps::set(None, CapSet::Permitted, &keep).map_err(caps_err("setting the permitted set"))
    }
}

/// `dir` without its leading `/`, refused unless it is absolute and holds only plain names.
fn plain_relative(dir: &Path) -> Result<PathBuf, JailError> {
    let mut components = dir.components();
    if components.next() != Some(Component::RootDir) {
        return Err(JailError::BadPath(dir.to_path_buf()));
    }
    let mut rel = PathBuf::new();
    for c in components {
        match c {
            Component::Normal(name) => rel.push(name),
            _ => return Err(JailError::BadPath(dir.to_path_buf())),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(JailError::BadPath(dir.to_path_buf()));
    }
    Ok(rel)
}

/// Creates the directories leading to `root/rel` (and `rel` itself) in the jail's tmpfs.
fn create_parents(root: &Path, rel: &Path) -> Result<(), JailError> {
    let mut at = root.to_path_buf();
    for name in rel.iter() {
        at.push(name);
        match rustix::fs::mkdir(&at, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(sys(format!("creating {}", at.display()))(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_directories_must_be_absolute_and_plain() {
        assert_eq!(
            plain_relative(Path::new("/run/husk/c1/vm")).unwrap(),
            Path::new("run/husk/c1/vm")
        );
        for bad in ["run/husk", "/", "/run/../etc", ""] {
            assert!(
                matches!(plain_relative(Path::new(bad)), Err(JailError::BadPath(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn only_a_share_keeps_capabilities_and_never_mknod_fsetid_or_sys_admin() {
        let none = Jail {
            socket_dir: None,
            shares: false,
        };
        assert!(none.kept_capabilities().is_empty());
        let fs = Jail {
            socket_dir: None,
            shares: true,
        };
        let kept = fs.kept_capabilities();
        assert_eq!(kept.len(), FS_CAPABILITIES.len());
        for cap in [
            Capability::CAP_MKNOD,
            Capability::CAP_FSETID,
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_SETPCAP,
            Capability::CAP_NET_ADMIN,
            Capability::CAP_SYS_PTRACE,
        ] {
            assert!(!kept.contains(&cap), "{cap}");
        }
    }
}
