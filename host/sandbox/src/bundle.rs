//! OCI bundles: a directory with `config.json` and (usually) the root file system.
//!
//! [`load`] reads and checks a bundle the way `create` needs it: the directory exists, config.json
//! parses as a runtime spec (errors carry the JSON path, line and column), the version is 1.x, the
//! rootfs exists and is a directory, and the process has something to run. A relative `root.path`
//! is taken relative to the bundle, like runc, and must stay inside the bundle once symlinks are
//! resolved; an absolute one is used as given (podman points it at its storage).

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{Process, Spec};
use serde::{Deserialize, Serialize};

/// The spec's file name in a bundle.
pub const CONFIG_FILE: &str = "config.json";
/// The largest config.json read, in bytes.
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// Why a bundle cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The bundle directory does not exist.
    #[error("bundle {0} does not exist")]
    NotFound(PathBuf),
    /// The bundle path is not a directory.
    #[error("bundle {0} is not a directory")]
    NotADirectory(PathBuf),
    /// A file of the bundle cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// No config.json in the bundle.
    #[error("bundle {0} has no config.json")]
    ConfigMissing(PathBuf),
    /// config.json is larger than [`MAX_CONFIG_BYTES`].
    #[error("{0} is larger than {MAX_CONFIG_BYTES} bytes")]
    ConfigTooLarge(PathBuf),
    /// config.json (or an `exec --process` file) is not valid JSON of the right shape.
    #[error("malformed {path}: line {line}, column {column}: {at}{message}")]
    ConfigMalformed {
        path: PathBuf,
        /// `at process.args[0]: ` or empty.
        at: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// ociVersion is not 1.x.
    #[error("unsupported ociVersion {0:?}: husk supports runtime-spec 1.x")]
    UnsupportedVersion(String),
    /// The spec has no `root`.
    #[error("config.json has no root: a root file system is required")]
    NoRoot,
    /// `root.path` is empty.
    #[error("config.json: root.path is empty")]
    EmptyRootPath,
    /// The rootfs does not exist.
    #[error("rootfs {0} does not exist")]
    RootfsMissing(PathBuf),
    /// The rootfs is not a directory.
    #[error("rootfs {0} is not a directory")]
    RootfsNotADirectory(PathBuf),
    /// A relative `root.path` that resolves (through `..` or symlinks) outside the bundle.
    #[error("rootfs {path} resolves to {resolved}, outside the bundle {bundle}")]
    RootfsOutsideBundle {
        path: PathBuf,
        resolved: PathBuf,
        bundle: PathBuf,
    },
    /// The spec has no `process`.
    #[error("config.json has no process: a container needs one to run")]
    NoProcess,
    /// `process.args` is missing or empty.
    #[error("config.json: process.args is empty: the container needs a program to run")]
    EmptyArgs,
    /// `process.cwd` is not absolute (the runtime spec requires it).
    #[error("config.json: process.cwd {0:?} is not an absolute path")]
    RelativeCwd(PathBuf),
    /// `createContainer`/`startContainer` hooks run in the container's namespaces, which are in
    /// the guest, where husk cannot run host binaries.
    #[error("config.json: hooks.{0} is not supported: it would run inside the microVM (husk runs prestart, createRuntime, poststart and poststop hooks on the host)")]
    HooksUnsupported(&'static str),
}

/// A bundle ready for `create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    /// The bundle directory, absolute with symlinks resolved.
    pub dir: PathBuf,
    /// The parsed and checked spec.
    pub spec: Spec,
    /// The rootfs, absolute with symlinks resolved.
    pub rootfs: PathBuf,
}

/// Loads and checks the bundle at `dir` (see the module documentation).
pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
    let dir = canonical_bundle_dir(dir)?;
    let config = dir.join(CONFIG_FILE);
    let bytes = read_config(&config)?;
    let spec = parse_spec(&config, &bytes)?;
    check_spec(&spec)?;
    let root = spec.root().as_ref().ok_or(BundleError::NoRoot)?;
    let rootfs = resolve_rootfs(&dir, root.path())?;
    Ok(Bundle { dir, spec, rootfs })
}

