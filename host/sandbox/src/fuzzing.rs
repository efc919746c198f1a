//! Fuzzing harnesses shared by the `cargo fuzz` targets in `host/sandbox/fuzz` and by plain
//! tests over pseudo-random inputs (so `cargo test` runs them too).
//!
//! - [`fuzz_vsock_reply`]: the bytes play the VMM's side of the hybrid vsock handshake: the reply
//!   to `CONNECT <port>` is read with [`crate::vsock`]'s bounded line reader, delivered in pieces
//!   of input-chosen sizes with interruptions, and parsed as `OK <port>`. Checked: no panic, at
//!   most [`crate::vsock::MAX_REPLY`] bytes consumed, and not one byte past the newline (those
//!   belong to the guest connection that follows).
//! - [`fuzz_share_teardown`]: the bytes build a guest-shaped tree in a share (directories, empty
//!   and non-empty files, symlinks to what lies outside it, the container's directory itself
//!   replaced by a symlink), a mount table (stale entries, mounts outside the share, unmounts
//!   that fail), then the container's part and the whole share are torn down as a task delete
//!   and a sandbox shutdown do. Checked: nothing outside the share changes, no file with
//!   content is deleted anywhere, nothing outside the share is unmounted, a teardown that leaves
//!   a mount in place fails, and one that succeeds leaves nothing behind.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use crate::share::{remove_container, remove_share, Mounter, ShareDirs};
use crate::vsock::{parse_ok, read_line, MAX_REPLY};

/// Delivers `data` in pieces whose sizes come from `sizes`, returning `Interrupted` when a size
/// byte asks for it.
struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    consumed: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = match self.sizes.split_first() {
            Some((first, rest)) => {
                self.sizes = rest;
                *first
            }
            None => u8::MAX,
        };
        if size == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = usize::from(size).min(buf.len()).min(self.data.len());
        let (now, later) = self.data.split_at(n);
        buf.get_mut(..n)
            .ok_or_else(|| io::Error::other("buffer"))?
            .copy_from_slice(now);
        self.data = later;
        self.consumed += n;
        Ok(n)
    }
}

/// The fuzz entry point: `[nsizes][nsizes x piece size][reply bytes...]`.
pub fn fuzz_vsock_reply(data: &[u8]) {
    let (sizes, reply) = match data.split_first() {
        Some((n, rest)) => rest.split_at(usize::from(*n % 16).min(rest.len())),
        None => (&[][..], data),
    };
    let mut reader = Chunked {
        data: reply,
        sizes,
        consumed: 0,
    };
    let line = match read_line(&mut reader) {
        Ok(Some(line)) => line,
        Ok(None) => {
            assert!(reply.is_empty());
            return;
        }
        Err(_) => return,
    };
    assert!(reader.consumed <= MAX_REPLY + 1);
    let newline = reply.iter().position(|b| *b == b'\n');
    match newline {
        // The newline was within reach: everything up to it, and nothing after it, is read.
        Some(at) if at < MAX_REPLY => assert_eq!(reader.consumed, at + 1),
        _ => assert!(reader.consumed <= MAX_REPLY),
    }
    if let Some(port) = parse_ok(&line) {
        assert!(line.starts_with("OK "));
        assert_eq!(
            line.get(3..).and_then(|p| p.parse::<u32>().ok()),
            Some(port)
        );
    }
}

/// A mount table in memory: `unmount` detaches a point and what lies under it (as a lazy
/// unmount does), or fails when the input said so; every call is recorded.
#[derive(Default)]
struct TeardownMounts {
    table: RefCell<Vec<PathBuf>>,
    unmounted: RefCell<Vec<PathBuf>>,
    /// Indexes of the unmount calls that fail.
    failing: Vec<usize>,
    /// Every unmount call from this index on fails (a mount that never comes off).
    stuck_from: Option<usize>,
}

impl TeardownMounts {
    fn mountinfo(&self) -> io::Result<String> {
        Ok(self
            .table
            .borrow()
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let point = p
                    .to_string_lossy()
                    .replace('\\', "\\134")
                    .replace(' ', "\\040");
                format!("{} 1 0:1 / {point} rw - fake fake rw\n", i + 100)
            })
            .collect())
    }
}

