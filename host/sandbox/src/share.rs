//! The sandbox's shared directory: what the guest sees of the host through virtio-fs.
//!
//! ```text
//! <root>/<id>/shared/            bound onto itself and made private (nothing propagates)
//!   <container>/rootfs           bind of the container's rootfs (read-only if root.readonly)
//!   <container>/mounts/<n>       bind of the spec's n-th mount when it is a bind mount
//!                                (read-only if its options say "ro")
//! ```
//!
//! The guest mounts the share at [`GUEST_SHARE_DIR`]; the spec handed to the agent is rewritten so
//! that `root.path` and the bind mounts' sources point there. Names inside the share come only
//! from validated container IDs and indices, never from the spec, so nothing in a spec can place
//! a mount outside the share. Bind sources are host paths chosen by the caller (as with runc):
//! relative ones are relative to the bundle, all are resolved (symlinks followed) and must exist.
//! Mount destinations are resolved inside the container's rootfs by the agent, in the guest.
//!
//! Mounting goes through the [`Mounter`] trait: [`HostMounter`] does the system calls, tests use
//! a recording double, and one test does real mounts (it needs root, like husk itself).

use std::fs::{self, DirBuilder, OpenOptions};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

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
    /// `mount --bind` (or `--rbind`).
    fn bind(&self, source: &Path, target: &Path, recursive: bool) -> io::Result<()>;
    /// Remounts a bind mount read-only.
    fn remount_readonly(&self, target: &Path) -> io::Result<()>;
    /// Makes a mount (and its submounts) private: no propagation in or out.
    fn make_private(&self, target: &Path) -> io::Result<()>;
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

    fn remount_readonly(&self, target: &Path) -> io::Result<()> {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(io::Error::from)
    }

    fn make_private(&self, target: &Path) -> io::Result<()> {
        let flags = MsFlags::MS_PRIVATE | MsFlags::MS_REC;
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(io::Error::from)
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        umount2(target, MntFlags::MNT_DETACH).map_err(io::Error::from)
    }
}

/// Sets up the share directory itself (`share`, created 0700): bound onto itself and made
/// private, so the binds inside it propagate nowhere.
pub fn create_share<M: Mounter + ?Sized>(share: &Path, mounter: &M) -> Result<(), ShareError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(share)
        .map_err(io_err("create", share))?;
    mounter
        .bind(share, share, false)
        .map_err(io_err("bind-mount onto itself", share))?;
    mounter
        .make_private(share)
        .map_err(io_err("make private", share))
}

