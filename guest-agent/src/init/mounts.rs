//! The container's file system view: mounts, devices, pivot_root, masked and read-only paths.
//! Runs in the container's fresh mount namespace, as root.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::config::{DeviceOp, InitConfig, MountOp};
use crate::rootpath::resolve_in_root;
use crate::spec::NsKind;

const DEFAULT_DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

fn flags(bits: libc::c_ulong) -> MsFlags {
    MsFlags::from_bits_truncate(bits)
}

fn do_mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    fl: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    mount(source, target, fstype, fl, data).with_context(|| {
        format!(
            "mount {} on {} (type {}, flags {:#x}, data {:?})",
            source.unwrap_or("none"),
            target.display(),
            fstype.unwrap_or("none"),
            fl.bits(),
            data.unwrap_or("")
        )
    })
}

/// The flags of the mount at `path` that a bind remount must keep (nosuid, nodev, noexec...).
fn locked_flags(path: &Path) -> MsFlags {
    // statvfs f_flag bits (linux/statfs.h); spelled out because the libc of musl lacks some.
    const ST_NOSUID: u64 = 2;
    const ST_NODEV: u64 = 4;
    const ST_NOEXEC: u64 = 8;
    const ST_NOATIME: u64 = 1024;
    const ST_NODIRATIME: u64 = 2048;
    const ST_RELATIME: u64 = 4096;
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return MsFlags::empty();
    };
    // SAFETY: statvfs is plain data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs reads a valid C string and writes into a valid struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return MsFlags::empty();
    }
    #[allow(clippy::unnecessary_cast)]
    let bits = st.f_flag as u64;
    let mut out = MsFlags::empty();
    for (fs, ms) in [
        (ST_NOSUID, MsFlags::MS_NOSUID),
        (ST_NODEV, MsFlags::MS_NODEV),
        (ST_NOEXEC, MsFlags::MS_NOEXEC),
        (ST_NOATIME, MsFlags::MS_NOATIME),
        (ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if bits & fs != 0 {
            out |= ms;
        }
    }
    out
}

fn create_target(dest: &Path, is_dir: bool) -> Result<()> {
    if is_dir {
        std::fs::create_dir_all(dest).with_context(|| format!("mkdir {}", dest.display()))?;
    } else {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("mkdir {}", parent.display()))?;
        }
        if std::fs::symlink_metadata(dest).is_err() {
            std::fs::File::create(dest).with_context(|| format!("create {}", dest.display()))?;
        }
    }
    Ok(())
}

fn mount_one(cfg: &InitConfig, root: &Path, m: &MountOp) -> Result<()> {
    let dest = resolve_in_root(root, &m.destination)
        .with_context(|| format!("resolving {} in the rootfs", m.destination))?;
    let cgroup_ns = cfg.namespaces.contains(&NsKind::Cgroup);
    if m.bind || (m.fstype == "cgroup2" && !cgroup_ns) {
        let source = if m.bind {
            m.source.as_str()
        } else {
            cfg.cgroup_dir.as_str()
        };
        let md = std::fs::metadata(source).with_context(|| format!("bind source {source}"))?;
        create_target(&dest, md.is_dir())?;
        let mut fl = MsFlags::MS_BIND;
        if m.recursive {
            fl |= MsFlags::MS_REC;
        }
        do_mount(Some(source), &dest, None, fl, None)?;
        let extra = flags(m.flags);
        if !extra.is_empty() {
            let keep = locked_flags(&dest);
            do_mount(
                None,
                &dest,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra | keep,
                None,
            )?;
        }
    } else {
        create_target(&dest, true)?;
        let data = (!m.data.is_empty()).then_some(m.data.as_str());
        let source = if m.source.is_empty() {
            m.fstype.as_str()
        } else {
            m.source.as_str()
        };
        do_mount(
            Some(source),
            &dest,
            Some(m.fstype.as_str()),
            flags(m.flags),
            data,
        )?;
    }
    if m.propagation != 0 {
        do_mount(None, &dest, None, flags(m.propagation), None)?;
    }
    Ok(())
}

