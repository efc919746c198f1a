//! What the agent hands to the container's init helper (`husk-agent init`): a validated,
//! fully resolved description of the container or exec'd process. It travels as JSON in a file of
//! the agent's state directory, never from the host directly.

use serde::{Deserialize, Serialize};

use crate::spec::NsKind;

/// A container's init (`exec == false`) or a process exec'd into a running container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InitConfig {
    /// Exec into the namespaces of `join_pid` instead of creating new ones.
    pub exec: bool,
    /// The container init whose namespaces an exec joins.
    pub join_pid: i32,
    /// The container's cgroup directory (the helper moves itself in first).
    pub cgroup_dir: String,
    /// Namespaces to create (container) or to join (exec).
    pub namespaces: Vec<NsKind>,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    /// The root file system, absolute in the agent's mount namespace.
    pub rootfs: String,
    pub root_readonly: bool,
    pub rootfs_propagation: libc::c_ulong,
    pub mounts: Vec<MountOp>,
    pub devices: Vec<DeviceOp>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub sysctl: Vec<(String, String)>,
    pub process: ProcessConfig,
    /// Compiled seccomp programs (all are installed), each a list of BPF instructions.
    pub seccomp: Vec<Vec<BpfInsn>>,
}

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct BpfInsn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// The process to run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessConfig {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
    pub terminal: bool,
    pub console_size: Option<(u16, u16)>,
    pub caps: Option<CapSets>,
    pub rlimits: Vec<Rlimit>,
    pub no_new_privileges: bool,
    pub oom_score_adj: Option<i32>,
}

/// Capability sets by name (`CAP_...`), validated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CapSets {
    pub bounding: Vec<String>,
    pub effective: Vec<String>,
    pub inheritable: Vec<String>,
    pub permitted: Vec<String>,
    pub ambient: Vec<String>,
}

/// One resource limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// One mount into the container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountOp {
    pub source: String,
    pub destination: String,
    pub fstype: String,
    pub flags: libc::c_ulong,
    pub propagation: libc::c_ulong,
    pub data: String,
    pub bind: bool,
    pub recursive: bool,
}

/// One device node to create.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceOp {
    pub path: String,
    pub kind: libc::mode_t,
    pub major: u32,
    pub minor: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Messages from the helper to the agent, one JSON object per line on the sync pipe.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMsg {
    /// The container's (or exec'd process's) pid, in the agent's pid namespace.
    Pid(i32),
    /// Set-up is done; the init waits for the start signal.
    Ready,
    /// Set-up or exec failed.
    Error(String),
}