/// Binds a plan's sources into `share` (made by [`create_share`]). On failure the binds made so
/// far are undone.
pub fn bind_all<M: Mounter + ?Sized>(
    share: &Path,
    plan: &SharePlan,
    mounter: &M,
) -> Result<(), ShareError> {
    let mut done: Vec<PathBuf> = Vec::new();
    let result = plan.binds.iter().try_for_each(|bind| {
        let target = share.join(&bind.target);
        make_mount_point(&target, bind.is_dir)?;
        mounter
            .bind(&bind.source, &target, bind.recursive)
            .map_err(io_err("bind-mount onto", &target))?;
        done.push(target.clone());
        if bind.readonly {
            mounter
                .remount_readonly(&target)
                .map_err(io_err("remount read-only", &target))?;
        }
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
    let parent = target.parent().unwrap_or(target);
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(parent)
        .map_err(io_err("create", parent))?;
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

/// Unmounts everything at or under `share` (deepest first, as listed in `mountinfo`, the text of
/// /proc/self/mountinfo), checks that nothing is left mounted, then removes the share's mount
/// points. It deletes only empty directories and empty files, so a mount that survived can never
/// lead to deleting the files behind it.
pub fn remove_share<M: Mounter + ?Sized>(
    share: &Path,
    mounter: &M,
    mountinfo: &dyn Fn() -> io::Result<String>,
) -> Result<(), ShareError> {
    let read = || mountinfo().map_err(io_err("read the mount table for", share));
    let mut points = mounts_under(&read()?, share);
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in &points {
        // The same point may be listed twice (stacked mounts); detach until it is gone.
        let _ = mounter.unmount(point);
    }
    let remaining = mounts_under(&read()?, share);
    if !remaining.is_empty() {
        return Err(ShareError::StillMounted {
            path: share.to_path_buf(),
            remaining,
        });
    }
    match fs::symlink_metadata(share) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(io_err("inspect", share)(err)),
        Ok(_) => remove_mount_points(share),
    }
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
        fn remount_readonly(&self, target: &Path) -> io::Result<()> {
            self.calls
                .borrow_mut()
                .push(format!("ro {}", target.display()));
            Ok(())
        }
        fn make_private(&self, target: &Path) -> io::Result<()> {
            self.calls
                .borrow_mut()
                .push(format!("private {}", target.display()));
            Ok(())
        }
        fn unmount(&self, target: &Path) -> io::Result<()> {
            self.calls
                .borrow_mut()
                .push(format!("umount {}", target.display()));
            Ok(())
        }
    }

    #[test]
    fn binds_are_made_in_order_with_read_only_remounts() {
        let (dir, bundle) = bundle();
        let plan = plan(&bundle, &id()).unwrap();
        let share = dir.path().join("shared");
        let recorder = Recorder::default();
        create_share(&share, &recorder).unwrap();
        bind_all(&share, &plan, &recorder).unwrap();
        let s = share.display();
        let hosts = fs::canonicalize(dir.path().join("hosts")).unwrap();
        assert_eq!(
            *recorder.calls.borrow(),
            vec![
                format!("bind {s} {s}"),
                format!("private {s}"),
                format!("rbind {} {s}/c1/rootfs", bundle.rootfs.display()),
                format!("ro {s}/c1/rootfs"),
                format!(
                    "rbind {} {s}/c1/mounts/1",
                    bundle.dir.join("data").display()
                ),
                format!("ro {s}/c1/mounts/1"),
                format!("bind {} {s}/c1/mounts/2", hosts.display()),
            ]
        );
        assert!(share.join("c1/rootfs").is_dir());
        assert!(share.join("c1/mounts/2").is_file());
    }

    #[test]
    fn a_failed_bind_undoes_the_earlier_ones() {
        let (dir, bundle) = bundle();
        let plan = plan(&bundle, &id()).unwrap();
        let share = dir.path().join("shared");
        let recorder = Recorder {
            fail_on: Some("mounts/2"),
            ..Recorder::default()
        };
        let err = bind_all(&share, &plan, &recorder).unwrap_err();
        assert!(err.to_string().contains("mounts/2"), "{err}");
        let calls = recorder.calls.borrow();
        let s = share.display();
        assert_eq!(
            calls[calls.len() - 2..],
            [
                format!("umount {s}/c1/mounts/1"),
                format!("umount {s}/c1/rootfs")
            ]
        );
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
        let share = dir.path().join("shared");
        fs::create_dir_all(share.join("c1/rootfs")).unwrap();
        let stuck = format!("1 1 0:1 / {}/c1/rootfs rw - ext4 x rw\n", share.display());
        let err = remove_share(&share, &Recorder::default(), &|| Ok(stuck.clone())).unwrap_err();
        assert!(matches!(err, ShareError::StillMounted { .. }), "{err}");
        assert!(share.join("c1/rootfs").exists());
    }

    #[test]
    fn removal_refuses_to_delete_real_files() {
        let dir = tempfile::tempdir().unwrap();
        let share = dir.path().join("shared");
        fs::create_dir_all(share.join("c1/rootfs/etc")).unwrap();
        fs::write(share.join("c1/rootfs/etc/passwd"), "root:x:0:0").unwrap();
        let err = remove_share(&share, &Recorder::default(), &|| Ok(String::new())).unwrap_err();
        assert!(matches!(err, ShareError::Unexpected(_)), "{err}");
        assert!(share.join("c1/rootfs/etc/passwd").exists());
    }

    /// Real mounts: needs root (CAP_SYS_ADMIN), as husk does; fails loudly without it.
    #[test]
    fn real_binds_are_read_only_where_asked_and_removed_without_a_trace() {
        let (dir, bundle) = bundle();
        let plan = plan(&bundle, &id()).unwrap();
        let share = dir.path().join("shared");
        let mounter = HostMounter;
        create_share(&share, &mounter).expect("bind mounts need root (CAP_SYS_ADMIN)");
        let bound = bind_all(&share, &plan, &mounter);
        // Observe through the binds, then tear down before asserting, so a failure leaks no mount.
        let data = share.join("c1/mounts/1");
        let read = fs::read_to_string(data.join("file")).map_err(|e| e.raw_os_error());
        let write_ro = fs::write(data.join("new"), "x").map_err(|e| e.raw_os_error());
        let write_rw =
            fs::write(share.join("c1/mounts/2"), "10.0.0.1 h\n").map_err(|e| e.raw_os_error());
        let removed = remove_share(&share, &mounter, &read_mountinfo);
        bound.unwrap();
        removed.unwrap();
        assert_eq!(read, Ok("data".to_owned()));
        assert_eq!(write_ro, Err(Some(libc::EROFS)));
        assert_eq!(write_rw, Ok(()));
        assert!(!share.exists());
        assert!(mounts_under(&read_mountinfo().unwrap(), &share).is_empty());
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
