//! `husk features`: the OCI features document (runtime-spec `features.md`): what husk supports.
//!
//! Containers run inside the guest, created by husk-agent, so this states what the agent honours
//! (guest-agent/src/spec.rs, mountopts.rs, seccomp.rs): namespaces pid, mount, ipc, uts, cgroup
//! and the sandbox's network (no user or time namespaces, no joining by path); cgroup v2 only;
//! every capability of the guest kernel; seccomp without SCMP_ACT_NOTIFY; no AppArmor, no SELinux.
//! Hooks are the runtime's: the host-side ones (see `crate::hooks`). Keep it in step with the
//! agent's validation: a field the agent rejects must not be listed here.

use std::collections::HashMap;

use oci_spec::runtime::{
    ApparmorBuilder, Arch, CgroupBuilder, Features, FeaturesBuilder, LinuxFeatureBuilder,
    LinuxNamespaceType, LinuxSeccompAction, SeccompBuilder, SelinuxBuilder,
};

use super::CommandError;
use crate::exit;

/// The oldest runtime-spec version husk accepts in a bundle.
pub const OCI_VERSION_MIN: &str = "1.0.0";
/// The newest runtime-spec version husk knows (the one its `oci-spec` crate implements).
pub const OCI_VERSION_MAX: &str = oci_spec::runtime::VERSION;

/// Namespaces a container can have. `network` is the sandbox's: every container of a microVM
/// shares the guest's network namespace.
pub const NAMESPACES: [LinuxNamespaceType; 6] = [
    LinuxNamespaceType::Pid,
    LinuxNamespaceType::Mount,
    LinuxNamespaceType::Ipc,
    LinuxNamespaceType::Uts,
    LinuxNamespaceType::Cgroup,
    LinuxNamespaceType::Network,
];

/// Mount options the agent applies (runc's set, minus id-mapped and propagation-recursive flags).
pub const MOUNT_OPTIONS: &[&str] = &[
    "async",
    "atime",
    "bind",
    "defaults",
    "dev",
    "diratime",
    "dirsync",
    "exec",
    "mand",
    "noatime",
    "nodev",
    "nodiratime",
    "noexec",
    "nomand",
    "norelatime",
    "nostrictatime",
    "nosuid",
    "private",
    "rbind",
    "relatime",
    "remount",
    "ro",
    "rprivate",
    "rshared",
    "rslave",
    "rw",
    "shared",
    "slave",
    "strictatime",
    "suid",
    "sync",
];

/// Capabilities of Linux 6.1 (the guest kernel), all grantable inside the guest.
pub const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Seccomp actions (SCMP_ACT_NOTIFY needs a listener on the host side: not supported).
pub const SECCOMP_ACTIONS: [LinuxSeccompAction; 8] = [
    LinuxSeccompAction::ScmpActKill,
    LinuxSeccompAction::ScmpActKillThread,
    LinuxSeccompAction::ScmpActKillProcess,
    LinuxSeccompAction::ScmpActTrap,
    LinuxSeccompAction::ScmpActErrno,
    LinuxSeccompAction::ScmpActTrace,
    LinuxSeccompAction::ScmpActLog,
    LinuxSeccompAction::ScmpActAllow,
];

/// Seccomp argument comparison operators.
pub const SECCOMP_OPERATORS: &[&str] = &[
    "SCMP_CMP_NE",
    "SCMP_CMP_LT",
    "SCMP_CMP_LE",
    "SCMP_CMP_EQ",
    "SCMP_CMP_GE",
    "SCMP_CMP_GT",
    "SCMP_CMP_MASKED_EQ",
];

/// Hooks husk runs (on the host, see `hooks`); createContainer and startContainer would run in
/// the guest and are refused.
pub const HOOKS: &[&str] = &["prestart", "createRuntime", "poststart", "poststop"];

