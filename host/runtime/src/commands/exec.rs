//! `husk exec [-t] [-d] [--process F | ID COMMAND...]`: runs a new process in a running container
//! and exits with its status (128 + N when signal N ended it), as `runc exec`. The signals a
//! shell or an engine sends to stop a process (TERM, INT, HUP, QUIT, USR1, USR2) are passed on
//! to it in the guest.
//!
//! The process lives in the microVM, so with `--detach` a host process stands for it, as the
//! sandbox supervisor does for a container: a relay (this binary again, hidden flag `--relay`,
//! in a session of its own) starts the process, answers on a pipe (see `crate::supervisor`),
//! then carries its I/O and exits with its status. `exec --detach` returns once the process
//! runs and writes the relay's PID to `--pid-file`: that PID is what engines such as conmon
//! (podman exec) wait for and signal.

use std::ffi::OsString;
use std::fs::File;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{SystemTime, UNIX_EPOCH};

use oci_spec::runtime::{Process, ProcessBuilder, User};

use super::CommandError;
use crate::bundle;
use crate::cli::Cli;
use crate::container::{self, Locked};
use crate::exit;
use crate::id::ContainerId;
use crate::lifecycle::Operation;
use crate::relay::{self, HostStdio};
use crate::signal;
use crate::store::write_pid_file;
use crate::supervisor;
use husk_sandbox::guest::{self, GuestError};

/// Arguments of `husk exec`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// An OCI `process` JSON file describing the process (instead of COMMAND).
    #[arg(long, short = 'p', value_name = "FILE")]
    pub process: Option<PathBuf>,
    /// Give the process a terminal.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// A Unix socket that receives the master of the process's terminal.
    #[arg(long, value_name = "SOCK")]
    pub console_socket: Option<PathBuf>,
    /// Write the PID of the process standing for the exec'd one on the host (this command's).
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
    /// Set an environment variable (KEY=VALUE); may be repeated.
    #[arg(long, short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// The working directory in the container.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<PathBuf>,
    /// The user as UID[:GID].
    #[arg(long, short = 'u', value_name = "UID[:GID]")]
    pub user: Option<String>,
    /// Return once the process runs; a relay process (its PID goes to --pid-file) carries its
    /// I/O and exits with its status.
    #[arg(long, short = 'd')]
    pub detach: bool,
    /// Internal: this is the relay of a detached exec (answers on fd 3).
    #[arg(long, hide = true)]
    pub relay: bool,
    /// The container's ID.
    #[arg(value_name = "ID")]
    pub id: String,
    /// The command and its arguments (when --process is not given).
    #[arg(
        value_name = "COMMAND",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub command: Vec<String>,
}

fn unsupported(what: String) -> CommandError {
    CommandError::Unsupported(what)
}

/// The process to run: `--process F`, or the container's own process with COMMAND and the
/// flags applied.
fn process(args: &Args, base: Option<Process>) -> Result<Process, CommandError> {
    if let Some(path) = &args.process {
        if !args.command.is_empty() {
            return Err(unsupported(
                "give either --process or a COMMAND, not both".to_owned(),
            ));
        }
        let mut process = bundle::load_process(path)?;
        if args.tty {
            process.set_terminal(Some(true));
        }
        return Ok(process);
    }
    if args.command.is_empty() {
        return Err(unsupported(
            "exec needs a COMMAND (or --process FILE)".to_owned(),
        ));
    }
    let mut process = match base {
        Some(p) => p,
        None => ProcessBuilder::default()
            .cwd("/")
            .build()
            .map_err(|e| unsupported(e.to_string()))?,
    };
    process.set_args(Some(args.command.clone()));
    process.set_terminal(Some(args.tty));
    process.set_console_size(None);
    if let Some(cwd) = &args.cwd {
        if !cwd.is_absolute() {
            return Err(unsupported(format!(
                "--cwd {}: not an absolute path",
                cwd.display()
            )));
        }
        process.set_cwd(cwd.clone());
    }
    if !args.env.is_empty() {
        let mut env = process.env().clone().unwrap_or_default();
        for item in &args.env {
            let Some((key, _)) = item.split_once('=') else {
                return Err(unsupported(format!("--env {item:?}: expected KEY=VALUE")));
            };
            env.retain(|e| e.split_once('=').map(|(k, _)| k) != Some(key));
            env.push(item.clone());
        }
        process.set_env(Some(env));
    }
    if let Some(user) = &args.user {
        process.set_user(parse_user(user)?);
    }
    Ok(process)
}

fn parse_user(text: &str) -> Result<User, CommandError> {
    let bad = || unsupported(format!("--user {text:?}: expected UID[:GID] (numbers)"));
    let (uid, gid) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    let mut user = User::default();
    user.set_uid(uid.parse().map_err(|_| bad())?);
    user.set_gid(match gid {
        Some(g) => g.parse().map_err(|_| bad())?,
        None => 0,
    });
    Ok(user)
}

