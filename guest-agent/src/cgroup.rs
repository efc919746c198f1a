//! cgroup v2: one cgroup per container under `<root>/husk/<id>`, resources, statistics, freezer,
//! kill and OOM counters.

use std::path::{Path, PathBuf};
use std::time::Duration;

use husk_agent_protocol::agent::{
    CpuStats, IoDeviceStats, MemoryStats, PidsStats, StatsContainerResponse,
};

use crate::spec::Resources;

/// Controllers the agent enables for containers.
const CONTROLLERS: [&str; 5] = ["cpu", "cpuset", "memory", "pids", "io"];

/// Most lines read from one statistics file.
const MAX_STAT_LINES: usize = 256;

/// cgroup failures.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The path is not a cgroup v2 mount.
    #[error("{0} is not a cgroup v2 file system: husk-agent needs cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup)")]
    NotCgroup2(PathBuf),
    /// A file could not be read or written.
    #[error("{op} {path}: {source}{hint}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
        hint: String,
    },
    /// The cgroup still had processes after the kill.
    #[error("cgroup {0} still has processes after being killed")]
    Busy(PathBuf),
    /// The freezer did not settle.
    #[error("cgroup {0} did not reach the requested freezer state")]
    FreezeTimeout(PathBuf),
}

fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> CgroupError {
    let hint = if source.kind() == std::io::ErrorKind::NotFound {
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let controller = file.split('.').next().unwrap_or("");
        format!(" (is the {controller} controller available in the guest kernel?)")
    } else {
        String::new()
    };
    CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
        hint,
    }
}

fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    std::fs::write(&path, value).map_err(|e| io_err("write", &path, e))
}

fn read(dir: &Path, file: &str) -> Result<String, CgroupError> {
    let path = dir.join(file);
    std::fs::read_to_string(&path).map_err(|e| io_err("read", &path, e))
}

/// Reads `key value` lines into a lookup.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .take(MAX_STAT_LINES)
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

fn limit_value(v: &str) -> u64 {
    v.trim().parse().unwrap_or(0)
}

/// The agent's cgroup subtree.
pub struct Cgroups {
    base: PathBuf,
}

impl Cgroups {
    /// Checks that `root` is cgroup v2 and prepares `root/husk` with the controllers enabled.
    pub fn init(root: &Path) -> Result<Self, CgroupError> {
        let st = nix::sys::statfs::statfs(root).map_err(|e| io_err("statfs", root, e.into()))?;
        if st.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
            return Err(CgroupError::NotCgroup2(root.to_path_buf()));
        }
        let base = root.join("husk");
        std::fs::create_dir_all(&base).map_err(|e| io_err("mkdir", &base, e))?;
        for dir in [root, base.as_path()] {
            let available = read(dir, "cgroup.controllers").unwrap_or_default();
            for c in CONTROLLERS {
                if available.split_whitespace().any(|a| a == c) {
                    if let Err(e) = write(dir, "cgroup.subtree_control", &format!("+{c}")) {
                        tracing::warn!(controller = c, error = %e, "cannot enable controller");
                    }
                } else {
                    tracing::warn!(controller = c, dir = %dir.display(), "controller not available");
                }
            }
        }
        Ok(Cgroups { base })
    }

    /// The directory of container `id` (validated by the caller).
    pub fn dir(&self, id: &str) -> PathBuf {
        self.base.join(id)
    }

    /// Creates the container's cgroup (a stale empty one from a crash is reused).
    pub fn create(&self, id: &str) -> Result<PathBuf, CgroupError> {
        let dir = self.dir(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if procs(&dir)?.is_empty() {
                    Ok(dir)
                } else {
                    Err(CgroupError::Busy(dir))
                }
            }
            Err(e) => Err(io_err("mkdir", &dir, e)),
        }
    }
}

