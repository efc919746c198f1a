//! The state store under `--root`: one directory per container.
//!
//! ```text
//! <root>/                      0700, created on first use
//!   <id>/                      0700, one per container; its creation (mkdir) claims the ID
//!     state.json               the container's Record (OCI state + husk's own fields), 0600
//! ```
//!
//! `state.json` is replaced atomically (temporary file, fsync, rename, fsync of the directory), so a
//! reader sees the old or the new record, never a torn one, even after a crash. Commands that
//! change a container hold an exclusive `flock` on its directory ([`ContainerLock`]) for their
//! whole duration, so concurrent CLI calls on one container are serialised.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use oci_spec::runtime::{ContainerState, State};
use serde::{Deserialize, Serialize};

use crate::exit;
use crate::id::ContainerId;

/// The record's file name in a container's directory.
pub const STATE_FILE: &str = "state.json";
/// The largest state.json read, in bytes (annotations are the only unbounded part of a record).
pub const MAX_STATE_BYTES: u64 = 4 * 1024 * 1024;
/// The version of the record format written by this husk.
pub const RECORD_VERSION: u32 = 1;

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No directory (or no state.json) for this ID under the root.
    #[error("container {0} does not exist")]
    NotFound(ContainerId),
    /// The ID is taken.
    #[error("container {0} already exists")]
    AlreadyExists(ContainerId),
    /// A file operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// state.json is not a record this husk understands.
    #[error("corrupt state file {path}: {message}")]
    Corrupt { path: PathBuf, message: String },
}

impl StoreError {
    /// The exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            StoreError::NotFound(_) => exit::NOT_FOUND,
            StoreError::AlreadyExists(_) => exit::ALREADY_EXISTS,
            StoreError::Io { .. } | StoreError::Corrupt { .. } => exit::FAILURE,
        }
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

/// What husk keeps about a container (the content of state.json).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// [`RECORD_VERSION`] of the husk that wrote it.
    pub version: u32,
    /// The OCI state (ociVersion, id, status, pid, bundle, annotations) as last written.
    pub oci: State,
    /// When the container was created, RFC 3339 UTC.
    pub created: String,
    /// The rootfs, resolved to an absolute path.
    pub rootfs: PathBuf,
    /// `starttime` of `oci.pid` (field 22 of /proc/PID/stat), so a reused PID is not mistaken
    /// for the container's process.
    pub pid_start_time: Option<u64>,
    /// The container is paused (frozen in the guest); its OCI status stays `running`.
    #[serde(default)]
    pub paused: bool,
}

impl Record {
    /// The OCI state as it is now: a `creating`/`created`/`running` container whose process is
    /// gone (or whose PID now belongs to another process) is `stopped`.
    pub fn current_state(&self) -> State {
        let mut state = self.oci.clone();
        let live = matches!(
            state.status(),
            ContainerState::Creating | ContainerState::Created | ContainerState::Running
        );
        if live {
            let alive = state
                .pid()
                .and_then(process_start_time)
                .is_some_and(|started| self.pid_start_time == Some(started));
            if !alive {
                state.set_status(ContainerState::Stopped);
            }
        }
        state
    }
}

/// One container found by [`Store::list`]: its ID and its record, or why it cannot be read.
pub type Listed = (ContainerId, Result<Record, StoreError>);

/// The state store rooted at `--root`.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// A store at `root` (nothing is created until a container is).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of container `id`. `id` is validated, so this stays under the root.
    pub fn container_dir(&self, id: &ContainerId) -> PathBuf {
        self.root.join(id.as_str())
    }

    /// Claims `id` (creating its directory, 0700) and returns it locked, without a state file
    /// yet. Fails with `AlreadyExists` when the ID is taken.
    ///
    /// A directory without state.json whose lock nobody holds is what a `create` that died
    /// before saving leaves behind: it is reclaimed (with whatever it contains, for the caller
    /// to clean up), so a crash never makes an ID unusable. Claims are serialised by a lock on
    /// the root, so a `create` between its mkdir and its lock is never mistaken for such a
    /// leftover.
    pub fn create(&self, id: &ContainerId) -> Result<ContainerLock, StoreError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)
            .map_err(io_error("create the state root", &self.root))?;
        let _claiming = lock_dir(&self.root, "lock the state root")?;
        let dir = self.container_dir(id);
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => ContainerLock::acquire(id.clone(), dir),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                match ContainerLock::try_acquire(id.clone(), dir)? {
                    Some(lock) if !lock.state_path().exists() => {
                        tracing::warn!(
                            "reclaiming {}: left by a create that did not finish",
                            lock.dir.display()
                        );
                        Ok(lock)
                    }
                    _ => Err(StoreError::AlreadyExists(id.clone())),
                }
            }
            Err(err) => Err(io_error("create the state directory", &dir)(err)),
        }
    }

    /// Locks an existing container (waiting for other holders). `NotFound` if it has no state.
    pub fn lock(&self, id: &ContainerId) -> Result<ContainerLock, StoreError> {
        let dir = self.container_dir(id);
        let lock = ContainerLock::acquire(id.clone(), dir)?;
        // A concurrent delete may have removed it while we waited for the lock.
        if !lock.state_path().exists() {
            return Err(StoreError::NotFound(id.clone()));
        }
        Ok(lock)
    }

    /// Reads a container's record without locking (records are replaced atomically).
    pub fn load(&self, id: &ContainerId) -> Result<Record, StoreError> {
        read_record(id, &self.container_dir(id).join(STATE_FILE))
    }

    /// Every container under the root, sorted by ID, each with its record or the error reading
    /// it. Directory entries that are not valid IDs or have no state.json are skipped. A missing
    /// root is an empty list.
    pub fn list(&self) -> Result<Vec<Listed>, StoreError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(io_error("read the state root", &self.root)(err)),
        };
        let mut containers = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error("read the state root", &self.root))?;
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|name| ContainerId::new(name).ok())
            else {
                continue;
            };
            let record = self.load(&id);
            if matches!(record, Err(StoreError::NotFound(_))) {
                continue;
            }
            containers.push((id, record));
        }
        containers.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(containers)
    }
}