/// A fresh exec ID: this process's PID and the time, unique on this host.
fn exec_id() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("exec-{}-{nanos}", std::process::id())
}

/// Runs `husk exec`.
pub fn run(cli: &Cli, args: &Args) -> Result<u8, CommandError> {
    if args.detach && !args.relay {
        return detach(cli, args);
    }
    let mut answer = if args.relay {
        supervisor::take_answer_fd()
    } else {
        None
    };
    let result = exec(cli, args, &mut answer);
    if let Err(err) = &result {
        supervisor::write_answer(&mut answer, &supervisor::error_answer(err.exit_code(), err));
    }
    result
}

/// `exec --detach`: starts the relay with the same request and waits for its answer.
fn detach(cli: &Cli, args: &Args) -> Result<u8, CommandError> {
    // Checked here too, so that a bad ID or state fails before any process is started.
    let id = ContainerId::new(&args.id)?;
    Locked::acquire(&cli.options(), &id)?.check(Operation::Exec)?;
    let mut command = supervisor::husk_command("the exec relay (no path to husk)")?;
    command
        .args(cli.options().global_args())
        .args(relay_args(args));
    if args.console_socket.is_some() {
        // The process's stdio is the terminal; the relay needs none of its own.
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    }
    let relay = supervisor::spawn_answering(command, "the exec relay")?;
    tracing::debug!(pid = relay.id(), "{id}: exec relay started");
    if let Some(pid_file) = &args.pid_file {
        write_pid_file(pid_file, i32::try_from(relay.id()).unwrap_or(0))?;
    }
    // The relay runs on by itself (reaped by whoever inherits it: an engine's subreaper).
    Ok(0)
}

/// The relay's verb and arguments: the same request, without --detach and --pid-file.
fn relay_args(args: &Args) -> Vec<OsString> {
    let mut out: Vec<OsString> = vec!["exec".into(), "--relay".into()];
    let mut flag = |name: &str, value: OsString| {
        out.push(name.into());
        out.push(value);
    };
    if let Some(process) = &args.process {
        flag("--process", process.into());
    }
    if let Some(socket) = &args.console_socket {
        flag("--console-socket", socket.into());
    }
    for env in &args.env {
        flag("--env", env.into());
    }
    if let Some(cwd) = &args.cwd {
        flag("--cwd", cwd.into());
    }
    if let Some(user) = &args.user {
        flag("--user", user.into());
    }
    if args.tty {
        out.push("--tty".into());
    }
    // After `--`, so that an ID starting with `-` (valid, as for runc) is never read as a flag;
    // the command follows it as the trailing positionals.
    out.push("--".into());
    out.push(args.id.clone().into());
    out.extend(args.command.iter().map(OsString::from));
    out
}

