//! A sandbox's files, and husk-vmm's configuration for it.
//!
//! ```text
//! <root>/<id>/vm/              the one host directory husk-vmm's jail keeps (writable)
//! <root>/<id>/vm/vsock         husk-vmm's hybrid vsock socket (agent: CONNECT 1024)
//! <root>/<id>/shared/          the virtio-fs share as the guest sees it (see `share`), tag
//!                              [`SHARE_TAG`]: a read-only view of staging/
//! <root>/<id>/staging/         the host's side of the share: mount points and binds
//! <root>/<id>/vmm.pid          husk-vmm's PID (so `delete` can make sure it is gone)
//! <root>/<id>/vmm.log          husk-vmm's own standard output and error
//! <console.log_dir>/<id>.log   the guest's serial console, capped at console.max_bytes
//! ```

use std::path::{Path, PathBuf};

use husk_vmm_config::{FsSpec, VmmConfig};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::id::ContainerId;
use crate::sizing::VmSize;

/// The guest's vsock context ID (every microVM has its own vsock device, so one value serves all).
pub const GUEST_CID: u64 = 3;
/// The vsock port husk-agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// The directory of the sandbox holding husk-vmm's sockets: the only host directory its jail
/// keeps, so nothing else of the sandbox's files is within its reach.
pub const VMM_DIR: &str = "vm";
/// The hybrid vsock socket's name in [`VMM_DIR`].
pub const VSOCK_FILE: &str = "vsock";

/// The vsock socket of the sandbox whose directory is `dir` (`<dir>/vm/vsock`).
pub fn vsock_path(dir: &Path) -> PathBuf {
    dir.join(VMM_DIR).join(VSOCK_FILE)
}
/// The virtio-fs tag of the sandbox's share; the agent mounts it at `share::GUEST_SHARE_DIR`.
pub const SHARE_TAG: &str = "husk-shared";
/// The longest Unix socket path (`sun_path` is 108 bytes with its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// husk-vmm also creates `<vsock.sock>_<port>` listeners for guest-initiated connections:
/// room kept for `_` and a 10-digit port.
const PORT_SUFFIX: usize = 11;

/// Errors about a sandbox's files and husk-vmm's configuration for them.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// A socket path longer than Unix sockets allow.
    #[error("socket path {path} is {len} bytes long, more than the {max} a Unix socket allows: use a shorter --root or container ID")]
    SocketPathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
    /// husk-vmm's `--fs PATH,tag=TAG` cannot carry a path with a comma.
    #[error("the share path {0} contains a comma, which husk-vmm's --fs cannot carry: use another --root")]
    CommaInPath(PathBuf),
    /// The share cannot be described to husk-vmm.
    #[error("the share {path} cannot be given to husk-vmm: {source}")]
    Share {
        path: PathBuf,
        #[source]
        source: husk_vmm_config::SpecError,
    },
}

/// Where a sandbox's files are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxPaths {
    /// `<root>/<id>`.
    pub dir: PathBuf,
    /// `<root>/<id>/vm/vsock` (its directory: husk-vmm's jail keeps it).
    pub vsock: PathBuf,
    /// `<root>/<id>/shared`: what husk-vmm exports (see `share`).
    pub shared: PathBuf,
    /// `<root>/<id>/staging`: the host's side of the share, never exported.
    pub staging: PathBuf,
    /// `<console.log_dir>/<id>.log`.
    pub console: PathBuf,
    /// husk-vmm's PID, written by the supervisor once it started it.
    pub vmm_pid: PathBuf,
    /// husk-vmm's standard output and error.
    pub vmm_log: PathBuf,
}

impl SandboxPaths {
    /// The paths of sandbox `id`; fails when the vsock socket path (with the port suffix
    /// husk-vmm adds for guest-initiated connections) would be too long.
    /// `root` is the directory holding every sandbox (the runtime's `--root`, the shim's state
    /// root).
    pub fn new(root: &Path, config: &Config, id: &ContainerId) -> Result<Self, PathError> {
        let dir = root.join(id.as_str());
        let vsock = vsock_path(&dir);
        let len = vsock.as_os_str().len().saturating_add(PORT_SUFFIX);
        if len > MAX_SOCKET_PATH {
            return Err(PathError::SocketPathTooLong {
                path: vsock,
                len,
                max: MAX_SOCKET_PATH,
            });
        }
        let shared = dir.join("shared");
        if shared.as_os_str().as_encoded_bytes().contains(&b',') {
            return Err(PathError::CommaInPath(shared));
        }
        Ok(Self {
            staging: dir.join("staging"),
            shared,
            console: config.console.log_dir.join(format!("{id}.log")),
            vmm_pid: dir.join("vmm.pid"),
            vmm_log: dir.join("vmm.log"),
            vsock,
            dir,
        })
    }
}

impl SandboxPaths {
    /// The two sides of the sandbox's share.
    pub fn share(&self) -> crate::share::ShareDirs<'_> {
        crate::share::ShareDirs {
            host: &self.staging,
            guest: &self.shared,
        }
    }
}

