//! The OCI runtime spec as the agent reads it, and its translation into what the container's init
//! helper executes ([`crate::config::InitConfig`]).
//!
//! Every struct keeps the fields it does not know in `other`; a field the agent cannot honour is
//! refused with [`SpecError::Unsupported`] naming it, never ignored. Fields that only make sense on
//! the host (`annotations`, `linux.cgroupsPath`) are accepted and documented in docs/agent-api.md.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::config::{CapSets, DeviceOp, MountOp, ProcessConfig, Rlimit};
use crate::mountopts::{parse_mount_options, parse_propagation};

/// Why a spec was refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The JSON does not parse as an OCI spec.
    #[error("malformed OCI JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A field the agent does not implement is set.
    #[error("unsupported OCI field {field}: {why}")]
    Unsupported {
        /// Dotted path of the field.
        field: String,
        /// Why, or what to do instead.
        why: String,
    },
    /// A field has a value the agent refuses.
    #[error("invalid OCI field {field}: {why}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        why: String,
    },
    /// A required field is missing.
    #[error("missing OCI field {0}")]
    Missing(&'static str),
}

fn unsupported(field: impl Into<String>, why: impl Into<String>) -> SpecError {
    SpecError::Unsupported {
        field: field.into(),
        why: why.into(),
    }
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

/// Refuses any field left in `other` (a field this agent does not know). A `null` counts as absent.
fn reject_unknown(prefix: &str, other: &BTreeMap<String, Value>) -> Result<(), SpecError> {
    match other.iter().find(|(_, v)| !v.is_null()) {
        Some((k, _)) => Err(unsupported(
            format!("{prefix}{k}"),
            "this agent does not implement it",
        )),
        None => Ok(()),
    }
}

/// The top level of config.json.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// Accepted, not checked: the agent implements runtime-spec 1.x.
    #[serde(default)]
    #[allow(dead_code)]
    pub oci_version: String,
    pub process: Option<Process>,
    pub root: Option<Root>,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    pub linux: Option<Linux>,
    pub hooks: Option<BTreeMap<String, Vec<Value>>>,
    /// Accepted: annotations are for the host side.
    #[serde(default)]
    #[allow(dead_code)]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// `process`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    #[serde(default)]
    pub terminal: bool,
    pub console_size: Option<ConsoleSize>,
    #[serde(default)]
    pub user: User,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: String,
    pub capabilities: Option<Capabilities>,
    #[serde(default)]
    pub rlimits: Vec<PosixRlimit>,
    #[serde(default)]
    pub no_new_privileges: bool,
    pub apparmor_profile: Option<String>,
    pub oom_score_adj: Option<i32>,
    pub selinux_label: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct ConsoleSize {
    pub height: u16,
    pub width: u16,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    pub umask: Option<u32>,
    #[serde(default)]
    pub additional_gids: Vec<u32>,
    pub username: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Capabilities {
    #[serde(default)]
    pub bounding: Vec<String>,
    #[serde(default)]
    pub effective: Vec<String>,
    #[serde(default)]
    pub inheritable: Vec<String>,
    #[serde(default)]
    pub permitted: Vec<String>,
    #[serde(default)]
    pub ambient: Vec<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct PosixRlimit {
    #[serde(rename = "type")]
    pub typ: String,
    pub hard: u64,
    pub soft: u64,
}

#[derive(Debug, Deserialize)]
pub struct Root {
    pub path: String,
    #[serde(default)]
    pub readonly: bool,
}

/// One entry of `mounts`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    pub destination: String,
    #[serde(rename = "type")]
    pub typ: Option<String>,
    pub source: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// `linux`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Linux {
    #[serde(default)]
    pub uid_mappings: Vec<Value>,
    #[serde(default)]
    pub gid_mappings: Vec<Value>,
    #[serde(default)]
    pub sysctl: BTreeMap<String, String>,
    pub resources: Option<Resources>,
    /// Accepted: a host-side path; in the guest every container lives in `husk/<id>`.
    #[allow(dead_code)]
    pub cgroups_path: Option<String>,
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    #[serde(default)]
    pub devices: Vec<Device>,
    pub seccomp: Option<Seccomp>,
    pub rootfs_propagation: Option<String>,
    #[serde(default)]
    pub masked_paths: Vec<String>,
    #[serde(default)]
    pub readonly_paths: Vec<String>,
    pub mount_label: Option<String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct Namespace {
    #[serde(rename = "type")]
    pub typ: String,
    pub path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub path: String,
    #[serde(rename = "type")]
    pub typ: String,
    #[serde(default)]
    pub major: i64,
    #[serde(default)]
    pub minor: i64,
    pub file_mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// `linux.resources`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    #[serde(default)]
    pub devices: Vec<Value>,
    pub memory: Option<Memory>,
    pub cpu: Option<Cpu>,
    pub pids: Option<Pids>,
    #[serde(rename = "blockIO")]
    pub block_io: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    pub hugepage_limits: Vec<Value>,
    pub network: Option<Value>,
    pub rdma: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    pub unified: BTreeMap<String, String>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Memory {
    pub limit: Option<i64>,
    pub reservation: Option<i64>,
    pub swap: Option<i64>,
    pub kernel: Option<i64>,
    #[serde(rename = "kernelTCP")]
    pub kernel_tcp: Option<i64>,
    pub swappiness: Option<u64>,
    #[serde(rename = "disableOOMKiller")]
    pub disable_oom_killer: Option<bool>,
    /// Accepted: always true in cgroup v2.
    #[allow(dead_code)]
    pub use_hierarchy: Option<bool>,
    /// Accepted: the kernel refuses a limit below the current usage anyway.
    #[allow(dead_code)]
    pub check_before_update: Option<bool>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cpu {
    pub shares: Option<u64>,
    pub quota: Option<i64>,
    pub burst: Option<u64>,
    pub period: Option<u64>,
    pub realtime_runtime: Option<i64>,
    pub realtime_period: Option<u64>,
    pub cpus: Option<String>,
    pub mems: Option<String>,
    pub idle: Option<i64>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Pids {
    pub limit: i64,
}

/// `linux.seccomp`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Seccomp {
    pub default_action: String,
    pub default_errno_ret: Option<u32>,
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub flags: Vec<String>,
    pub listener_path: Option<String>,
    /// Accepted: meaningless without `listenerPath`, which is refused.
    #[allow(dead_code)]
    pub listener_metadata: Option<String>,
    #[serde(default)]
    pub syscalls: Vec<Syscall>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Syscall {
    pub names: Vec<String>,
    pub action: String,
    pub errno_ret: Option<u32>,
    #[serde(default)]
    pub args: Vec<SeccompArg>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SeccompArg {
    pub index: u32,
    pub value: u64,
    #[serde(default)]
    pub value_two: u64,
    pub op: String,
}

/// The namespaces the agent creates for a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub enum NsKind {
    Mount,
    Uts,
    Ipc,
    Pid,
    Cgroup,
}

impl NsKind {
    /// The clone flag.
    pub fn flag(self) -> libc::c_int {
        match self {
            NsKind::Mount => libc::CLONE_NEWNS,
            NsKind::Uts => libc::CLONE_NEWUTS,
            NsKind::Ipc => libc::CLONE_NEWIPC,
            NsKind::Pid => libc::CLONE_NEWPID,
            NsKind::Cgroup => libc::CLONE_NEWCGROUP,
        }
    }

    /// The name under /proc/PID/ns/.
    pub fn proc_name(self) -> &'static str {
        match self {
            NsKind::Mount => "mnt",
            NsKind::Uts => "uts",
            NsKind::Ipc => "ipc",
            NsKind::Pid => "pid",
            NsKind::Cgroup => "cgroup",
        }
    }
}

/// Parses config.json.
pub fn parse_spec(json: &[u8]) -> Result<Spec, SpecError> {
    Ok(serde_json::from_slice(json)?)
}

/// Parses an OCI `process` object (for exec).
pub fn parse_process(json: &[u8]) -> Result<Process, SpecError> {
    Ok(serde_json::from_slice(json)?)
}

/// Parses an OCI `linux.resources` object (for update).
pub fn parse_resources(json: &[u8]) -> Result<Resources, SpecError> {
    Ok(serde_json::from_slice(json)?)
}

/// Checks that `p` is absolute and has no `..` component.
pub fn check_container_path(field: &str, p: &str) -> Result<(), SpecError> {
    if !p.starts_with('/') {
        return Err(invalid(field, format!("{p:?} must be an absolute path")));
    }
    if p.len() > husk_agent_protocol::MAX_PATH_LEN || p.contains('\0') {
        return Err(invalid(field, "path too long or contains NUL"));
    }
    Ok(())
}

/// The container-level part of a validated spec.
#[derive(Debug)]
pub struct ContainerPlan {
    pub namespaces: Vec<NsKind>,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    pub root_path: Option<String>,
    pub root_readonly: bool,
    pub rootfs_propagation: libc::c_ulong,
    pub mounts: Vec<MountOp>,
    pub devices: Vec<DeviceOp>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub sysctl: Vec<(String, String)>,
    pub process: ProcessConfig,
    pub resources: Option<Resources>,
    pub seccomp: Option<Seccomp>,
}

/// Validates a whole spec and translates it into a plan.
pub fn plan_container(spec: Spec) -> Result<ContainerPlan, SpecError> {
    reject_unknown("", &spec.other)?;
    if let Some(hooks) = &spec.hooks {
        if let Some((name, _)) = hooks.iter().find(|(_, v)| !v.is_empty()) {
            return Err(unsupported(
                format!("hooks.{name}"),
                "hooks run on the host: the runtime must run them and strip them from the spec",
            ));
        }
    }
    let process = spec.process.ok_or(SpecError::Missing("process"))?;
    let process = plan_process(process)?;
    let linux = spec.linux.unwrap_or_default();
    reject_unknown("linux.", &linux.other)?;
    if !linux.uid_mappings.is_empty() || !linux.gid_mappings.is_empty() {
        return Err(unsupported(
            "linux.uidMappings/gidMappings",
            "user namespaces are not supported in the guest",
        ));
    }
    if linux.mount_label.as_deref().is_some_and(|l| !l.is_empty()) {
        return Err(unsupported(
            "linux.mountLabel",
            "SELinux is not available in the guest",
        ));
    }
    let namespaces = plan_namespaces(&linux.namespaces)?;
    if spec.hostname.as_deref().is_some_and(|h| !h.is_empty()) && !namespaces.contains(&NsKind::Uts)
    {
        return Err(invalid(
            "hostname",
            "setting a hostname needs a uts namespace",
        ));
    }
    if let Some(h) = &spec.hostname {
        if h.len() > husk_agent_protocol::MAX_HOSTNAME_LEN {
            return Err(invalid("hostname", "longer than 64 bytes"));
        }
    }
    let root_path = spec.root.as_ref().map(|r| r.path.clone());
    let root_readonly = spec.root.as_ref().is_some_and(|r| r.readonly);
    let rootfs_propagation = match linux.rootfs_propagation.as_deref() {
        None | Some("") => 0,
        Some(p) => parse_propagation(p)
            .ok_or_else(|| invalid("linux.rootfsPropagation", format!("unknown mode {p:?}")))?,
    };
    let mut mounts = Vec::with_capacity(spec.mounts.len());
    for (i, m) in spec.mounts.into_iter().enumerate() {
        mounts.push(plan_mount(i, m)?);
    }
    let mut devices = Vec::with_capacity(linux.devices.len());
    for (i, d) in linux.devices.into_iter().enumerate() {
        devices.push(plan_device(i, d)?);
    }
    for (i, p) in linux.masked_paths.iter().enumerate() {
        check_container_path(&format!("linux.maskedPaths[{i}]"), p)?;
    }
    for (i, p) in linux.readonly_paths.iter().enumerate() {
        check_container_path(&format!("linux.readonlyPaths[{i}]"), p)?;
    }
    let mut sysctl = Vec::with_capacity(linux.sysctl.len());
    for (k, v) in linux.sysctl {
        let valid_key = !k.is_empty()
            && k.len() <= 256
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'))
            && !k.split(['.', '/']).any(|c| c.is_empty() || c == "..");
        if !valid_key {
            return Err(invalid(format!("linux.sysctl.{k}"), "not a sysctl name"));
        }
        sysctl.push((k, v));
    }
    if let Some(r) = &linux.resources {
        check_resources(r)?;
    }
    if let Some(s) = &linux.seccomp {
        crate::seccomp::compile(s, process.no_new_privileges)
            .map_err(|e| invalid("linux.seccomp", e))?;
    }
    Ok(ContainerPlan {
        namespaces,
        hostname: spec.hostname,
        domainname: spec.domainname,
        root_path,
        root_readonly,
        rootfs_propagation,
        mounts,
        devices,
        masked_paths: linux.masked_paths,
        readonly_paths: linux.readonly_paths,
        sysctl,
        process,
        resources: linux.resources,
        seccomp: linux.seccomp,
    })
}

fn plan_namespaces(list: &[Namespace]) -> Result<Vec<NsKind>, SpecError> {
    let mut out = Vec::new();
    for (i, ns) in list.iter().enumerate() {
        let field = format!("linux.namespaces[{i}]");
        if ns.path.as_deref().is_some_and(|p| !p.is_empty()) {
            return Err(unsupported(
                format!("{field}.path"),
                "joining an existing namespace is not supported; containers of a sandbox share its VM",
            ));
        }
        let kind = match ns.typ.as_str() {
            "mount" => NsKind::Mount,
            "uts" => NsKind::Uts,
            "ipc" => NsKind::Ipc,
            "pid" => NsKind::Pid,
            "cgroup" => NsKind::Cgroup,
            // The VM is the sandbox's network boundary: every container shares its network.
            "network" => continue,
            "user" | "time" => {
                return Err(unsupported(
                    format!("{field}.type"),
                    format!("{} namespaces are not supported in the guest", ns.typ),
                ))
            }
            other => {
                return Err(invalid(
                    format!("{field}.type"),
                    format!("unknown namespace type {other:?}"),
                ))
            }
        };
        if out.contains(&kind) {
            return Err(invalid(field, format!("duplicate namespace {:?}", ns.typ)));
        }
        out.push(kind);
    }
    if !out.contains(&NsKind::Mount) {
        return Err(invalid(
            "linux.namespaces",
            "a mount namespace is required (the agent never mounts in its own namespace for a container)",
        ));
    }
    Ok(out)
}

fn cap_list(field: &str, names: &[String]) -> Result<Vec<String>, SpecError> {
    for n in names {
        n.parse::<caps::Capability>()
            .map_err(|_| invalid(field, format!("unknown capability {n:?}")))?;
    }
    Ok(names.to_vec())
}

fn rlimit_resource(name: &str) -> Option<u32> {
    let r = match name {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        _ => return None,
    };
    #[allow(clippy::unnecessary_cast)]
    Some(r as u32)
}

/// Validates an OCI `process` and translates it.
pub fn plan_process(p: Process) -> Result<ProcessConfig, SpecError> {
    reject_unknown("process.", &p.other)?;
    reject_unknown("process.user.", &p.user.other)?;
    if p.args.is_empty() {
        return Err(SpecError::Missing("process.args"));
    }
    if p.args.iter().chain(p.env.iter()).any(|s| s.contains('\0')) {
        return Err(invalid("process.args/env", "contains a NUL byte"));
    }
    for (i, e) in p.env.iter().enumerate() {
        if !e.contains('=') {
            return Err(invalid(format!("process.env[{i}]"), "not NAME=VALUE"));
        }
    }
    let cwd = if p.cwd.is_empty() {
        "/".to_owned()
    } else {
        p.cwd
    };
    check_container_path("process.cwd", &cwd)?;
    if p.apparmor_profile.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported(
            "process.apparmorProfile",
            "AppArmor is not available in the guest",
        ));
    }
    if p.selinux_label.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported(
            "process.selinuxLabel",
            "SELinux is not available in the guest",
        ));
    }
    if p.user.username.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(unsupported(
            "process.user.username",
            "only numeric uid/gid are supported (this is a Windows field)",
        ));
    }
    let caps = match p.capabilities {
        None => None,
        Some(c) => {
            reject_unknown("process.capabilities.", &c.other)?;
            Some(CapSets {
                bounding: cap_list("process.capabilities.bounding", &c.bounding)?,
                effective: cap_list("process.capabilities.effective", &c.effective)?,
                inheritable: cap_list("process.capabilities.inheritable", &c.inheritable)?,
                permitted: cap_list("process.capabilities.permitted", &c.permitted)?,
                ambient: cap_list("process.capabilities.ambient", &c.ambient)?,
            })
        }
    };
    let mut rlimits = Vec::with_capacity(p.rlimits.len());
    for (i, r) in p.rlimits.iter().enumerate() {
        let resource = rlimit_resource(&r.typ).ok_or_else(|| {
            invalid(
                format!("process.rlimits[{i}].type"),
                format!("unknown rlimit {:?}", r.typ),
            )
        })?;
        if r.soft > r.hard {
            return Err(invalid(
                format!("process.rlimits[{i}]"),
                "soft limit above hard limit",
            ));
        }
        rlimits.push(Rlimit {
            resource,
            soft: r.soft,
            hard: r.hard,
        });
    }
    if let Some(adj) = p.oom_score_adj {
        if !(-1000..=1000).contains(&adj) {
            return Err(invalid(
                "process.oomScoreAdj",
                "must be within -1000..=1000",
            ));
        }
    }
    Ok(ProcessConfig {
        args: p.args,
        env: p.env,
        cwd,
        uid: p.user.uid,
        gid: p.user.gid,
        additional_gids: p.user.additional_gids,
        umask: p.user.umask,
        terminal: p.terminal,
        console_size: p.console_size.map(|c| (c.height, c.width)),
        caps,
        rlimits,
        no_new_privileges: p.no_new_privileges,
        oom_score_adj: p.oom_score_adj,
    })
}

