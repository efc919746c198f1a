//! What husk reports when a running sandbox's agent stops answering: a request that ran into its
//! deadline (ttrpc's "Request deadline elapsed") says nothing about why. [`Watched`] wraps the
//! sandbox's [`Guest`] and, when a request times out, logs once (at most every
//! [`REPORT_INTERVAL`]) the state of husk-vmm's threads (state, kernel wait channel, system
//! call: is its event loop blocked in the host?), the end of husk-vmm's log (a device that
//! failed, a vCPU fault) and the end of the guest console (a soft lockup, a panic). The error
//! itself goes back to the caller unchanged.

use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use husk_agent_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, StatsContainerResponse,
};
use husk_agent_protocol::client::ExitStatus;
use husk_agent_protocol::ClientError;
use tracing::warn;

use crate::files::log_tail;
use crate::guest::{Guest, SharedGuest};
use crate::paths::SandboxPaths;

/// What ttrpc's client says when a request's deadline elapsed.
pub const DEADLINE_ELAPSED: &str = "Request deadline elapsed";
/// The least time between two reports of one sandbox.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(30);
/// The most threads of husk-vmm listed (it has one per vCPU and a few more).
const MAX_THREADS: usize = 64;

/// Whether `err` is a request that timed out (rather than one the agent refused).
pub fn is_timeout(err: &ClientError) -> bool {
    matches!(err, ClientError::Transport { reason, .. } if reason.contains(DEADLINE_ELAPSED))
}

/// One line per thread of process `pid`: `tid comm state wchan=... syscall=...` (what
/// `/proc/<pid>/task/<tid>/` says; a field it does not give is `?`).
pub fn threads(pid: u32) -> Vec<String> {
    let dir = Path::new("/proc").join(pid.to_string()).join("task");
    let Ok(entries) = fs::read_dir(&dir) else {
        return vec![format!("(cannot read {})", dir.display())];
    };
    let mut tids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable();
    let more = tids.len().saturating_sub(MAX_THREADS);
    tids.truncate(MAX_THREADS);
    let mut lines: Vec<String> = tids
        .into_iter()
        .map(|tid| {
            let task = dir.join(tid.to_string());
            let read = |name: &str| {
                fs::read_to_string(task.join(name))
                    .ok()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "?".to_owned())
            };
            // stat: "tid (comm) S ...": the state follows the last ')'.
            let state = read("stat")
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(str::to_owned))
                .unwrap_or_else(|| "?".to_owned());
            // syscall: the number and arguments, or "running"; the number is enough.
            let syscall = read("syscall")
                .split_whitespace()
                .next()
                .unwrap_or("?")
                .to_owned();
            format!(
                "{tid} {} {state} wchan={} syscall={syscall}",
                read("comm"),
                read("wchan")
            )
        })
        .collect();
    if more > 0 {
        lines.push(format!("(and {more} more)"));
    }
    lines
}

/// The report logged for a stalled agent of the sandbox at `paths` whose husk-vmm is `pid`.
pub fn report(paths: &SandboxPaths, pid: u32) -> String {
    format!(
        "husk-vmm {pid} threads: {}; husk-vmm log ({}) ends with: {}; console ({}) ends with: {}",
        threads(pid).join(" | "),
        paths.vmm_log.display(),
        log_tail(&paths.vmm_log),
        paths.console.display(),
        log_tail(&paths.console),
    )
}

/// A sandbox's guest whose timed-out requests are reported (see the module documentation).
pub struct Watched {
    inner: SharedGuest,
    sandbox: String,
    paths: SandboxPaths,
    vmm_pid: u32,
    last_report: Mutex<Option<Instant>>,
    reports: Arc<Mutex<Vec<String>>>,
}