/// husk-vmm's configuration for a sandbox of `size`: the one definition of its command line.
pub fn vmm_config(
    config: &Config,
    size: VmSize,
    paths: &SandboxPaths,
) -> Result<VmmConfig, PathError> {
    let share = FsSpec::new(paths.shared.clone(), SHARE_TAG.to_owned()).map_err(|source| {
        PathError::Share {
            path: paths.shared.clone(),
            source,
        }
    })?;
    let quiet = if config.console.kernel_messages {
        ""
    } else {
        " quiet"
    };
    let mut vmm = VmmConfig::new(config.guest.kernel.clone());
    vmm.initrd = Some(config.guest.initramfs.clone());
    vmm.vcpus = u8::try_from(size.vcpus).unwrap_or(u8::MAX);
    vmm.memory_mib = u64::from(size.memory_mib);
    vmm.console = paths.console.to_string_lossy().into_owned();
    vmm.console_max_bytes = config.console.max_bytes;
    vmm.vsock_uds = Some(paths.vsock.clone());
    vmm.guest_cid = Some(GUEST_CID);
    vmm.fs = vec![share];
    vmm.cmdline = format!("husk.agent_port={AGENT_PORT}{quiet}");
    Ok(vmm)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{self, Discovery};

    fn config() -> Config {
        let discovery = Discovery {
            exe: "/usr/bin/husk".into(),
            path_var: None,
        };
        config::load(Path::new("/nonexistent/husk.toml"), false, &discovery).unwrap()
    }

    fn id(s: &str) -> ContainerId {
        ContainerId::new(s).unwrap()
    }

    #[test]
    fn paths_of_a_sandbox() {
        let paths = SandboxPaths::new(Path::new("/run/husk"), &config(), &id("c1")).unwrap();
        assert_eq!(paths.dir, Path::new("/run/husk/c1"));
        assert_eq!(paths.vsock, Path::new("/run/husk/c1/vm/vsock"));
        assert_eq!(paths.shared, Path::new("/run/husk/c1/shared"));
        assert_eq!(paths.console, Path::new("/var/log/husk/c1.log"));
    }

    #[test]
    fn podman_length_ids_fit_under_the_default_root() {
        let podman_id = "a".repeat(64);
        SandboxPaths::new(Path::new("/run/husk"), &config(), &id(&podman_id)).unwrap();
    }

    #[test]
    fn too_long_socket_paths_are_refused() {
        let long = "b".repeat(100);
        let err = SandboxPaths::new(Path::new("/run/husk"), &config(), &id(&long)).unwrap_err();
        assert!(
            err.to_string().contains("shorter --root or container ID"),
            "{err}"
        );
    }

    #[test]
    fn roots_with_a_comma_are_refused() {
        let err = SandboxPaths::new(Path::new("/run/a,b"), &config(), &id("c1")).unwrap_err();
        assert!(matches!(err, PathError::CommaInPath(_)), "{err}");
    }

    #[test]
    fn vmm_configuration_of_a_sandbox() {
        let config = config();
        let paths = SandboxPaths::new(Path::new("/run/husk"), &config, &id("c1")).unwrap();
        let size = VmSize {
            vcpus: 2,
            memory_mib: 576,
        };
        let vmm = vmm_config(&config, size, &paths).unwrap();
        assert_eq!(vmm.kernel, Path::new("/usr/share/husk/vmlinux"));
        assert_eq!(
            vmm.initrd.as_deref(),
            Some(Path::new("/usr/share/husk/initramfs.cpio.gz"))
        );
        assert_eq!((vmm.vcpus, vmm.memory_mib), (2, 576));
        assert_eq!(vmm.console, "/var/log/husk/c1.log");
        assert_eq!(vmm.console_max_bytes, 16 << 20);
        assert_eq!(
            vmm.vsock_uds.as_deref(),
            Some(Path::new("/run/husk/c1/vm/vsock"))
        );
        assert_eq!(vmm.guest_cid, Some(GUEST_CID));
        assert_eq!(vmm.fs.len(), 1);
        assert_eq!(vmm.fs[0].path, Path::new("/run/husk/c1/shared"));
        assert_eq!(vmm.fs[0].tag, SHARE_TAG);
        assert_eq!(vmm.cmdline, "husk.agent_port=1024 quiet");
        // What husk-vmm parses back from the command line is the same configuration.
        let argv = std::iter::once(std::ffi::OsString::from("husk-vmm")).chain(vmm.to_args());
        assert_eq!(
            <VmmConfig as clap::Parser>::try_parse_from(argv).unwrap(),
            vmm
        );
        // With console.kernel_messages the kernel is not quiet.
        let mut loud = config.clone();
        loud.console.kernel_messages = true;
        let vmm = vmm_config(&loud, size, &paths).unwrap();
        assert_eq!(vmm.cmdline, "husk.agent_port=1024");
    }
}
