//! Per-process set-up in the helper: limits, terminal, user, capabilities, seccomp, exec.

use std::collections::HashSet;
use std::ffi::CString;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use caps::{CapSet, Capability};

use crate::config::{BpfInsn, ProcessConfig};

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Steps done while still fully privileged, before the start signal.
pub fn prepare(p: &ProcessConfig) -> Result<()> {
    if let Some(adj) = p.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .context("setting oom_score_adj (is /proc mounted in the container?)")?;
    }
    for r in &p.rlimits {
        let lim = libc::rlimit {
            rlim_cur: r.soft,
            rlim_max: r.hard,
        };
        // SAFETY: setrlimit reads a valid rlimit struct.
        if unsafe { libc::setrlimit(r.resource as _, &lim) } != 0 {
            bail!(
                "setrlimit({}): {}",
                r.resource,
                std::io::Error::last_os_error()
            );
        }
    }
    if let Some(mask) = p.umask {
        // SAFETY: umask cannot fail.
        unsafe { libc::umask((mask & 0o777) as libc::mode_t) };
    }
    nix::unistd::setsid().context("setsid")?;
    if p.terminal {
        // SAFETY: TIOCSCTTY on our stdin (the pty slave) with argument 0.
        if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
            bail!(
                "making the pty the controlling terminal: {}",
                std::io::Error::last_os_error()
            );
        }
        if let Some((rows, cols)) = p.console_size {
            let ws = libc::winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ reads a valid winsize struct.
            unsafe { libc::ioctl(0, libc::TIOCSWINSZ, &ws) };
        }
    }
    Ok(())
}

fn cap_set(names: &[String]) -> Result<HashSet<Capability>> {
    names
        .iter()
        .map(|n| n.parse::<Capability>().map_err(|e| anyhow!("{n}: {e}")))
        .collect()
}

fn install_seccomp(programs: &[Vec<BpfInsn>]) -> Result<()> {
    for prog in programs {
        let bpf: Vec<seccompiler::sock_filter> = prog
            .iter()
            .map(|i| seccompiler::sock_filter {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            })
            .collect();
        seccompiler::apply_filter(&bpf).context("installing the seccomp filter")?;
    }
    Ok(())
}

fn switch_user(p: &ProcessConfig) -> Result<()> {
    let groups: Vec<nix::unistd::Gid> = p
        .additional_gids
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&groups).context("setgroups")?;
    let gid = nix::unistd::Gid::from_raw(p.gid);
    nix::unistd::setresgid(gid, gid, gid).context("setresgid")?;
    let uid = nix::unistd::Uid::from_raw(p.uid);
    nix::unistd::setresuid(uid, uid, uid).context("setresuid")?;
    Ok(())
}

fn apply_caps(p: &ProcessConfig) -> Result<()> {
    let Some(c) = &p.caps else {
        return switch_user(p);
    };
    let bounding = cap_set(&c.bounding)?;
    for cap in caps::all() {
        if !bounding.contains(&cap) {
            // Capabilities unknown to the running kernel cannot be dropped; that is fine.
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    // SAFETY: prctl(PR_SET_KEEPCAPS, 1) keeps the permitted set across the uid change.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
        bail!("PR_SET_KEEPCAPS: {}", std::io::Error::last_os_error());
    }
    switch_user(p)?;
    let permitted = cap_set(&c.permitted)?;
    let effective = cap_set(&c.effective)?;
    caps::set(
        None,
        CapSet::Effective,
        &effective.intersection(&permitted).copied().collect(),
    )
    .context("setting effective capabilities")?;
    caps::set(None, CapSet::Permitted, &permitted).context("setting permitted capabilities")?;
    caps::set(None, CapSet::Effective, &effective).context("setting effective capabilities")?;
    caps::set(None, CapSet::Inheritable, &cap_set(&c.inheritable)?)
        .context("setting inheritable capabilities")?;
    caps::clear(None, CapSet::Ambient).context("clearing ambient capabilities")?;
    for cap in cap_set(&c.ambient)? {
        caps::raise(None, CapSet::Ambient, cap)
            .with_context(|| format!("raising ambient {cap}"))?;
    }
    // SAFETY: plain prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    Ok(())
}

fn find_executable(arg0: &str, env: &[String]) -> Result<String> {
    if arg0.contains('/') {
        return Ok(arg0.to_owned());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = format!("{dir}/{arg0}");
        let Ok(c) = CString::new(candidate.as_str()) else {
            continue;
        };
        // SAFETY: access reads a valid C string.
        if Path::new(&candidate).is_file() && unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 {
            return Ok(candidate);
        }
    }
    bail!("executable {arg0:?} not found in PATH {path:?}")
}

fn exec(p: &ProcessConfig) -> Result<()> {
    let arg0 = p
        .args
        .first()
        .ok_or_else(|| anyhow!("process.args is empty"))?;
    let path = find_executable(arg0, &p.env)?;
    let cpath = CString::new(path.as_str())?;
    let args = p
        .args
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    let env = p
        .env
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<Vec<_>, _>>()?;
    nix::unistd::execve(&cpath, &args, &env).with_context(|| format!("exec {path:?}"))?;
    Ok(())
}

/// Drops privileges as the spec says and execs; returns only the error.
pub fn finalize_and_exec(p: &ProcessConfig, seccomp: &[Vec<BpfInsn>]) -> anyhow::Error {
    let r = (|| -> Result<()> {
        nix::unistd::chdir(p.cwd.as_str()).with_context(|| format!("chdir {:?}", p.cwd))?;
        if !p.no_new_privileges {
            // Without no_new_privs a filter needs CAP_SYS_ADMIN: install it while we have it.
            install_seccomp(seccomp)?;
        }
        apply_caps(p)?;
        if p.no_new_privileges {
            // SAFETY: plain prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
                bail!("PR_SET_NO_NEW_PRIVS: {}", std::io::Error::last_os_error());
            }
            install_seccomp(seccomp)?;
        }
        exec(p)
    })();
    match r {
        Ok(()) => anyhow!("exec returned without error"),
        Err(e) => e,
    }
}
