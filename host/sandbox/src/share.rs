//! The sandbox's shared directory: what the guest sees of the host through virtio-fs.
//!
//! ```text
//! <root>/<id>/staging/           the host's side: bound onto itself, private, then shared
//!   <container>/rootfs           bind of the container's rootfs (read-only if root.readonly)
//!   <container>/mounts/<n>       bind of the spec's n-th mount when it is a bind mount
//!                                (read-only if its options say "ro")
//! <root>/<id>/shared/            what husk-vmm exports: a read-only bind of staging/, a slave
//!                                of it, so each bind made in staging/ appears here too
//! ```
//!
//! The guest can write only inside the binds the spec asks for (the rootfs and the read-write
//! volumes); the tree around them (`shared/`, `shared/<container>/`, `mounts/`) is read-only to
//! it. So husk's own mkdirs, binds and unmounts, all made in `staging/`, work on paths no guest
//! can rename or replace with a symlink, and a guest cannot fill the host's `/run` through the
//! share. Every bind is made detached (`open_tree`), given `nosuid,nodev` (and `ro` when asked)
//! there (`mount_setattr`), and only then attached (`move_mount`): a read-only volume is never
//! writable, not even for an instant, and a device node a guest creates in a volume cannot open
//! a host device.
//!
//! The guest mounts the share at [`GUEST_SHARE_DIR`]; the spec handed to the agent is rewritten so
//! that `root.path` and the bind mounts' sources point there. Names inside the share come only
//! from validated container IDs and indices, never from the spec, so nothing in a spec can place
//! a mount outside the share. Bind sources are host paths chosen by the caller (as with runc):
//! relative ones are relative to the bundle, all are resolved (symlinks followed) and must exist.
//! Mount destinations are resolved inside the container's rootfs by the agent, in the guest.
//!
//! Mounting goes through the [`Mounter`] trait: [`HostMounter`] does the system calls (Linux 5.12
//! or later, for `mount_setattr`), tests use a recording double, and one test does real mounts
//! (it needs root, like husk itself).

use std::fs::{self, DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use oci_spec::runtime::{Mount, Spec};
use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::id::ContainerId;

/// Where the guest mounts the sandbox's share.
pub const GUEST_SHARE_DIR: &str = "/run/husk/shared";
/// The most bind mounts one container may have.
pub const MAX_BIND_MOUNTS: usize = 256;

/// Errors preparing or removing a share.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// A bind mount without a source.
    #[error("mounts[{index}] ({destination}): a bind mount needs a source")]
    NoSource { index: usize, destination: PathBuf },
    /// A bind source that does not exist or cannot be resolved.
    #[error("mounts[{index}] ({destination}): source {source_path}: {error}")]
    BadSource {
        index: usize,
        destination: PathBuf,
        source_path: PathBuf,
        #[source]
        error: io::Error,
    },
    /// More than [`MAX_BIND_MOUNTS`] bind mounts.
    #[error("{0} bind mounts; the limit is {MAX_BIND_MOUNTS}")]
    TooManyMounts(usize),
    /// A mount system call or a file operation failed.
    #[error("cannot {action} {path}: {error}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    /// Mounts are still present under the share after unmounting: nothing is deleted.
    #[error("{path} still has mounts after unmounting ({remaining:?}); not removing it")]
    StillMounted {
        path: PathBuf,
        remaining: Vec<PathBuf>,
    },
    /// Something other than an empty mount point was found in the share: nothing is deleted.
    #[error("unexpected content {0} in the share; not removing it")]
    Unexpected(PathBuf),
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ShareError {
    let path = path.to_path_buf();
    move |error| ShareError::Io {
        action,
        path,
        error,
    }
}

/// One bind mount into the share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bind {
    /// The host path, resolved.
    pub source: PathBuf,
    /// Where in the share, relative to it.
    pub target: PathBuf,
    /// Remount read-only after binding.
    pub readonly: bool,
    /// Bind the submounts too (`rbind`, and the rootfs).
    pub recursive: bool,
    /// The source is a directory (else the mount point is an empty file).
    pub is_dir: bool,
}

/// What to bind for one container, and its spec rewritten for the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharePlan {
    /// The binds, rootfs first.
    pub binds: Vec<Bind>,
    /// The spec with `root.path` and bind sources pointing into [`GUEST_SHARE_DIR`].
    pub guest_spec: Spec,
    /// The rootfs in the guest (for `CreateContainer.rootfs_path`).
    pub guest_rootfs: PathBuf,
}

