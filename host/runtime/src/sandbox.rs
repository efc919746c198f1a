//! A sandbox's files and its monitor's command line (used by `create`, next).
//!
//! ```text
//! <root>/<id>/vsock.sock       husk-vmm's hybrid vsock socket (agent: CONNECT 1024)
//! <root>/<id>/shared/          the virtio-fs share (see `share`), tag [`SHARE_TAG`]
//! <root>/<id>/vmm.pid          husk-vmm's PID (so `delete` can make sure it is gone)
//! <root>/<id>/vmm.log          husk-vmm's own standard output and error
//! <console.log_dir>/<id>.log   the guest's serial console, capped at console.max_bytes
//! ```

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use crate::config::Config;
use crate::id::ContainerId;
use crate::sizing::VmSize;
use crate::store::Store;

/// The guest's vsock context ID (every microVM has its own vsock device, so one value serves all).
pub const GUEST_CID: u64 = 3;
/// The vsock port husk-agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// The hybrid vsock socket's name in the container's directory.
pub const VSOCK_FILE: &str = "vsock.sock";
/// The virtio-fs tag of the sandbox's share; the agent mounts it at `share::GUEST_SHARE_DIR`.
pub const SHARE_TAG: &str = "husk-shared";
/// The longest Unix socket path (`sun_path` is 108 bytes with its terminating NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// husk-vmm also creates `<vsock.sock>_<port>` listeners for guest-initiated connections:
/// room kept for `_` and a 10-digit port.
const PORT_SUFFIX: usize = 11;

/// Errors about a sandbox's files.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
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
}

/// Where a sandbox's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxPaths {
    /// `<root>/<id>`.
    pub dir: PathBuf,
    /// `<root>/<id>/vsock.sock`.
    pub vsock: PathBuf,
    /// `<root>/<id>/shared`.
    pub shared: PathBuf,
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
    pub fn new(store: &Store, config: &Config, id: &ContainerId) -> Result<Self, SandboxError> {
        let dir = store.container_dir(id);
        let vsock = dir.join(VSOCK_FILE);
        let len = vsock.as_os_str().len().saturating_add(PORT_SUFFIX);
        if len > MAX_SOCKET_PATH {
            return Err(SandboxError::SocketPathTooLong {
                path: vsock,
                len,
                max: MAX_SOCKET_PATH,
            });
        }
        let shared = dir.join("shared");
        if shared.as_os_str().as_encoded_bytes().contains(&b',') {
            return Err(SandboxError::CommaInPath(shared));
        }
        Ok(Self {
            shared,
            console: config.console.log_dir.join(format!("{id}.log")),
            vmm_pid: dir.join("vmm.pid"),
            vmm_log: dir.join("vmm.log"),
            vsock,
            dir,
        })
    }
}

/// The husk-vmm command line for a sandbox of `size`.
pub fn vmm_args(config: &Config, size: VmSize, paths: &SandboxPaths) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |flag: &str, value: OsString| {
        args.push(flag.into());
        args.push(value);
    };
    push("--kernel", config.guest.kernel.clone().into());
    push("--initrd", config.guest.initramfs.clone().into());
    push("--vcpus", size.vcpus.to_string().into());
    push("--memory-mib", size.memory_mib.to_string().into());
    push("--console", paths.console.clone().into());
    push(
        "--console-max-bytes",
        config.console.max_bytes.to_string().into(),
    );
    push("--vsock-uds", paths.vsock.clone().into());
    let mut fs = paths.shared.clone().into_os_string();
    fs.push(format!(",tag={SHARE_TAG}"));
    push("--fs", fs);
    push("--guest-cid", GUEST_CID.to_string().into());
    let quiet = if config.console.kernel_messages {
        ""
    } else {
        " quiet"
    };
    push(
        "--cmdline",
        format!("husk.agent_port={AGENT_PORT}{quiet}").into(),
    );
    args
}

/// The husk-vmm command for a sandbox (not started).
pub fn vmm_command(config: &Config, size: VmSize, paths: &SandboxPaths) -> Command {
    let mut command = Command::new(&config.vmm.path);
    command.args(vmm_args(config, size, paths));
    command
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
        let paths = SandboxPaths::new(&Store::new("/run/husk"), &config(), &id("c1")).unwrap();
        assert_eq!(paths.dir, Path::new("/run/husk/c1"));
        assert_eq!(paths.vsock, Path::new("/run/husk/c1/vsock.sock"));
        assert_eq!(paths.shared, Path::new("/run/husk/c1/shared"));
        assert_eq!(paths.console, Path::new("/var/log/husk/c1.log"));
    }

    #[test]
    fn podman_length_ids_fit_under_the_default_root() {
        let podman_id = "a".repeat(64);
        SandboxPaths::new(&Store::new("/run/husk"), &config(), &id(&podman_id)).unwrap();
    }

    #[test]
    fn too_long_socket_paths_are_refused() {
        let long = "b".repeat(100);
        let err = SandboxPaths::new(&Store::new("/run/husk"), &config(), &id(&long)).unwrap_err();
        assert!(
            err.to_string().contains("shorter --root or container ID"),
            "{err}"
        );
    }

    #[test]
    fn roots_with_a_comma_are_refused() {
        let err = SandboxPaths::new(&Store::new("/run/a,b"), &config(), &id("c1")).unwrap_err();
        assert!(matches!(err, SandboxError::CommaInPath(_)), "{err}");
    }

    #[test]
    fn vmm_command_line() {
        let config = config();
        let paths = SandboxPaths::new(&Store::new("/run/husk"), &config, &id("c1")).unwrap();
        let size = VmSize {
            vcpus: 2,
            memory_mib: 576,
        };
        let args: Vec<String> = vmm_args(&config, size, &paths)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--kernel",
                "/usr/share/husk/vmlinux",
                "--initrd",
                "/usr/share/husk/initramfs.cpio.gz",
                "--vcpus",
                "2",
                "--memory-mib",
                "576",
                "--console",
                "/var/log/husk/c1.log",
                "--console-max-bytes",
                "16777216",
                "--vsock-uds",
                "/run/husk/c1/vsock.sock",
                "--fs",
                "/run/husk/c1/shared,tag=husk-shared",
                "--guest-cid",
                "3",
                "--cmdline",
                "husk.agent_port=1024 quiet",
            ]
        );
        assert_eq!(
            vmm_command(&config, size, &paths).get_program(),
            "/usr/bin/husk-vmm"
        );
        // With console.kernel_messages the kernel is not quiet.
        let mut loud = config.clone();
        loud.console.kernel_messages = true;
        let args = vmm_args(&loud, size, &paths);
        assert_eq!(
            args.last().map(|a| a.to_str().unwrap()),
            Some("husk.agent_port=1024")
        );
    }
}