fn plan_mount(i: usize, m: Mount) -> Result<MountOp, SpecError> {
    let field = format!("mounts[{i}]");
    reject_unknown(&format!("{field}."), &m.other)?;
    check_container_path(&format!("{field}.destination"), &m.destination)?;
    let opts = parse_mount_options(&m.options);
    let fstype = m.typ.unwrap_or_default();
    let bind = opts.bind || fstype == "bind";
    if bind {
        let src = m.source.as_deref().unwrap_or("");
        check_container_path(&format!("{field}.source"), src).map_err(|_| {
            invalid(
                format!("{field}.source"),
                format!("bind source {src:?} must be an absolute path in the guest"),
            )
        })?;
    } else if fstype.is_empty() {
        return Err(invalid(format!("{field}.type"), "missing file system type"));
    }
    let fstype = match fstype.as_str() {
        "cgroup" | "cgroup2" => "cgroup2".to_owned(),
        _ => fstype,
    };
    Ok(MountOp {
        source: m.source.unwrap_or_default(),
        destination: m.destination,
        fstype,
        flags: opts.flags,
        propagation: opts.propagation,
        data: opts.data,
        bind,
        recursive: opts.recursive,
    })
}

fn plan_device(i: usize, d: Device) -> Result<DeviceOp, SpecError> {
    let field = format!("linux.devices[{i}]");
    check_container_path(&format!("{field}.path"), &d.path)?;
    if !d.path.starts_with("/dev/") {
        return Err(invalid(
            format!("{field}.path"),
            "devices must be under /dev",
        ));
    }
    let kind = match d.typ.as_str() {
        "c" | "u" => libc::S_IFCHR,
        "b" => libc::S_IFBLK,
        "p" => libc::S_IFIFO,
        other => {
            return Err(invalid(
                format!("{field}.type"),
                format!("unknown device type {other:?}"),
            ))
        }
    };
    let major =
        u32::try_from(d.major).map_err(|_| invalid(format!("{field}.major"), "out of range"))?;
    let minor =
        u32::try_from(d.minor).map_err(|_| invalid(format!("{field}.minor"), "out of range"))?;
    Ok(DeviceOp {
        path: d.path,
        kind,
        major,
        minor,
        mode: d.file_mode.unwrap_or(0o666) & 0o7777,
        uid: d.uid.unwrap_or(0),
        gid: d.gid.unwrap_or(0),
    })
}