/// Whether a spec mount is a bind mount (type `bind`, or option `bind`/`rbind`).
fn is_bind(mount: &Mount) -> bool {
    mount.typ().as_deref() == Some("bind")
        || mount
            .options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

/// The last of `ro`/`rw` wins, as for mount(8); default read-write.
fn is_readonly(options: &[String]) -> bool {
    options
        .iter()
        .rev()
        .find_map(|o| match o.as_str() {
            "ro" => Some(true),
            "rw" => Some(false),
            _ => None,
        })
        .unwrap_or(false)
}

/// Plans the share of `container` from its loaded bundle.
pub fn plan(bundle: &Bundle, container: &ContainerId) -> Result<SharePlan, ShareError> {
    let base = PathBuf::from(container.as_str());
    let guest_base = Path::new(GUEST_SHARE_DIR).join(container.as_str());
    let mut guest_spec = bundle.spec.clone();
    let rootfs_readonly = bundle
        .spec
        .root()
        .as_ref()
        .and_then(|root| root.readonly())
        .unwrap_or(false);
    let mut binds = vec![Bind {
        source: bundle.rootfs.clone(),
        target: base.join("rootfs"),
        readonly: rootfs_readonly,
        recursive: true,
        is_dir: true,
    }];
    let guest_rootfs = guest_base.join("rootfs");
    if let Some(root) = guest_spec.root_mut() {
        root.set_path(guest_rootfs.clone());
    }

    let mut mounts = guest_spec.mounts().clone().unwrap_or_default();
    let bind_count = mounts.iter().filter(|m| is_bind(m)).count();
    if bind_count > MAX_BIND_MOUNTS {
        return Err(ShareError::TooManyMounts(bind_count));
    }
    for (index, mount) in mounts.iter_mut().enumerate() {
        if !is_bind(mount) {
            continue;
        }
        let destination = mount.destination().clone();
        let source = mount.source().clone().ok_or(ShareError::NoSource {
            index,
            destination: destination.clone(),
        })?;
        let joined = bundle.dir.join(&source);
        let bad_source = |error| ShareError::BadSource {
            index,
            destination: destination.clone(),
            source_path: joined.clone(),
            error,
        };
        let resolved = fs::canonicalize(&joined).map_err(bad_source)?;
        let is_dir = fs::metadata(&resolved).map_err(bad_source)?.is_dir();
        let options = mount.options().clone().unwrap_or_default();
        let target = base.join("mounts").join(index.to_string());
        binds.push(Bind {
            source: resolved,
            target: target.clone(),
            readonly: is_readonly(&options),
            recursive: options.iter().any(|o| o == "rbind"),
            is_dir,
        });
        mount.set_source(Some(Path::new(GUEST_SHARE_DIR).join(target)));
    }
    if !mounts.is_empty() {
        guest_spec.set_mounts(Some(mounts));
    }
    Ok(SharePlan {
        binds,
        guest_spec,
        guest_rootfs,
    })
}

/// The mount system calls the share needs.
pub trait Mounter {
    /// `mount --bind` (or `--rbind`), as it is: for the share's own directories.
    fn bind(&self, source: &Path, target: &Path, recursive: bool) -> io::Result<()>;
    /// Binds `source` (with its submounts if `recursive`) onto `target` as `nosuid,nodev`, and
    /// read-only if `readonly`, with the flags set before the mount is attached.
    fn attach(
        &self,
        source: &Path,
        target: &Path,
        recursive: bool,
        readonly: bool,
    ) -> io::Result<()>;
    /// Remounts a bind mount read-only (`nosuid,nodev` too).
    fn remount_readonly(&self, target: &Path) -> io::Result<()>;
    /// Makes a mount (and its submounts) private: no propagation in or out.
    fn make_private(&self, target: &Path) -> io::Result<()>;
    /// Makes a mount shared: mounts made under it propagate to its peers and slaves.
    fn make_shared(&self, target: &Path) -> io::Result<()>;
    /// Makes a mount a slave: it receives its master's mounts and sends none back.
    fn make_slave(&self, target: &Path) -> io::Result<()>;
    /// Detaches a mount (`umount -l`).
    fn unmount(&self, target: &Path) -> io::Result<()>;
}

/// The mount calls and the mount table: what the share needs from the host.
pub trait Mounts: Mounter + Send + Sync {
    /// The text of /proc/self/mountinfo (or what stands for it).
    fn mountinfo(&self) -> io::Result<String>;
}

impl Mounts for HostMounter {
    fn mountinfo(&self) -> io::Result<String> {
        read_mountinfo()
    }
}

/// The real system calls.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostMounter;

impl Mounter for HostMounter {
    fn bind(&self, source: &Path, target: &Path, recursive: bool) -> io::Result<()> {
        let flags = if recursive {
            MsFlags::MS_BIND | MsFlags::MS_REC
        } else {
            MsFlags::MS_BIND
        };
        mount(Some(source), target, None::<&str>, flags, None::<&str>).map_err(io::Error::from)
    }

    fn attach(
        &self,
        source: &Path,
        target: &Path,
        recursive: bool,
        readonly: bool,
    ) -> io::Result<()> {
        let mut attr_set = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
        if readonly {
            attr_set |= libc::MOUNT_ATTR_RDONLY;
        }
        let tree = fd_mount::open_tree_clone(source, recursive)?;
        fd_mount::set_attr(&tree, attr_set, recursive)?;
        fd_mount::move_to(&tree, target)
    }

    fn remount_readonly(&self, target: &Path) -> io::Result<()> {
        let flags = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV;
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(io::Error::from)
    }

    fn make_private(&self, target: &Path) -> io::Result<()> {
        propagation(target, MsFlags::MS_PRIVATE | MsFlags::MS_REC)
    }

    fn make_shared(&self, target: &Path) -> io::Result<()> {
        propagation(target, MsFlags::MS_SHARED)
    }

    fn make_slave(&self, target: &Path) -> io::Result<()> {
        propagation(target, MsFlags::MS_SLAVE)
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        umount2(target, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW).map_err(io::Error::from)
    }
}

fn propagation(target: &Path, flags: MsFlags) -> io::Result<()> {
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(io::Error::from)
}

/// The new mount API (Linux 5.2; `mount_setattr` 5.12), which nix does not wrap.
mod fd_mount {
    use std::ffi::CString;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    fn c_path(path: &Path) -> io::Result<CString> {
        CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }

    /// A detached copy of the mount at `source` (and of its submounts if `recursive`).
    pub fn open_tree_clone(source: &Path, recursive: bool) -> io::Result<OwnedFd> {
        let path = c_path(source)?;
        let mut flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC;
        if recursive {
            flags |= libc::AT_RECURSIVE as libc::c_uint;
        }
        // SAFETY: open_tree reads the NUL-terminated path, which outlives the call, and
        // returns a new fd or -1; no memory of ours is written.
        let fd =
            unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: the kernel just returned this fd to us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Sets `attr_set` on the detached tree `tree` (all of it if `recursive`).
    pub fn set_attr(tree: &OwnedFd, attr_set: u64, recursive: bool) -> io::Result<()> {
        let mut attr: libc::mount_attr = libc::mount_attr {
            attr_set,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        let mut flags = libc::AT_EMPTY_PATH;
        if recursive {
            flags |= libc::AT_RECURSIVE;
        }
        // SAFETY: mount_setattr reads `size` bytes of `attr` (a live, initialised struct) and
        // the empty NUL-terminated path; the fd is ours and open.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                tree.as_raw_fd(),
                c"".as_ptr(),
                flags,
                &mut attr as *mut libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Attaches the detached tree `tree` at `target`.
    pub fn move_to(tree: &OwnedFd, target: &Path) -> io::Result<()> {
        let path = c_path(target)?;
        // SAFETY: move_mount reads the two NUL-terminated paths, which outlive the call; the
        // fd is ours and open.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::MOVE_MOUNT_F_EMPTY_PATH,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The two sides of a sandbox's share (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareDirs<'a> {
    /// `staging/`: where husk makes mount points and binds; never exported.
    pub host: &'a Path,
    /// `shared/`: what husk-vmm exports; a read-only slave view of `host`.
    pub guest: &'a Path,
}

fn make_dir(dir: &Path) -> Result<(), ShareError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("create", dir))
}

/// Sets up the share's two directories (created 0700): `host` bound onto itself, made private
/// (nothing of the host's propagates into it) and then shared; `guest` a bind of it, made its
/// slave and read-only.
pub fn create_share<M: Mounter + ?Sized>(
    dirs: ShareDirs<'_>,
    mounter: &M,
) -> Result<(), ShareError> {
    make_dir(dirs.host)?;
    mounter
        .bind(dirs.host, dirs.host, false)
        .map_err(io_err("bind-mount onto itself", dirs.host))?;
    mounter
        .make_private(dirs.host)
        .map_err(io_err("make private", dirs.host))?;
    mounter
        .make_shared(dirs.host)
        .map_err(io_err("make shared", dirs.host))?;
    make_dir(dirs.guest)?;
    mounter
        .bind(dirs.host, dirs.guest, false)
        .map_err(io_err("bind-mount the share's host side onto", dirs.guest))?;
    mounter
        .make_slave(dirs.guest)
        .map_err(io_err("make a slave", dirs.guest))?;
    mounter
        .remount_readonly(dirs.guest)
        .map_err(io_err("remount read-only", dirs.guest))
}

/// Binds a plan's sources into the share (made by [`create_share`]), on its host side. On
/// failure the binds made so far are undone.
pub fn bind_all<M: Mounter + ?Sized>(
    dirs: ShareDirs<'_>,
    plan: &SharePlan,
    mounter: &M,
) -> Result<(), ShareError> {
    let mut done: Vec<PathBuf> = Vec::new();
    let result = plan.binds.iter().try_for_each(|bind| {
        let target = dirs.host.join(&bind.target);
        make_mount_point(&target, bind.is_dir)?;
        mounter
            .attach(&bind.source, &target, bind.recursive, bind.readonly)
            .map_err(io_err("bind-mount onto", &target))?;
        done.push(target);
        Ok(())
    });
    if result.is_err() {
        for target in done.iter().rev() {
            let _ = mounter.unmount(target);
        }
    }
    result
}

fn make_mount_point(target: &Path, is_dir: bool) -> Result<(), ShareError> {
    make_dir(target.parent().unwrap_or(target))?;
    if is_dir {
        DirBuilder::new()
            .mode(0o700)
            .create(target)
            .map_err(io_err("create", target))
    } else {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(target)
            .map(drop)
            .map_err(io_err("create", target))
    }
}

/// Unmounts and removes one container's part of the share (`<container>/` on both sides).
pub fn remove_container<M: Mounter + ?Sized>(
    dirs: ShareDirs<'_>,
    container: &str,
    mounter: &M,
    mountinfo: &dyn Fn() -> io::Result<String>,
) -> Result<(), ShareError> {
    let mut parts = Path::new(container).components();
    if !matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(_)), None)
    ) {
        return Err(ShareError::Unexpected(dirs.host.join(container)));
    }
    let host = dirs.host.join(container);
    let guest = dirs.guest.join(container);
    unmount_and_remove(&[&host, &guest], &[&host, &guest], mounter, mountinfo)
}

