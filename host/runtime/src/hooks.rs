//! OCI hooks that run on the host, in the runtime's namespaces (runtime-spec `config.md`, "POSIX
//! platform hooks"): `prestart` (deprecated) and `createRuntime` during `create`, `poststart`
//! after `start`, `poststop` during `delete`.
//!
//! Each hook is executed with its `path`, `args` (whose first element is argv\[0\], as in
//! execv) and exactly its `env`; the container's state JSON on standard input; killed when its
//! `timeout` (seconds) runs out. Its output is captured (bounded) and shown when it fails.
//! `createContainer` and `startContainer` hooks run in the container's namespaces, which are in
//! the guest: husk cannot run them and refuses specs that have them (see `bundle`).
//!
//! A failing `prestart`/`createRuntime` hook fails `create`; a failing `poststart`/`poststop`
//! hook is logged and the operation goes on, as the runtime spec says.

use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Hooks};

/// The most output kept from one hook (stdout and stderr together), in bytes.
pub const MAX_OUTPUT: usize = 16 * 1024;
/// How often a running hook is polled for its exit.
const POLL: Duration = Duration::from_millis(5);

/// The host-side hook points, in the order of a container's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    Prestart,
    CreateRuntime,
    Poststart,
    Poststop,
}

impl HookKind {
    /// The spec's field name.
    pub fn name(self) -> &'static str {
        match self {
            HookKind::Prestart => "prestart",
            HookKind::CreateRuntime => "createRuntime",
            HookKind::Poststart => "poststart",
            HookKind::Poststop => "poststop",
        }
    }

    /// Whether a failure fails the operation (else it is only logged).
    pub fn must_succeed(self) -> bool {
        matches!(self, HookKind::Prestart | HookKind::CreateRuntime)
    }

    /// The hooks of this kind in `hooks`.
    #[allow(deprecated)]
    pub fn select(self, hooks: &Hooks) -> &[Hook] {
        let list = match self {
            HookKind::Prestart => hooks.prestart(),
            HookKind::CreateRuntime => hooks.create_runtime(),
            HookKind::Poststart => hooks.poststart(),
            HookKind::Poststop => hooks.poststop(),
        };
        list.as_deref().unwrap_or_default()
    }
}

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The hook could not be started.
    #[error("{kind} hook {index} ({path}): cannot run: {source}")]
    Spawn {
        kind: &'static str,
        index: usize,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The hook ran and failed.
    #[error("{kind} hook {index} ({path}): {how}{}", output_suffix(.output))]
    Failed {
        kind: &'static str,
        index: usize,
        path: PathBuf,
        /// `exited with status 3`, `killed by signal 9`, `timed out after 2 s`.
        how: String,
        output: String,
    },
    /// A timeout of 0 or less (the spec requires a positive number).
    #[error("{kind} hook {index} ({path}): timeout must be positive, not {timeout}")]
    BadTimeout {
        kind: &'static str,
        index: usize,
        path: PathBuf,
        timeout: i64,
    },
}

fn output_suffix(output: &str) -> String {
    if output.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", output.trim())
    }
}

/// Runs the hooks of `kind` in order with `state` (the OCI state JSON) on their standard input.
/// For `prestart`/`createRuntime` the first failure stops and is returned; for the others every
/// hook runs and failures are logged as warnings.
pub fn run_hooks(kind: HookKind, hooks: Option<&Hooks>, state: &[u8]) -> Result<(), HookError> {
    let Some(hooks) = hooks else {
        return Ok(());
    };
    for (index, hook) in kind.select(hooks).iter().enumerate() {
        match run_hook(kind, index, hook, state) {
            Ok(()) => {}
            Err(err) if kind.must_succeed() => return Err(err),
            Err(err) => tracing::warn!("{err}"),
        }
    }
    Ok(())
}

/// Runs one hook (see the module documentation).
pub fn run_hook(kind: HookKind, index: usize, hook: &Hook, state: &[u8]) -> Result<(), HookError> {
    let path = hook.path().clone();
    let timeout = match hook.timeout() {
        None => None,
        Some(t) if t > 0 => Some(Duration::from_secs(t.unsigned_abs())),
        Some(t) => {
            return Err(HookError::BadTimeout {
                kind: kind.name(),
                index,
                path,
                timeout: t,
            })
        }
    };
    let mut command = Command::new(&path);
    if let Some(args) = hook.args().as_deref() {
        if let Some((argv0, rest)) = args.split_first() {
            command.arg0(argv0).args(rest);
        }
    }
    command.env_clear();
    for entry in hook.env().iter().flatten() {
        if let Some((name, value)) = entry.split_once('=') {
            command.env(name, value);
        }
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| HookError::Spawn {
            kind: kind.name(),
            index,
            path: path.clone(),
            source,
        })?;
    // The hook may exit without reading its input: a broken pipe is not an error.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(state);
    }
    let output = collect_output(&mut child);
    let status = wait(&mut child, timeout);
    let output = output.join().unwrap_or_default();
    let how = match status {
        Ok(status) if status.success() => return Ok(()),
        Ok(status) => describe(status),
        Err(elapsed) => format!("timed out after {} s", elapsed.as_secs()),
    };
    Err(HookError::Failed {
        kind: kind.name(),
        index,
        path,
        how,
        output,
    })
}