/// Runs the process and relays its I/O until it ends. With `answer` (the relay of a detached
/// exec), `ok` is written there once the process runs and its terminal has been handed over.
fn exec(cli: &Cli, args: &Args, answer: &mut Option<File>) -> Result<u8, CommandError> {
    let id = ContainerId::new(&args.id)?;
    let (vsock, spec) = {
        // The lock is held only to check; the process may run for long.
        let container = Locked::acquire(&cli.options(), &id)?;
        container.check(Operation::Exec)?;
        (
            container.vsock(),
            container::saved_spec(container.lock.dir()),
        )
    };
    let process = process(args, spec.and_then(|s| s.process().clone()))?;
    let terminal = process.terminal().unwrap_or(false);
    if args.console_socket.is_some() && !terminal {
        return Err(unsupported(
            "--console-socket needs a terminal (-t or process.terminal)".into(),
        ));
    }
    let json = serde_json::to_vec(&process).map_err(|e| unsupported(e.to_string()))?;
    if let Some(pid_file) = &args.pid_file {
        write_pid_file(pid_file, i32::try_from(std::process::id()).unwrap_or(0))?;
    }
    let rt = guest::runtime()?;
    let exec = exec_id();
    let status = rt.block_on(async {
        let mut signals = signal::Forwarded::new()
            .map_err(|e| unsupported(format!("cannot handle signals: {e}")))?;
        let client: husk_sandbox::SharedGuest =
            std::sync::Arc::new(guest::connect(&vsock, guest::CONNECT_TIMEOUT).await?);
        client.exec_process(id.as_str(), &exec, &json).await?;
        let stdio = if terminal {
            match relay::terminal(args.console_socket.as_deref(), None) {
                Ok(stdio) => stdio,
                Err(err) => {
                    // Nobody would see the process or end it: end it now.
                    let sigkill = libc::SIGKILL.unsigned_abs();
                    let _ = client
                        .signal_process(id.as_str(), &exec, sigkill, false)
                        .await;
                    return Err(unsupported(err.to_string()));
                }
            }
        } else {
            HostStdio::Inherited
        };
        let attached = relay::attach(&client, id.as_str(), &exec, stdio);
        supervisor::write_answer(answer, "ok\n");
        let waited = client.wait_process(id.as_str(), &exec);
        tokio::pin!(waited);
        let status = loop {
            tokio::select! {
                status = &mut waited => break status.map_err(GuestError::from),
                signal = signals.recv() => {
                    tracing::debug!(signal, "{id}: passing a signal on to exec {exec}");
                    if let Err(err) = client.signal_process(id.as_str(), &exec, signal, false).await {
                        tracing::warn!("{id}: cannot pass signal {signal} on to exec {exec}: {err}");
                    }
                }
            }
        };
        attached.finish(status.is_ok()).await;
        Ok::<_, CommandError>(status?)
    });
    rt.shutdown_background();
    let status = status?;
    let code = if status.signal > 0 {
        status.signal.saturating_add(128)
    } else {
        status.code
    };
    Ok(u8::try_from(code & 0xff).unwrap_or(exit::FAILURE))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::*;

    fn args(line: &[&str]) -> Args {
        #[derive(Debug, clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            args: Args,
        }
        Wrapper::parse_from(std::iter::once("exec").chain(line.iter().copied())).args
    }

    #[test]
    fn the_relay_reads_back_an_id_that_looks_like_a_flag_and_the_whole_command() {
        let given = args(&["--tty", "--", "-x", "sh", "-c", "echo -- --tty"]);
        assert_eq!(given.id, "-x");
        let line: Vec<String> = relay_args(&given)
            .into_iter()
            .skip(1) // "exec": the verb, which `args` adds itself
            .map(|a| a.into_string().unwrap())
            .collect();
        let line: Vec<&str> = line.iter().map(String::as_str).collect();
        let relayed = args(&line);
        assert!(relayed.relay && relayed.tty);
        assert_eq!(relayed.id, "-x");
        assert_eq!(relayed.command, ["sh", "-c", "echo -- --tty"]);
        // Without a command too.
        let relayed = args(&["--relay", "--", "-x"]);
        assert_eq!((relayed.id.as_str(), relayed.command.len()), ("-x", 0));
    }

    fn base() -> Process {
        let mut p = Process::default();
        p.set_env(Some(vec!["PATH=/bin".into(), "A=1".into()]));
        p.set_cwd("/work".into());
        p
    }

    #[test]
    fn the_command_replaces_the_args_of_the_containers_process() {
        let p = process(&args(&["c1", "sh", "-c", "echo hi"]), Some(base())).unwrap();
        assert_eq!(p.args().clone().unwrap(), ["sh", "-c", "echo hi"]);
        assert_eq!(p.cwd(), Path::new("/work"));
        assert_eq!(p.terminal(), Some(false));
    }

    #[test]
    fn env_cwd_user_and_tty_apply() {
        let a = args(&[
            "-t", "-e", "A=2", "-e", "B=3", "--cwd", "/tmp", "-u", "5:6", "c1", "id",
        ]);
        let p = process(&a, Some(base())).unwrap();
        assert_eq!(p.env().clone().unwrap(), ["PATH=/bin", "A=2", "B=3"]);
        assert_eq!(p.cwd(), Path::new("/tmp"));
        assert_eq!((p.user().uid(), p.user().gid()), (5, 6));
        assert_eq!(p.terminal(), Some(true));
    }

    #[test]
    fn bad_requests_are_refused() {
        assert!(process(&args(&["c1"]), Some(base())).is_err(), "no command");
        assert!(process(&args(&["--cwd", "rel", "c1", "id"]), None).is_err());
        assert!(process(&args(&["-e", "NOEQUALS", "c1", "id"]), None).is_err());
        assert!(process(&args(&["-u", "root", "c1", "id"]), None).is_err());
    }

    #[test]
    fn the_relay_gets_the_same_request_without_detach_and_pid_file() {
        let a = args(&[
            "-d",
            "--pid-file",
            "/run/p",
            "-t",
            "--console-socket",
            "/run/s",
            "-e",
            "A=1",
            "--cwd",
            "/w",
            "-u",
            "1:2",
            "c1",
            "sh",
            "-c",
            "--not-a-flag",
        ]);
        let relayed = relay_args(&a);
        assert_eq!(relayed[..2], ["exec", "--relay"]);
        let line: Vec<&str> = relayed[1..].iter().map(|a| a.to_str().unwrap()).collect();
        let again = args(&line);
        assert!(again.relay && !again.detach && again.pid_file.is_none());
        assert!(again.tty);
        assert_eq!(again.console_socket, a.console_socket);
        assert_eq!((again.env, again.cwd, again.user), (a.env, a.cwd, a.user));
        assert_eq!(again.id, "c1");
        assert_eq!(again.command, ["sh", "-c", "--not-a-flag"]);

        let from_file = relay_args(&args(&["-d", "--process", "p.json", "c1"]));
        assert_eq!(
            from_file,
            ["exec", "--relay", "--process", "p.json", "--", "c1"]
        );
    }

    #[test]
    fn exec_ids_are_valid_agent_ids() {
        let id = exec_id();
        husk_agent_protocol::validate::validate_id("exec id", &id).unwrap();
    }
}
