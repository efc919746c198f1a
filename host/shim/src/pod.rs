//! Pods: which microVM a container belongs to, from containerd's CRI annotations.

use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxNamespaceType, LinuxResources, LinuxResourcesBuilder,
    Spec,
};

use crate::error::ShimError;

/// `sandbox` for a pod's sandbox (pause) container, `container` for its other containers.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The pod's sandbox ID, on every container of the pod.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// The pod's CPU period (µs) on the sandbox container (containerd 1.7+, from kubelet's pod
/// resources).
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// The pod's CPU quota (µs per period; 0 or absent: no limit).
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// The pod's memory limit in bytes (0 or absent: no limit).
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// A container's place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Without CRI annotations (`ctr run`): a microVM of its own.
    Standalone,
    /// A pod's sandbox container: boots the pod's microVM.
    Sandbox,
    /// A container of pod `sandbox_id`: joins that pod's microVM.
    Container { sandbox_id: String },
}

/// The role of the container whose spec is `spec`.
pub fn role(spec: &Spec) -> Role {
    let annotations = spec.annotations().as_ref();
    let get = |key: &str| annotations.and_then(|a| a.get(key)).map(String::as_str);
    match (get(CONTAINER_TYPE), get(SANDBOX_ID)) {
        (Some("sandbox"), _) => Role::Sandbox,
        (Some("container"), Some(sandbox)) if !sandbox.is_empty() => Role::Container {
            sandbox_id: sandbox.to_owned(),
        },
        _ => Role::Standalone,
    }
}

/// The shim grouping of a container (containerd runs one shim per group): its pod's sandbox ID
/// for a pod's container, else its own ID.
pub fn grouping(spec: &Spec, id: &str) -> String {
    match role(spec) {
        Role::Container { sandbox_id } => sandbox_id,
        Role::Sandbox | Role::Standalone => id.to_owned(),
    }
}

/// The pod's resources from the sandbox annotations, when containerd passes them (1.7+):
/// a CPU quota and period and a memory limit, sized like a container's `linux.resources`.
/// `None` when none is set; a value that is not a number is an error naming the annotation.
pub fn sandbox_resources(spec: &Spec) -> Result<Option<LinuxResources>, ShimError> {
    let annotations = spec.annotations().as_ref();
    let number = |key: &'static str| -> Result<Option<i64>, ShimError> {
        annotations
            .and_then(|a| a.get(key))
            .map(|v| {
                v.trim()
                    .parse::<i64>()
                    .map_err(|e| ShimError::InvalidArgument(format!("annotation {key}={v:?}: {e}")))
            })
            .transpose()
    };
    let quota = number(SANDBOX_CPU_QUOTA)?.filter(|q| *q > 0);
    let period = number(SANDBOX_CPU_PERIOD)?
        .filter(|p| *p > 0)
        .and_then(|p| u64::try_from(p).ok());
    let memory = number(SANDBOX_MEMORY)?.filter(|m| *m > 0);
    if quota.is_none() && memory.is_none() {
        return Ok(None);
    }
    let invalid = |e: oci_spec::OciSpecError| ShimError::InvalidArgument(e.to_string());
    let mut builder = LinuxResourcesBuilder::default();
    if let Some(quota) = quota {
        let mut cpu = LinuxCpuBuilder::default().quota(quota);
        if let Some(period) = period {
            cpu = cpu.period(period);
        }
        builder = builder.cpu(cpu.build().map_err(invalid)?);
    }
    if let Some(memory) = memory {
        builder = builder.memory(
            LinuxMemoryBuilder::default()
                .limit(memory)
                .build()
                .map_err(invalid)?,
        );
    }
    builder.build().map(Some).map_err(invalid)
}

