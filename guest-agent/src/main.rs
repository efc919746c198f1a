//! `husk-agent`: PID 1 inside the microVM, or a debugging/test service on a host.
//!
//! - As PID 1 (the guest's `/init`): mounts the early file systems, reads `husk.agent_port` and
//!   `husk.log` from the kernel command line, serves the agent API on AF_VSOCK, prints
//!   [`husk_agent_protocol::BOOT_MARKER`] once listening, reaps orphans and never exits.
//! - Off PID 1: `husk-agent --listen unix:/path|vsock:PORT --state-dir DIR [--cgroup-root DIR]
//!   [--log LEVEL]` serves the same API.
//! - `husk-agent init CONFIG` is the internal container helper (see `init`).

mod cgroup;
mod config;
mod container;
mod init;
mod mountopts;
mod pid1;
mod reaper;
mod rootpath;
mod seccomp;
mod service;
mod spec;
mod stdio;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use husk_agent_protocol::BOOT_MARKER;

const USAGE: &str = "usage: husk-agent --listen unix:PATH|vsock:PORT --state-dir DIR [--cgroup-root DIR] [--log LEVEL]";

struct Options {
    listen: String,
    state_dir: PathBuf,
    cgroup_root: PathBuf,
    log: String,
}

fn parse_args(args: &[String]) -> Result<Options> {
    let mut listen = None;
    let mut state_dir = None;
    let mut cgroup_root = PathBuf::from("/sys/fs/cgroup");
    let mut log = "info".to_owned();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .with_context(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--listen" => listen = Some(value()?),
            "--state-dir" => state_dir = Some(PathBuf::from(value()?)),
            "--cgroup-root" => cgroup_root = PathBuf::from(value()?),
            "--log" => log = value()?,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    Ok(Options {
        listen: listen.with_context(|| format!("--listen is required\n{USAGE}"))?,
        state_dir: state_dir.with_context(|| format!("--state-dir is required\n{USAGE}"))?,
        cgroup_root,
        log,
    })
}

fn init_logging(level: &str) {
    let level = level.parse().unwrap_or(tracing::Level::INFO);
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// The ttrpc address for `--listen` (`unix:PATH` or `vsock:PORT`).
fn listen_address(listen: &str) -> Result<String> {
    if let Some(path) = listen.strip_prefix("unix:") {
        if !path.starts_with('/') {
            bail!("--listen unix:PATH needs an absolute path, got {path:?}");
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing stale socket {path}")),
        }
        return Ok(format!("unix://{path}"));
    }
    if let Some(port) = listen.strip_prefix("vsock:") {
        let port: u32 = port
            .parse()
            .with_context(|| format!("bad vsock port {port:?}"))?;
        return Ok(format!("vsock://-1:{port}"));
    }
    bail!("--listen must be unix:PATH or vsock:PORT, got {listen:?}")
}

async fn serve(opts: Options, is_pid1: bool, started: std::time::Instant) -> Result<()> {
    let reaper = reaper::Reaper::start().context("installing the SIGCHLD handler")?;
    if !is_pid1 {
        // SAFETY: plain prctl with integer arguments: orphans of containers come back to us.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            bail!(
                "PR_SET_CHILD_SUBREAPER: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let manager = container::Manager::new(opts.state_dir.clone(), &opts.cgroup_root, reaper);
    let service = Arc::new(service::Service::new(manager, is_pid1));
    let addr = listen_address(&opts.listen)?;
    let mut server = ttrpc::r#async::Server::new()
        .bind(&addr)
        .with_context(|| format!("listening on {addr}"))?
        .register_service(husk_agent_protocol::agent_ttrpc::create_agent(service));
    server.start().await.context("starting the ttrpc server")?;
    if is_pid1 {
        // The guest's uptime (kernel boot included) and the agent's own start-up time, for
        // boot-time measurements from the console.
        let uptime = std::fs::read_to_string("/proc/uptime").unwrap_or_default();
        let uptime = uptime.split_whitespace().next().unwrap_or("?");
        let agent_ms = started.elapsed().as_millis();
        tracing::info!(%addr, uptime_s = uptime, agent_ms, "serving the agent API");
    } else {
        tracing::info!(%addr, "serving the agent API");
    }
    if is_pid1 {
        println!("{BOOT_MARKER}");
    }
    std::future::pending::<()>().await;
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run_pid1() -> ! {
    let started = std::time::Instant::now();
    pid1::install_panic_hook();
    if let Err(e) = pid1::mount_early_filesystems() {
        pid1::fatal(&format!("{e:#}"));
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cmdline = match pid1::parse_cmdline(&cmdline) {
        Ok(c) => c,
        Err(e) => pid1::fatal(&format!("{e:#}")),
    };
    init_logging(cmdline.log.as_deref().unwrap_or("info"));
    let opts = Options {
        listen: format!("vsock:{}", cmdline.port),
        state_dir: PathBuf::from("/run/husk-agent"),
        cgroup_root: PathBuf::from("/sys/fs/cgroup"),
        log: String::new(),
    };
    let result = runtime().and_then(|rt| rt.block_on(serve(opts, true, started)));
    match result {
        Ok(()) => pid1::fatal("the agent service stopped"),
        Err(e) => pid1::fatal(&format!("{e:#}")),
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("init") {
        let Some(config) = args.get(2) else {
            bail!("usage: husk-agent init CONFIG (internal)");
        };
        init::main(config);
    }
    if std::process::id() == 1 {
        run_pid1();
    }
    let opts = parse_args(args.get(1..).unwrap_or_default())?;
    init_logging(&opts.log);
    runtime()?.block_on(serve(opts, false, std::time::Instant::now()))
}
