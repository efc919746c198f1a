//! In its jail husk-vmm's open-file limit (soft and hard) is the jail's bound, 65536, or the
//! inherited hard limit if lower (virtio-fs holds one `O_PATH` fd per inode the guest looked up;
//! 1024 ran out after ~730 small files in `make bench-fs`). Without the jail (`--no-jail`), a
//! virtio-fs share raises the soft limit to the hard limit, and without one the limit is left as
//! inherited. Runs the binary on a payload that halts forever, reads /proc/PID/limits, stops it
//! with SIGTERM. Needs /dev/kvm (any backend, PVM included: --allow-emulated-kvm) and root (the
//! jail).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a failed expectation is a test failure

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Below any real hard limit, so raising it is observable.
const SOFT: u64 = 256;

/// The soft limit of open files of the running husk-vmm, started with soft limit SOFT.
fn soft_open_files_limit(extra: &[&str]) -> (u64, u64) {
    let payload = write_payload("nofile", &[0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    let share = tempdir::Dir::new("nofile-share");
    let console = share.path().join("..").join(format!(
        "husk-vmm-nofile-console-{}-{}",
        std::process::id(),
        extra.len()
    ));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_husk-vmm"));
    cmd.arg("--kernel")
        .arg(&payload.kernel)
        .arg("--console")
        .arg(&console)
        .arg("--allow-emulated-kvm")
        .stdout(Stdio::null());
    for a in extra {
        cmd.arg(a.replace("SHARE", share.path().to_str().unwrap()));
    }
    // SAFETY: only async-signal-safe calls between fork and exec (getrlimit/setrlimit).
    unsafe {
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim.rlim_cur = SOFT.min(lim.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let limits = format!("/proc/{}/limits", child.id());
    // The limit is raised before the VM is built; wait until the vCPU runs (console file exists)
    // so the read happens after start-up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !console.exists() && Instant::now() < deadline {
        assert!(child.try_wait().unwrap().is_none(), "husk-vmm exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&limits).unwrap();
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let _ = std::fs::remove_file(&console);
    assert!(status.success(), "husk-vmm after SIGTERM: {status}");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("no 'Max open files' line");
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

fn inherited_hard_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the valid, owned `lim`.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_max
}

#[test]
fn in_the_jail_the_limit_is_the_jails_bound_with_or_without_a_share() {
    let bound = inherited_hard_limit().min(65_536);
    for extra in [&["--fs", "SHARE,tag=t"][..], &[]] {
        assert_eq!(soft_open_files_limit(extra), (bound, bound), "{extra:?}");
    }
}

#[test]
fn without_the_jail_a_virtio_fs_share_raises_the_soft_limit_to_the_hard_limit() {
    let (soft, hard) = soft_open_files_limit(&["--fs", "SHARE,tag=t", "--no-jail"]);
    assert!(
        hard > SOFT,
        "hard limit {hard} too low to observe the raise"
    );
    assert_eq!(soft, hard, "soft limit not raised (hard {hard})");
}

#[test]
fn without_the_jail_or_a_share_the_inherited_limit_is_kept() {
    let (soft, hard) = soft_open_files_limit(&["--no-jail"]);
    assert_eq!(soft, SOFT.min(hard));
}
