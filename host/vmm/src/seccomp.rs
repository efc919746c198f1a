//! seccomp filters, one per thread role, built with seccompiler when husk-vmm starts.
//!
//! husk-vmm has two roles: the vCPU threads (`KVM_RUN` and the port and MMIO accesses it
//! returns, which reach device registers, the console and the exit eventfd) and the main thread,
//! which once the VM is built runs the event loop: virtio queues, the vsock muxer (Unix sockets),
//! disk I/O and the virtio-fs passthrough (fd-relative file system calls and per-thread
//! credential switches). Each filter allows what its role needs and nothing else: no `execve`,
//! no `open` or `mount` by path outside what virtio-fs does relative to its own fds, no new
//! namespaces, no `ptrace`, `bpf`, `io_uring`, `userfaultfd`, no sockets but Unix ones, no
//! signals but to its own threads, `ioctl` only with the requests the role uses.
//!
//! A forbidden call raises SIGSYS (seccomp's trap action); the handler writes one line naming
//! the role and the call to husk-vmm's standard error (its log) and ends the process with
//! [`crate::ExitCode::Seccomp`], so the VM stops and nothing else on the host is touched.
//! `--seccomp-log` (debugging only) lets the call through and has the kernel log it instead
//! (audit records of type 1326 in the kernel log).
//!
//! Each thread applies its own filter when its setup is done: the vCPU threads before their first
//! `KVM_RUN`, the main thread once the vCPU threads are started (so spawning them stays out of its
//! filter).

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// A thread's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A vCPU thread.
    Vcpu,
    /// The main thread, running the event loop and the devices' back ends.
    Main,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Vcpu => "vCPU",
            Role::Main => "event loop",
        }
    }
}

/// What a forbidden call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Stop the VM with a message naming the call (the default).
    #[default]
    Trap,
    /// Let the call through; the kernel logs it (debugging only).
    Log,
}