/// An exclusive `flock` on a container's directory, held until dropped.
#[derive(Debug)]
pub struct ContainerLock {
    id: ContainerId,
    dir: PathBuf,
    /// The open directory carrying the lock; closing it releases the lock.
    _handle: File,
}

impl ContainerLock {
    fn acquire(id: ContainerId, dir: PathBuf) -> Result<Self, StoreError> {
        let handle = open_dir(&id, &dir)?;
        handle
            .lock()
            .map_err(io_error("lock the state directory", &dir))?;
        Ok(Self {
            id,
            dir,
            _handle: handle,
        })
    }

    /// Like `acquire`, but `None` instead of waiting when someone holds the lock.
    fn try_acquire(id: ContainerId, dir: PathBuf) -> Result<Option<Self>, StoreError> {
        let handle = open_dir(&id, &dir)?;
        match handle.try_lock() {
            Ok(()) => Ok(Some(Self {
                id,
                dir,
                _handle: handle,
            })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(err)) => {
                Err(io_error("lock the state directory", &dir)(err))
            }
        }
    }

    /// The container's ID.
    pub fn id(&self) -> &ContainerId {
        &self.id
    }

    /// The container's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Reads the record.
    pub fn load(&self) -> Result<Record, StoreError> {
        read_record(&self.id, &self.state_path())
    }

    /// Replaces the record crash-safely.
    pub fn save(&self, record: &Record) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(record).map_err(|err| StoreError::Corrupt {
            path: self.state_path(),
            message: err.to_string(),
        })?;
        write_atomic(&self.dir, STATE_FILE, &json)
    }

    /// Removes the container's directory and everything in it; the ID is free again.
    pub fn remove(self) -> Result<(), StoreError> {
        fs::remove_dir_all(&self.dir).map_err(io_error("remove", &self.dir))?;
        if let Some(root) = self.dir.parent() {
            sync_dir(root)?;
        }
        Ok(())
    }
}

/// Opens a container's directory (to lock it); `NotFound` if there is none.
fn open_dir(id: &ContainerId, dir: &Path) -> Result<File, StoreError> {
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir);
    match opened {
        Ok(handle) => Ok(handle),
        Err(err) if is_absent(&err) => Err(StoreError::NotFound(id.clone())),
        Err(err) => Err(io_error("open the state directory", dir)(err)),
    }
}

/// An exclusive lock on a directory, held while the returned file is open.
fn lock_dir(dir: &Path, action: &'static str) -> Result<File, StoreError> {
    let handle = File::open(dir).map_err(io_error(action, dir))?;
    handle.lock().map_err(io_error(action, dir))?;
    Ok(handle)
}

/// `<root>/<id>` missing, or a file rather than a directory: no such container.
fn is_absent(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

fn read_record(id: &ContainerId, path: &Path) -> Result<Record, StoreError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if is_absent(&err) => return Err(StoreError::NotFound(id.clone())),
        Err(err) => return Err(io_error("open", path)(err)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_STATE_BYTES.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_error("read", path))?;
    let corrupt = |message: String| StoreError::Corrupt {
        path: path.to_path_buf(),
        message,
    };
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(corrupt(format!("larger than {MAX_STATE_BYTES} bytes")));
    }
    let record: Record = serde_json::from_slice(&bytes).map_err(|err| corrupt(err.to_string()))?;
    if record.version != RECORD_VERSION {
        return Err(corrupt(format!(
            "record version {} (this husk reads version {RECORD_VERSION})",
            record.version
        )));
    }
    if record.oci.id() != id.as_str() {
        return Err(corrupt(format!(
            "it describes container {:?}",
            record.oci.id()
        )));
    }
    Ok(record)
}