/// Unmounts everything of the share (both sides, deepest first, as listed in `mountinfo`, the
/// text of /proc/self/mountinfo), checks that nothing is left mounted, then removes the
/// share's mount points. It deletes only empty directories and empty files, so a mount that
/// survived can never lead to deleting the files behind it; and it works only on the host
/// side and on the guest side's (read-only, unchangeable) mount point.
pub fn remove_share<M: Mounter + ?Sized>(
    dirs: ShareDirs<'_>,
    mounter: &M,
    mountinfo: &dyn Fn() -> io::Result<String>,
) -> Result<(), ShareError> {
    let both = [dirs.guest, dirs.host];
    unmount_and_remove(&both, &both, mounter, mountinfo)
}

/// The most rounds of unmounting (stacked mounts need one each).
const MAX_UNMOUNT_ROUNDS: usize = 16;

/// Detaches every mount under `unmount`, checks that none is left under `check`, then removes
/// the directories of `check` (see [`remove_share`]). Only the topmost mounts are detached (a
/// lazy unmount takes the submounts with it): their paths lie in husk's own tree, while a
/// deeper mount's path runs through a bind the guest can write, where a planted symlink could
/// point the unmount at a host mount.
fn unmount_and_remove<M: Mounter + ?Sized>(
    unmount: &[&Path],
    check: &[&Path],
    mounter: &M,
    mountinfo: &dyn Fn() -> io::Result<String>,
) -> Result<(), ShareError> {
    let first = check.first().copied().unwrap_or(Path::new("/"));
    let read = || mountinfo().map_err(io_err("read the mount table for", first));
    for _ in 0..MAX_UNMOUNT_ROUNDS {
        let table = read()?;
        let points = topmost(unmount.iter().flat_map(|dir| mounts_under(&table, dir)));
        if points.is_empty() {
            break;
        }
        for point in &points {
            // A propagated copy goes with its master: ignore what is already gone.
            let _ = mounter.unmount(point);
        }
    }
    let table = read()?;
    for dir in check {
        let remaining = mounts_under(&table, dir);
        if !remaining.is_empty() {
            return Err(ShareError::StillMounted {
                path: dir.to_path_buf(),
                remaining,
            });
        }
    }
    for dir in check {
        match fs::symlink_metadata(dir) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_err("inspect", dir)(err)),
            Ok(meta) if meta.is_dir() => remove_mount_points(dir)?,
            Ok(_) => return Err(ShareError::Unexpected(dir.to_path_buf())),
        }
    }
    Ok(())
}

