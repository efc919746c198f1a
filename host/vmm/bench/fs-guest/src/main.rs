//! The reader of `make bench-fs`: times reads of one large file and of a tree of small files.
//!
//! As the guest's `/init` (PID 1), with `fsbench.tag=TAG` on the kernel command line: mounts
//! devtmpfs and proc, mounts the virtio-fs share TAG at /mnt, then reads `/mnt/big` and every file
//! under `/mnt/small` twice (pass 1: first read after the mount, nothing cached in the guest;
//! pass 2: again), copies both sets into the initramfs root (guest memory) and reads them from
//! there as a reference, and reboots. Each read prints one console line:
//!
//! `fsbench: set=big where=virtiofs pass=1 files=1 bytes=67108864 ns=123456`
//!
//! Timing is `Instant` (clock_gettime(CLOCK_MONOTONIC)) inside the guest around the reads (the
//! small-file figure includes the directory walk, opens and closes). On the host,
//! `husk-fsbench big FILE` and `husk-fsbench small DIR` time the same code and print the same line
//! with `where=host`.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

/// Read size for every file: large enough for one FUSE request of the maximum size (1 MiB).
const CHUNK: usize = 1 << 20;
/// A directory tree deeper than this is refused (the walk is recursive).
const MAX_DEPTH: usize = 16;
/// Longest accepted virtio-fs tag (the device's config-space field).
const MAX_TAG: usize = 36;

#[derive(Default)]
struct Tally {
    files: u64,
    bytes: u64,
}

fn read_file(path: &Path, buf: &mut [u8], tally: &mut Tally) -> std::io::Result<()> {
    let mut file = File::open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("open {}: {e}", path.display())))?;
    loop {
        let n = file.read(buf)?;
        if n == 0 {
            break;
        }
        tally.bytes = tally.bytes.saturating_add(n as u64);
    }
    tally.files = tally.files.saturating_add(1);
    Ok(())
}

fn read_tree(dir: &Path, depth: usize, buf: &mut [u8], tally: &mut Tally) -> std::io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(std::io::Error::other(format!(
            "{} is nested deeper than {MAX_DEPTH} levels",
            dir.display()
        )));
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            read_tree(&entry.path(), depth + 1, buf, tally)?;
        } else if kind.is_file() {
            read_file(&entry.path(), buf, tally)?;
        }
    }
    Ok(())
}

/// Times a read of `path`: a file (`set` "big") or a tree (`set` "small").
fn timed(set: &str, path: &Path) -> std::io::Result<(Tally, u128)> {
    let mut buf = vec![0u8; CHUNK];
    let mut tally = Tally::default();
    let start = Instant::now();
    if set == "big" {
        read_file(path, &mut buf, &mut tally)?;
    } else {
        read_tree(path, 0, &mut buf, &mut tally)?;
    }
    Ok((tally, start.elapsed().as_nanos()))
}

fn report(
    out: &mut impl Write,
    set: &str,
    place: &str,
    pass: u32,
    path: &Path,
) -> std::io::Result<()> {
    let (tally, ns) = timed(set, path)?;
    writeln!(
        out,
        "fsbench: set={set} where={place} pass={pass} files={} bytes={} ns={ns}",
        tally.files, tally.bytes
    )
}

fn cstr(s: &str) -> std::io::Result<CString> {
    CString::new(s).map_err(|_| std::io::Error::other(format!("{s:?} contains a NUL byte")))
}

fn mount(src: &str, target: &str, fstype: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    let (s, t, f) = (cstr(src)?, cstr(target)?, cstr(fstype)?);
    // SAFETY: valid NUL-terminated strings; the result is checked.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            err.kind(),
            format!("mount {fstype} {src} on {target}: {err}"),
        ));
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path, depth: usize) -> std::io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(std::io::Error::other("tree too deep to copy"));
    }
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let dest = to.join(entry.file_name());
        if kind.is_dir() {
            copy_tree(&entry.path(), &dest, depth + 1)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), dest)?;
        }
    }
    Ok(())
}

fn guest(console: &mut File) -> std::io::Result<()> {
    let cmdline = std::fs::read_to_string("/proc/cmdline")?;
    let tag = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("fsbench.tag="))
        .ok_or_else(|| std::io::Error::other("no fsbench.tag=TAG on the kernel command line"))?;
    if tag.is_empty() || tag.len() > MAX_TAG {
        return Err(std::io::Error::other(format!(
            "fsbench.tag must be 1-{MAX_TAG} bytes"
        )));
    }
    mount(tag, "/mnt", "virtiofs")?;
    writeln!(console, "fsbench: mounted {tag}")?;
    let (big, small) = (Path::new("/mnt/big"), Path::new("/mnt/small"));
    for pass in 1..=2 {
        report(console, "big", "virtiofs", pass, big)?;
        report(console, "small", "virtiofs", pass, small)?;
    }
    // Reference: the same files from the guest's own memory (the initramfs root).
    std::fs::create_dir_all("/ref")?;
    std::fs::copy(big, "/ref/big")?;
    copy_tree(small, Path::new("/ref/small"), 0)?;
    report(console, "big", "memory", 1, Path::new("/ref/big"))?;
    report(console, "small", "memory", 1, Path::new("/ref/small"))?;
    let t = cstr("/mnt")?;
    // SAFETY: valid NUL-terminated string; the result is checked.
    if unsafe { libc::umount(t.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn reboot() {
    // SAFETY: reboot(2) with a valid command; we are init and the run is over.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
}

fn host(args: &[String]) -> Result<(), String> {
    let usage = "usage: husk-fsbench big FILE | husk-fsbench small DIR";
    let (set, path) = match args {
        [set, path] if set == "big" || set == "small" => (set.as_str(), Path::new(path)),
        _ => return Err(usage.to_string()),
    };
    let mut out = std::io::stdout().lock();
    report(&mut out, set, "host", 1, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn main() {
    // SAFETY: getpid(2) has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if let Err(e) = host(&args) {
            eprintln!("husk-fsbench: {e}");
            std::process::exit(1);
        }
        return;
    }
    let _ = mount("devtmpfs", "/dev", "devtmpfs");
    let _ = mount("proc", "/proc", "proc");
    if let Ok(mut console) = OpenOptions::new().write(true).open("/dev/console") {
        match guest(&mut console) {
            Ok(()) => {
                let _ = writeln!(console, "fsbench: done");
            }
            Err(e) => {
                let _ = writeln!(console, "fsbench: failed: {e}");
            }
        }
    }
    reboot();
}
