//! `containerd-shim-husk-v2 -info`: containerd 2.x's introspection of a runtime (its CRI plugin
//! asks it for every runtime handler). Stdin holds the handler's runtime options (a protobuf
//! `Any`, possibly empty); stdout gets a `containerd.types.RuntimeInfo` message whose features
//! are husk's OCI features document, the one `husk features` prints. The CRI plugin derives
//! what it advertises for the handler from it (recursive read-only mounts when the mount
//! options list `rro`, user namespaces when id-mapped mounts are supported), so it states only
//! what works in husk's guest.

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::types::introspection::{RuntimeInfo, RuntimeVersion};

/// The name the shim reports.
pub const NAME: &str = "containerd-shim-husk-v2";
/// The type URL containerd gives an OCI features document (its value is the JSON).
pub const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// Why `-info` failed.
#[derive(Debug, thiserror::Error)]
pub enum InfoError {
    #[error("runtime options on stdin are not a protobuf Any: {0}")]
    Options(String),
    #[error("husk's features document: {0}")]
    Features(String),
    #[error("cannot encode the runtime info: {0}")]
    Encode(String),
}

/// The answer to `-info` given the runtime options read from stdin, encoded.
pub fn answer(options: &[u8]) -> Result<Vec<u8>, InfoError> {
    runtime_info(options)?
        .write_to_bytes()
        .map_err(|err| InfoError::Encode(err.to_string()))
}

/// The runtime info: name, version, the options given back (as containerd's runc shim does),
/// and the features document.
pub fn runtime_info(options: &[u8]) -> Result<RuntimeInfo, InfoError> {
    let options = if options.is_empty() {
        MessageField::none()
    } else {
        MessageField::some(
            Any::parse_from_bytes(options).map_err(|err| InfoError::Options(err.to_string()))?,
        )
    };
    let features =
        husk_runtime::commands::features::features_json().map_err(InfoError::Features)?;
    Ok(RuntimeInfo {
        name: NAME.to_owned(),
        version: MessageField::some(RuntimeVersion {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        }),
        options,
        features: MessageField::some(Any {
            type_url: FEATURES_TYPE_URL.to_owned(),
            value: features.into_bytes(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features_of(info: &RuntimeInfo) -> serde_json::Value {
        let features = info.features.as_ref().unwrap();
        assert_eq!(features.type_url, FEATURES_TYPE_URL);
        serde_json::from_slice(&features.value).unwrap()
    }

    #[test]
    fn the_answer_decodes_as_runtime_info_with_husks_features() {
        let bytes = answer(&[]).unwrap();
        let info = RuntimeInfo::parse_from_bytes(&bytes).unwrap();
        assert_eq!(info.name, NAME);
        assert_eq!(info.version.version, env!("CARGO_PKG_VERSION"));
        assert!(info.options.is_none());
        let features = features_of(&info);
        let document: serde_json::Value =
            serde_json::from_str(&husk_runtime::commands::features::features_json().unwrap())
                .unwrap();
        assert_eq!(features, document, "the same document as `husk features`");
        assert_eq!(features["linux"]["cgroup"]["v2"], true);
    }

    #[test]
    fn cri_sees_no_recursive_read_only_mounts_and_no_user_namespaces() {
        // What containerd's CRI plugin looks at: `rro` among the mount options, and id-mapped
        // mounts (linux.mountExtensions.idmap.enabled) for user namespaces. Neither works in
        // husk's guest today, so neither may be advertised.
        let features = features_of(&runtime_info(&[]).unwrap());
        let options = features["mountOptions"].as_array().unwrap();
        assert!(!options.contains(&serde_json::json!("rro")), "{options:?}");
        assert_ne!(
            features["linux"]["mountExtensions"]["idmap"]["enabled"],
            true
        );
        let namespaces = features["linux"]["namespaces"].as_array().unwrap();
        assert!(!namespaces.contains(&serde_json::json!("user")));
    }

    #[test]
    fn runtime_options_are_given_back() {
        let mut any = Any::new();
        any.type_url = "runtimeoptions.v1.Options".to_owned();
        any.value = vec![0x12, 0x01, b'x'];
        let info = runtime_info(&any.write_to_bytes().unwrap()).unwrap();
        assert_eq!(info.options.as_ref(), Some(&any));
    }

    #[test]
    fn options_that_are_not_an_any_are_refused() {
        let err = runtime_info(&[0x0a, 0x7f]).unwrap_err();
        assert!(err.to_string().contains("not a protobuf Any"), "{err}");
    }
}