/// Seccomp filter flags.
pub const SECCOMP_FLAGS: &[&str] = &["SECCOMP_FILTER_FLAG_TSYNC"];

/// The annotation carrying husk's version (like runc's `org.opencontainers.runc.version`).
pub const VERSION_ANNOTATION: &str = "io.husk.runtime.version";

/// `husk features` takes no arguments.
#[derive(Debug, clap::Args)]
pub struct Args {}

/// The features document.
pub fn features() -> Result<Features, oci_spec::OciSpecError> {
    let linux = LinuxFeatureBuilder::default()
        .namespaces(NAMESPACES.to_vec())
        .capabilities(strings(CAPABILITIES))
        .cgroup(
            CgroupBuilder::default()
                .v1(false)
                .v2(true)
                .systemd(false)
                .systemd_user(false)
                .rdma(false)
                .build()?,
        )
        .seccomp(
            SeccompBuilder::default()
                .enabled(true)
                .actions(SECCOMP_ACTIONS.to_vec())
                .operators(strings(SECCOMP_OPERATORS))
                .archs(vec![
                    Arch::ScmpArchX86_64,
                    Arch::ScmpArchX86,
                    Arch::ScmpArchX32,
                ])
                .build()?,
        )
        .apparmor(ApparmorBuilder::default().enabled(false).build()?)
        .selinux(SelinuxBuilder::default().enabled(false).build()?)
        .build()?;
    FeaturesBuilder::default()
        .oci_version_min(OCI_VERSION_MIN)
        .oci_version_max(OCI_VERSION_MAX)
        .hooks(strings(HOOKS))
        .mount_options(strings(MOUNT_OPTIONS))
        .linux(linux)
        .annotations(HashMap::from([(
            VERSION_ANNOTATION.to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        )]))
        .build()
}

/// The features document as pretty JSON, without the `null`s of fields husk does not describe.
pub fn features_json() -> Result<String, String> {
    let document = features().map_err(|err| err.to_string())?;
    let mut value = serde_json::to_value(document).map_err(|err| err.to_string())?;
    drop_nulls(&mut value);
    serde_json::to_string_pretty(&value).map_err(|err| err.to_string())
}

/// Runs `husk features`.
pub fn run(_args: &Args) -> Result<u8, CommandError> {
    let json = features_json().map_err(|err| CommandError::Output(std::io::Error::other(err)))?;
    super::print(&format!("{json}\n"))?;
    Ok(exit::SUCCESS)
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// Removes object members whose value is `null`, recursively.
fn drop_nulls(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(drop_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_has_versions_and_no_nulls() {
        let json = features_json().unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["ociVersionMin"], OCI_VERSION_MIN);
        assert_eq!(value["ociVersionMax"], OCI_VERSION_MAX);
        assert!(!json.contains("null"), "{json}");
    }

    #[test]
    fn document_states_linux_support() {
        let value: serde_json::Value = serde_json::from_str(&features_json().unwrap()).unwrap();
        let linux = &value["linux"];
        assert_eq!(linux["cgroup"]["v2"], true);
        assert_eq!(linux["cgroup"]["v1"], false);
        assert_eq!(linux["seccomp"]["enabled"], true);
        assert_eq!(
            linux["namespaces"],
            serde_json::json!(["pid", "mount", "ipc", "uts", "cgroup", "network"])
        );
        assert!(linux["seccomp"]["actions"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("SCMP_ACT_ERRNO")));
        assert!(!linux["seccomp"]["actions"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("SCMP_ACT_NOTIFY")));
        assert_eq!(linux["capabilities"].as_array().unwrap().len(), 41);
        assert_eq!(
            value["hooks"],
            serde_json::json!(["prestart", "createRuntime", "poststart", "poststop"])
        );
    }

    #[test]
    fn document_round_trips_through_oci_spec() {
        let parsed: Features = serde_json::from_str(&features_json().unwrap()).unwrap();
        assert_eq!(parsed, features().unwrap());
    }
}