/// Refuses resources the agent cannot apply (cgroup v2 only).
pub fn check_resources(r: &Resources) -> Result<(), SpecError> {
    reject_unknown("linux.resources.", &r.other)?;
    if let Some(m) = &r.memory {
        reject_unknown("linux.resources.memory.", &m.other)?;
        if m.kernel.is_some() || m.kernel_tcp.is_some() {
            return Err(unsupported(
                "linux.resources.memory.kernel/kernelTCP",
                "kernel memory limits do not exist in cgroup v2",
            ));
        }
        if m.swappiness.is_some() {
            return Err(unsupported(
                "linux.resources.memory.swappiness",
                "cgroup v2 has no per-cgroup swappiness",
            ));
        }
        if m.disable_oom_killer == Some(true) {
            return Err(unsupported(
                "linux.resources.memory.disableOOMKiller",
                "cgroup v2 cannot disable the OOM killer",
            ));
        }
        if let (Some(limit), Some(swap)) = (m.limit, m.swap) {
            if limit > 0 && swap > 0 && swap < limit {
                return Err(invalid(
                    "linux.resources.memory.swap",
                    "memory+swap limit is below the memory limit",
                ));
            }
        }
    }
    if let Some(c) = &r.cpu {
        reject_unknown("linux.resources.cpu.", &c.other)?;
        if c.realtime_runtime.is_some_and(|v| v != 0) || c.realtime_period.is_some_and(|v| v != 0) {
            return Err(unsupported(
                "linux.resources.cpu.realtimeRuntime/realtimePeriod",
                "the real-time scheduler is not available in cgroup v2",
            ));
        }
        for (name, v) in [("cpus", &c.cpus), ("mems", &c.mems)] {
            if let Some(v) = v {
                if !v
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b == b',' || b == b'-')
                {
                    return Err(invalid(
                        format!("linux.resources.cpu.{name}"),
                        "not a cpu list",
                    ));
                }
            }
        }
    }
    if r.block_io
        .as_ref()
        .is_some_and(|b| b.values().any(|v| !v.is_null()))
    {
        return Err(unsupported(
            "linux.resources.blockIO",
            "block I/O limits are not implemented by this agent",
        ));
    }
    if !r.hugepage_limits.is_empty() {
        return Err(unsupported(
            "linux.resources.hugepageLimits",
            "the guest has no huge pages",
        ));
    }
    if r.network.as_ref().is_some_and(|n| !n.is_null()) {
        return Err(unsupported(
            "linux.resources.network",
            "network classes do not exist in cgroup v2",
        ));
    }
    if r.rdma.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(unsupported("linux.resources.rdma", "the guest has no RDMA"));
    }
    for k in r.unified.keys() {
        let ok = k.contains('.')
            && !k.starts_with("cgroup.")
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_'));
        if !ok {
            return Err(invalid(
                format!("linux.resources.unified.{k}"),
                "not a cgroup v2 controller file",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
            "root": {"path": "/rootfs"},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "network"}]}
        })
    }

    fn plan(v: Value) -> Result<ContainerPlan, SpecError> {
        plan_container(parse_spec(v.to_string().as_bytes())?)
    }

    #[test]
    fn translates_a_minimal_spec() {
        let p = plan(base()).expect("valid spec");
        assert_eq!(p.namespaces, vec![NsKind::Mount, NsKind::Pid]);
        assert_eq!(p.process.args, vec!["sh"]);
        assert_eq!(p.mounts.len(), 1);
        assert_eq!(p.mounts[0].fstype, "proc");
    }

    #[test]
    fn refuses_bad_json() {
        assert!(matches!(parse_spec(b"{not json"), Err(SpecError::Json(_))));
        assert!(matches!(
            parse_spec(b"{\"process\": 3}"),
            Err(SpecError::Json(_))
        ));
    }

    #[test]
    fn refuses_unknown_namespace_type() {
        let mut v = base();
        v["linux"]["namespaces"] = serde_json::json!([{"type": "mount"}, {"type": "bogus"}]);
        let err = plan(v).expect_err("unknown ns accepted").to_string();
        assert!(err.contains("unknown namespace type"), "{err}");
    }

    #[test]
    fn refuses_user_namespace_clearly() {
        let mut v = base();
        v["linux"]["namespaces"] = serde_json::json!([{"type": "mount"}, {"type": "user"}]);
        assert!(matches!(plan(v), Err(SpecError::Unsupported { .. })));
    }

    #[test]
    fn refuses_relative_paths() {
        let mut v = base();
        v["mounts"][0]["destination"] = "proc".into();
        assert!(plan(v).is_err());
        let mut v = base();
        v["process"]["cwd"] = "tmp".into();
        assert!(plan(v).is_err());
        let mut v = base();
        v["mounts"] = serde_json::json!([{"destination": "/x", "type": "bind", "source": "rel", "options": ["rbind"]}]);
        assert!(plan(v).is_err());
    }

    #[test]
    fn refuses_unknown_fields_by_name() {
        let mut v = base();
        v["linux"]["intelRdt"] = serde_json::json!({"closID": "x"});
        let err = plan(v).expect_err("intelRdt accepted").to_string();
        assert!(err.contains("linux.intelRdt"), "{err}");
        let mut v = base();
        v["process"]["ioPriority"] = serde_json::json!({"class": "IOPRIO_CLASS_RT"});
        assert!(plan(v)
            .expect_err("accepted")
            .to_string()
            .contains("process.ioPriority"));
    }

    #[test]
    fn refuses_hooks_and_bad_resources() {
        let mut v = base();
        v["hooks"] = serde_json::json!({"prestart": [{"path": "/bin/true"}]});
        assert!(matches!(plan(v), Err(SpecError::Unsupported { .. })));
        let mut v = base();
        v["linux"]["resources"] = serde_json::json!({"memory": {"kernel": 1000}});
        assert!(matches!(plan(v), Err(SpecError::Unsupported { .. })));
        let mut v = base();
        v["linux"]["resources"] = serde_json::json!({"unified": {"../x": "1"}});
        assert!(plan(v).is_err());
    }

    #[test]
    fn refuses_bad_rlimits_and_caps() {
        let mut v = base();
        v["process"]["rlimits"] =
            serde_json::json!([{"type": "RLIMIT_BOGUS", "hard": 1, "soft": 1}]);
        assert!(plan(v).is_err());
        let mut v = base();
        v["process"]["capabilities"] = serde_json::json!({"bounding": ["CAP_NOPE"]});
        assert!(plan(v).is_err());
    }

    #[test]
    fn hostname_needs_uts_namespace() {
        let mut v = base();
        v["hostname"] = "box".into();
        assert!(plan(v).is_err());
        let mut v = base();
        v["hostname"] = "box".into();
        v["linux"]["namespaces"] = serde_json::json!([{"type": "mount"}, {"type": "uts"}]);
        assert_eq!(plan(v).expect("valid").hostname.as_deref(), Some("box"));
    }

    #[test]
    fn refuses_a_missing_mount_namespace() {
        let mut v = base();
        v["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}]);
        assert!(plan(v).is_err());
    }
}
