//! Small file helpers of the sandbox: atomic writes, the tail of a log.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The last bytes of a log file shown when something fails.
pub const LOG_TAIL: u64 = 2048;

/// Writes `dir/name` (mode 0600) so that it is either the old or the new content after a crash:
/// a temporary file in the same directory, fsync, rename over `name`, fsync of the directory.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let target = dir.join(name);
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, &target)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result?;
    File::open(dir).and_then(|d| d.sync_all())
}

/// The last [`LOG_TAIL`] bytes of a log file, on one line ("(unreadable)" when it cannot be
/// read). Only the tail is read: the log can be large (guest-triggered warnings end up in it).
pub fn log_tail(path: &Path) -> String {
    let read = || -> io::Result<Vec<u8>> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL)))?;
        let mut bytes = Vec::new();
        file.take(LOG_TAIL).read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    let Ok(bytes) = read() else {
        return "(unreadable)".to_owned();
    };
    String::from_utf8_lossy(&bytes).trim().replace('\n', " | ")
}

/// Removes `path`; a file that is already gone is not an error.
pub fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tails_are_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        fs::write(&log, "a\nb\n").unwrap();
        assert_eq!(log_tail(&log), "a | b");
        assert_eq!(log_tail(&dir.path().join("none")), "(unreadable)");
        let big = "x".repeat(3 * LOG_TAIL as usize) + "\nlast";
        fs::write(&log, &big).unwrap();
        let tail = log_tail(&log);
        assert_eq!(tail.len(), LOG_TAIL as usize + 2, "{tail}");
        assert!(tail.ends_with("x | last"));
    }

    #[test]
    fn atomic_writes_replace_and_leave_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "f", b"one").unwrap();
        write_atomic(dir.path(), "f", b"two").unwrap();
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
        remove_if_exists(&dir.path().join("f")).unwrap();
        remove_if_exists(&dir.path().join("f")).unwrap();
    }
}
