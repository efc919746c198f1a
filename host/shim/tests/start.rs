//! The shim binary's `start`, `-info` and `-v` as containerd runs them, with no containerd and
//! no VM: a bundle directory, a listening socket standing in for containerd's ttrpc address,
//! and stdin as containerd 2.3 (bootstrap protocol) or 1.x-2.2 (flags) write it. The server
//! started is then driven over ttrpc (Connect, Shutdown), as containerd would. Needs no root:
//! the shim socket goes to a temporary socket directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use containerd_shim::protos::protobuf::{CodedInputStream, Message};
use containerd_shim::protos::shim_async::TaskClient;
use containerd_shim::protos::ttrpc::asynchronous::Client;
use containerd_shim::protos::ttrpc::context;
use containerd_shim::protos::types::introspection::RuntimeInfo;

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-husk-v2");

/// A temporary directory with a short path (the socket path must fit in 107 bytes).
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let path = PathBuf::from(format!("/tmp/husk-shim-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Dir(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A bundle as containerd prepares it for `start`: the shim's log file is there (containerd's
/// is a FIFO; a file takes the lines as well).
fn bundle(dir: &Path, name: &str) -> PathBuf {
    let bundle = dir.join(name);
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("log"), "").unwrap();
    bundle
}

fn run(bundle: &Path, args: &[&str], env: &[(&str, &Path)], stdin: &[u8]) -> Output {
    let mut child = Command::new(SHIM)
        .args(args)
        .current_dir(bundle)
        .env_remove("TTRPC_ADDRESS")
        .env_remove("SHIM_SOCKET_DIR")
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{SHIM} {args:?}: {:?}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A length-delimited protobuf field (tag byte, one-byte length).
fn field(out: &mut Vec<u8>, tag: u8, value: &[u8]) {
    out.push(tag);
    out.push(u8::try_from(value.len()).unwrap());
    out.extend_from_slice(value);
}

/// BootstrapParams as containerd 2.3 writes them (fields 1, 2, 5, 6, 7, 9; log level unset).
fn bootstrap_params(id: &str, namespace: &str, ttrpc: &Path, socket_dir: &Path) -> Vec<u8> {
    let mut b = Vec::new();
    field(&mut b, 0x0a, id.as_bytes());
    field(&mut b, 0x12, namespace.as_bytes());
    field(
        &mut b,
        0x2a,
        format!("unix://{}", ttrpc.display()).as_bytes(),
    );
    field(&mut b, 0x32, b"/run/containerd-test/containerd.sock");
    field(&mut b, 0x3a, b"/usr/bin/containerd");
    field(&mut b, 0x4a, socket_dir.to_str().unwrap().as_bytes());
    b
}

/// Decodes BootstrapResult: (version, address, protocol).
fn bootstrap_result(bytes: &[u8]) -> (i32, String, String) {
    let mut input = CodedInputStream::from_bytes(bytes);
    let (mut version, mut address, mut protocol) = (0, String::new(), String::new());
    while let Some(tag) = input.read_raw_tag_or_eof().unwrap() {
        match tag {
            0x08 => version = input.read_int32().unwrap(),
            0x12 => address = input.read_string().unwrap(),
            0x1a => protocol = input.read_string().unwrap(),
            other => panic!("unexpected tag {other:#x} in {bytes:?}"),
        }
    }
    (version, address, protocol)
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Connects to the server at `address`, checks it answers, sends Shutdown and waits (10 s) for
/// it to exit and remove its socket.
fn connect_and_shut_down(address: &str, id: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let pid = runtime.block_on(async {
        let client = TaskClient::new(Client::connect(address).await.unwrap());
        let connected = client
            .connect(
                context::with_timeout(5_000_000_000),
                &containerd_shim::api::ConnectRequest {
                    id: id.to_owned(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        client
            .shutdown(
                context::with_timeout(5_000_000_000),
                &containerd_shim::api::ShutdownRequest {
                    id: id.to_owned(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        connected.shim_pid
    });
    let pid = i32::try_from(pid).unwrap();
    assert!(pid > 0, "Connect reported no shim pid");
    let socket = PathBuf::from(address.strip_prefix("unix://").unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while (alive(pid) || socket.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // The server was our child's child: once it exits it is reaped by init, or a zombie of
    // the process that outlived it, which kill(0) still finds; /proc/PID/stat says which.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie_or_gone = state.is_empty() || state.split(' ').nth(2) == Some("Z");
    assert!(
        zombie_or_gone,
        "shim server {pid} still runs after Shutdown"
    );
    assert!(!socket.exists(), "{} left after Shutdown", socket.display());
}

#[test]
fn containerd_2_3_bootstrap_start_answers_a_bootstrap_result_and_serves_there() {
    let dir = Dir::new("boot");
    let ttrpc = dir.0.join("ttrpc.sock");
    let _containerd = UnixListener::bind(&ttrpc).unwrap();
    let sockets = dir.0.join("s");
    let bundle = bundle(&dir.0, "b1");

    let stdin = bootstrap_params("task-1", "default", &ttrpc, &sockets);
    // containerd 2.3 still passes the flags (no TTRPC_ADDRESS here: the parameters carry it).
    let args = [
        "-namespace",
        "default",
        "-id",
        "task-1",
        "-address",
        "/x",
        "start",
    ];
    let out = run(&bundle, &args, &[], &stdin);
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (version, address, protocol) = bootstrap_result(&out.stdout);
    assert_eq!(version, 2, "task API v2");
    assert_eq!(protocol, "ttrpc");
    let prefix = format!("unix://{}/", sockets.display());
    assert!(address.starts_with(&prefix), "{address} not in {prefix}");
    assert_eq!(
        std::fs::read_to_string(bundle.join("address")).unwrap(),
        address
    );

    connect_and_shut_down(&address, "task-1");
}

#[test]
fn flag_start_of_older_containerd_answers_the_address_and_a_group_shares_it() {
    let dir = Dir::new("flags");
    let ttrpc = dir.0.join("ttrpc.sock");
    let _containerd = UnixListener::bind(&ttrpc).unwrap();
    let sockets = dir.0.join("s");
    let env = [
        ("TTRPC_ADDRESS", ttrpc.as_path()),
        ("SHIM_SOCKET_DIR", sockets.as_path()),
    ];
    // The runtime options containerd 1.6-2.2 write for a CRI runtime with an options table.
    let mut options = Vec::new();
    field(&mut options, 0x0a, b"runtimeoptions.v1.Options");
    field(&mut options, 0x12, b"\x12\x04conf");
    let args = [
        "-namespace",
        "k8s.io",
        "-id",
        "task-2",
        "-address",
        "/x",
        "start",
    ];

    let first = run(&bundle(&dir.0, "b1"), &args, &env, &options);
    let address = String::from_utf8(first.stdout).unwrap();
    assert!(
        address.starts_with(&format!("unix://{}/", sockets.display())),
        "{address}"
    );
    // The same group again (another bundle): the running server's address, no second server.
    let second = run(&bundle(&dir.0, "b2"), &args, &env, &[]);
    assert_eq!(String::from_utf8(second.stdout).unwrap(), address);

    connect_and_shut_down(&address, "task-2");
}

#[test]
fn info_answers_runtime_info_with_the_features_document() {
    let dir = Dir::new("info");
    let out = run(&dir.0, &["-info"], &[], &[]);
    let info = RuntimeInfo::parse_from_bytes(&out.stdout).unwrap();
    assert_eq!(info.name, "containerd-shim-husk-v2");
    let features = info.features.as_ref().unwrap();
    assert_eq!(
        features.type_url,
        "types.containerd.io/opencontainers/runtime-spec/1/features/Features"
    );
    let document: serde_json::Value = serde_json::from_slice(&features.value).unwrap();
    assert_eq!(document["ociVersionMin"], "1.0.0");
    assert_eq!(document["linux"]["cgroup"]["v2"], true);
}

#[test]
fn version_is_printed() {
    let dir = Dir::new("version");
    let out = run(&dir.0, &["-v"], &[], &[]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(env!("CARGO_PKG_VERSION")) && text.contains("containerd-shim-husk-v2"),
        "{text}"
    );
}

#[test]
fn a_start_with_garbage_on_stdin_fails_naming_the_problem() {
    let dir = Dir::new("garbage");
    let ttrpc = dir.0.join("ttrpc.sock");
    let out = Command::new(SHIM)
        .args([
            "-namespace",
            "default",
            "-id",
            "t",
            "-address",
            "/x",
            "start",
        ])
        .current_dir(&dir.0)
        .env("TTRPC_ADDRESS", &ttrpc)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(&[0x0a, 0x40, b'x'])?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("neither bootstrap parameters"), "{stderr}");
    assert!(!dir.0.join("address").exists());
}
