//! The shim's `start` command: containerd runs it (in the task's bundle) to get the address of
//! the shim that will serve the task. It starts the shim server of the task's group (a pod, or
//! the standalone container), or finds it already running, and answers with its address.
//!
//! Two protocols, chosen by what containerd actually sends (as containerd's own shims do):
//! - **bootstrap** (containerd 2.3+): a `BootstrapParams` message on stdin, naming the same task
//!   and namespace as the command line; the answer is a `BootstrapResult` message;
//! - **flags** (containerd 1.x and 2.0-2.2): `-id`, `-namespace`, `-address` and the
//!   `TTRPC_ADDRESS` variable, the runtime options (a protobuf `Any`) or nothing on stdin; the
//!   answer is the address as text.
//!
//! husk takes no containerd runtime options (its configuration is `/etc/husk/config.toml`), so
//! those are read, checked and left alone.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::Message;
use containerd_shim::Flags;
use tokio::io::AsyncReadExt;
use tracing::{debug, warn};

use crate::bootstrap::{BootstrapError, BootstrapParams, BootstrapResult, MAX_INPUT};
use crate::pod;

/// The variable containerd (all lines) sets to its ttrpc address.
pub const TTRPC_ADDRESS_ENV: &str = "TTRPC_ADDRESS";
/// The variable naming the shim socket directory (containerd's `socket_dir` before the
/// bootstrap protocol carried it).
pub const SOCKET_DIR_ENV: &str = "SHIM_SOCKET_DIR";
/// A Unix socket path's limit (`sockaddr_un.sun_path` without its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why `start` failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot read stdin: {0}")]
    Stdin(#[source] std::io::Error),
    #[error("stdin holds more than {MAX_INPUT} bytes")]
    TooLarge,
    #[error(
        "stdin holds neither bootstrap parameters for task {id:?} in namespace {namespace:?} \
         nor runtime options (a protobuf Any): {source}"
    )]
    Unrecognised {
        id: String,
        namespace: String,
        source: BootstrapError,
    },
    #[error("no {0} given (neither on the command line nor in bootstrap parameters)")]
    Missing(&'static str),
    #[error(
        "no ttrpc address: {TTRPC_ADDRESS_ENV} is not set and no bootstrap parameters name one"
    )]
    NoTtrpcAddress,
    #[error("shim socket directory {0:?} is not an absolute path")]
    SocketDirNotAbsolute(String),
    #[error(
        "shim socket path {0:?} is longer than {MAX_SOCKET_PATH} bytes: use a shorter socket_dir"
    )]
    SocketPathTooLong(String),
    #[error("cannot start the shim server: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("cannot write the address file: {0}")]
    AddressFile(#[source] std::io::Error),
    #[error(transparent)]
    Encode(#[from] BootstrapError),
}

/// How containerd talks to this `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// containerd 2.3+: `BootstrapParams` in, `BootstrapResult` out.
    Bootstrap,
    /// containerd 1.x, 2.0-2.2: flags and environment in, the address as text out.
    Flags,
}

/// Everything `start` needs, whichever protocol brought it.
#[derive(Debug, Clone, PartialEq)]
pub struct StartRequest {
    pub protocol: Protocol,
    /// The task ID.
    pub id: String,
    pub namespace: String,
    /// containerd's gRPC address (part of the shim socket's name).
    pub grpc_address: String,
    /// containerd's ttrpc address, where the server publishes events.
    pub ttrpc_address: String,
    pub debug: bool,
    /// The shim socket directory, when containerd names one.
    pub socket_dir: Option<String>,
    /// The type of the runtime options containerd passed, if any (husk takes none).
    pub options_type: Option<String>,
}