fn setup_devices(cfg: &InitConfig, root: &Path) -> Result<()> {
    let dev = resolve_in_root(root, "/dev")?;
    std::fs::create_dir_all(&dev).with_context(|| format!("mkdir {}", dev.display()))?;
    for name in DEFAULT_DEVICES {
        let target = dev.join(name);
        create_target(&target, false)?;
        do_mount(
            Some(&format!("/dev/{name}")),
            &target,
            None,
            MsFlags::MS_BIND,
            None,
        )?;
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let path = dev.join(link);
        if std::fs::symlink_metadata(&path).is_err() {
            std::os::unix::fs::symlink(target, &path)
                .with_context(|| format!("symlink {}", path.display()))?;
        }
    }
    if cfg.process.terminal {
        // The pty slave, by its name under our /dev/pts (the link may name it as seen from
        // outside a chroot).
        let tty = std::fs::read_link("/proc/self/fd/0").context("finding our pty")?;
        let tty = tty.to_string_lossy().into_owned();
        let name = tty
            .rsplit_once("/dev/pts/")
            .map(|(_, n)| format!("/dev/pts/{n}"))
            .with_context(|| format!("stdin {tty:?} is not a pty"))?;
        let console = dev.join("console");
        create_target(&console, false)?;
        do_mount(Some(&name), &console, None, MsFlags::MS_BIND, None)?;
    }
    for d in &cfg.devices {
        make_device(root, d)?;
    }
    Ok(())
}

fn make_device(root: &Path, d: &DeviceOp) -> Result<()> {
    let path = resolve_in_root(root, &d.path)?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(&path);
    let dev = libc::makedev(d.major, d.minor);
    nix::sys::stat::mknod(
        &path,
        nix::sys::stat::SFlag::from_bits_truncate(d.kind),
        nix::sys::stat::Mode::from_bits_truncate(d.mode),
        dev,
    )
    .with_context(|| format!("mknod {}", d.path))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(d.mode))?;
    nix::unistd::chown(
        &path,
        Some(nix::unistd::Uid::from_raw(d.uid)),
        Some(nix::unistd::Gid::from_raw(d.gid)),
    )
    .with_context(|| format!("chown {}", d.path))?;
    Ok(())
}

fn pivot(root: &Path) -> Result<()> {
    nix::unistd::chdir(root).context("chdir to the rootfs")?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            umount2(".", MntFlags::MNT_DETACH).context("detaching the old root")?;
        }
        // The current root is the initramfs (rootfs), which pivot_root cannot move away from:
        // move the container's root over / and chroot into it, as runc's --no-pivot does. The
        // old root stays hidden below the moved mount, in this mount namespace only.
        Err(nix::errno::Errno::EINVAL) => {
            tracing::debug!("pivot_root refused (initramfs root); using MS_MOVE + chroot");
            do_mount(Some("."), Path::new("/"), None, MsFlags::MS_MOVE, None)?;
            nix::unistd::chroot(".").context("chroot to the rootfs")?;
        }
        Err(e) => return Err(e).context("pivot_root"),
    }
    nix::unistd::chdir("/").context("chdir /")?;
    Ok(())
}

fn mask(path: &str) -> Result<()> {
    let p = PathBuf::from(path);
    let Ok(md) = std::fs::metadata(&p) else {
        return Ok(());
    };
    if md.is_dir() {
        do_mount(Some("tmpfs"), &p, Some("tmpfs"), MsFlags::MS_RDONLY, None)
    } else {
        do_mount(Some("/dev/null"), &p, None, MsFlags::MS_BIND, None)
    }
}

fn make_readonly(path: &Path) -> Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    do_mount(
        Some(&path.to_string_lossy()),
        path,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    let keep = locked_flags(path);
    do_mount(
        None,
        path,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | keep,
        None,
    )
}

fn write_sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).with_context(|| format!("sysctl {key}={value} ({path})"))
}

/// Builds the container's root: everything from making / private to the read-only remount.
pub fn setup_rootfs(cfg: &InitConfig) -> Result<()> {
    let root = PathBuf::from(&cfg.rootfs);
    if !root.is_dir() {
        bail!("rootfs {} is not a directory", root.display());
    }
    do_mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    do_mount(
        Some(&cfg.rootfs),
        &root,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    for m in &cfg.mounts {
        mount_one(cfg, &root, m)?;
    }
    setup_devices(cfg, &root)?;
    pivot(&root)?;
    if cfg.rootfs_propagation != 0 {
        do_mount(
            None,
            Path::new("/"),
            None,
            flags(cfg.rootfs_propagation),
            None,
        )?;
    }
    for (k, v) in &cfg.sysctl {
        write_sysctl(k, v)?;
    }
    for p in &cfg.masked_paths {
        mask(p)?;
    }
    for p in &cfg.readonly_paths {
        make_readonly(Path::new(p))?;
    }
    if cfg.root_readonly {
        let keep = locked_flags(Path::new("/"));
        do_mount(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | keep,
            None,
        )?;
    }
    Ok(())
}
