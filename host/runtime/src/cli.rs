//! The command line: runc's global flags, one subcommand per verb (each in `commands/`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::commands::{
    check, create, delete, events, exec, features, kill, list, pause, ps, run, sandbox_supervisor,
    spec, start, state, update,
};
use crate::logging::LogFormat;
use crate::options::Options;

/// `husk --version`: husk's version and the runtime-spec version it implements, like runc.
static VERSION: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{}\nspec: {}",
        env!("CARGO_PKG_VERSION"),
        oci_spec::runtime::VERSION
    )
});

/// The exit statuses, for `--help` (the constants are in `crate::exit`).
const EXIT_STATUSES: &str = "\
Exit status:
  0  success
  1  failure without a more specific status (I/O error, corrupt state file)
  2  usage: unknown verb or flag, unknown --log-format, invalid container ID
  3  the configuration file is invalid, unreadable, or missing when named with --config
  4  the container does not exist
  5  the bundle is invalid
  6  husk check: this host cannot run husk as configured
  7  already exists: a container ID, or config.json for spec";

/// The default `--root`: where container state lives (a tmpfs on most hosts, as for runc).
pub const DEFAULT_ROOT: &str = "/run/husk";

/// husk: an OCI runtime that runs each container in its own KVM microVM.
#[derive(Debug, Parser)]
#[command(
    name = "husk",
    version = VERSION.as_str(),
    propagate_version = true,
    after_help = EXIT_STATUSES
)]
pub struct Cli {
    /// Root directory for container state.
    #[arg(long, global = true, value_name = "DIR", default_value = DEFAULT_ROOT)]
    pub root: PathBuf,

    /// Write log lines to FILE (appended) instead of standard error.
    #[arg(long, global = true, value_name = "FILE")]
    pub log: Option<PathBuf>,

    /// Format of log lines.
    #[arg(
        long,
        global = true,
        value_name = "FORMAT",
        value_enum,
        default_value_t
    )]
    pub log_format: LogFormat,

    /// Log debug messages too.
    #[arg(long, global = true)]
    pub debug: bool,

    /// husk's configuration file. When this flag is not given and the default file does not
    /// exist, built-in defaults apply; a file named with this flag must exist.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Place containers in systemd scopes (cgroupsPath as "slice:prefix:name"), as runc's flag
    /// (podman passes it when its cgroup manager is systemd). It matters to `create`; the
    /// current verbs, like runc's `state`, `list`, `spec` and `features`, do not use it.
    #[arg(long, global = true)]
    pub systemd_cgroup: bool,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// `--root` made absolute (relative to the current directory), as runc does.
    pub fn root(&self) -> PathBuf {
        std::path::absolute(&self.root).unwrap_or_else(|_| self.root.clone())
    }

    /// Where log lines go: `--log`, or for the sandbox supervisor (whose standard error is the
    /// container's) its state directory's `supervisor.log`.
    pub fn log_path(&self) -> Option<PathBuf> {
        if let Some(log) = &self.log {
            return Some(log.clone());
        }
        match &self.command {
            Command::SandboxSupervisor(args) => crate::id::ContainerId::new(&args.id)
                .ok()
                .map(|id| self.root().join(id.as_str()).join("supervisor.log")),
            _ => None,
        }
    }

    /// The global options as values, for the library (`--root` made absolute).
    pub fn options(&self) -> Options {
        Options {
            root: self.root(),
            log: self.log.clone(),
            log_format: self.log_format,
            debug: self.debug,
            config: self.config.clone(),
            systemd_cgroup: self.systemd_cgroup,
        }
    }
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Tell whether this host can run husk (KVM, guest kernel, husk-vmm, cgroup v2), and what to
    /// do if not; print the effective configuration; optionally validate a bundle.
    Check(check::Args),
    /// Print the OCI features document: what husk supports.
    Features(features::Args),
    /// List the containers under --root.
    List(list::Args),
    /// Create a new specification file (config.json) in the bundle.
    Spec(spec::Args),
    /// Print the state of a container as OCI state JSON.
    State(state::Args),
    /// Create a container in its own microVM; its process waits for `start`.
    Create(create::Args),
    /// Run the process of a created container.
    Start(start::Args),
    /// Create and start a container; wait for it and exit with its status (unless --detach).
    Run(run::Args),
    /// Send a signal to a container's process (default SIGTERM).
    Kill(kill::Args),
    /// Delete a stopped container (--force: any container) and everything it holds.
    Delete(delete::Args),
    /// Run a new process in a running container; exit with its status.
    Exec(exec::Args),
    /// List the processes of a container (their PIDs in the guest).
    Ps(ps::Args),
    /// Freeze every process of a running container.
    Pause(pause::Args),
    /// Thaw a paused container.
    Resume(pause::Args),
    /// Apply new resource limits to a container.
    Update(update::Args),
    /// Print a container's statistics and OOM events.
    Events(events::Args),
    /// Internal: the long-lived process of one container, started by create.
    #[command(hide = true)]
    SandboxSupervisor(sandbox_supervisor::Args),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit;

    #[test]
    fn help_lists_every_exit_status() {
        let codes = [
            exit::SUCCESS,
            exit::FAILURE,
            exit::USAGE,
            exit::CONFIG,
            exit::NOT_FOUND,
            exit::BUNDLE,
            exit::HOST_NOT_READY,
            exit::ALREADY_EXISTS,
        ];
        for code in codes {
            assert!(EXIT_STATUSES.contains(&format!("\n  {code}  ")), "{code}");
        }
        assert_eq!(EXIT_STATUSES.lines().count(), codes.len() + 1);
    }
}
