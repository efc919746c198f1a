//! Reaps every child (the agent is PID 1 or a subreaper) and hands exit statuses to waiters.
//!
//! A process can exit before the agent registers interest in it (the helper reports a pid only
//! after fork), so statuses nobody waits for yet are kept, up to [`MAX_UNCLAIMED`] of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Most exit statuses kept for pids nobody registered (orphans reparented to the agent).
const MAX_UNCLAIMED: usize = 4096;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status, or 128 + signal.
    pub code: i32,
    /// Terminating signal, 0 when it exited.
    pub signal: i32,
}

#[derive(Default)]
struct State {
    waiting: HashMap<i32, watch::Sender<Option<Exit>>>,
    unclaimed: HashMap<i32, Exit>,
}

/// The process table of exits.
pub struct Reaper {
    state: Mutex<State>,
}

impl Reaper {
    /// Starts reaping on SIGCHLD. Must run inside the tokio runtime.
    pub fn start() -> std::io::Result<Arc<Self>> {
        let reaper = Arc::new(Reaper {
            state: Mutex::new(State::default()),
        });
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    tracing::error!("SIGCHLD stream ended; no more reaping");
                    return;
                }
            }
        });
        Ok(reaper)
    }

    fn reap_all(&self) {
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid writes the status into a valid int.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            let exit = if libc::WIFSIGNALED(status) {
                let sig = libc::WTERMSIG(status);
                Exit {
                    code: 128 + sig,
                    signal: sig,
                }
            } else {
                Exit {
                    code: libc::WEXITSTATUS(status),
                    signal: 0,
                }
            };
            tracing::debug!(pid, ?exit, "reaped");
            self.deliver(pid, exit);
        }
    }

    fn deliver(&self, pid: i32, exit: Exit) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        if let Some(tx) = st.waiting.remove(&pid) {
            let _ = tx.send(Some(exit));
            return;
        }
        if st.unclaimed.len() >= MAX_UNCLAIMED {
            if let Some(k) = st.unclaimed.keys().next().copied() {
                st.unclaimed.remove(&k);
            }
        }
        st.unclaimed.insert(pid, exit);
    }

    /// A receiver that holds the exit of `pid` once it ends (at once if it already ended).
    pub fn watch(&self, pid: i32) -> watch::Receiver<Option<Exit>> {
        let (tx, rx) = watch::channel(None);
        match self.state.lock() {
            Ok(mut st) => {
                if let Some(exit) = st.unclaimed.remove(&pid) {
                    let _ = tx.send(Some(exit));
                } else {
                    st.waiting.insert(pid, tx);
                }
            }
            Err(_) => tracing::error!("reaper state poisoned"),
        }
        rx
    }
}

/// Waits until the receiver holds an exit.
pub async fn wait_exit(rx: &mut watch::Receiver<Option<Exit>>) -> Option<Exit> {
    match rx.wait_for(|e| e.is_some()).await {
        Ok(v) => *v,
        Err(_) => None,
    }
}