impl StartRequest {
    /// Reads the request from the command line, the environment's `TTRPC_ADDRESS` and
    /// `SHIM_SOCKET_DIR`, and stdin: bootstrap parameters when stdin decodes as such and names
    /// the task and namespace of the command line (runtime options of older containerd lines
    /// decode too, with other values), else the flag protocol.
    pub fn parse(
        flags: &Flags,
        ttrpc_env: Option<String>,
        socket_dir_env: Option<String>,
        stdin: &[u8],
    ) -> Result<Self, StartError> {
        let bootstrap = (!stdin.is_empty())
            .then(|| BootstrapParams::decode(stdin))
            .and_then(Result::ok)
            .filter(|p| {
                !p.instance_id.is_empty()
                    && !p.namespace.is_empty()
                    && (flags.id.is_empty() || flags.id == p.instance_id)
                    && (flags.namespace.is_empty() || flags.namespace == p.namespace)
            });
        let request = match bootstrap {
            Some(params) => {
                let debug = params.debug() || flags.debug;
                let options_type = params.extensions.first().map(|a| a.type_url.clone());
                StartRequest {
                    protocol: Protocol::Bootstrap,
                    grpc_address: non_empty(params.containerd_grpc_address)
                        .unwrap_or_else(|| flags.address.clone()),
                    // containerd-shim's event publisher takes a socket path, not a URL.
                    ttrpc_address: non_empty(params.containerd_ttrpc_address)
                        .map(|a| a.strip_prefix("unix://").map(str::to_owned).unwrap_or(a))
                        .or(ttrpc_env)
                        .ok_or(StartError::NoTtrpcAddress)?,
                    socket_dir: params.socket_dir.or(socket_dir_env),
                    id: params.instance_id,
                    namespace: params.namespace,
                    debug,
                    options_type,
                }
            }
            None => {
                let options_type = if stdin.is_empty() {
                    None
                } else {
                    let options =
                        Any::parse_from_bytes(stdin).map_err(|err| StartError::Unrecognised {
                            id: flags.id.clone(),
                            namespace: flags.namespace.clone(),
                            source: err.into(),
                        })?;
                    Some(options.type_url)
                };
                StartRequest {
                    protocol: Protocol::Flags,
                    id: flags.id.clone(),
                    namespace: flags.namespace.clone(),
                    grpc_address: flags.address.clone(),
                    ttrpc_address: ttrpc_env.ok_or(StartError::NoTtrpcAddress)?,
                    debug: flags.debug,
                    socket_dir: socket_dir_env,
                    options_type,
                }
            }
        };
        if request.id.is_empty() {
            return Err(StartError::Missing("task ID (-id)"));
        }
        if request.namespace.is_empty() {
            return Err(StartError::Missing("namespace (-namespace)"));
        }
        Ok(request)
    }

    /// The address of the shim serving `grouping` (containerd's naming: a SHA-256 of its own
    /// address, the namespace and the group, in `/run/containerd/s` or the socket directory).
    pub fn socket_address(&self, grouping: &str) -> Result<String, StartError> {
        let default =
            containerd_shim::socket_address(&self.grpc_address, &self.namespace, grouping);
        let Some(dir) = self.socket_dir.as_deref().filter(|d| !d.is_empty()) else {
            return Ok(default);
        };
        if !Path::new(dir).is_absolute() {
            return Err(StartError::SocketDirNotAbsolute(dir.to_owned()));
        }
        let name = default.rsplit('/').next().unwrap_or_default();
        let path = Path::new(dir).join(name);
        let path = path.to_string_lossy();
        if path.len() > MAX_SOCKET_PATH {
            return Err(StartError::SocketPathTooLong(path.into_owned()));
        }
        Ok(format!("unix://{path}"))
    }