/// Reads the hook's stdout and stderr on threads, keeping at most [`MAX_OUTPUT`] bytes.
fn collect_output(child: &mut Child) -> thread::JoinHandle<String> {
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let drain = |reader: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut kept = Vec::new();
            if let Some(mut reader) = reader {
                let _ = reader
                    .by_ref()
                    .take(MAX_OUTPUT as u64)
                    .read_to_end(&mut kept);
                // Keep draining so a talkative hook never blocks on a full pipe.
                let _ = io::copy(&mut reader, &mut io::sink());
            }
            kept
        })
    };
    let out = drain(stdout.map(|s| Box::new(s) as Box<dyn Read + Send>));
    let err = drain(stderr.map(|s| Box::new(s) as Box<dyn Read + Send>));
    thread::spawn(move || {
        let mut all = out.join().unwrap_or_default();
        all.extend(err.join().unwrap_or_default());
        all.truncate(MAX_OUTPUT);
        String::from_utf8_lossy(&all).into_owned()
    })
}

/// Waits for the hook; on timeout kills it and returns the time waited.
fn wait(child: &mut Child, timeout: Option<Duration>) -> Result<ExitStatus, Duration> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) => {}
            Err(_) => return child.wait().map_err(|_| start.elapsed()),
        }
        if timeout.is_some_and(|t| start.elapsed() >= t) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(start.elapsed());
        }
        thread::sleep(POLL);
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("ended with {status}"),
    }
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::{HookBuilder, HooksBuilder};

    use super::*;

    fn sh(script: &str, timeout: Option<i64>) -> Hook {
        let mut builder = HookBuilder::default()
            .path("/bin/sh")
            .args(vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()])
            .env(vec!["HOOK_VAR=42".to_owned()]);
        if let Some(t) = timeout {
            builder = builder.timeout(t);
        }
        builder.build().unwrap()
    }

    #[test]
    fn hook_gets_the_state_args_and_only_its_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let script = format!(
            "cat > {0}.state; echo \"$0 $HOOK_VAR ${{HOME:-unset}}\" > {0}",
            out.display()
        );
        run_hook(
            HookKind::CreateRuntime,
            0,
            &sh(&script, None),
            b"{\"id\":\"c\"}",
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "sh 42 unset\n");
        assert_eq!(
            std::fs::read_to_string(out.with_extension("state")).unwrap(),
            "{\"id\":\"c\"}"
        );
    }

    #[test]
    fn failing_hook_reports_status_and_output() {
        let err = run_hook(
            HookKind::CreateRuntime,
            2,
            &sh("echo no network >&2; exit 3", None),
            b"{}",
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "createRuntime hook 2 (/bin/sh): exited with status 3: no network"
        );
    }

    #[test]
    fn hook_past_its_timeout_is_killed() {
        let err = run_hook(HookKind::Prestart, 0, &sh("exec sleep 30", Some(1)), b"").unwrap_err();
        assert!(err.to_string().contains("timed out after 1 s"), "{err}");
    }

    #[test]
    fn non_positive_timeout_is_refused() {
        let err = run_hook(HookKind::Prestart, 0, &sh("true", Some(0)), b"").unwrap_err();
        assert!(
            matches!(err, HookError::BadTimeout { timeout: 0, .. }),
            "{err}"
        );
    }

    #[test]
    fn missing_hook_binary_cannot_run() {
        let hook = HookBuilder::default()
            .path("/nonexistent/hook")
            .build()
            .unwrap();
        let err = run_hook(HookKind::Poststop, 0, &hook, b"").unwrap_err();
        assert!(matches!(err, HookError::Spawn { .. }), "{err}");
    }

    #[test]
    fn create_hooks_stop_at_the_first_failure_others_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("ran");
        let touch = sh(&format!("touch {}", mark.display()), None);
        let hooks = HooksBuilder::default()
            .create_runtime(vec![sh("exit 1", None), touch.clone()])
            .poststop(vec![sh("exit 1", None), touch])
            .build()
            .unwrap();
        assert!(run_hooks(HookKind::CreateRuntime, Some(&hooks), b"{}").is_err());
        assert!(!mark.exists());
        run_hooks(HookKind::Poststop, Some(&hooks), b"{}").unwrap();
        assert!(mark.exists());
    }

    #[test]
    fn output_is_bounded() {
        let err = run_hook(
            HookKind::Poststart,
            0,
            &sh("head -c 1000000 /dev/zero | tr '\\0' x; exit 1", None),
            b"",
        )
        .unwrap_err();
        let HookError::Failed { output, .. } = err else {
            panic!("{err}")
        };
        assert_eq!(output.len(), MAX_OUTPUT);
    }
}
