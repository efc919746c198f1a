//! The tasks a shim runs: containers (their init process) and exec'd processes, with their
//! status and exit.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::SystemTime;

use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::io::StdioPaths;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status; 128 + signal when a signal ended it; 255 when its VM went away.
    pub status: u32,
    pub at: SystemTime,
}

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    /// Start is under way (the agent call has not answered yet).
    Starting,
    Running,
    Stopped,
}

/// One process: a container's init (exec ID empty) or an exec'd process.
pub struct Process {
    pub stdio: StdioPaths,
    /// The guest PID, once known.
    pub pid: u32,
    pub status: Status,
    /// For an exec not started yet: its OCI `process` as JSON.
    pub spec: Option<Vec<u8>>,
    /// Closes the stdin relay (CloseIO).
    pub stdin_close: Option<oneshot::Sender<()>>,
    /// The output relays until Start hands them to the process's waiter.
    pub outputs: Vec<JoinHandle<()>>,
    exit_tx: watch::Sender<Option<Exit>>,
}

impl Process {
    pub fn new(stdio: StdioPaths) -> Process {
        let (exit_tx, _) = watch::channel(None);
        Process {
            stdio,
            pid: 0,
            status: Status::Created,
            spec: None,
            stdin_close: None,
            outputs: Vec::new(),
            exit_tx,
        }
    }

    /// The exit, once the process has ended.
    pub fn exit(&self) -> Option<Exit> {
        *self.exit_tx.borrow()
    }

    /// A receiver that sees the exit.
    pub fn subscribe(&self) -> watch::Receiver<Option<Exit>> {
        self.exit_tx.subscribe()
    }

    /// Records the exit (the first one counts).
    pub fn set_exit(&mut self, exit: Exit) -> bool {
        if self.exit().is_some() {
            return false;
        }
        self.status = Status::Stopped;
        self.exit_tx.send_replace(Some(exit));
        true
    }

    pub fn close_stdin(&mut self) {
        if let Some(tx) = self.stdin_close.take() {
            let _ = tx.send(());
        }
    }
}

/// A container of the VM.
pub struct Container {
    pub bundle: PathBuf,
    /// The rootfs containerd's mounts were mounted on (unmounted at delete), if any.
    pub mounted_rootfs: Option<PathBuf>,
    pub init: Process,
    pub execs: HashMap<String, Process>,
    pub paused: bool,
}

impl Container {
    /// The process `exec_id` names (empty: the init).
    pub fn process(&self, exec_id: &str) -> Option<&Process> {
        if exec_id.is_empty() {
            Some(&self.init)
        } else {
            self.execs.get(exec_id)
        }
    }

    pub fn process_mut(&mut self, exec_id: &str) -> Option<&mut Process> {
        if exec_id.is_empty() {
            Some(&mut self.init)
        } else {
            self.execs.get_mut(exec_id)
        }
    }
}