impl Mounter for TeardownMounts {
    fn bind(&self, _: &Path, target: &Path, _: bool) -> io::Result<()> {
        self.table.borrow_mut().push(target.to_path_buf());
        Ok(())
    }
    fn attach(&self, source: &Path, target: &Path, recursive: bool, _: bool) -> io::Result<()> {
        self.bind(source, target, recursive)
    }
    fn remount_readonly(&self, _: &Path) -> io::Result<()> {
        Ok(())
    }
    fn make_private(&self, _: &Path) -> io::Result<()> {
        Ok(())
    }
    fn make_shared(&self, _: &Path) -> io::Result<()> {
        Ok(())
    }
    fn make_slave(&self, _: &Path) -> io::Result<()> {
        Ok(())
    }
    fn unmount(&self, target: &Path) -> io::Result<()> {
        let call = self.unmounted.borrow().len();
        self.unmounted.borrow_mut().push(target.to_path_buf());
        if self.failing.contains(&call) || self.stuck_from.is_some_and(|from| call >= from) {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        let mut table = self.table.borrow_mut();
        let before = table.len();
        table.retain(|p| !p.starts_with(target));
        if table.len() == before {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }
}

/// A fresh directory under the system's temporary directory, removed (without following
/// symlinks) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Option<TempDir> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("husk-fuzz-share-{}-{n}", std::process::id()));
        fs::create_dir(&dir).ok()?;
        Some(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// What a tree holds, without following symlinks: path -> kind and content.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let what = if meta.is_dir() {
                stack.push(path.clone());
                "dir".to_owned()
            } else if meta.file_type().is_symlink() {
                format!(
                    "link {}",
                    fs::read_link(&path).unwrap_or_default().display()
                )
            } else {
                format!("file {:?}", fs::read(&path).unwrap_or_default())
            };
            out.insert(path, what);
        }
    }
    out
}

/// Whether `path` (under `base`) runs through a symlink or a non-directory: the fuzz setup never
/// writes through one (it must not reach outside its temporary directory).
fn crosses_a_link(base: &Path, path: &Path) -> bool {
    let Ok(rest) = path.strip_prefix(base) else {
        return true;
    };
    let mut at = base.to_path_buf();
    let mut parts = rest.components().peekable();
    while let Some(part) = parts.next() {
        at.push(part);
        if parts.peek().is_none() {
            break;
        }
        match fs::symlink_metadata(&at) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return true,
            Err(_) => {}
        }
    }
    fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink())
}