/// The mount points not below another one of `points` (each once).
fn topmost(points: impl Iterator<Item = PathBuf>) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = points.collect();
    points.sort();
    points.dedup();
    let mut top: Vec<PathBuf> = Vec::new();
    for point in points {
        // Sorted, so a mount's ancestors come before it.
        if !top.iter().any(|t| point.starts_with(t)) {
            top.push(point);
        }
    }
    top
}

/// Removes a tree made only of directories and empty files.
fn remove_mount_points(dir: &Path) -> Result<(), ShareError> {
    for entry in fs::read_dir(dir).map_err(io_err("read", dir))? {
        let entry = entry.map_err(io_err("read", dir))?;
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).map_err(io_err("inspect", &path))?;
        if meta.is_dir() {
            remove_mount_points(&path)?;
        } else if meta.is_file() && meta.len() == 0 {
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
        } else {
            return Err(ShareError::Unexpected(path));
        }
    }
    fs::remove_dir(dir).map_err(io_err("remove", dir))
}

/// The mount points at or under `dir` in a /proc/self/mountinfo text.
pub fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|point| point.starts_with(dir))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| b == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0')));
        match octal.and_then(|v| u8::try_from(v).ok()) {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// /proc/self/mountinfo.
pub fn read_mountinfo() -> io::Result<String> {
    fs::read_to_string("/proc/self/mountinfo")
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    const SPEC: &str = r#"{
      "ociVersion": "1.0.2",
      "root": {"path": "rootfs", "readonly": true},
      "process": {"cwd": "/", "args": ["sh"], "user": {"uid": 0, "gid": 0}},
      "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/data", "type": "bind", "source": "data", "options": ["rbind", "ro"]},
        {"destination": "/etc/hosts", "type": "none", "source": "HOSTS", "options": ["bind", "rw"]}
      ]
    }"#;

    /// A bundle with rootfs/, data/ and an `outside` file (the hosts file) next to it.
    fn bundle() -> (tempfile::TempDir, Bundle) {
        let dir = tempfile::tempdir().unwrap();
        let bundle_dir = dir.path().join("bundle");
        fs::create_dir_all(bundle_dir.join("rootfs")).unwrap();
        fs::create_dir(bundle_dir.join("data")).unwrap();
        fs::write(bundle_dir.join("data/file"), "data").unwrap();
        let hosts = dir.path().join("hosts");
        fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let spec = SPEC.replace("HOSTS", hosts.to_str().unwrap());
        fs::write(bundle_dir.join("config.json"), spec).unwrap();
        let bundle = crate::bundle::load(&bundle_dir).unwrap();
        (dir, bundle)
    }

    fn id() -> ContainerId {
        ContainerId::new("c1").unwrap()
    }

    #[test]
    fn plan_binds_rootfs_and_bind_mounts_only() {
        let (dir, bundle) = bundle();
        let plan = plan(&bundle, &id()).unwrap();
        assert_eq!(
            plan.binds,
            vec![
                Bind {
                    source: bundle.rootfs.clone(),
                    target: "c1/rootfs".into(),
                    readonly: true,
                    recursive: true,
                    is_dir: true,
                },
                Bind {
                    source: bundle.dir.join("data"),
                    target: "c1/mounts/1".into(),
                    readonly: true,
                    recursive: true,
                    is_dir: true,
                },
                Bind {
                    source: fs::canonicalize(dir.path().join("hosts")).unwrap(),
                    target: "c1/mounts/2".into(),
                    readonly: false,
                    recursive: false,
                    is_dir: false,
                },
            ]
        );
    }

    #[test]
    fn plan_rewrites_the_spec_for_the_guest() {
        let (_dir, bundle) = bundle();
        let plan = plan(&bundle, &id()).unwrap();
        assert_eq!(plan.guest_rootfs, Path::new("/run/husk/shared/c1/rootfs"));
        let spec = &plan.guest_spec;
        assert_eq!(spec.root().as_ref().unwrap().path(), &plan.guest_rootfs);
        let mounts = spec.mounts().as_ref().unwrap();
        assert_eq!(mounts[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(
            mounts[1].source().as_deref(),
            Some(Path::new("/run/husk/shared/c1/mounts/1"))
        );
        assert_eq!(mounts[1].destination(), Path::new("/data"));
        assert_eq!(
            mounts[2].source().as_deref(),
            Some(Path::new("/run/husk/shared/c1/mounts/2"))
        );
    }

    #[test]
    fn missing_bind_source_is_named() {
        let (_dir, mut bundle) = bundle();
        let mut mounts = bundle.spec.mounts().clone().unwrap();
        mounts[1].set_source(Some("nope".into()));
        bundle.spec.set_mounts(Some(mounts));
        let err = plan(&bundle, &id()).unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("mounts[1] (/data): source "),
            "{message}"
        );
        assert!(message.contains("nope"), "{message}");
    }

    #[test]
    fn bind_without_source_is_refused() {
        let (_dir, mut bundle) = bundle();
        let mut mounts = bundle.spec.mounts().clone().unwrap();
        mounts[1].set_source(None);
        bundle.spec.set_mounts(Some(mounts));
        assert!(matches!(
            plan(&bundle, &id()),
            Err(ShareError::NoSource { index: 1, .. })
        ));
    }

    #[test]
    fn too_many_binds_are_refused() {
        let (_dir, mut bundle) = bundle();
        let mut mounts = bundle.spec.mounts().clone().unwrap();
        let bind = mounts[1].clone();
        mounts.extend(std::iter::repeat_n(bind, MAX_BIND_MOUNTS));
        bundle.spec.set_mounts(Some(mounts));
        assert!(matches!(
            plan(&bundle, &id()),
            Err(ShareError::TooManyMounts(_))
        ));
    }

    #[test]
    fn last_of_ro_and_rw_wins() {
        let opts = |o: &[&str]| o.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(is_readonly(&opts(&["rw", "ro"])));
        assert!(!is_readonly(&opts(&["ro", "rw"])));
        assert!(!is_readonly(&opts(&["nosuid"])));
    }

    /// Records calls; fails the bind whose target ends with `fail_on`.
    #[derive(Default)]
    struct Recorder {
        calls: RefCell<Vec<String>>,
        fail_on: Option<&'static str>,
    }

    impl Recorder {
        fn record(&self, what: &str, target: &Path) -> io::Result<()> {
            self.calls
                .borrow_mut()
                .push(format!("{what} {}", target.display()));
            Ok(())
        }
    }

    impl Mounter for Recorder {
        fn bind(&self, source: &Path, target: &Path, recursive: bool) -> io::Result<()> {
            if self.fail_on.is_some_and(|f| target.ends_with(f)) {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            let kind = if recursive { "rbind" } else { "bind" };
            self.calls.borrow_mut().push(format!(
                "{kind} {} {}",
                source.display(),
                target.display()
            ));
            Ok(())
        }
        fn attach(
            &self,
            source: &Path,
            target: &Path,
            recursive: bool,
            readonly: bool,
        ) -> io::Result<()> {
            if self.fail_on.is_some_and(|f| target.ends_with(f)) {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            let kind = if recursive { "rattach" } else { "attach" };
            let ro = if readonly { " ro" } else { "" };
            self.calls.borrow_mut().push(format!(
                "{kind}{ro} {} {}",
                source.display(),
                target.display()
            ));
            Ok(())
        }
        fn remount_readonly(&self, target: &Path) -> io::Result<()> {
            self.record("ro", target)
        }
        fn make_private(&self, target: &Path) -> io::Result<()> {
            self.record("private", target)
        }
        fn make_shared(&self, target: &Path) -> io::Result<()> {
            self.record("shared", target)
        }
        fn make_slave(&self, target: &Path) -> io::Result<()> {
            self.record("slave", target)
        }
        fn unmount(&self, target: &Path) -> io::Result<()> {
            self.record("umount", target)
        }
    }

    /// The two sides of a share in `dir`.
    fn dirs(dir: &Path) -> (PathBuf, PathBuf) {
        (dir.join("staging"), dir.join("shared"))
    }

    #[test]
    fn binds_are_made_on_the_host_side_with_their_flags_before_attaching() {
        let (dir, bundle) = bundle();
        let plan = plan(&bundle, &id()).unwrap();
        let (host, guest) = dirs(dir.path());
        let share = ShareDirs {
            host: &host,
            guest: &guest,
        };
        let recorder = Recorder::default();
        create_share(share, &recorder).unwrap();
        bind_all(share, &plan, &recorder).unwrap();
        let (h, g) = (host.display(), guest.display());
        let hosts = fs::canonicalize(dir.path().join("hosts")).unwrap();
        assert_eq!(
            *recorder.calls.borrow(),
            vec![
                format!("bind {h} {h}"),
                format!("private {h}"),
                format!("shared {h}"),
                format!("bind {h} {g}"),
                format!("slave {g}"),
                format!("ro {g}"),
                format!("rattach ro {} {h}/c1/rootfs", bundle.rootfs.display()),
                format!(
                    "rattach ro {} {h}/c1/mounts/1",
                    bundle.dir.join("data").display()
                ),
                format!("attach {} {h}/c1/mounts/2", hosts.display()),
            ]
        );
        assert!(host.join("c1/rootfs").is_dir());
        assert!(host.join("c1/mounts/2").is_file());
    }

    #[test]
    fn a_failed_bind_undoes_the_earlier_ones() {
        let (dir, bundle) = bundle();
        let plan = plan(&bundle, &id()).unwrap();
        let (host, guest) = dirs(dir.path());
        let share = ShareDirs {
            host: &host,
            guest: &guest,
        };
        let recorder = Recorder {
            fail_on: Some("mounts/2"),
            ..Recorder::default()
        };
        let err = bind_all(share, &plan, &recorder).unwrap_err();
        assert!(err.to_string().contains("mounts/2"), "{err}");
        let calls = recorder.calls.borrow();
        let h = host.display();
        assert_eq!(
            calls[calls.len() - 2..],
            [
                format!("umount {h}/c1/mounts/1"),
                format!("umount {h}/c1/rootfs")
            ]
        );
    }

    #[test]
    fn only_the_topmost_mounts_are_unmounted() {
        // A mount below a bind lies in a tree the guest can change (a symlink planted in the
        // rootfs): its path is never handed to umount; the bind's lazy unmount takes it along.
        let dir = tempfile::tempdir().unwrap();
        let (host, guest) = dirs(dir.path());
        fs::create_dir_all(host.join("c1/rootfs")).unwrap();
        let table = std::cell::Cell::new(true);
        let info = format!(
            "1 1 0:1 / {h}/c1/rootfs rw - ext4 x rw\n\
             2 1 0:1 / {h}/c1/rootfs/proc rw - proc x rw\n\
             3 1 0:1 / {g}/c1/rootfs rw - ext4 x rw\n\
             4 1 0:1 / {g}/c1/rootfs/proc rw - proc x rw\n",
            h = host.display(),
            g = guest.display()
        );
        let recorder = Recorder::default();
        let share = ShareDirs {
            host: &host,
            guest: &guest,
        };
        remove_container(share, "c1", &recorder, &|| {
            // Mounted on the first read, gone after the unmounts.
            Ok(if table.replace(false) {
                info.clone()
            } else {
                String::new()
            })
        })
        .unwrap();
        assert_eq!(
            *recorder.calls.borrow(),
            vec![
                format!("umount {}/c1/rootfs", guest.display()),
                format!("umount {}/c1/rootfs", host.display()),
            ]
        );
        assert!(!host.join("c1").exists());
        assert!(host.exists(), "the rest of the share stays");
    }

    #[test]
    fn a_container_name_is_one_path_component() {
        let dir = tempfile::tempdir().unwrap();
        let (host, guest) = dirs(dir.path());
        let share = ShareDirs {
            host: &host,
            guest: &guest,
        };
        for name in ["..", "a/b", "/etc", "", "."] {
            let err = remove_container(share, name, &Recorder::default(), &|| Ok(String::new()));
            assert!(
                matches!(err, Err(ShareError::Unexpected(_))),
                "{name:?}: {err:?}"
            );
        }
    }

    #[test]
    fn mountinfo_points_under_a_directory() {
        let info = "36 35 98:0 / /mnt/a rw - ext3 /dev/root rw\n\
                    37 36 98:0 / /mnt/a/b\\040c rw - ext3 /dev/root rw\n\
                    38 35 98:0 / /mnt/ab rw - ext3 /dev/root rw\n\
                    bad\n";
        assert_eq!(
            mounts_under(info, Path::new("/mnt/a")),
            vec![PathBuf::from("/mnt/a"), PathBuf::from("/mnt/a/b c")]
        );
        assert_eq!(unescape_mountinfo("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape_mountinfo("a\\9"), "a\\9");
    }

    #[test]
    fn removal_refuses_while_something_is_still_mounted() {
        let dir = tempfile::tempdir().unwrap();
        let (host, guest) = dirs(dir.path());
        fs::create_dir_all(host.join("c1/rootfs")).unwrap();
        let stuck = format!("1 1 0:1 / {}/c1/rootfs rw - ext4 x rw\n", host.display());
        let share = ShareDirs {
            host: &host,
            guest: &guest,
        };
        let err = remove_share(share, &Recorder::default(), &|| Ok(stuck.clone())).unwrap_err();
        assert!(matches!(err, ShareError::StillMounted { .. }), "{err}");
        assert!(host.join("c1/rootfs").exists());
    }

    #[test]
    fn removal_refuses_to_delete_real_files() {
        let dir = tempfile::tempdir().unwrap();
        let (host, guest) = dirs(dir.path());
        fs::create_dir_all(host.join("c1/rootfs/etc")).unwrap();
        fs::write(host.join("c1/rootfs/etc/passwd"), "root:x:0:0").unwrap();
        let share = ShareDirs {
            host: &host,
            guest: &guest,
        };
        let err = remove_share(share, &Recorder::default(), &|| Ok(String::new())).unwrap_err();
        assert!(matches!(err, ShareError::Unexpected(_)), "{err}");
        assert!(host.join("c1/rootfs/etc/passwd").exists());
        // A symlink where a container's directory was is not followed.
        fs::create_dir_all(dir.path().join("target/empty")).unwrap();
        fs::remove_dir_all(host.join("c1")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("target"), host.join("c1")).unwrap();
        let err = remove_container(share, "c1", &Recorder::default(), &|| Ok(String::new()));
        assert!(matches!(err, Err(ShareError::Unexpected(_))), "{err:?}");
        assert!(dir.path().join("target/empty").is_dir());
    }

    /// Real mounts: needs root (CAP_SYS_ADMIN), as husk does; fails loudly without it.
    #[test]
    fn real_binds_are_read_only_where_asked_and_removed_without_a_trace() {
        use nix::sys::statvfs::{statvfs, FsFlags};
        let (dir, bundle) = bundle();
        let plan1 = plan(&bundle, &id()).unwrap();
        let plan2 = plan(&bundle, &ContainerId::new("c2").unwrap()).unwrap();
        let (host, guest) = dirs(dir.path());
        let share = ShareDirs {
            host: &host,
            guest: &guest,
        };
        let mounter = HostMounter;
        create_share(share, &mounter).expect("bind mounts need root (CAP_SYS_ADMIN)");
        let bound = bind_all(share, &plan1, &mounter);
        // A container added later (a pod's second container) appears on the guest side too.
        let bound2 = bind_all(share, &plan2, &mounter);
        // Observe through the guest side, then tear down before asserting, so a failure leaks
        // no mount.
        let errno = |r: io::Result<()>| r.map_err(|e| e.raw_os_error());
        let data = guest.join("c1/mounts/1");
        let read = fs::read_to_string(data.join("file")).map_err(|e| e.raw_os_error());
        let write_ro = errno(fs::write(data.join("new"), "x"));
        let write_rw = errno(fs::write(guest.join("c1/mounts/2"), "10.0.0.1 h\n"));
        let flags = |p: &Path| statvfs(p).map(|v| v.flags()).ok();
        let (ro_flags, rw_flags) = (flags(&data), flags(&guest.join("c1/mounts/2")));
        // The tree around the binds cannot be changed by the guest.
        let mkdir_top = errno(fs::create_dir(guest.join("x")));
        let rename = errno(fs::rename(guest.join("c1"), guest.join("moved")));
        let plant = errno(std::os::unix::fs::symlink(
            "/etc",
            guest.join("c1/mounts/9"),
        ));
        let second =
            fs::read_to_string(guest.join("c2/mounts/1/file")).map_err(|e| e.raw_os_error());
        let removed2 = remove_container(share, "c2", &mounter, &read_mountinfo);
        let table = read_mountinfo().unwrap();
        let c2_left = [
            mounts_under(&table, &host.join("c2")),
            mounts_under(&table, &guest.join("c2")),
        ];
        let c1_kept = mounts_under(&table, &guest.join("c1")).len();
        let removed = remove_share(share, &mounter, &read_mountinfo);
        bound.unwrap();
        bound2.unwrap();
        removed2.unwrap();
        removed.unwrap();
        assert_eq!(read, Ok("data".to_owned()));
        assert_eq!(write_ro, Err(Some(libc::EROFS)));
        assert_eq!(write_rw, Ok(()));
        let ro_flags = ro_flags.unwrap();
        assert!(
            ro_flags.contains(FsFlags::ST_RDONLY | FsFlags::ST_NOSUID | FsFlags::ST_NODEV),
            "{ro_flags:?}"
        );
        let rw_flags = rw_flags.unwrap();
        assert!(
            rw_flags.contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV),
            "{rw_flags:?}"
        );
        assert!(!rw_flags.contains(FsFlags::ST_RDONLY), "{rw_flags:?}");
        assert_eq!(mkdir_top, Err(Some(libc::EROFS)));
        assert_eq!(rename, Err(Some(libc::EROFS)));
        assert_eq!(plant, Err(Some(libc::EROFS)));
        assert_eq!(second, Ok("data".to_owned()));
        assert_eq!(c2_left, [Vec::<PathBuf>::new(), Vec::new()]);
        assert!(c1_kept >= 3, "removing c2 leaves c1 mounted");
        assert!(!host.exists() && !guest.exists());
        let table = read_mountinfo().unwrap();
        assert!(mounts_under(&table, &host).is_empty() && mounts_under(&table, &guest).is_empty());
        // The sources are untouched, apart from the write through the read-write bind.
        assert_eq!(
            fs::read_to_string(bundle.dir.join("data/file")).unwrap(),
            "data"
        );
        assert_eq!(
            fs::read_to_string(dir.path().join("hosts")).unwrap(),
            "10.0.0.1 h\n"
        );
    }
}