/// Writes `dir/name` so that it is either the old or the new content after a crash:
/// a temporary file in the same directory, fsync, rename over `name`, fsync of the directory.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let target = dir.join(name);
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(io_error("create", &temp))?;
        file.write_all(bytes).map_err(io_error("write", &temp))?;
        file.sync_all().map_err(io_error("fsync", &temp))?;
        fs::rename(&temp, &target).map_err(io_error("rename into place", &target))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result?;
    sync_dir(dir)
}

/// Writes `pid` (decimal, no newline, as runc does) to `path` for `--pid-file`, atomically: a
/// reader never sees an empty or partial file. A relative path is relative to the current
/// directory.
pub fn write_pid_file(path: &Path, pid: i32) -> Result<(), StoreError> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| StoreError::Io {
            action: "write the pid file",
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    write_atomic(dir, name, pid.to_string().as_bytes())
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("fsync", dir))
}

/// `starttime` (clock ticks after boot) of process `pid` (the sandbox core's one rule).
pub use husk_sandbox::process::start_time as process_start_time;

/// Now as RFC 3339 UTC with nanoseconds, like runc's `created`.
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// `time` as RFC 3339 UTC with nanoseconds (`1970-01-01T00:00:00.000000000Z` before the epoch).
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_nanos()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use oci_spec::runtime::StateBuilder;

    use super::*;

    fn id(s: &str) -> ContainerId {
        ContainerId::new(s).unwrap()
    }

    fn record(id: &str, status: ContainerState, pid: Option<i32>) -> Record {
        let mut builder = StateBuilder::default()
            .version(oci_spec::runtime::VERSION)
            .id(id)
            .status(status)
            .bundle("/bundle");
        if let Some(pid) = pid {
            builder = builder.pid(pid);
        }
        Record {
            version: RECORD_VERSION,
            oci: builder.build().unwrap(),
            created: now_rfc3339(),
            rootfs: "/bundle/rootfs".into(),
            pid_start_time: pid.and_then(process_start_time),
            paused: false,
        }
    }

    #[test]
    fn create_save_load_remove() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path().join("husk"));
        let lock = store.create(&id("a")).unwrap();
        let saved = record("a", ContainerState::Created, None);
        lock.save(&saved).unwrap();
        assert_eq!(lock.load().unwrap(), saved);
        assert_eq!(store.load(&id("a")).unwrap(), saved);
        lock.remove().unwrap();
        assert!(matches!(store.load(&id("a")), Err(StoreError::NotFound(_))));
        assert!(!root.path().join("husk/a").exists());
    }

    #[test]
    fn directories_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path().join("husk"));
        let lock = store.create(&id("a")).unwrap();
        lock.save(&record("a", ContainerState::Created, None))
            .unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(store.root()), 0o700);
        assert_eq!(mode(lock.dir()), 0o700);
        assert_eq!(mode(&lock.dir().join(STATE_FILE)), 0o600);
    }

    #[test]
    fn duplicate_id_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        let _first = store.create(&id("a")).unwrap();
        assert!(matches!(
            store.create(&id("a")),
            Err(StoreError::AlreadyExists(_))
        ));
    }

    #[test]
    fn concurrent_creates_of_one_id_let_exactly_one_win() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path().join("husk"));
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                // Each winner keeps its lock (returned from the thread) until all are done, as a
                // create in progress does.
                .map(|_| scope.spawn(|| store.create(&id("same"))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
        assert!(results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, StoreError::AlreadyExists(_))));
    }

    #[test]
    fn a_directory_left_by_a_dead_create_is_reclaimed() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        fs::create_dir(root.path().join("a")).unwrap();
        fs::write(root.path().join("a/vsock.sock"), "").unwrap();
        let lock = store.create(&id("a")).unwrap();
        assert!(
            lock.dir().join("vsock.sock").exists(),
            "contents are the caller's to clean"
        );
    }

    #[test]
    fn a_create_in_progress_is_not_reclaimed() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        let in_progress = store.create(&id("a")).unwrap();
        assert!(matches!(
            store.create(&id("a")),
            Err(StoreError::AlreadyExists(_))
        ));
        drop(in_progress);
    }

    #[test]
    fn a_saved_container_is_not_reclaimed_even_unlocked() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        store
            .create(&id("a"))
            .unwrap()
            .save(&record("a", ContainerState::Stopped, None))
            .unwrap();
        assert!(matches!(
            store.create(&id("a")),
            Err(StoreError::AlreadyExists(_))
        ));
    }

    #[test]
    fn a_temporary_left_by_a_crash_is_ignored() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        let lock = store.create(&id("a")).unwrap();
        let saved = record("a", ContainerState::Created, None);
        lock.save(&saved).unwrap();
        fs::write(lock.dir().join(".state.json.tmp-99999"), "{torn").unwrap();
        assert_eq!(store.load(&id("a")).unwrap(), saved);
        assert_eq!(store.list().unwrap().len(), 1);
        // The next save still replaces the record.
        let mut changed = saved.clone();
        changed.oci.set_status(ContainerState::Stopped);
        lock.save(&changed).unwrap();
        assert_eq!(store.load(&id("a")).unwrap(), changed);
    }

    #[test]
    fn lock_waits_for_a_concurrent_delete_and_then_finds_nothing() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        let lock = store.create(&id("a")).unwrap();
        lock.save(&record("a", ContainerState::Created, None))
            .unwrap();
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| store.lock(&id("a")).map(|_| ()));
            // We delete while holding the lock: whether the waiter opens the directory before
            // (and blocks on the lock) or after the removal, it must find no container.
            lock.remove().unwrap();
            assert!(matches!(
                waiter.join().unwrap(),
                Err(StoreError::NotFound(_))
            ));
        });
    }

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        let lock = store.create(&id("a")).unwrap();
        lock.save(&record("a", ContainerState::Created, None))
            .unwrap();
        let other = File::open(lock.dir()).unwrap();
        assert!(other.try_lock().is_err(), "a second lock must wait");
        drop(lock);
        other.try_lock().unwrap();
    }

    #[test]
    fn lock_of_unknown_container_is_not_found() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        assert!(matches!(store.lock(&id("x")), Err(StoreError::NotFound(_))));
        // A directory without state.json (a create that died before saving) is not a container.
        fs::create_dir(root.path().join("y")).unwrap();
        assert!(matches!(store.lock(&id("y")), Err(StoreError::NotFound(_))));
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "f", b"one").unwrap();
        write_atomic(dir.path(), "f", b"two").unwrap();
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["f"]);
    }

    #[test]
    fn pid_file_holds_the_pid_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctr.pid");
        write_pid_file(&path, 4242).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "4242");
        write_pid_file(&path, 7).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "7");
        assert!(write_pid_file(&dir.path().join("missing/ctr.pid"), 1).is_err());
        assert!(write_pid_file(Path::new("/"), 1).is_err());
    }

    #[test]
    fn corrupt_or_foreign_records_are_reported() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        let dir = root.path().join("a");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join(STATE_FILE), "{not json").unwrap();
        assert!(matches!(
            store.load(&id("a")),
            Err(StoreError::Corrupt { .. })
        ));
        let other = serde_json::to_vec(&record("b", ContainerState::Created, None)).unwrap();
        fs::write(dir.join(STATE_FILE), other).unwrap();
        let err = store.load(&id("a")).unwrap_err();
        assert!(
            err.to_string().contains("describes container \"b\""),
            "{err}"
        );
    }

    #[test]
    fn list_is_sorted_and_skips_non_containers() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::new(root.path());
        for name in ["b", "a"] {
            let lock = store.create(&id(name)).unwrap();
            lock.save(&record(name, ContainerState::Created, None))
                .unwrap();
        }
        fs::create_dir(root.path().join("not valid")).unwrap();
        fs::create_dir(root.path().join("empty")).unwrap();
        fs::write(root.path().join("file"), "").unwrap();
        let ids: Vec<String> = store
            .list()
            .unwrap()
            .into_iter()
            .map(|(id, record)| {
                record.unwrap();
                id.to_string()
            })
            .collect();
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn list_of_missing_root_is_empty() {
        let root = tempfile::tempdir().unwrap();
        assert!(Store::new(root.path().join("absent"))
            .list()
            .unwrap()
            .is_empty());
    }

    #[test]
    fn live_process_keeps_its_status() {
        let me = i32::try_from(std::process::id()).unwrap();
        let record = record("a", ContainerState::Running, Some(me));
        assert_eq!(*record.current_state().status(), ContainerState::Running);
    }

    #[test]
    fn dead_or_reused_pid_means_stopped() {
        let me = i32::try_from(std::process::id()).unwrap();
        let mut reused = record("a", ContainerState::Running, Some(me));
        reused.pid_start_time = reused.pid_start_time.map(|t| t + 1);
        assert_eq!(*reused.current_state().status(), ContainerState::Stopped);
        let dead = record("a", ContainerState::Running, Some(i32::MAX));
        assert_eq!(dead.pid_start_time, None);
        assert_eq!(*dead.current_state().status(), ContainerState::Stopped);
        let no_pid = record("a", ContainerState::Created, None);
        assert_eq!(*no_pid.current_state().status(), ContainerState::Stopped);
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(1_795_425_466, 5);
        assert_eq!(rfc3339(t), "2026-11-23T09:17:46.000000005Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000000000Z");
    }
}
