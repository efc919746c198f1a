//! Pods: which microVM a container belongs to, from containerd's CRI annotations.

use oci_spec::runtime::Spec;

/// `sandbox` for a pod's sandbox (pause) container, `container` for its other containers.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The pod's sandbox ID, on every container of the pod.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

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