/// Pids in the cgroup.
pub fn procs(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    Ok(read(dir, "cgroup.procs")?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// Applies OCI resources (already validated by `spec::check_resources`).
pub fn apply(dir: &Path, r: &Resources) -> Result<(), CgroupError> {
    if let Some(m) = &r.memory {
        if let Some(limit) = m.limit {
            write(dir, "memory.max", &max_or(limit))?;
        }
        if let Some(res) = m.reservation {
            write(dir, "memory.low", &max_or(res))?;
        }
        if let Some(swap) = m.swap {
            let value = match (swap, m.limit) {
                (s, _) if s < 0 => "max".to_owned(),
                (s, Some(l)) if l > 0 => s.saturating_sub(l).to_string(),
                (s, _) => s.to_string(),
            };
            let path = dir.join("memory.swap.max");
            if path.exists() {
                write(dir, "memory.swap.max", &value)?;
            } else if value != "0" && value != "max" {
                return Err(io_err(
                    "write",
                    &path,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no swap accounting"),
                ));
            }
        }
    }
    if let Some(c) = &r.cpu {
        if let Some(shares) = c.shares {
            let shares = shares.clamp(2, 262_144);
            let weight = 1 + ((shares - 2) * 9999) / 262_142;
            write(dir, "cpu.weight", &weight.to_string())?;
        }
        if c.quota.is_some() || c.period.is_some() {
            let quota = match c.quota {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_owned(),
            };
            let period = c.period.unwrap_or(100_000);
            write(dir, "cpu.max", &format!("{quota} {period}"))?;
        }
        if let Some(b) = c.burst {
            write(dir, "cpu.max.burst", &b.to_string())?;
        }
        if let Some(idle) = c.idle {
            write(dir, "cpu.idle", &idle.to_string())?;
        }
        if let Some(cpus) = c.cpus.as_deref().filter(|s| !s.is_empty()) {
            write(dir, "cpuset.cpus", cpus)?;
        }
        if let Some(mems) = c.mems.as_deref().filter(|s| !s.is_empty()) {
            write(dir, "cpuset.mems", mems)?;
        }
    }
    if let Some(p) = &r.pids {
        let v = if p.limit > 0 {
            p.limit.to_string()
        } else {
            "max".to_owned()
        };
        write(dir, "pids.max", &v)?;
    }
    for (k, v) in &r.unified {
        write(dir, k, v)?;
    }
    if !r.devices.is_empty() {
        tracing::debug!(
            "linux.resources.devices: not enforced by a cgroup program; the container's /dev holds only the default and listed devices"
        );
    }
    Ok(())
}

fn max_or(v: i64) -> String {
    if v <= 0 {
        "max".to_owned()
    } else {
        v.to_string()
    }
}

/// Statistics of the cgroup.
pub fn stats(dir: &Path) -> Result<StatsContainerResponse, CgroupError> {
    let cpu_stat = read(dir, "cpu.stat")?;
    let cpu = CpuStats {
        usage_usec: keyed(&cpu_stat, "usage_usec").unwrap_or(0),
        user_usec: keyed(&cpu_stat, "user_usec").unwrap_or(0),
        system_usec: keyed(&cpu_stat, "system_usec").unwrap_or(0),
        nr_throttled: keyed(&cpu_stat, "nr_throttled").unwrap_or(0),
        throttled_usec: keyed(&cpu_stat, "throttled_usec").unwrap_or(0),
        ..Default::default()
    };
    let mem_stat = read(dir, "memory.stat").unwrap_or_default();
    let memory = MemoryStats {
        current_bytes: limit_value(&read(dir, "memory.current").unwrap_or_default()),
        limit_bytes: limit_value(&read(dir, "memory.max").unwrap_or_default()),
        swap_current_bytes: limit_value(&read(dir, "memory.swap.current").unwrap_or_default()),
        oom_kills: oom_kills(dir),
        anon_bytes: keyed(&mem_stat, "anon").unwrap_or(0),
        file_bytes: keyed(&mem_stat, "file").unwrap_or(0),
        ..Default::default()
    };
    let pids = PidsStats {
        current: limit_value(&read(dir, "pids.current").unwrap_or_default()),
        limit: limit_value(&read(dir, "pids.max").unwrap_or_default()),
        ..Default::default()
    };
    let io = read(dir, "io.stat")
        .unwrap_or_default()
        .lines()
        .take(MAX_STAT_LINES)
        .filter_map(parse_io_line)
        .collect();
    Ok(StatsContainerResponse {
        cpu: protobuf::MessageField::some(cpu),
        memory: protobuf::MessageField::some(memory),
        pids: protobuf::MessageField::some(pids),
        io,
        ..Default::default()
    })
}

fn parse_io_line(line: &str) -> Option<IoDeviceStats> {
    let mut parts = line.split_whitespace();
    let (major, minor) = parts.next()?.split_once(':')?;
    let mut s = IoDeviceStats {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        ..Default::default()
    };
    for kv in parts {
        let (k, v) = kv.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        match k {
            "rbytes" => s.read_bytes = v,
            "wbytes" => s.write_bytes = v,
            "rios" => s.read_ios = v,
            "wios" => s.write_ios = v,
            _ => {}
        }
    }
    Some(s)
}

/// The `oom_kill` counter of memory.events (0 when unreadable).
pub fn oom_kills(dir: &Path) -> u64 {
    read(dir, "memory.events")
        .ok()
        .and_then(|t| keyed(&t, "oom_kill"))
        .unwrap_or(0)
}

/// Freezes (`true`) or thaws the cgroup and waits until it settles.
pub async fn freeze(dir: &Path, frozen: bool) -> Result<(), CgroupError> {
    write(dir, "cgroup.freeze", if frozen { "1" } else { "0" })?;
    let want = if frozen { 1 } else { 0 };
    for _ in 0..200 {
        if keyed(&read(dir, "cgroup.events")?, "frozen") == Some(want) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(CgroupError::FreezeTimeout(dir.to_path_buf()))
}

/// Kills every process in the cgroup (cgroup.kill) and removes it once empty.
pub async fn destroy(dir: &Path) -> Result<(), CgroupError> {
    if !dir.exists() {
        return Ok(());
    }
    // A frozen cgroup must be thawed for its processes to die promptly.
    let _ = write(dir, "cgroup.freeze", "0");
    write(dir, "cgroup.kill", "1")?;
    for _ in 0..500 {
        if keyed(&read(dir, "cgroup.events")?, "populated") == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..100 {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("rmdir", dir, e)),
        }
    }
    Err(CgroupError::Busy(dir.to_path_buf()))
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_keyed_files() {
        let t = "low 0\nhigh 0\nmax 0\noom 2\noom_kill 1\n";
        assert_eq!(keyed(t, "oom_kill"), Some(1));
        assert_eq!(keyed(t, "oom"), Some(2));
        assert_eq!(keyed(t, "missing"), None);
    }

    #[test]
    fn parses_io_stat() {
        let s = parse_io_line("254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0")
            .expect("parses");
        assert_eq!(
            (s.major, s.minor, s.read_bytes, s.write_ios),
            (254, 0, 4096, 2)
        );
    }
}
