//! One module per verb. Each has an `Args` (its part of the command line) and a `run` that
//! returns the exit status or a [`CommandError`].

pub mod check;
pub mod create;
pub mod delete;
pub mod events;
pub mod exec;
pub mod features;
pub mod kill;
pub mod list;
pub mod pause;
pub mod ps;
pub mod run;
pub mod sandbox_supervisor;
pub mod spec;
pub mod start;
pub mod state;
pub mod update;

use std::io::{self, Write};

use crate::bundle::BundleError;
use crate::cli::{Cli, Command};
use crate::config::ConfigError;
use crate::container::ContainerError;
use crate::exit;
use crate::hooks::HookError;
use crate::id::IdError;
use crate::lifecycle::NotAllowed;
use crate::signal::UnknownSignal;
use crate::sizing::SizingError;
use crate::store::StoreError;
use crate::supervisor::SupervisorError;
use husk_sandbox::guest::GuestError;

/// Why a verb failed; each cause has its own exit status ([`CommandError::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Sizing(#[from] SizingError),
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Agent(#[from] GuestError),
    #[error(transparent)]
    NotAllowed(#[from] NotAllowed),
    #[error(transparent)]
    Signal(#[from] UnknownSignal),
    #[error(transparent)]
    Hook(#[from] HookError),
    /// A request husk cannot carry out (the message says why).
    #[error("{0}")]
    Unsupported(String),
    /// Writing the verb's output failed (for example a closed pipe).
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

impl CommandError {
    /// The process exit status for this error (see `crate::exit`).
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Id(_) => exit::USAGE,
            CommandError::Config(_) => exit::CONFIG,
            CommandError::Store(err) => err.exit_code(),
            CommandError::Bundle(_) | CommandError::Sizing(_) => exit::BUNDLE,
            CommandError::Spec(err) => err.exit_code(),
            CommandError::Supervisor(err) => err.exit_code(),
            CommandError::Container(err) => err.exit_code(),
            CommandError::Signal(_) => exit::USAGE,
            CommandError::Agent(_)
            | CommandError::NotAllowed(_)
            | CommandError::Hook(_)
            | CommandError::Unsupported(_)
            | CommandError::Output(_) => exit::FAILURE,
        }
    }
}

/// Runs the verb named on the command line.
pub fn run(cli: &Cli) -> Result<u8, CommandError> {
    match &cli.command {
        Command::Check(args) => check::run(cli, args),
        Command::Create(args) => create::run(cli, args),
        Command::Delete(args) => delete::run(cli, args),
        Command::Events(args) => events::run(cli, args),
        Command::Exec(args) => exec::run(cli, args),
        Command::Kill(args) => kill::run(cli, args),
        Command::Pause(args) => pause::run(cli, args, true),
        Command::Ps(args) => ps::run(cli, args),
        Command::Resume(args) => pause::run(cli, args, false),
        Command::Run(args) => run::run(cli, args),
        Command::SandboxSupervisor(args) => sandbox_supervisor::run(cli, args),
        Command::Start(args) => start::run(cli, args),
        Command::Update(args) => update::run(cli, args),
        Command::Features(args) => features::run(args),
        Command::List(args) => list::run(cli, args),
        Command::Spec(args) => spec::run(args),
        Command::State(args) => state::run(cli, args),
    }
}

impl From<husk_agent_protocol::ClientError> for CommandError {
    fn from(err: husk_agent_protocol::ClientError) -> Self {
        CommandError::Agent(GuestError::from(err))
    }
}

/// Writes `text` to standard output, reporting failures (a closed pipe) as errors.
pub(crate) fn print(text: &str) -> Result<(), CommandError> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(CommandError::Output)
}