impl Watched {
    /// Wraps the guest of sandbox `sandbox` (files `paths`, husk-vmm `vmm_pid`).
    pub fn new(inner: SharedGuest, sandbox: &str, paths: &SandboxPaths, vmm_pid: u32) -> Watched {
        Watched {
            inner,
            sandbox: sandbox.to_owned(),
            paths: paths.clone(),
            vmm_pid,
            last_report: Mutex::new(None),
            reports: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// The reports logged so far (for tests).
    pub fn reports(&self) -> Vec<String> {
        self.reports.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn check<T>(&self, result: Result<T, ClientError>) -> Result<T, ClientError> {
        if let Err(err) = &result {
            if is_timeout(err) && self.due() {
                let report = report(&self.paths, self.vmm_pid);
                warn!(sandbox = %self.sandbox, %err, %report, "the agent stopped answering");
                if let Ok(mut reports) = self.reports.lock() {
                    reports.push(report);
                }
            }
        }
        result
    }

    /// Whether a report is due now (and, if so, records that one is made).
    fn due(&self) -> bool {
        let Ok(mut last) = self.last_report.lock() else {
            return false;
        };
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < REPORT_INTERVAL) {
            return false;
        }
        *last = Some(now);
        true
    }
}

#[async_trait]
impl Guest for Watched {
    async fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<(), ClientError> {
        self.check(self.inner.create_sandbox(req).await)
    }
    async fn destroy_sandbox(&self, sandbox_id: &str) -> Result<(), ClientError> {
        self.check(self.inner.destroy_sandbox(sandbox_id).await)
    }
    async fn create_container(&self, req: &CreateContainerRequest) -> Result<u32, ClientError> {
        self.check(self.inner.create_container(req).await)
    }
    async fn start_container(&self, container_id: &str) -> Result<(), ClientError> {
        self.check(self.inner.start_container(container_id).await)
    }
    async fn remove_container(&self, container_id: &str) -> Result<(), ClientError> {
        self.check(self.inner.remove_container(container_id).await)
    }
    async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: &[u8],
    ) -> Result<u32, ClientError> {
        self.check(
            self.inner
                .exec_process(container_id, exec_id, process_json)
                .await,
        )
    }
    async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ClientError> {
        self.check(
            self.inner
                .signal_process(container_id, exec_id, signal, all)
                .await,
        )
    }
    async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<ExitStatus, ClientError> {
        self.check(self.inner.wait_process(container_id, exec_id).await)
    }
    async fn write_stdin(
        &self,
        container_id: &str,
        exec_id: &str,
        data: &[u8],
    ) -> Result<(), ClientError> {
        self.check(self.inner.write_stdin(container_id, exec_id, data).await)
    }
    async fn close_stdin(&self, container_id: &str, exec_id: &str) -> Result<(), ClientError> {
        self.check(self.inner.close_stdin(container_id, exec_id).await)
    }
    async fn read_output(
        &self,
        stderr: bool,
        container_id: &str,
        exec_id: &str,
        max_len: usize,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        self.check(
            self.inner
                .read_output(stderr, container_id, exec_id, max_len)
                .await,
        )
    }
    async fn resize_terminal(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ClientError> {
        self.check(
            self.inner
                .resize_terminal(container_id, exec_id, rows, cols)
                .await,
        )
    }
    async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>, ClientError> {
        self.check(self.inner.list_processes(container_id).await)
    }
    async fn stats_container(
        &self,
        container_id: &str,
    ) -> Result<StatsContainerResponse, ClientError> {
        self.check(self.inner.stats_container(container_id).await)
    }
    async fn update_container(
        &self,
        container_id: &str,
        resources_json: &[u8],
    ) -> Result<(), ClientError> {
        self.check(
            self.inner
                .update_container(container_id, resources_json)
                .await,
        )
    }
    async fn pause_container(&self, container_id: &str) -> Result<(), ClientError> {
        self.check(self.inner.pause_container(container_id).await)
    }
    async fn resume_container(&self, container_id: &str) -> Result<(), ClientError> {
        self.check(self.inner.resume_container(container_id).await)
    }
    async fn oom_event(&self) -> Result<String, ClientError> {
        self.check(self.inner.oom_event().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::FakeGuest;

    fn paths(dir: &Path) -> SandboxPaths {
        SandboxPaths {
            dir: dir.to_path_buf(),
            vsock: dir.join("vsock.sock"),
            shared: dir.join("shared"),
            staging: dir.join("staging"),
            console: dir.join("console.log"),
            vmm_pid: dir.join("vmm.pid"),
            vmm_log: dir.join("vmm.log"),
        }
    }

    #[test]
    fn only_deadlines_are_timeouts() {
        let timeout = ClientError::Transport {
            method: "CreateContainer",
            reason: format!("ttrpc err: {DEADLINE_ELAPSED}"),
        };
        assert!(is_timeout(&timeout));
        let broken = ClientError::Transport {
            method: "CreateContainer",
            reason: "ttrpc err: Local stream closed".to_owned(),
        };
        assert!(!is_timeout(&broken));
        let refused = ClientError::Rpc {
            method: "CreateContainer",
            code: ttrpc::Code::INTERNAL,
            message: DEADLINE_ELAPSED.to_owned(),
        };
        assert!(!is_timeout(&refused), "an agent's message is not a timeout");
    }

    #[test]
    fn threads_of_a_live_process_are_listed() {
        let lines = threads(std::process::id());
        assert!(!lines.is_empty());
        let first = &lines[0];
        let fields: Vec<&str> = first.split_whitespace().collect();
        assert_eq!(fields[0], std::process::id().to_string(), "{first}");
        assert!(fields.iter().any(|f| f.starts_with("wchan=")), "{first}");
        assert!(fields.iter().any(|f| f.starts_with("syscall=")), "{first}");
        // The state of a running test thread is one letter (R, S, D...).
        assert!(
            fields
                .iter()
                .any(|f| f.len() == 1 && f.chars().all(|c| c.is_ascii_uppercase())),
            "{first}"
        );
        assert!(threads(u32::MAX)[0].starts_with("(cannot read"));
    }

    #[tokio::test]
    async fn a_timed_out_request_is_reported_once_with_the_logs() {
        let dir = tempfile::tempdir().unwrap();
        let paths = paths(dir.path());
        fs::write(
            &paths.vmm_log,
            "virtio device type 19 failed, needs reset: x\n",
        )
        .unwrap();
        fs::write(
            &paths.console,
            "watchdog: BUG: soft lockup - CPU#0 stuck for 22s!\n",
        )
        .unwrap();
        let fake = FakeGuest::new();
        fake.time_out("SignalProcess");
        let watched = Watched::new(Arc::new(fake.clone()), "pod", &paths, std::process::id());

        let err = watched.signal_process("c", "", 9, false).await.unwrap_err();
        assert!(is_timeout(&err), "the error is passed on: {err}");
        let err = watched.signal_process("c", "", 9, false).await.unwrap_err();
        assert!(is_timeout(&err));
        let reports = watched.reports();
        assert_eq!(reports.len(), 1, "one report per interval: {reports:?}");
        let report = &reports[0];
        assert!(report.contains("needs reset: x"), "{report}");
        assert!(report.contains("soft lockup"), "{report}");
        assert!(
            report.contains(&format!("husk-vmm {} threads: ", std::process::id())),
            "{report}"
        );
    }

    #[tokio::test]
    async fn refusals_and_successes_are_not_reported() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeGuest::new();
        fake.fail("StartContainer", "no such container");
        let watched = Watched::new(Arc::new(fake.clone()), "pod", &paths(dir.path()), 1);
        assert!(watched.start_container("c").await.is_err());
        let _ = watched.list_processes("c").await;
        assert!(watched.reports().is_empty());
        assert_eq!(
            fake.count("StartContainer"),
            1,
            "the call reached the guest"
        );
    }
}