/// The bundle directory, absolute and with symlinks resolved.
fn canonical_bundle_dir(dir: &Path) -> Result<PathBuf, BundleError> {
    let canonical = match fs::canonicalize(dir) {
        Ok(path) => path,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(BundleError::NotFound(dir.to_path_buf()))
        }
        Err(source) => {
            return Err(BundleError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    if !canonical.is_dir() {
        return Err(BundleError::NotADirectory(dir.to_path_buf()));
    }
    Ok(canonical)
}

/// Reads config.json, at most [`MAX_CONFIG_BYTES`].
fn read_config(path: &Path) -> Result<Vec<u8>, BundleError> {
    let file = match fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(BundleError::ConfigMissing(
                path.parent().unwrap_or(path).to_path_buf(),
            ))
        }
        Err(source) => {
            return Err(BundleError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|source| BundleError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(BundleError::ConfigTooLarge(path.to_path_buf()));
    }
    Ok(bytes)
}

/// Parses a runtime spec; an error names the JSON path, line and column.
pub fn parse_spec(path: &Path, bytes: &[u8]) -> Result<Spec, BundleError> {
    parse_json(path, bytes)
}

/// Parses JSON into `T`; an error names the JSON path, line and column.
fn parse_json<T: serde::de::DeserializeOwned>(path: &Path, bytes: &[u8]) -> Result<T, BundleError> {
    let malformed = |at: String, err: &serde_json::Error| BundleError::ConfigMalformed {
        path: path.to_path_buf(),
        at,
        line: err.line(),
        column: err.column(),
        message: strip_position(&err.to_string()),
    };
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let at = err.path().to_string();
        // serde_path_to_error writes "." for the top level and "?" where it does not know.
        let at = if at.is_empty() || at == "." || at == "?" {
            String::new()
        } else {
            format!("at {at}: ")
        };
        malformed(at, err.inner())
    })?;
    deserializer
        .end()
        .map_err(|err| malformed(String::new(), &err))?;
    Ok(value)
}

/// serde_json's messages end with " at line L column C", which the error already shows.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(index) => message.get(..index).unwrap_or(message).to_owned(),
        None => message.to_owned(),
    }
}

/// Loads an OCI `process` object from `path` for `exec --process F`: at most
/// [`MAX_CONFIG_BYTES`], parsed with the same position-carrying errors as config.json, with
/// non-empty `args` and an absolute `cwd`.
pub fn load_process(path: &Path) -> Result<Process, BundleError> {
    let bytes = match read_config(path) {
        Err(BundleError::ConfigMissing(_)) => {
            return Err(BundleError::Read {
                path: path.to_path_buf(),
                source: io::ErrorKind::NotFound.into(),
            })
        }
        other => other?,
    };
    let process: Process = parse_json(path, &bytes)?;
    check_process(&process)?;
    Ok(process)
}

fn check_process(process: &Process) -> Result<(), BundleError> {
    if process.args().as_ref().is_none_or(Vec::is_empty) {
        return Err(BundleError::EmptyArgs);
    }
    if !process.cwd().is_absolute() {
        return Err(BundleError::RelativeCwd(process.cwd().clone()));
    }
    Ok(())
}

/// Checks what `create` needs of the spec beyond its syntax.
pub fn check_spec(spec: &Spec) -> Result<(), BundleError> {
    let version = spec.version();
    if version.split('.').next() != Some("1") {
        return Err(BundleError::UnsupportedVersion(version.clone()));
    }
    let root = spec.root().as_ref().ok_or(BundleError::NoRoot)?;
    if root.path().as_os_str().is_empty() {
        return Err(BundleError::EmptyRootPath);
    }
    check_process(spec.process().as_ref().ok_or(BundleError::NoProcess)?)?;
    if let Some(name) = spec.hooks().as_ref().and_then(guest_side_hooks) {
        return Err(BundleError::HooksUnsupported(name));
    }
    Ok(())
}

/// The first hook point that runs in the container's namespaces (in the guest), if used.
fn guest_side_hooks(hooks: &oci_spec::runtime::Hooks) -> Option<&'static str> {
    [
        ("createContainer", hooks.create_container()),
        ("startContainer", hooks.start_container()),
    ]
    .into_iter()
    .find(|(_, list)| list.as_ref().is_some_and(|l| !l.is_empty()))
    .map(|(name, _)| name)
}

