//! `husk-vmm`: boots one microVM.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::process::ExitCode as ProcessExitCode;

use clap::builder::{OsStringValueParser, TypedValueParser};
use clap::{CommandFactory, Parser};
use husk_vmm::devices::virtio::block::BlockConfig;
use husk_vmm::devices::virtio::fs::FsConfig;
use husk_vmm::jail::Jail;
use husk_vmm::signals::TerminationSignals;
use husk_vmm::{ExitCode, Vm, VmConfig};
use husk_vmm_config::{FsSpec, VmmConfig};

fn console_writer(spec: &str) -> anyhow::Result<(Box<dyn Write + Send>, bool)> {
    if spec == "-" {
        return Ok((Box::new(std::io::stdout()), false));
    }
    // 0600: the guest's console is the guest's, readable by root only (as husk's other logs).
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(spec)
        .map_err(|e| anyhow::anyhow!("cannot create the console file {spec}: {e}"))?;
    Ok((Box::new(LineWriter::new(file)), true))
}

/// Raises the soft limit on open files to the hard limit, as virtiofsd does, when running
/// without the jail (which sets its own bound, [`husk_vmm::jail::MAX_OPEN_FILES`]): the
/// virtio-fs device holds one `O_PATH` fd per inode the guest has looked up, and the usual soft
/// limit of 1024 ran out after ~730 small files (measured by `make bench-fs`).
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid, owned `lim` and has no other effect.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(
            "getrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    if lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit reads the valid `raised`; raising the soft limit up to the hard limit
    // needs no privilege and affects only this process.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        tracing::warn!(
            "setrlimit(RLIMIT_NOFILE): {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Resolves the shared directories. A missing or unusable one is a command-line error (exit
/// status 2) reported as clap reports any invalid `--fs` value, as when the path was checked
/// while parsing: each value goes back through a clap value parser that parses and resolves it.
fn shared_dirs(specs: &[FsSpec]) -> Result<Vec<FsConfig>, clap::Error> {
    let mut cmd = VmmConfig::command();
    // Rendering the argument in the error needs a built command.
    cmd.build();
    let arg = cmd.get_arguments().find(|a| a.get_id() == "fs");
    let resolve = OsStringValueParser::new().try_map(
        |value: OsString| -> Result<FsConfig, Box<dyn std::error::Error + Send + Sync>> {
            let spec = FsSpec::try_from(value.as_os_str())?;
            Ok(FsConfig::try_from(&spec)?)
        },
    );
    specs
        .iter()
        .map(|spec| resolve.parse_ref(&cmd, arg, &spec.to_arg()))
        .collect()
}

fn run(args: VmmConfig, filesystems: Vec<FsConfig>) -> anyhow::Result<ExitCode> {
    if args.no_jail && !filesystems.is_empty() {
        raise_open_file_limit();
    }
    let jail = (!args.no_jail).then(|| Jail {
        socket_dir: args
            .vsock_uds
            .as_ref()
            .and_then(|uds| uds.parent())
            .map(|dir| match dir.as_os_str().is_empty() {
                true => std::path::PathBuf::from("."),
                false => dir.to_path_buf(),
            }),
        shares: !filesystems.is_empty(),
    });
    let kernel_dir = args
        .kernel
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| std::path::PathBuf::from("."));
    // Block SIGTERM/SIGINT before any thread exists so that every thread inherits the mask and
    // the signals arrive only on the signalfd.
    let signals = TerminationSignals::block()?;
    let (console, is_file) = console_writer(&args.console)?;
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        console,
        console_cap: is_file.then_some(args.console_max_bytes),
        allow_emulated_kvm: args.allow_emulated_kvm,
        rng: !args.no_rng,
        blocks: args.block.iter().map(BlockConfig::from).collect(),
        filesystems,
        vsock: args
            .vsock_uds
            .zip(args.guest_cid)
            .map(
                |(uds_path, guest_cid)| husk_vmm::devices::virtio::vsock::VsockConfig {
                    uds_path,
                    guest_cid,
                },
            ),
    };
    let mut vm = match Vm::new(config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("husk-vmm: {e}");
            return Ok(e.exit_code());
        }
    };
    vm.set_termination_signals(signals);
    vm.set_seccomp(if args.seccomp_log {
        husk_vmm::seccomp::Mode::Log
    } else {
        husk_vmm::seccomp::Mode::Trap
    });
    if let Some(mut jail) = jail {
        // Absolute and without symlinks, as the jail rebuilds them (both exist by now).
        let kernel_dir = std::fs::canonicalize(&kernel_dir).unwrap_or(kernel_dir);
        jail.socket_dir = jail
            .socket_dir
            .map(|d| std::fs::canonicalize(&d).unwrap_or(d));
        if let Err(e) = jail.enter(&kernel_dir) {
            eprintln!("husk-vmm: {e}");
            return Ok(ExitCode::InternalError);
        }
    }
    match vm.run() {
        Ok(outcome) => {
            let code = outcome.exit_code();
            match code {
                ExitCode::Ok => tracing::info!("VM stopped: {:?}", outcome.exit),
                ExitCode::GuestPanic => {
                    eprintln!("husk-vmm: the guest kernel panicked ({:?})", outcome.exit)
                }
                _ => eprintln!("husk-vmm: VM stopped with an error: {:?}", outcome.exit),
            }
            Ok(code)
        }
        Err(e) => {
            eprintln!("husk-vmm: {e}");
            Ok(e.exit_code())
        }
    }
}

fn main() -> ProcessExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = VmmConfig::parse();
    let filesystems = match shared_dirs(&args.fs) {
        Ok(filesystems) => filesystems,
        Err(e) => e.exit(),
    };
    match run(args, filesystems) {
        Ok(code) => ProcessExitCode::from(code as u8),
        Err(e) => {
            eprintln!("husk-vmm: {e:#}");
            ProcessExitCode::from(ExitCode::InternalError as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn missing_shared_directory_is_a_command_line_error() {
        let spec: FsSpec = "/nonexistent/husk-share,tag=t".parse().unwrap();

        let err = shared_dirs(&[spec]).unwrap_err();

        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert_eq!(err.exit_code(), 2);
        assert_eq!(
            err.to_string(),
            "error: invalid value '/nonexistent/husk-share,tag=t' for '--fs <PATH,tag=TAG>': \
             shared directory /nonexistent/husk-share: No such file or directory (os error 2)\n\n\
             For more information, try '--help'.\n"
        );
    }

    #[test]
    fn existing_shared_directory_is_resolved() {
        let spec: FsSpec = "/tmp/,tag=t".parse().unwrap();

        let dirs = shared_dirs(&[spec]).unwrap();

        assert_eq!(dirs[0].path, std::fs::canonicalize("/tmp").unwrap());
        assert_eq!(dirs[0].tag, "t");
    }
}
