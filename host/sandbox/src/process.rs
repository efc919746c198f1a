//! Processes the sandbox starts and later finds again by PID: the one rule against a reused PID.
//!
//! A PID read back from a file (`vmm.pid`, a supervisor's record) may by then belong to another
//! process. It is signalled only while it is still the process that was started: same `starttime`
//! (field 22 of /proc/PID/stat) and, when known, the same program name.

use std::fs;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// `starttime` (clock ticks after boot) of process `pid`, or `None` if it does not exist.
pub fn start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of /proc/PID/stat. The command name (field 2) may contain spaces and parentheses,
/// so fields are counted after its last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let after_comm = stat.get(stat.rfind(')')?.checked_add(1)?..)?;
    // After the command come field 3 (state) onwards; starttime is field 22.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The program name of `pid` (/proc/PID/comm).
pub fn comm(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim_end().to_owned())
}

/// A process as recorded when it was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub pid: i32,
    /// Its `starttime`, when known.
    pub start: Option<u64>,
}

impl Recorded {
    /// Records the running process `pid` (its start time read now).
    pub fn of(pid: i32) -> Recorded {
        Recorded {
            pid,
            start: start_time(pid),
        }
    }

    /// `PID STARTTIME` (or `PID` alone when the start time is unknown), the text of a PID file.
    pub fn to_text(self) -> String {
        match self.start {
            Some(start) => format!("{} {start}\n", self.pid),
            None => format!("{}\n", self.pid),
        }
    }

    /// Parses [`Recorded::to_text`]; `None` for anything else (a corrupt file).
    pub fn parse(text: &str) -> Option<Recorded> {
        let mut words = text.split_whitespace();
        let pid = words.next()?.parse::<i32>().ok().filter(|p| *p > 0)?;
        let start = match words.next() {
            Some(word) => Some(word.parse::<u64>().ok()?),
            None => None,
        };
        if words.next().is_some() {
            return None;
        }
        Some(Recorded { pid, start })
    }

    /// Whether the process still runs and is the one recorded: same start time, and named
    /// `program` when given. Without a recorded start time only the name can tell, and without
    /// either nothing can: such a process is never taken for the recorded one.
    pub fn is_alive(&self, program: Option<&str>) -> bool {
        let Some(now) = start_time(self.pid) else {
            return false;
        };
        if self.start.is_some_and(|start| start != now) {
            return false;
        }
        match program {
            Some(name) => comm(self.pid).is_some_and(|c| c == name),
            None => self.start.is_some(),
        }
    }

    /// SIGTERM (while it is still the recorded process), SIGKILL after `grace`, and waits until
    /// it is gone (at most twice `grace`).
    pub fn stop(&self, program: Option<&str>, grace: Duration) {
        if !self.is_alive(program) {
            return;
        }
        let pid = Pid::from_raw(self.pid);
        let _ = kill(pid, Signal::SIGTERM);
        let step = Duration::from_millis(20);
        let mut waited = Duration::ZERO;
        let mut killed = false;
        while self.is_alive(program) {
            if waited >= grace && !killed {
                tracing::warn!(pid = self.pid, "did not stop after SIGTERM; killing it");
                let _ = kill(pid, Signal::SIGKILL);
                killed = true;
            }
            if waited >= grace.saturating_mul(2) {
                tracing::warn!(pid = self.pid, "did not go away after SIGKILL");
                return;
            }
            std::thread::sleep(step);
            waited = waited.saturating_add(step);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_after_a_tricky_command_name() {
        let stat = "42 (a) b (c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_start_time(stat), Some(98765));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn records_round_trip_and_garbage_is_refused() {
        let r = Recorded {
            pid: 7,
            start: Some(12),
        };
        assert_eq!(Recorded::parse(&r.to_text()), Some(r));
        let bare = Recorded {
            pid: 7,
            start: None,
        };
        assert_eq!(Recorded::parse(&bare.to_text()), Some(bare));
        for bad in ["", "x", "0", "-3", "7 x", "7 1 2", "7 -1"] {
            assert_eq!(Recorded::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let me = Recorded::of(i32::try_from(std::process::id()).unwrap());
        assert!(me.is_alive(None));
        let name = comm(me.pid).unwrap();
        assert!(me.is_alive(Some(&name)));
        assert!(!me.is_alive(Some("husk-vmm-not-this")));
        let reused = Recorded {
            start: me.start.map(|s| s + 1),
            ..me
        };
        assert!(
            !reused.is_alive(None),
            "another start time is another process"
        );
        let unknown = Recorded { start: None, ..me };
        assert!(
            !unknown.is_alive(None),
            "without start time or name nothing is known"
        );
        assert!(unknown.is_alive(Some(&name)));
    }

    #[test]
    fn stopping_a_child_ends_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let rec = Recorded::of(i32::try_from(child.id()).unwrap());
        // A zombie still has a start time: reap it from another thread while `stop` polls.
        let reaper = std::thread::spawn(move || child.wait().unwrap());
        rec.stop(Some("sleep"), Duration::from_secs(2));
        let status = reaper.join().unwrap();
        assert!(!status.success());
        assert!(!rec.is_alive(None));
    }
}
