//! `containerd-shim-husk-v2`: containerd's shim v2 for husk. Each pod (or container started
//! without CRI annotations) runs in its own microVM; the shim is the long-lived process that
//! owns the VM and relays the containers' I/O. See docs/containerd.md.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod bootstrap;
mod error;
mod info;
mod io;
mod logger;
mod metrics;
mod pod;
mod service;
mod shim;
mod start;
mod task;
mod vm;

use std::io::Write;
use std::process::ExitCode;

/// The runtime name containerd knows the shim by.
const RUNTIME_ID: &str = "io.containerd.husk.v2";

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let flags = match containerd_shim::parse(&args) {
        Ok(flags) => flags,
        Err(err) => return fail(&err),
    };
    // The one-shot queries and `start` are answered here: containerd-shim 0.11 knows neither
    // `-info` nor containerd 2.3's bootstrap protocol. `delete` and the server are its own.
    if flags.version {
        println!("{}:\n  Version:  {}", info::NAME, env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if flags.info {
        let answer = start::read_stdin()
            .map_err(|err| err.to_string())
            .and_then(|options| info::answer(&options).map_err(|err| err.to_string()));
        return match answer {
            Ok(bytes) => write_stdout(&bytes),
            Err(err) => fail(&err),
        };
    }
    if flags.action == "start" {
        return match start_command(&flags).await {
            Ok(bytes) => write_stdout(&bytes),
            Err(err) => fail(&err),
        };
    }
    let config = containerd_shim::Config {
        // The shim waits for its own children (husk-vmm) through tokio; it starts nothing that
        // could orphan processes onto it.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<shim::HuskShim>(RUNTIME_ID, Some(config)).await;
    ExitCode::SUCCESS
}

/// `start`: the request from whatever containerd sent, the server of the task's group, and the
/// answer containerd expects.
async fn start_command(flags: &containerd_shim::Flags) -> Result<Vec<u8>, start::StartError> {
    let stdin = start::read_stdin()?;
    let request = start::StartRequest::parse(
        flags,
        std::env::var(start::TTRPC_ADDRESS_ENV).ok(),
        std::env::var(start::SOCKET_DIR_ENV).ok(),
        &stdin,
    )?;
    let address = start::serve(&request).await?;
    request.answer(&address)
}

/// containerd reads stdout whole (with stderr: nothing else may be written on success).
fn write_stdout(bytes: &[u8]) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(&format!("cannot write stdout: {err}")),
    }
}

/// containerd shows the output of a failed command in its error.
fn fail(err: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("{RUNTIME_ID}: {err}");
    ExitCode::FAILURE
}