/// Maps a pod member's namespaces onto the VM, which is the pod: containerd's CRI plugin gives
/// a pod's containers the paths of the sandbox's network, IPC and UTS namespaces (on the host,
/// meaningless in the guest), and the sandbox new ones of its own. In the guest, the pod's
/// network, IPC and UTS namespaces are the VM's own (booted with the pod's hostname): the
/// sandbox's new ones and every member's joined ones are dropped, so all the pod's containers
/// share them (the sandbox's hostname is the VM's already). Sharing the sandbox's PID namespace
/// (`shareProcessNamespace`) is refused: the guest has no way to join it yet. A standalone
/// container's spec is left as it is.
pub fn map_namespaces(spec: &mut Spec, role: &Role) -> Result<(), ShimError> {
    if *role == Role::Standalone {
        return Ok(());
    }
    let Some(linux) = spec.linux_mut() else {
        return Ok(());
    };
    let Some(namespaces) = linux.namespaces().clone() else {
        return Ok(());
    };
    let mut kept = Vec::with_capacity(namespaces.len());
    for namespace in namespaces {
        let joins = namespace
            .path()
            .as_ref()
            .is_some_and(|p| !p.as_os_str().is_empty());
        let pod_wide = matches!(
            namespace.typ(),
            LinuxNamespaceType::Network | LinuxNamespaceType::Ipc | LinuxNamespaceType::Uts
        );
        if pod_wide && (joins || *role == Role::Sandbox) {
            continue;
        }
        if joins && namespace.typ() == LinuxNamespaceType::Pid {
            return Err(ShimError::InvalidArgument(
                "sharing the pod's PID namespace (shareProcessNamespace) is not supported: \
                 each container of a husk pod has a PID namespace of its own"
                    .into(),
            ));
        }
        kept.push(namespace);
    }
    linux.set_namespaces(Some(kept));
    if *role == Role::Sandbox {
        spec.set_hostname(None);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn spec(annotations: &[(&str, &str)]) -> Spec {
        let mut spec = Spec::default();
        let map: HashMap<String, String> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        spec.set_annotations(Some(map));
        spec
    }

    #[test]
    fn roles_from_cri_annotations() {
        assert_eq!(role(&spec(&[])), Role::Standalone);
        assert_eq!(role(&spec(&[(CONTAINER_TYPE, "sandbox")])), Role::Sandbox);
        assert_eq!(
            role(&spec(&[
                (CONTAINER_TYPE, "container"),
                (SANDBOX_ID, "pod1")
            ])),
            Role::Container {
                sandbox_id: "pod1".into()
            }
        );
        // A container without its sandbox ID cannot join anything.
        assert_eq!(
            role(&spec(&[(CONTAINER_TYPE, "container")])),
            Role::Standalone
        );
    }

    #[test]
    fn pod_resources_from_sandbox_annotations() {
        assert!(sandbox_resources(&spec(&[])).unwrap().is_none());
        let unlimited = spec(&[(SANDBOX_CPU_QUOTA, "0"), (SANDBOX_MEMORY, "0")]);
        assert!(sandbox_resources(&unlimited).unwrap().is_none());
        let limited = spec(&[
            (SANDBOX_CPU_PERIOD, "100000"),
            (SANDBOX_CPU_QUOTA, "250000"),
            (SANDBOX_MEMORY, "536870912"),
        ]);
        let resources = sandbox_resources(&limited).unwrap().unwrap();
        let cpu = resources.cpu().as_ref().unwrap();
        assert_eq!(cpu.quota(), Some(250000));
        assert_eq!(cpu.period(), Some(100000));
        assert_eq!(
            resources.memory().as_ref().unwrap().limit(),
            Some(536870912)
        );
    }

    #[test]
    fn bad_sandbox_annotations_are_named() {
        let err = sandbox_resources(&spec(&[(SANDBOX_MEMORY, "lots")])).unwrap_err();
        assert!(err.to_string().contains(SANDBOX_MEMORY), "{err}");
    }

    fn namespaced(annotations: &[(&str, &str)], namespaces: serde_json::Value) -> Spec {
        let mut spec = spec(annotations);
        let linux =
            serde_json::from_value(serde_json::json!({ "namespaces": namespaces })).unwrap();
        spec.set_linux(Some(linux));
        spec.set_hostname(Some("pod-host".into()));
        spec
    }

    fn namespace_list(spec: &Spec) -> serde_json::Value {
        serde_json::to_value(spec.linux().as_ref().unwrap().namespaces()).unwrap()
    }

    #[test]
    fn pod_members_share_the_vms_network_ipc_and_uts_namespaces() {
        // containerd 1.6's CRI plugin: the sandbox gets new namespaces (a CNI netns by path).
        let mut sandbox = namespaced(
            &[(CONTAINER_TYPE, "sandbox")],
            serde_json::json!([
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": "/var/run/netns/cni-1"}
            ]),
        );
        let r = role(&sandbox);
        map_namespaces(&mut sandbox, &r).unwrap();
        assert_eq!(
            namespace_list(&sandbox),
            serde_json::json!([{"type": "pid"}, {"type": "mount"}])
        );
        assert_eq!(sandbox.hostname(), &None);

        // Its containers join the sandbox's by /proc paths.
        let member_annotations = [(CONTAINER_TYPE, "container"), (SANDBOX_ID, "pod1")];
        let mut member = namespaced(
            &member_annotations,
            serde_json::json!([
                {"type": "pid"}, {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/42/ns/uts"}, {"type": "mount"},
                {"type": "network", "path": "/proc/42/ns/net"}
            ]),
        );
        let r = role(&member);
        map_namespaces(&mut member, &r).unwrap();
        assert_eq!(
            namespace_list(&member),
            serde_json::json!([{"type": "pid"}, {"type": "mount"}])
        );

        // shareProcessNamespace: refused, named.
        let mut shared_pid = namespaced(
            &member_annotations,
            serde_json::json!([{"type": "pid", "path": "/proc/42/ns/pid"}, {"type": "mount"}]),
        );
        let r = role(&shared_pid);
        let err = map_namespaces(&mut shared_pid, &r).unwrap_err();
        assert!(err.to_string().contains("shareProcessNamespace"), "{err}");

        // A standalone container keeps its spec.
        let mut standalone = namespaced(
            &[],
            serde_json::json!([{"type": "uts"}, {"type": "network", "path": "/x"}]),
        );
        let before = namespace_list(&standalone);
        let r = role(&standalone);
        map_namespaces(&mut standalone, &r).unwrap();
        assert_eq!(namespace_list(&standalone), before);
        assert_eq!(standalone.hostname().as_deref(), Some("pod-host"));
    }

    #[test]
    fn grouping_follows_the_pod() {
        let member = spec(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "pod1")]);
        assert_eq!(grouping(&member, "c1"), "pod1");
        assert_eq!(
            grouping(&spec(&[(CONTAINER_TYPE, "sandbox")]), "pod1"),
            "pod1"
        );
        assert_eq!(grouping(&spec(&[]), "c2"), "c2");
    }
}