    /// What containerd reads on stdout: the protocol's answer for `address`.
    pub fn answer(&self, address: &str) -> Result<Vec<u8>, StartError> {
        match self.protocol {
            Protocol::Bootstrap => Ok(BootstrapResult::ttrpc(address).encode()?),
            Protocol::Flags => Ok(address.as_bytes().to_vec()),
        }
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Reads stdin to its end, at most [`MAX_INPUT`] bytes; nothing when it is a terminal (someone
/// running the command by hand).
pub fn read_stdin() -> Result<Vec<u8>, StartError> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(Vec::new());
    }
    let mut input = Vec::new();
    stdin
        .lock()
        .take(MAX_INPUT as u64 + 1)
        .read_to_end(&mut input)
        .map_err(StartError::Stdin)?;
    if input.len() > MAX_INPUT {
        return Err(StartError::TooLarge);
    }
    Ok(input)
}

/// The group of the task in the bundle in the current directory (containerd runs `start`
/// there): its pod's sandbox ID, or its own ID.
fn grouping(id: &str) -> String {
    match husk_runtime::bundle::load(Path::new(".")) {
        Ok(bundle) => pod::grouping(&bundle.spec, id),
        Err(err) => {
            warn!(%err, "cannot read the bundle; the task gets a shim of its own");
            id.to_owned()
        }
    }
}

/// Starts (or finds) the server of the request's group and returns its address; writes it to
/// the bundle's `address` file, which `delete` reads.
pub async fn serve(request: &StartRequest) -> Result<String, StartError> {
    if let Some(options) = &request.options_type {
        debug!(%options, "runtime options ignored: husk is configured by its config.toml");
    }
    let address = request.socket_address(&grouping(&request.id))?;
    spawn_server(request, &address).await?;
    std::fs::write("address", &address).map_err(StartError::AddressFile)?;
    Ok(address)
}

/// Runs this binary as the server on `address` and waits until it listens: the server closes
/// its stdout once it serves (or once it found another server of the group on `address`, and
/// exited). containerd-shim's server mode binds the socket, or reuses a live one.
async fn spawn_server(request: &StartRequest, address: &str) -> Result<(), StartError> {
    let exe = std::env::current_exe().map_err(StartError::Spawn)?;
    let cwd: PathBuf = std::env::current_dir().map_err(StartError::Spawn)?;
    let mut command = tokio::process::Command::new(exe);
    command
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .env(TTRPC_ADDRESS_ENV, &request.ttrpc_address)
        .args(["-namespace", &request.namespace, "-id", &request.id])
        .args(["-address", &request.grpc_address, "-socket", address]);
    if request.debug {
        command.arg("-debug");
    }
    let mut child = command.spawn().map_err(StartError::Spawn)?;
    if let Some(pid) = child.id() {
        // The shim is killed before containerd when memory runs out, as containerd's shims.
        if let Err(err) = containerd_shim::cgroup::adjust_oom_score(pid) {
            warn!(%err, "cannot adjust the shim server's OOM score");
        }
    }
    if let Some(mut out) = child.stdout.take() {
        let mut sink = Vec::new();
        out.read_to_end(&mut sink)
            .await
            .map_err(StartError::Spawn)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(id: &str, namespace: &str) -> Flags {
        Flags {
            id: id.to_owned(),
            namespace: namespace.to_owned(),
            address: "/run/containerd/containerd.sock".to_owned(),
            action: "start".to_owned(),
            ..Default::default()
        }
    }

    const TTRPC: &str = "/run/containerd/containerd.sock.ttrpc";

    /// BootstrapParams as containerd 2.3 writes them, assembled by hand: instance_id, namespace,
    /// containerd_ttrpc_address, containerd_grpc_address and, if given, socket_dir.
    fn bootstrap_input(id: &str, namespace: &str, socket_dir: Option<&str>) -> Vec<u8> {
        let mut b = Vec::new();
        let mut field = |tag: u8, value: &str| {
            b.push(tag);
            b.push(value.len() as u8);
            b.extend_from_slice(value.as_bytes());
        };
        field(0x0a, id);
        field(0x12, namespace);
        field(0x2a, "unix:///run/containerd/containerd.sock.ttrpc");
        field(0x32, "/run/containerd/containerd.sock");
        if let Some(dir) = socket_dir {
            field(0x4a, dir);
        }
        b
    }

    /// The runtime options of a CRI runtime table (`runtimeoptions.v1.Options` with a
    /// config_path), as containerd 1.6-2.2 write them on stdin: a bare Any.
    fn options_input() -> Vec<u8> {
        let mut any = Any::new();
        any.type_url = "runtimeoptions.v1.Options".to_owned();
        any.value = b"\x12\x14/etc/husk/other.toml".to_vec();
        any.write_to_bytes().unwrap()
    }

    #[test]
    fn containerd_2_3_bootstrap_parameters_choose_the_bootstrap_protocol() {
        let input = bootstrap_input("id1", "default", None);
        let request = StartRequest::parse(&flags("id1", "default"), None, None, &input).unwrap();
        assert_eq!(request.protocol, Protocol::Bootstrap);
        assert_eq!(request.id, "id1");
        assert_eq!(request.namespace, "default");
        assert_eq!(request.grpc_address, "/run/containerd/containerd.sock");
        assert_eq!(
            request.ttrpc_address, TTRPC,
            "the unix:// URL becomes a path"
        );
        assert!(!request.debug);
        assert_eq!(request.socket_dir, None);
    }

    #[test]
    fn the_bootstrap_answer_is_a_bootstrap_result_message() {
        let input = bootstrap_input("id1", "default", None);
        let request = StartRequest::parse(&flags("id1", "default"), None, None, &input).unwrap();
        let answer = request.answer("unix:///run/containerd/s/ab").unwrap();
        assert_eq!(
            answer,
            BootstrapResult::ttrpc("unix:///run/containerd/s/ab")
                .encode()
                .unwrap()
        );
        // version 2 (task API v2), then the address, then "ttrpc".
        assert_eq!(&answer[..2], &[0x08, 0x02]);
        assert!(answer.ends_with(b"\x1a\x05ttrpc"));
    }

    #[test]
    fn containerd_1_x_and_2_0_without_options_use_the_flag_protocol() {
        let request =
            StartRequest::parse(&flags("id1", "default"), Some(TTRPC.to_owned()), None, &[])
                .unwrap();
        assert_eq!(request.protocol, Protocol::Flags);
        assert_eq!(request.ttrpc_address, TTRPC);
        assert_eq!(request.options_type, None);
        assert_eq!(
            request.answer("unix:///run/containerd/s/ab").unwrap(),
            b"unix:///run/containerd/s/ab"
        );
    }

    #[test]
    fn runtime_options_on_stdin_mean_the_flag_protocol_and_are_ignored() {
        let request = StartRequest::parse(
            &flags("id1", "k8s.io"),
            Some(TTRPC.to_owned()),
            None,
            &options_input(),
        )
        .unwrap();
        assert_eq!(request.protocol, Protocol::Flags);
        assert_eq!(
            request.options_type.as_deref(),
            Some("runtimeoptions.v1.Options")
        );
    }

    #[test]
    fn bootstrap_parameters_for_another_task_are_not_trusted() {
        // Decodes as BootstrapParams, but names another task: containerd's rule is that only a
        // matching identity makes it the bootstrap protocol; as runtime options it is a
        // well-formed Any too, so the flag protocol goes on with the command line's values.
        let input = bootstrap_input("other", "default", None);
        let request = StartRequest::parse(
            &flags("id1", "default"),
            Some(TTRPC.to_owned()),
            None,
            &input,
        )
        .unwrap();
        assert_eq!(request.protocol, Protocol::Flags);
        assert_eq!(request.id, "id1");
    }

    #[test]
    fn garbage_on_stdin_is_an_error_naming_the_task() {
        let err = StartRequest::parse(
            &flags("id1", "default"),
            Some(TTRPC.to_owned()),
            None,
            &[0x0a, 0x09, b'x'],
        )
        .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("\"id1\""), "{message}");
        assert!(
            message.contains("neither bootstrap parameters"),
            "{message}"
        );
    }

    #[test]
    fn the_flag_protocol_needs_the_ttrpc_address_and_an_id() {
        assert!(matches!(
            StartRequest::parse(&flags("id1", "default"), None, None, &[]),
            Err(StartError::NoTtrpcAddress)
        ));
        assert!(matches!(
            StartRequest::parse(&flags("", "default"), Some(TTRPC.to_owned()), None, &[]),
            Err(StartError::Missing(_))
        ));
    }

    #[test]
    fn bootstrap_parameters_alone_are_enough() {
        // A containerd that passes no flags at all (the bootstrap protocol's aim).
        let input = bootstrap_input("id1", "default", None);
        let request = StartRequest::parse(&Flags::default(), None, None, &input).unwrap();
        assert_eq!(request.protocol, Protocol::Bootstrap);
        assert_eq!(request.id, "id1");
    }

    #[test]
    fn debug_comes_from_the_log_level_or_the_flag() {
        let mut input = bootstrap_input("id1", "default", None);
        input.extend_from_slice(&[
            0x18, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ]);
        let request = StartRequest::parse(&flags("id1", "default"), None, None, &input).unwrap();
        assert!(request.debug, "log level -8 (trace) means debug");
        let mut debug_flags = flags("id1", "default");
        debug_flags.debug = true;
        let request = StartRequest::parse(&debug_flags, Some(TTRPC.to_owned()), None, &[]).unwrap();
        assert!(request.debug);
    }

    #[test]
    fn the_socket_goes_where_containerd_says() {
        let request =
            StartRequest::parse(&flags("id1", "default"), Some(TTRPC.to_owned()), None, &[])
                .unwrap();
        let default = request.socket_address("pod1").unwrap();
        assert!(
            default.starts_with("unix:///run/containerd/s/"),
            "{default}"
        );
        let hash = default.rsplit('/').next().unwrap();
        assert_eq!(hash.len(), 64);

        let input = bootstrap_input("id1", "default", Some("/run/c2/s"));
        let request = StartRequest::parse(
            &flags("id1", "default"),
            None,
            Some("/ignored".to_owned()),
            &input,
        )
        .unwrap();
        assert_eq!(
            request.socket_address("pod1").unwrap(),
            format!("unix:///run/c2/s/{hash}")
        );

        let request = StartRequest::parse(
            &flags("id1", "default"),
            Some(TTRPC.to_owned()),
            Some("/run/env-s".to_owned()),
            &[],
        )
        .unwrap();
        assert_eq!(
            request.socket_address("pod1").unwrap(),
            format!("unix:///run/env-s/{hash}")
        );
    }

    #[test]
    fn a_bad_socket_directory_is_refused_by_name() {
        for (dir, want) in [
            ("relative/s", "not an absolute path"),
            (&*format!("/{}", "d".repeat(60)), "longer than 107 bytes"),
        ] {
            let input = bootstrap_input("id1", "default", Some(dir));
            let request =
                StartRequest::parse(&flags("id1", "default"), None, None, &input).unwrap();
            let err = request.socket_address("pod1").unwrap_err().to_string();
            assert!(err.contains(want), "{dir}: {err}");
        }
    }
}
