//! Running as the guest's PID 1: the early file systems, the kernel command line, and the
//! "print why and end the VM" path for fatal failures.

use std::path::Path;

use anyhow::{Context, Result};
use nix::mount::MsFlags;

/// Settings read from /proc/cmdline.
#[derive(Debug, PartialEq, Eq)]
pub struct Cmdline {
    /// `husk.agent_port=N`.
    pub port: u32,
    /// `husk.log=LEVEL`.
    pub log: Option<String>,
}

/// Parses the kernel command line (unknown words are the kernel's business).
pub fn parse_cmdline(text: &str) -> Result<Cmdline> {
    let mut out = Cmdline {
        port: husk_agent_protocol::DEFAULT_AGENT_PORT,
        log: None,
    };
    for word in text.split_whitespace() {
        if let Some(v) = word.strip_prefix("husk.agent_port=") {
            out.port = v
                .parse()
                .ok()
                .filter(|p| *p > 0)
                .with_context(|| format!("husk.agent_port={v:?} is not a port number"))?;
        } else if let Some(v) = word.strip_prefix("husk.log=") {
            out.log = Some(v.to_owned());
        }
    }
    Ok(out)
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(target).with_context(|| format!("mkdir {target}"))?;
    match nix::mount::mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) => Ok(()),
        // Already mounted (e.g. devtmpfs with CONFIG_DEVTMPFS_MOUNT).
        Err(nix::errno::Errno::EBUSY) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("mount {fstype} on {target}")),
    }
}

/// Mounts proc, sys, dev, devpts, /dev/shm, /run and cgroup2, and enables cgroup controllers.
pub fn mount_early_filesystems() -> Result<()> {
    let common = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", common, None)?;
    mount_fs("sysfs", "/sys", "sysfs", common, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    mount_fs(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs("cgroup2", "/sys/fs/cgroup", "cgroup2", common, None)?;
    Ok(())
}

/// Prints why on the console and ends the agent. As PID 1 that makes the kernel panic
/// ("Attempted to kill init!"), and with `panic=-1` (set here too) the guest resets at once: the
/// monitor stops, and husk-vmm reports the panic with exit status 3, so a failed guest is never
/// mistaken for one that shut down cleanly (a plain `reboot(2)` would exit 0).
pub fn fatal(why: &str) -> ! {
    say_fatal(&why);
    // The console is a tty whose serial driver sends the written bytes later, from its
    // interrupt; the panic that follows resets the guest at once and would lose them. Wait
    // until they are out.
    // SAFETY: tcdrain(2) on an integer fd; it touches no memory of ours (fails harmlessly when
    // stderr is not a terminal).
    unsafe { libc::tcdrain(libc::STDERR_FILENO) };
    reset_on_panic();
    // SAFETY: sync(2) takes no arguments.
    unsafe { libc::sync() };
    std::process::exit(1)
}

/// Writes "husk-agent: fatal: WHY" to the console as one write(2) (`eprintln!` writes each piece
/// of its format on its own), so the kernel's own messages can split the line less often.
fn say_fatal(why: &dyn std::fmt::Display) {
    use std::io::Write;
    let line = format!("husk-agent: fatal: {why}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// Makes a kernel panic reset the guest at once whatever the command line says (`panic=-1`), so
/// that a dying agent never leaves a hung VM behind. Best effort: /proc may not be mounted yet.
fn reset_on_panic() {
    let _ = std::fs::write("/proc/sys/kernel/panic", "-1");
}

/// As PID 1, a panic anywhere in the agent is fatal (release builds abort on panic): say so on the
/// console with the agent's own prefix before the process ends.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        say_fatal(info);
        reset_on_panic();
        // SAFETY: sync(2) takes no arguments.
        unsafe { libc::sync() };
    }));
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reads_port_and_log_level() {
        let c =
            parse_cmdline("console=ttyS0 reboot=k panic=-1 husk.agent_port=2048 husk.log=debug")
                .expect("parses");
        assert_eq!(
            c,
            Cmdline {
                port: 2048,
                log: Some("debug".into())
            }
        );
    }

    #[test]
    fn defaults_and_bad_ports() {
        assert_eq!(parse_cmdline("quiet").expect("parses").port, 1024);
        assert!(parse_cmdline("husk.agent_port=x").is_err());
        assert!(parse_cmdline("husk.agent_port=0").is_err());
    }
}
