//! `husk-agent init CONFIG`: the helper that becomes a container's init or an exec'd process.
//!
//! The agent is multi-threaded, so it never forks into a namespace itself: it spawns this helper
//! (a fresh single-threaded process) with the container's stdio on fds 0-2, the sync pipe on fd 3
//! and, for a container, the start pipe on fd 4. The helper moves into the container's cgroup,
//! creates (or joins) the namespaces, forks the real process (so that it is inside the new pid
//! namespace), reports its pid and exits; the agent, a subreaper, inherits the process.
//! The process sets up mounts and itself, reports `Ready`, waits for the start byte, drops its
//! privileges and execs. Errors travel back on the sync pipe as text.

mod mounts;
mod process;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use anyhow::{bail, Context, Result};
use nix::sched::CloneFlags;
use nix::unistd::ForkResult;

use crate::config::{InitConfig, SyncMsg};

/// fd of the sync pipe (helper → agent) in the helper.
pub const SYNC_FD: RawFd = 3;
/// fd of the start pipe (agent → container init) in the helper.
pub const START_FD: RawFd = 4;

fn send(sync: &mut File, msg: &SyncMsg) {
    if let Ok(mut line) = serde_json::to_vec(msg) {
        line.push(b'\n');
        // Nobody to report a failed report to: the agent sees EOF and a failed helper.
        let _ = sync.write_all(&line);
    }
}

/// The kernel's `struct sigaction` on x86_64 (what `rt_sigaction(2)` takes).
#[repr(C)]
struct KernelSigaction {
    handler: libc::c_ulong,
    flags: libc::c_ulong,
    restorer: libc::c_ulong,
    mask: u64,
}

/// Gives the container's process the signal state a fresh process has: every disposition at its
/// default and nothing blocked. Rust's runtime ignores SIGPIPE in this helper, and an ignored
/// signal stays ignored across exec: `yes | head` in the container would then see EPIPE errors
/// instead of dying quietly by SIGPIPE. Ignored dispositions inherited from whoever started the
/// agent (real-time signals included) go too. The raw system call is used because the C library
/// refuses to touch the signals it reserves for itself (32-34 for musl and glibc).
fn reset_signals() {
    let default = KernelSigaction {
        handler: libc::SIG_DFL as libc::c_ulong,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: rt_sigaction reads a valid kernel sigaction of the size passed (8-byte mask)
        // and writes nothing (null old action); SIG_DFL runs no code in this process.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                &default as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                8usize,
            )
        };
    }
    let empty: u64 = 0;
    // SAFETY: rt_sigprocmask reads an 8-byte mask and writes nothing (null old mask).
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        )
    };
}

/// Entry point of the helper; never returns.
pub fn main(config_path: &str) -> ! {
    reset_signals();
    // SAFETY: the agent always passes the sync pipe as fd 3 to this helper; we own it from here.
    let mut sync = unsafe { File::from_raw_fd(SYNC_FD) };
    let code = match run(config_path, &mut sync) {
        Ok(()) => 0,
        Err(e) => {
            send(&mut sync, &SyncMsg::Error(format!("{e:#}")));
            1
        }
    };
    std::process::exit(code)
}