/// Errors building or applying a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be built.
    #[error("cannot build the {role} thread's seccomp filter: {err}")]
    Build {
        /// The role.
        role: &'static str,
        /// The error.
        err: seccompiler::BackendError,
    },
    /// The filter could not be compiled to BPF.
    #[error("cannot compile the {role} thread's seccomp filter: {err}")]
    Compile {
        /// The role.
        role: &'static str,
        /// The error.
        err: seccompiler::BackendError,
    },
    /// The kernel refused the filter.
    #[error("cannot apply the {role} thread's seccomp filter: {err}")]
    Apply {
        /// The role.
        role: &'static str,
        /// The error.
        err: seccompiler::Error,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

// KVM ioctl requests (linux/kvm.h, x86_64).
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_GET_SREGS: u64 = 0x8138_ae83;

/// Calls every thread makes: memory, locks, time, signals returning, thread exit, reads and
/// writes of fds it already has (eventfds, the console, its log), closing them.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The main thread's calls besides [`COMMON`]: the event loop, vsock's Unix sockets, disks,
/// and virtio-fs's passthrough.
const MAIN: &[i64] = &[
    // Event loop.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_ppoll,
    libc::SYS_poll,
    // vsock: connections from host clients, and to host listeners for the guest.
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_unlink,
    // Disks and virtio-fs file I/O.
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_copy_file_range,
    libc::SYS_dup,
    // virtio-fs: every path is relative to an fd of the share (openat on O_PATH fds).
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_fstatfs,
    libc::SYS_getdents64,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_symlinkat,
    libc::SYS_readlinkat,
    libc::SYS_linkat,
    libc::SYS_unlinkat,
    libc::SYS_renameat2,
    libc::SYS_fchownat,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_utimensat,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_umask,
    // virtio-fs creates files as the guest's uid and gid (this thread only, switched back after).
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_getuid,
    libc::SYS_getgid,
    libc::SYS_geteuid,
    libc::SYS_getegid,
];

thread_local! {
    static ROLE: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

fn rule(conditions: Vec<SeccompCondition>) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(conditions)
}

fn arg_eq(index: u8, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
}

fn arg32_eq(index: u8, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

fn rules(role: Role) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = COMMON.iter().map(|s| (*s, vec![])).collect();
    let pid = u64::from(std::process::id());
    match role {
        Role::Vcpu => {
            let ioctls = [KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS]
                .into_iter()
                .map(|req| rule(vec![arg32_eq(1, req)?]))
                .collect::<Result<Vec<_>, _>>()?;
            map.insert(libc::SYS_ioctl, ioctls);
        }
        Role::Main => {
            map.extend(MAIN.iter().map(|s| (*s, vec![])));
            // Unix stream sockets only (vsock's connections to host listeners).
            map.insert(
                libc::SYS_socket,
                vec![rule(vec![arg32_eq(0, libc::AF_UNIX as u64)?])?],
            );
            // Non-blocking mode (std sets it with FIONBIO) and nothing else.
            map.insert(
                libc::SYS_ioctl,
                vec![rule(vec![arg32_eq(1, libc::FIONBIO)?])?],
            );
            // Signals to its own vCPU threads only (to kick them out of KVM_RUN).
            map.insert(libc::SYS_tgkill, vec![rule(vec![arg_eq(0, pid)?])?]);
        }
    }
    Ok(map)
}

/// The BPF program of `role`'s filter.
pub fn program(role: Role, mode: Mode) -> Result<BpfProgram, SeccompError> {
    let build = |err| SeccompError::Build {
        role: role.name(),
        err,
    };
    let mismatch = match mode {
        Mode::Trap => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(
        rules(role).map_err(build)?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build)?;
    filter.try_into().map_err(|err| SeccompError::Compile {
        role: role.name(),
        err,
    })
}

/// Applies `role`'s filter to the calling thread (after setting no_new_privs, which the kernel
/// requires of a process without CAP_SYS_ADMIN).
pub fn apply(role: Role, mode: Mode) -> Result<(), SeccompError> {
    let program = program(role, mode)?;
    ROLE.with(|r| r.set(role as u8 + 1));
    seccompiler::apply_filter(&program).map_err(|err| SeccompError::Apply {
        role: role.name(),
        err,
    })
}

/// Installs the SIGSYS handler that reports a forbidden call and ends the process. Call once,
/// before any filter is applied.
pub fn install_trap_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler is an extern "C" fn
    // of the three-argument form SA_SIGINFO calls for, and it only calls async-signal-safe
    // functions (write, _exit).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// The line the handler writes for call `nr` made by a thread of role index `role` (0: unknown).
fn trap_message(role: u8, nr: i64, buf: &mut [u8; 160]) -> usize {
    let name: &[u8] = match role {
        1 => b"vCPU",
        2 => b"event loop",
        _ => b"unknown",
    };
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        for b in bytes {
            if let Some(slot) = buf.get_mut(len) {
                *slot = *b;
                len += 1;
            }
        }
    };
    put(b"husk-vmm: seccomp: the ");
    put(name);
    put(b" thread made system call ");
    let mut digits = [0u8; 20];
    let mut n = nr.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    if nr < 0 {
        put(b"-");
    }
    put(&digits[i..]);
    put(b", which its filter forbids; stopping the VM\n");
    len
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The syscall number is the int at offset 24 of a SIGSYS siginfo (si_syscall, after
    // si_call_addr) on x86_64.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a valid siginfo_t (128 bytes) for SA_SIGINFO handlers.
        i64::from(unsafe { *(info.cast::<u8>().add(24).cast::<libc::c_int>()) })
    };
    let role = ROLE.with(|r| r.get());
    let mut buf = [0u8; 160];
    let len = trap_message(role, nr, &mut buf);
    // SAFETY: write and _exit are async-signal-safe; buf outlives the call.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(crate::ExitCode::Seccomp as i32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_filters_build() {
        for role in [Role::Vcpu, Role::Main] {
            for mode in [Mode::Trap, Mode::Log] {
                assert!(!program(role, mode).unwrap().is_empty());
            }
        }
    }

    #[test]
    fn the_trap_message_names_the_role_and_the_call() {
        let mut buf = [0u8; 160];
        let len = trap_message(1, 59, &mut buf);
        assert_eq!(
            std::str::from_utf8(&buf[..len]).unwrap(),
            "husk-vmm: seccomp: the vCPU thread made system call 59, which its filter forbids; \
             stopping the VM\n"
        );
        let len = trap_message(2, 0, &mut buf);
        assert!(std::str::from_utf8(&buf[..len])
            .unwrap()
            .contains("the event loop thread made system call 0,"));
    }

    #[test]
    fn neither_role_may_exec_ptrace_mount_or_make_namespaces() {
        for role in [Role::Vcpu, Role::Main] {
            let map = rules(role).unwrap();
            for forbidden in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_unshare,
                libc::SYS_setns,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_kill,
                libc::SYS_open,
                libc::SYS_bpf,
                libc::SYS_io_uring_setup,
                libc::SYS_userfaultfd,
                libc::SYS_process_vm_writev,
                libc::SYS_init_module,
            ] {
                assert!(!map.contains_key(&forbidden), "{role:?} allows {forbidden}");
            }
        }
        assert!(!rules(Role::Vcpu).unwrap().contains_key(&libc::SYS_openat));
    }
}