/// Resolves `root.path` against the canonical bundle directory `bundle`: relative paths must
/// resolve inside the bundle (symlinks followed), absolute ones are used as given. The result is
/// canonical and is a directory.
pub fn resolve_rootfs(bundle: &Path, root_path: &Path) -> Result<PathBuf, BundleError> {
    let joined = bundle.join(root_path);
    let resolved = match fs::canonicalize(&joined) {
        Ok(path) => path,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(BundleError::RootfsMissing(joined))
        }
        Err(source) => {
            return Err(BundleError::Read {
                path: joined,
                source,
            })
        }
    };
    if root_path.is_relative() && !resolved.starts_with(bundle) {
        return Err(BundleError::RootfsOutsideBundle {
            path: joined,
            resolved,
            bundle: bundle.to_path_buf(),
        });
    }
    if !resolved.is_dir() {
        return Err(BundleError::RootfsNotADirectory(joined));
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    const MINIMAL: &str = r#"{
  "ociVersion": "1.0.2",
  "root": { "path": "rootfs" },
  "process": { "cwd": "/", "args": ["sh"], "user": { "uid": 0, "gid": 0 } }
}"#;

    fn bundle_with(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("rootfs")).unwrap();
        fs::write(dir.path().join(CONFIG_FILE), config).unwrap();
        dir
    }

    fn with_field(field: &str, value: &str) -> String {
        let mut spec: serde_json::Value = serde_json::from_str(MINIMAL).unwrap();
        let value: serde_json::Value = serde_json::from_str(value).unwrap();
        let mut target = &mut spec;
        let mut parts = field.split('.').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                if value.is_null() {
                    target.as_object_mut().unwrap().remove(part);
                } else {
                    target[part] = value.clone();
                }
                break;
            }
            target = &mut target[part];
        }
        spec.to_string()
    }

    #[test]
    fn loads_a_minimal_bundle() {
        let dir = bundle_with(MINIMAL);
        let bundle = load(dir.path()).unwrap();
        assert_eq!(bundle.dir, fs::canonicalize(dir.path()).unwrap());
        assert_eq!(bundle.rootfs, bundle.dir.join("rootfs"));
        assert_eq!(
            bundle.spec.process().as_ref().unwrap().args().as_deref(),
            Some(&["sh".to_owned()][..])
        );
    }

    #[test]
    fn missing_bundle() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(err, BundleError::NotFound(_)), "{err}");
        assert!(err.to_string().contains("does not exist"));
    }

    #[test]
    fn bundle_that_is_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, "").unwrap();
        assert!(matches!(load(&file), Err(BundleError::NotADirectory(_))));
    }

    #[test]
    fn missing_config() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(matches!(err, BundleError::ConfigMissing(_)), "{err}");
    }

    #[test]
    fn malformed_json_shows_the_position() {
        let dir = bundle_with("{\n  \"ociVersion\": \"1.0.2\",\n  \"root\": {\n}");
        let err = load(dir.path()).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, BundleError::ConfigMalformed { line: 4, .. }),
            "{message}"
        );
        assert!(message.contains("line 4, column"), "{message}");
    }

    #[test]
    fn wrong_type_shows_the_json_path() {
        let dir = bundle_with(&with_field("process.args", "[\"sh\", 3]"));
        let message = load(dir.path()).unwrap_err().to_string();
        assert!(message.contains("at process.args[1]"), "{message}");
        assert!(message.contains("invalid type: integer `3`"), "{message}");
    }

    #[test]
    fn truncated_json_has_no_bogus_path() {
        let dir = bundle_with("{\n \"ociVersion\": \"1.0.2\",\n");
        let message = load(dir.path()).unwrap_err().to_string();
        assert!(
            message.contains("line 3, column 0: EOF while parsing"),
            "{message}"
        );
    }

    #[test]
    fn trailing_garbage_is_malformed() {
        let dir = bundle_with(&format!("{MINIMAL} x"));
        assert!(matches!(
            load(dir.path()),
            Err(BundleError::ConfigMalformed { .. })
        ));
    }

    #[test]
    fn oversized_config() {
        let padding = " ".repeat(usize::try_from(MAX_CONFIG_BYTES).unwrap());
        let dir = bundle_with(&format!("{MINIMAL}{padding}"));
        assert!(matches!(
            load(dir.path()),
            Err(BundleError::ConfigTooLarge(_))
        ));
    }

    #[test]
    fn version_2_is_unsupported() {
        let dir = bundle_with(&with_field("ociVersion", "\"2.0.0\""));
        assert!(matches!(
            load(dir.path()),
            Err(BundleError::UnsupportedVersion(_))
        ));
    }

    #[test]
    fn empty_or_missing_args() {
        let dir = bundle_with(&with_field("process.args", "[]"));
        assert!(matches!(load(dir.path()), Err(BundleError::EmptyArgs)));
        let dir = bundle_with(&with_field("process.args", "null"));
        assert!(matches!(load(dir.path()), Err(BundleError::EmptyArgs)));
    }

    #[test]
    fn missing_process_or_root() {
        let dir = bundle_with(&with_field("process", "null"));
        assert!(matches!(load(dir.path()), Err(BundleError::NoProcess)));
        let dir = bundle_with(&with_field("root", "null"));
        assert!(matches!(load(dir.path()), Err(BundleError::NoRoot)));
    }

    #[test]
    fn relative_cwd() {
        let dir = bundle_with(&with_field("process.cwd", "\"work\""));
        assert!(matches!(load(dir.path()), Err(BundleError::RelativeCwd(_))));
    }

    #[test]
    fn container_namespace_hooks_are_rejected() {
        let dir = bundle_with(&with_field(
            "hooks",
            r#"{"startContainer": [{"path": "/bin/true"}]}"#,
        ));
        assert!(matches!(
            load(dir.path()),
            Err(BundleError::HooksUnsupported("startContainer"))
        ));
        let dir = bundle_with(&with_field(
            "hooks",
            r#"{"createContainer": [{"path": "/bin/true"}]}"#,
        ));
        assert!(matches!(
            load(dir.path()),
            Err(BundleError::HooksUnsupported("createContainer"))
        ));
    }

    #[test]
    fn host_hooks_are_accepted() {
        let dir = bundle_with(&with_field(
            "hooks",
            r#"{"prestart": [{"path": "/bin/true"}], "createRuntime": [{"path": "/bin/true"}],
                "poststart": [{"path": "/bin/true"}], "poststop": [{"path": "/bin/true"}],
                "startContainer": []}"#,
        ));
        load(dir.path()).unwrap();
    }

    #[test]
    fn process_file_for_exec() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("process.json");
        fs::write(
            &path,
            r#"{"cwd": "/", "args": ["ls", "-l"], "user": {"uid": 0, "gid": 0}}"#,
        )
        .unwrap();
        let process = load_process(&path).unwrap();
        assert_eq!(process.args().as_ref().unwrap()[1], "-l");

        fs::write(
            &path,
            r#"{"cwd": "/", "args": [], "user": {"uid": 0, "gid": 0}}"#,
        )
        .unwrap();
        assert!(matches!(load_process(&path), Err(BundleError::EmptyArgs)));
        fs::write(
            &path,
            r#"{"cwd": "tmp", "args": ["ls"], "user": {"uid": 0, "gid": 0}}"#,
        )
        .unwrap();
        assert!(matches!(
            load_process(&path),
            Err(BundleError::RelativeCwd(_))
        ));
        fs::write(&path, "{\n \"args\": \"ls\"}").unwrap();
        let message = load_process(&path).unwrap_err().to_string();
        assert!(message.contains("line 2"), "{message}");
        assert!(message.contains("at args"), "{message}");
        let err = load_process(&dir.path().join("absent.json")).unwrap_err();
        assert!(matches!(err, BundleError::Read { .. }), "{err}");
    }

    #[test]
    fn rootfs_missing() {
        let dir = bundle_with(MINIMAL);
        fs::remove_dir(dir.path().join("rootfs")).unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(BundleError::RootfsMissing(_))
        ));
    }

    #[test]
    fn rootfs_that_is_a_file() {
        let dir = bundle_with(MINIMAL);
        fs::remove_dir(dir.path().join("rootfs")).unwrap();
        fs::write(dir.path().join("rootfs"), "").unwrap();
        assert!(matches!(
            load(dir.path()),
            Err(BundleError::RootfsNotADirectory(_))
        ));
    }

    #[test]
    fn rootfs_symlink_outside_the_bundle_is_rejected() {
        let outside = tempfile::tempdir().unwrap();
        let dir = bundle_with(MINIMAL);
        fs::remove_dir(dir.path().join("rootfs")).unwrap();
        symlink(outside.path(), dir.path().join("rootfs")).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(
            matches!(err, BundleError::RootfsOutsideBundle { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("outside the bundle"));
    }

    #[test]
    fn rootfs_dotdot_outside_the_bundle_is_rejected() {
        let parent = tempfile::tempdir().unwrap();
        fs::create_dir(parent.path().join("rootfs")).unwrap();
        let bundle = parent.path().join("bundle");
        fs::create_dir(&bundle).unwrap();
        fs::write(
            bundle.join(CONFIG_FILE),
            with_field("root", r#"{"path": "../rootfs"}"#),
        )
        .unwrap();
        assert!(matches!(
            load(&bundle),
            Err(BundleError::RootfsOutsideBundle { .. })
        ));
    }

    #[test]
    fn rootfs_symlink_inside_the_bundle_is_resolved() {
        let dir = bundle_with(MINIMAL);
        fs::rename(dir.path().join("rootfs"), dir.path().join("real")).unwrap();
        symlink("real", dir.path().join("rootfs")).unwrap();
        let bundle = load(dir.path()).unwrap();
        assert_eq!(bundle.rootfs, bundle.dir.join("real"));
    }

    #[test]
    fn absolute_rootfs_may_be_anywhere() {
        let elsewhere = tempfile::tempdir().unwrap();
        let root = format!(r#"{{"path": {:?}}}"#, elsewhere.path());
        let dir = bundle_with(&with_field("root", &root));
        let bundle = load(dir.path()).unwrap();
        assert_eq!(bundle.rootfs, fs::canonicalize(elsewhere.path()).unwrap());
    }
}