fn run(config_path: &str, sync: &mut File) -> Result<()> {
    let raw = std::fs::read(config_path).with_context(|| format!("reading {config_path}"))?;
    let cfg: InitConfig = serde_json::from_slice(&raw).context("parsing the init config")?;
    std::fs::write(format!("{}/cgroup.procs", cfg.cgroup_dir), "0")
        .with_context(|| format!("joining cgroup {}", cfg.cgroup_dir))?;
    if cfg.exec {
        join_namespaces(&cfg)?;
    } else {
        let flags = cfg.namespaces.iter().fold(0, |acc, ns| acc | ns.flag());
        nix::sched::unshare(CloneFlags::from_bits_truncate(flags))
            .context("creating the container's namespaces")?;
    }
    // The child reports nothing before the parent has reported its pid (the agent reads the pid
    // first): it waits for the parent to close this pipe. Without it a quick child's `Ready`
    // could reach the agent before the pid (seen in twenty_containers_leave_nothing_behind).
    let (reported_r, reported_w) = nix::unistd::pipe().context("pipe")?;
    // SAFETY: pipe() returned two fresh fds that nothing else owns.
    let (reported_r, reported_w) =
        unsafe { (File::from_raw_fd(reported_r), File::from_raw_fd(reported_w)) };
    // SAFETY: this helper is single-threaded (no runtime, no threads were started), so the child
    // may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        ForkResult::Parent { child } => {
            drop(reported_r);
            send(sync, &SyncMsg::Pid(child.as_raw()));
            drop(reported_w);
            Ok(())
        }
        ForkResult::Child => {
            drop(reported_w);
            // EOF once the parent reported the pid (or died: the agent then fails the launch).
            let mut reported_r = reported_r;
            let _ = reported_r.read(&mut [0u8; 1]);
            drop(reported_r);
            let code = match child_main(&cfg, sync) {
                Ok(never) => match never {},
                Err(e) => {
                    send(sync, &SyncMsg::Error(format!("{e:#}")));
                    1
                }
            };
            std::process::exit(code)
        }
    }
}

fn join_namespaces(cfg: &InitConfig) -> Result<()> {
    // Open every namespace first: after joining the mount namespace /proc is the container's.
    let mut files = Vec::new();
    for ns in &cfg.namespaces {
        let path = format!("/proc/{}/ns/{}", cfg.join_pid, ns.proc_name());
        let f = File::open(&path).with_context(|| format!("opening {path}"))?;
        files.push((ns, f));
    }
    // The container init's root directory: joining the mount namespace moves us to the
    // namespace's root, which is not the container's root when that was set with chroot (an
    // initramfs cannot be pivoted away from) or when the agent itself runs chrooted.
    let root_path = format!("/proc/{}/root", cfg.join_pid);
    let root = File::open(&root_path).with_context(|| format!("opening {root_path}"))?;
    // The mount namespace last: it changes our root and working directory.
    files.sort_by_key(|(ns, _)| **ns == crate::spec::NsKind::Mount);
    for (ns, f) in &files {
        nix::sched::setns(f.as_raw_fd(), CloneFlags::from_bits_truncate(ns.flag()))
            .with_context(|| format!("joining the container's {} namespace", ns.proc_name()))?;
    }
    nix::unistd::fchdir(root.as_raw_fd()).context("entering the container's root")?;
    nix::unistd::chroot(".").context("chroot to the container's root")?;
    nix::unistd::chdir("/").context("chdir /")?;
    Ok(())
}

enum Never {}

fn child_main(cfg: &InitConfig, sync: &mut File) -> Result<Never> {
    if !cfg.exec {
        mounts::setup_rootfs(cfg)?;
        if let Some(h) = &cfg.hostname {
            nix::unistd::sethostname(h).context("sethostname")?;
        }
        if let Some(d) = &cfg.domainname {
            let c = std::ffi::CString::new(d.as_str()).context("domainname")?;
            // SAFETY: setdomainname reads `len` bytes of a valid buffer.
            if unsafe { libc::setdomainname(c.as_ptr(), d.len()) } != 0 {
                bail!("setdomainname: {}", std::io::Error::last_os_error());
            }
        }
    }
    process::prepare(&cfg.process)?;
    if !cfg.exec {
        send(sync, &SyncMsg::Ready);
        // SAFETY: the agent passes the start pipe's read end as fd 4 to a container's helper.
        let mut start = unsafe { File::from_raw_fd(START_FD) };
        let mut byte = [0u8; 1];
        let n = start
            .read(&mut byte)
            .context("waiting for the start signal")?;
        if n == 0 {
            // The container was removed before it started.
            std::process::exit(0);
        }
        drop(start);
    }
    // The sync pipe closes on a successful exec: that is how the agent learns it succeeded.
    nix::fcntl::fcntl(
        sync.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("marking the sync pipe close-on-exec")?;
    Err(process::finalize_and_exec(&cfg.process, &cfg.seccomp))
}
