//! `husk spec`: writes a default config.json into the bundle, like `runc spec`.
//!
//! The default runs `sh` on a terminal in `rootfs/` (read-only), with runc's mounts, and only the
//! namespaces husk supports (see `features`). An existing config.json is never overwritten.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespace, Spec};

use super::{features, CommandError};
use crate::bundle::CONFIG_FILE;
use crate::exit;

/// Arguments of `husk spec`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The bundle directory to write config.json into (default: the current directory).
    #[arg(long, short = 'b', value_name = "DIR", default_value = ".")]
    pub bundle: PathBuf,
}

/// Errors of `husk spec`.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// runc's refusal, kept word for word.
    #[error("File {0} exists. Remove it first")]
    Exists(PathBuf),
    /// The bundle directory is missing, or config.json cannot be written.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The default spec cannot be built or serialized (a bug).
    #[error("cannot build the default spec: {0}")]
    Build(String),
}

impl SpecError {
    /// The exit status for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            SpecError::Exists(_) => exit::ALREADY_EXISTS,
            SpecError::Write { .. } | SpecError::Build(_) => exit::FAILURE,
        }
    }
}

/// The default spec: oci-spec's runc-like default, adjusted to husk.
pub fn default_spec() -> Result<Spec, SpecError> {
    let mut spec = Spec::default();
    spec.set_version(oci_spec::runtime::VERSION.to_owned());
    spec.set_hostname(Some("husk".to_owned()));
    if let Some(process) = spec.process_mut() {
        process.set_terminal(Some(true));
    }
    let linux = spec
        .linux_mut()
        .as_mut()
        .ok_or_else(|| SpecError::Build("the default spec has no linux section".into()))?;
    let namespaces: Vec<LinuxNamespace> = linux
        .namespaces()
        .iter()
        .flatten()
        .filter(|ns| features::NAMESPACES.contains(&ns.typ()))
        .cloned()
        .collect();
    linux.set_namespaces(Some(namespaces));
    Ok(spec)
}

/// Writes the default spec to `<bundle>/config.json`, failing if it exists (atomically:
/// `O_CREAT|O_EXCL`).
pub fn write_default(bundle: &Path) -> Result<PathBuf, SpecError> {
    let path = bundle.join(CONFIG_FILE);
    let json = serde_json::to_string_pretty(&default_spec()?)
        .map_err(|err| SpecError::Build(err.to_string()))?;
    let write_error = |source| SpecError::Write {
        path: path.clone(),
        source,
    };
    let mut file = match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
            return Err(SpecError::Exists(path))
        }
        Err(err) => return Err(write_error(err)),
    };
    file.write_all(json.as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all())
        .map_err(write_error)?;
    Ok(path)
}

/// Runs `husk spec`.
pub fn run(args: &Args) -> Result<u8, CommandError> {
    let path = write_default(&args.bundle)?;
    tracing::debug!(path = %path.display(), "wrote the default spec");
    Ok(exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_spec_uses_only_supported_namespaces() {
        let spec = default_spec().unwrap();
        let namespaces = spec.linux().as_ref().unwrap().namespaces().clone().unwrap();
        assert!(!namespaces.is_empty());
        for ns in namespaces {
            assert!(features::NAMESPACES.contains(&ns.typ()), "{:?}", ns.typ());
        }
    }

    #[test]
    fn default_spec_runs_sh_in_rootfs() {
        let spec = default_spec().unwrap();
        let process = spec.process().as_ref().unwrap();
        assert_eq!(process.args().as_deref(), Some(&["sh".to_owned()][..]));
        assert_eq!(spec.root().as_ref().unwrap().path(), Path::new("rootfs"));
        assert_eq!(spec.version(), oci_spec::runtime::VERSION);
    }

    #[test]
    fn writes_once_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = write_default(dir.path()).unwrap();
        let first = std::fs::read(&path).unwrap();
        let err = write_default(dir.path()).unwrap_err();
        assert!(matches!(err, SpecError::Exists(_)), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), first);
    }

    #[test]
    fn missing_bundle_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_default(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(err, SpecError::Write { .. }), "{err}");
    }
}
