//! A forbidden system call under husk-vmm's seccomp filters stops the process with status 7
//! and one line naming the thread's role and the call; `Log` mode lets it through. Each case
//! runs in a child (this test binary again, with `HUSK_SECCOMP_CASE` set), since a filter
//! cannot be removed from a thread.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a test failure

use std::process::Command;

use husk_vmm::seccomp::{apply, install_trap_handler, Mode, Role};

const CASE: &str = "HUSK_SECCOMP_CASE";

/// In the child: applies the filter the case names, then calls getppid (allowed to neither
/// role) and prints what it returned.
fn child_case(case: &str) -> ! {
    let (role, mode) = match case {
        "vcpu" => (Role::Vcpu, Mode::Trap),
        "main" => (Role::Main, Mode::Trap),
        "log" => (Role::Main, Mode::Log),
        _ => std::process::exit(100),
    };
    install_trap_handler().unwrap();
    apply(role, mode).unwrap();
    // SAFETY: getppid has no preconditions.
    let ppid = unsafe { libc::getppid() };
    // Raw write: allowed to both roles, unlike what println might need.
    let line = format!("getppid returned {}\n", i32::from(ppid > 0));
    // SAFETY: writes a valid buffer to stdout.
    unsafe { libc::write(1, line.as_ptr().cast(), line.len()) };
    // SAFETY: exit_group is allowed; skip destructors that might call more.
    unsafe { libc::_exit(0) }
}

fn run_case(case: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads=1"])
        .env(CASE, case)
        .output()
        .unwrap()
}

#[test]
fn child() {
    if let Ok(case) = std::env::var(CASE) {
        child_case(&case);
    }
}

#[test]
fn a_forbidden_call_stops_the_process_with_status_7_naming_role_and_call() {
    for (case, role) in [("vcpu", "vCPU"), ("main", "event loop")] {
        let out = run_case(case);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(7), "{case}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "husk-vmm: seccomp: the {role} thread made system call {}, which its filter \
                 forbids; stopping the VM",
                libc::SYS_getppid
            )),
            "{case}: {stderr}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("getppid returned"));
    }
}

#[test]
fn log_mode_lets_the_call_through() {
    let out = run_case("log");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("getppid returned 1"));
}