/// The fuzz entry point: a sequence of 3-byte operations `[op][where][what]` building the tree
/// and the mount table (see the module documentation), then the teardown.
pub fn fuzz_share_teardown(data: &[u8]) {
    const NAMES: [&str; 6] = ["c1", "rootfs", "etc", "a", "x y", "mnt"];
    let Some(tmp) = TempDir::new() else {
        return;
    };
    let base = tmp.0.as_path();
    let (host, guest, outside) = (
        base.join("staging"),
        base.join("shared"),
        base.join("outside"),
    );
    let made = fs::create_dir_all(&host)
        .and_then(|()| fs::create_dir_all(&guest))
        .and_then(|()| fs::create_dir_all(outside.join("emptydir")))
        .and_then(|()| fs::write(outside.join("keep"), b"host data"))
        .and_then(|()| fs::write(outside.join("empty"), b""));
    if made.is_err() {
        return;
    }
    let link_targets: [PathBuf; 8] = [
        outside.clone(),
        outside.join("keep"),
        outside.join("emptydir"),
        outside.join("empty"),
        PathBuf::from("../outside"),
        PathBuf::from("../../outside"),
        PathBuf::from("."),
        PathBuf::from("missing"),
    ];
    let mut mounts = TeardownMounts::default();
    let mut container = "c1";
    for op in data.chunks_exact(3).take(64) {
        let (kind, place, what) = (op[0], op[1], op[2]);
        // Where: one of the share's sides (or, for mounts, outside it), then up to 3 names.
        let root = match place % 4 {
            0 => host.join("c1"),
            1 => guest.join("c1"),
            2 => host.clone(),
            _ => guest.clone(),
        };
        let mut path = root;
        for i in 0..(what % 4) {
            let pick = usize::from(what.rotate_right(u32::from(i) * 2 + 2)) % NAMES.len();
            path.push(NAMES[pick]);
        }
        if kind % 8 == 5 {
            // A mount point listed in the table: in the share, or outside it.
            let point = if place & 0x80 != 0 {
                outside.clone()
            } else {
                path
            };
            mounts.table.borrow_mut().push(point);
            continue;
        }
        if kind % 8 == 6 {
            if what & 0x80 != 0 {
                mounts.stuck_from = Some(usize::from(what % 8));
            } else {
                mounts.failing.push(usize::from(what % 8));
            }
            continue;
        }
        if kind % 8 == 7 {
            container = ["c1", "..", "a/b", "", "/etc", "c1/rootfs", "."][usize::from(what % 7)];
            continue;
        }
        if crosses_a_link(base, &path) {
            continue;
        }
        if let Some(parent) = path.parent() {
            if crosses_a_link(base, parent) || fs::create_dir_all(parent).is_err() {
                continue;
            }
        }
        let _ = match kind % 8 {
            0 => fs::create_dir_all(&path),
            1 => fs::write(&path, b""),
            2 => fs::write(&path, [what; 3]),
            _ => symlink(&link_targets[usize::from(what) % link_targets.len()], &path),
        };
    }
    let before = snapshot(base);
    let outside_before = snapshot(&outside);
    let dirs = ShareDirs {
        host: &host,
        guest: &guest,
    };
    let info = || mounts.mountinfo();
    let one = remove_container(dirs, container, &mounts, &info);
    let valid = container == "c1";
    if !valid {
        assert!(one.is_err(), "container name {container:?} accepted");
    }
    let all = remove_share(dirs, &mounts, &info);
    let after = snapshot(base);

    assert_eq!(
        snapshot(&outside),
        outside_before,
        "outside the share changed"
    );
    for (path, what) in &before {
        if what.starts_with("file") && what != "file []" {
            assert_eq!(
                after.get(path),
                Some(what),
                "{} was deleted",
                path.display()
            );
        }
        if what.starts_with("link") && !path.starts_with(&host) && !path.starts_with(&guest) {
            assert_eq!(after.get(path), Some(what));
        }
    }
    for point in mounts.unmounted.borrow().iter() {
        assert!(
            point.starts_with(&host) || point.starts_with(&guest),
            "{} was unmounted",
            point.display()
        );
    }
    let left: Vec<PathBuf> = mounts
        .table
        .borrow()
        .iter()
        .filter(|p| p.starts_with(&host) || p.starts_with(&guest))
        .cloned()
        .collect();
    if !left.is_empty() {
        assert!(
            all.is_err(),
            "the share's teardown succeeded with {left:?} mounted"
        );
    }
    if all.is_ok() {
        assert!(
            fs::symlink_metadata(&host).is_err() && fs::symlink_metadata(&guest).is_err(),
            "the share's teardown succeeded and left {:?}",
            after
                .keys()
                .filter(|p| !p.starts_with(&outside))
                .collect::<Vec<_>>()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift: deterministic pseudo-random inputs without a dependency.
    fn inputs(count: usize, len: usize) -> Vec<Vec<u8>> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..count)
            .map(|_| {
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn share_teardown_survives_random_trees() {
        for input in inputs(300, 48) {
            fuzz_share_teardown(&input);
        }
    }

    /// The attacks named in the isolation issue: the container's directory replaced by a symlink
    /// to a host directory holding an empty file and an empty directory; a symlink planted where
    /// a mount point was; a mount that does not come off.
    #[test]
    fn share_teardown_survives_the_known_attacks() {
        // [op, where, what]: op 3 symlink, 0 mkdir, 1 empty file, 5 mount, 6 failing unmount.
        let cases: [&[u8]; 6] = [
            // staging/c1 -> <tmp>/outside (depth 0, target 0).
            &[3, 0, 0],
            // staging/c1 -> ../outside.
            &[3, 0, 4],
            // staging/c1/<name> is mounted, then replaced by a symlink to outside/emptydir.
            &[5, 0, 1, 3, 0, 0x06],
            // Unmounts that fail for a while: the teardown tries again.
            &[0, 0, 1, 5, 0, 1, 6, 0, 0, 6, 0, 1, 6, 0, 2, 6, 0, 3],
            // A mount that never comes off: the teardown must fail and keep its mount point.
            &[0, 0, 1, 5, 0, 1, 6, 0, 0x80],
            // A stale mount outside the share is never unmounted.
            &[5, 0x80, 0, 1, 0, 2],
        ];
        for case in cases {
            fuzz_share_teardown(case);
        }
    }

    #[test]
    fn harness_survives_random_inputs() {
        for input in inputs(500, 64) {
            fuzz_vsock_reply(&input);
        }
    }

    /// Valid replies, every truncation of them, piecewise delivery, and oversized lines.
    #[test]
    fn harness_survives_truncated_and_oversized_replies() {
        let replies: [&[u8]; 6] = [
            b"OK 1073741824\nttrpc bytes",
            b"OK 4294967295\n",
            b"OK 4294967296\n",
            b"OK -1\n",
            b"\xff\xfeOK 5\n",
            &[b'9'; 100],
        ];
        for reply in replies {
            for len in 0..=reply.len() {
                for sizes in [&[][..], &[1, 0, 1, 3][..], &[0, 0, 200][..]] {
                    let mut input = vec![u8::try_from(sizes.len()).unwrap_or(0)];
                    input.extend_from_slice(sizes);
                    input.extend_from_slice(&reply[..len]);
                    fuzz_vsock_reply(&input);
                }
            }
        }
    }

    #[test]
    fn only_ok_with_a_port_is_accepted() {
        assert_eq!(parse_ok("OK 1073741824"), Some(1_073_741_824));
        for reply in [
            "OK",
            "OK ",
            "OK x",
            "OK 4294967296",
            "ok 5",
            " OK 5",
            "OK 5 6",
            "OK -1",
        ] {
            assert_eq!(parse_ok(reply), None, "{reply:?}");
        }
    }
}
