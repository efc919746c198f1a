//! The Task service against the sandbox core's fakes: a fake agent, fake VMs, a mount table in
//! memory. No VM, no root.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use containerd_shim::protos::protobuf::MessageFull;
use husk_sandbox::cgroup::HostLimits;
use husk_sandbox::config::{self, Discovery};
use husk_sandbox::fake::FakeHost;

use super::*;

/// The events the service published.
#[derive(Default)]
struct Recorder(Mutex<Vec<(&'static str, Box<dyn MessageDyn>)>>);

impl Events for Recorder {
    fn publish(&self, topic: &'static str, event: Box<dyn MessageDyn>) {
        self.0.lock().unwrap().push((topic, event));
    }
}

impl Recorder {
    fn topics(&self) -> Vec<&'static str> {
        self.0.lock().unwrap().iter().map(|(t, _)| *t).collect()
    }

    /// The events of type `M`, in order.
    fn of<M: MessageFull + Clone>(&self) -> Vec<M> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, e)| e.downcast_ref::<M>().cloned())
            .collect()
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    fake: FakeHost,
    events: Arc<Recorder>,
    exit: Arc<ExitSignal>,
    service: Service,
}

fn ctx() -> TtrpcContext {
    TtrpcContext {
        mh: Default::default(),
        metadata: HashMap::new(),
        timeout_nano: 0,
    }
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let discovery = Discovery {
        exe: "/usr/bin/husk".into(),
        path_var: None,
    };
    let mut config = config::load(Path::new("/nonexistent/husk.toml"), false, &discovery).unwrap();
    config.console.log_dir = dir.path().join("log");
    let fake = FakeHost::new();
    let events = Arc::new(Recorder::default());
    let exit = Arc::new(ExitSignal::default());
    let service = Service::new(
        events.clone(),
        "default".into(),
        exit.clone(),
        Settings {
            host: fake.host.clone(),
            state_root: dir.path().join("run"),
            config: ConfigSource::Fixed(Box::new(config)),
        },
    );
    Fixture {
        dir,
        fake,
        events,
        exit,
        service,
    }
}

impl Fixture {
    /// A bundle named `name` with `annotations` (and hostname `h-<name>`).
    fn bundle(&self, name: &str, annotations: &[(&str, &str)]) -> PathBuf {
        self.bundle_with_linux(name, annotations, serde_json::Value::Null)
    }

    /// A bundle named `name` with `annotations` and, unless null, `linux` as its `linux`.
    fn bundle_with_linux(
        &self,
        name: &str,
        annotations: &[(&str, &str)],
        linux: serde_json::Value,
    ) -> PathBuf {
        let dir = self.dir.path().join("bundles").join(name);
        std::fs::create_dir_all(dir.join("rootfs")).unwrap();
        let annotations: HashMap<&str, &str> = annotations.iter().copied().collect();
        let mut spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "hostname": format!("h-{name}"),
            "process": {"cwd": "/", "args": ["sh"], "user": {"uid": 0, "gid": 0}},
            "hooks": {"prestart": [{"path": "/bin/true"}]},
            "annotations": annotations,
        });
        if !linux.is_null() {
            spec["linux"] = linux;
        }
        std::fs::write(dir.join("config.json"), spec.to_string()).unwrap();
        dir
    }

    /// Creates the pod sandbox "pod" whose spec names `cgroups_path`, with `annotations`.
    async fn create_pod_in_cgroup(
        &self,
        cgroups_path: &str,
        annotations: &[(&str, &str)],
    ) -> Result<u32> {
        let mut all = vec![(POD, "sandbox")];
        all.extend_from_slice(annotations);
        let linux = serde_json::json!({ "cgroupsPath": cgroups_path });
        let bundle = self.bundle_with_linux("pod", &all, linux);
        self.service
            .do_create(&api::CreateTaskRequest {
                id: "pod".into(),
                bundle: bundle.to_string_lossy().into_owned(),
                ..Default::default()
            })
            .await
    }

    fn create_req(&self, id: &str, annotations: &[(&str, &str)]) -> api::CreateTaskRequest {
        api::CreateTaskRequest {
            id: id.into(),
            bundle: self.bundle(id, annotations).to_string_lossy().into_owned(),
            ..Default::default()
        }
    }

    /// Creates the pod sandbox "pod" and the container "app" in it (CRI annotations).
    async fn create_pod_with_app(&self) {
        self.service
            .do_create(&self.create_req("pod", &[(POD, "sandbox")]))
            .await
            .unwrap();
        self.service
            .do_create(&self.create_req("app", &[(POD, "container"), (POD_SANDBOX, "pod")]))
            .await
            .unwrap();
    }

    async fn create(&self, id: &str) -> Result<u32> {
        self.service.do_create(&self.create_req(id, &[])).await
    }

    async fn start(&self, id: &str, exec: &str) -> Result<u32> {
        self.service
            .do_start(&api::StartRequest {
                id: id.into(),
                exec_id: exec.into(),
                ..Default::default()
            })
            .await
    }

    async fn running(&self, id: &str) {
        self.create(id).await.unwrap();
        self.start(id, "").await.unwrap();
    }

    fn state(&self, id: &str, exec: &str) -> Result<api::StateResponse> {
        self.service.do_state(&api::StateRequest {
            id: id.into(),
            exec_id: exec.into(),
            ..Default::default()
        })
    }

    async fn wait(&self, id: &str, exec: &str) -> api::WaitResponse {
        let req = api::WaitRequest {
            id: id.into(),
            exec_id: exec.into(),
            ..Default::default()
        };
        tokio::time::timeout(Duration::from_secs(20), self.service.wait(&ctx(), req))
            .await
            .expect("Wait answered")
            .unwrap()
    }

    async fn kill(&self, id: &str, exec: &str, signal: u32, all: bool) -> Result<()> {
        self.service
            .do_kill(&api::KillRequest {
                id: id.into(),
                exec_id: exec.into(),
                signal,
                all,
                ..Default::default()
            })
            .await
    }

    async fn delete(&self, id: &str, exec: &str) -> Result<api::DeleteResponse> {
        self.service
            .do_delete(&api::DeleteRequest {
                id: id.into(),
                exec_id: exec.into(),
                ..Default::default()
            })
            .await
    }

    fn exec_req(&self, id: &str, exec: &str) -> api::ExecProcessRequest {
        api::ExecProcessRequest {
            id: id.into(),
            exec_id: exec.into(),
            spec: MessageField::some(Any {
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process".into(),
                value: br#"{"cwd":"/","args":["ls"],"user":{"uid":0,"gid":0}}"#.to_vec(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.dir.path().join("run").join(id)
    }

    async fn exited(&self) -> bool {
        tokio::time::timeout(Duration::from_millis(50), self.exit.wait())
            .await
            .is_ok()
    }
}

fn code(err: ShimError) -> containerd_shim::protos::ttrpc::Code {
    err.code()
}

const POD: &str = "io.kubernetes.cri.container-type";
const POD_SANDBOX: &str = "io.kubernetes.cri.sandbox-id";

// --- Create --------------------------------------------------------------------------------

#[tokio::test]
async fn create_boots_one_vm_and_answers_its_pid() {
    let f = fixture();
    let pid = f.create("c1").await.unwrap();
    let launched = f.fake.launcher.launched();
    assert_eq!(launched.len(), 1);
    assert_eq!(pid, 40_000, "the task's PID is husk-vmm's");
    assert_eq!(f.fake.launcher.running(), 1);
    assert!(f.fake.guest().has_container("c1"));
    assert!(f.sandbox_dir("c1").join("shared").is_dir());
}

#[tokio::test]
async fn create_publishes_task_create_with_the_pid() {
    let f = fixture();
    f.create("c1").await.unwrap();
    let created = f.events.of::<TaskCreate>();
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].container_id, "c1");
    assert_eq!(created[0].pid, 40_000);
}

#[tokio::test]
async fn the_vm_gets_the_configured_size_and_the_share() {
    let f = fixture();
    f.create("c1").await.unwrap();
    let spec = &f.fake.launcher.launched()[0];
    assert!(spec.config.vcpus >= 1);
    assert!(spec.config.memory_mib >= 64);
    assert_eq!(spec.config.fs.len(), 1);
    assert_eq!(spec.config.fs[0].path, f.sandbox_dir("c1").join("shared"));
    assert_eq!(
        spec.config.vsock_uds.as_deref(),
        Some(f.sandbox_dir("c1").join("vm").join("vsock").as_path())
    );
}

#[tokio::test]
async fn the_guest_sandbox_gets_the_hostname_and_the_share_storage() {
    let f = fixture();
    f.create("c1").await.unwrap();
    let sandbox = f.fake.guest().sandbox().unwrap();
    assert_eq!(sandbox.sandbox_id, "c1");
    assert_eq!(sandbox.hostname, "h-c1");
    assert_eq!(sandbox.storages.len(), 1);
    assert_eq!(sandbox.storages[0].fstype, "virtiofs");
}

#[tokio::test]
async fn the_guest_spec_has_no_hooks_and_pipes_without_a_terminal() {
    let f = fixture();
    f.create("c1").await.unwrap();
    let created = f.fake.guest().created();
    let spec: serde_json::Value = serde_json::from_slice(&created[0].oci_spec_json).unwrap();
    assert!(spec.get("hooks").is_none_or(|h| h.is_null()), "{spec}");
    assert_eq!(created[0].stdio, StdioMode::STDIO_PIPES.into());
}

#[tokio::test]
async fn a_terminal_is_asked_of_the_guest() {
    let f = fixture();
    let mut req = f.create_req("c1", &[]);
    req.terminal = true;
    f.service.do_create(&req).await.unwrap();
    assert_eq!(
        f.fake.guest().created()[0].stdio,
        StdioMode::STDIO_TERMINAL.into()
    );
}

#[tokio::test]
async fn the_rootfs_is_shared_into_the_vm() {
    let f = fixture();
    f.create("c1").await.unwrap();
    let mounted = f.fake.mounts.mounted();
    let shared = f.sandbox_dir("c1").join("shared");
    let staging = f.sandbox_dir("c1").join("staging");
    assert!(mounted.contains(&shared), "{mounted:?}");
    assert!(mounted.contains(&staging), "{mounted:?}");
    assert!(
        mounted.contains(&staging.join("c1/rootfs")),
        "the rootfs is bound on the share's host side: {mounted:?}"
    );
    assert!(
        f.fake.mounts.readonly().contains(&shared),
        "the guest's side is read-only"
    );
}

#[tokio::test]
async fn a_bad_id_is_an_invalid_argument() {
    let f = fixture();
    let mut req = f.create_req("c1", &[]);
    req.id = "../x".into();
    let err = f.service.do_create(&req).await.unwrap_err();
    assert_eq!(
        code(err),
        containerd_shim::protos::ttrpc::Code::INVALID_ARGUMENT
    );
    assert!(f.fake.launcher.launched().is_empty());
}

#[tokio::test]
async fn a_second_create_of_an_id_is_refused() {
    let f = fixture();
    f.create("c1").await.unwrap();
    let err = f.create("c1").await.unwrap_err();
    assert_eq!(
        code(err),
        containerd_shim::protos::ttrpc::Code::ALREADY_EXISTS
    );
}

#[tokio::test]
async fn a_checkpoint_restore_is_unsupported() {
    let f = fixture();
    let mut req = f.create_req("c1", &[]);
    req.checkpoint = "/x".into();
    let err = f.service.do_create(&req).await.unwrap_err();
    assert_eq!(
        code(err),
        containerd_shim::protos::ttrpc::Code::UNIMPLEMENTED
    );
}

#[tokio::test]
async fn a_missing_bundle_boots_nothing() {
    let f = fixture();
    let req = api::CreateTaskRequest {
        id: "c1".into(),
        bundle: f.dir.path().join("nope").to_string_lossy().into_owned(),
        ..Default::default()
    };
    let err = f.service.do_create(&req).await.unwrap_err();
    assert_eq!(
        code(err),
        containerd_shim::protos::ttrpc::Code::INVALID_ARGUMENT
    );
    assert!(f.fake.launcher.launched().is_empty());
    // The ID is free again.
    f.create("c1").await.unwrap();
}

#[tokio::test]
async fn a_vmm_that_cannot_start_leaves_no_sandbox_directory() {
    let f = fixture();
    f.fake.launcher.fail_launch("no such binary");
    let err = f.create("c1").await.unwrap_err();
    assert!(err.to_string().contains("no such binary"), "{err}");
    assert!(!f.sandbox_dir("c1").exists());
    assert!(f.fake.mounts.mounted().is_empty());
}

#[tokio::test]
async fn a_vmm_exiting_while_booting_fails_create_with_its_status() {
    let f = fixture();
    f.fake.launcher.exit_while_booting("exit status: 3");
    let err = f.create("c1").await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("husk-vmm exited (exit status: 3) before the agent answered"),
        "{text}"
    );
    assert!(!f.sandbox_dir("c1").exists());
    assert!(f.fake.mounts.mounted().is_empty());
}

#[tokio::test]
async fn a_failed_container_create_stops_the_vm_it_booted() {
    let f = fixture();
    f.fake.guest().fail("CreateContainer", "bad spec");
    let err = f.create("c1").await.unwrap_err();
    assert!(err.to_string().contains("bad spec"), "{err}");
    assert_eq!(f.fake.launcher.running(), 0);
    assert!(f.fake.guest().destroyed());
    assert!(!f.sandbox_dir("c1").exists());
    assert!(f.fake.mounts.mounted().is_empty());
}

// --- Start ---------------------------------------------------------------------------------

#[tokio::test]
async fn start_starts_the_init_and_publishes_task_start() {
    let f = fixture();
    f.create("c1").await.unwrap();
    let pid = f.start("c1", "").await.unwrap();
    assert_eq!(pid, 40_000);
    assert!(f.fake.guest().started("c1"));
    let started = f.events.of::<TaskStart>();
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].pid, 40_000);
}

#[tokio::test]
async fn a_second_start_is_refused() {
    let f = fixture();
    f.running("c1").await;
    let err = f.start("c1", "").await.unwrap_err();
    assert_eq!(
        code(err),
        containerd_shim::protos::ttrpc::Code::FAILED_PRECONDITION
    );
    assert_eq!(f.fake.guest().count("StartContainer"), 1);
}

#[tokio::test]
async fn start_of_an_unknown_task_is_not_found() {
    let f = fixture();
    f.create("c1").await.unwrap();
    let err = f.start("c2", "").await.unwrap_err();
    assert_eq!(code(err), containerd_shim::protos::ttrpc::Code::NOT_FOUND);
}

#[tokio::test]
async fn a_failed_start_leaves_the_task_created() {
    let f = fixture();
    f.create("c1").await.unwrap();
    f.fake.guest().fail("StartContainer", "no");
    f.start("c1", "").await.unwrap_err();
    assert_eq!(
        f.state("c1", "").unwrap().status,
        TaskStatus::CREATED.into()
    );
}

// --- State, Wait, Kill ---------------------------------------------------------------------

#[tokio::test]
async fn state_follows_the_task_from_created_to_stopped() {
    let f = fixture();
    f.create("c1").await.unwrap();
    let state = f.state("c1", "").unwrap();
    assert_eq!(state.status, TaskStatus::CREATED.into());
    assert_eq!(state.pid, 40_000);
    f.start("c1", "").await.unwrap();
    assert_eq!(
        f.state("c1", "").unwrap().status,
        TaskStatus::RUNNING.into()
    );
    f.fake.guest().exit("c1", "", 7);
    f.wait("c1", "").await;
    let state = f.state("c1", "").unwrap();
    assert_eq!(state.status, TaskStatus::STOPPED.into());
    assert_eq!(state.exit_status, 7);
}

#[tokio::test]
async fn state_of_an_unknown_task_is_not_found() {
    let f = fixture();
    assert_eq!(
        code(f.state("nope", "").unwrap_err()),
        containerd_shim::protos::ttrpc::Code::NOT_FOUND
    );
}

#[tokio::test]
async fn wait_answers_the_exit_status_and_task_exit_is_published() {
    let f = fixture();
    f.running("c1").await;
    f.fake.guest().exit("c1", "", 3);
    let waited = f.wait("c1", "").await;
    assert_eq!(waited.exit_status, 3);
    let exits = f.events.of::<TaskExit>();
    assert_eq!(exits.len(), 1);
    assert_eq!((exits[0].id.as_str(), exits[0].exit_status), ("c1", 3));
}

#[tokio::test]
async fn kill_passes_the_signal_to_the_guest() {
    let f = fixture();
    f.running("c1").await;
    f.kill("c1", "", 15, false).await.unwrap();
    assert!(f
        .fake
        .guest()
        .calls()
        .contains(&"SignalProcess c1  15 all=false".to_owned()));
    assert_eq!(f.wait("c1", "").await.exit_status, 128 + 15);
}

#[tokio::test]
async fn kill_all_reaches_the_execs_too() {
    let f = fixture();
    f.running("c1").await;
    f.service.do_exec(&f.exec_req("c1", "e1")).unwrap();
    f.start("c1", "e1").await.unwrap();
    f.kill("c1", "", 9, true).await.unwrap();
    assert_eq!(f.wait("c1", "e1").await.exit_status, 137);
    assert_eq!(f.wait("c1", "").await.exit_status, 137);
}

#[tokio::test]
async fn kill_of_a_finished_process_is_not_found() {
    let f = fixture();
    f.running("c1").await;
    f.fake.guest().exit("c1", "", 0);
    f.wait("c1", "").await;
    let err = f.kill("c1", "", 9, false).await.unwrap_err();
    assert_eq!(code(err), containerd_shim::protos::ttrpc::Code::NOT_FOUND);
}

#[tokio::test]
async fn kill_of_an_unknown_task_is_not_found() {
    let f = fixture();
    let err = f.kill("nope", "", 9, false).await.unwrap_err();
    assert_eq!(code(err), containerd_shim::protos::ttrpc::Code::NOT_FOUND);
}

#[tokio::test]
async fn an_agent_refusal_keeps_its_code() {
    let f = fixture();
    f.running("c1").await;
    f.fake.guest().fail("SignalProcess", "nope");
    let err = f.kill("c1", "", 9, false).await.unwrap_err();
    assert_eq!(code(err), containerd_shim::protos::ttrpc::Code::INTERNAL);
}

// --- Exec ----------------------------------------------------------------------------------

#[tokio::test]
async fn an_exec_is_added_started_and_gets_its_guest_pid() {
    let f = fixture();
    f.running("c1").await;
    f.service.do_exec(&f.exec_req("c1", "e1")).unwrap();
    assert_eq!(f.events.of::<TaskExecAdded>().len(), 1);
    assert_eq!(
        f.state("c1", "e1").unwrap().status,
        TaskStatus::CREATED.into()
    );
    let pid = f.start("c1", "e1").await.unwrap();
    assert_ne!(pid, 40_000, "an exec's PID is its guest PID");
    assert_eq!(f.state("c1", "e1").unwrap().pid, pid);
    let started = f.events.of::<TaskExecStarted>();
    assert_eq!((started[0].exec_id.as_str(), started[0].pid), ("e1", pid));
    assert!(f
        .fake
        .guest()
        .calls()
        .iter()
        .any(|c| c.starts_with("ExecProcess c1 e1 ") && c.contains("\"ls\"")));
}

#[tokio::test]
async fn an_exec_without_a_spec_is_invalid() {
    let f = fixture();
    f.running("c1").await;
    let mut req = f.exec_req("c1", "e1");
    req.spec = MessageField::none();
    assert_eq!(
        code(f.service.do_exec(&req).unwrap_err()),
        containerd_shim::protos::ttrpc::Code::INVALID_ARGUMENT
    );
}

#[tokio::test]
async fn an_exec_with_a_malformed_spec_is_invalid() {
    let f = fixture();
    f.running("c1").await;
    let mut req = f.exec_req("c1", "e1");
    if let Some(any) = req.spec.as_mut() {
        any.value = b"{not json".to_vec();
    }
    assert_eq!(
        code(f.service.do_exec(&req).unwrap_err()),
        containerd_shim::protos::ttrpc::Code::INVALID_ARGUMENT
    );
}

#[tokio::test]
async fn an_exec_in_a_task_not_running_is_refused() {
    let f = fixture();
    f.create("c1").await.unwrap();
    assert_eq!(
        code(f.service.do_exec(&f.exec_req("c1", "e1")).unwrap_err()),
        containerd_shim::protos::ttrpc::Code::FAILED_PRECONDITION
    );
}

#[tokio::test]
async fn an_exec_id_is_used_once() {
    let f = fixture();
    f.running("c1").await;
    f.service.do_exec(&f.exec_req("c1", "e1")).unwrap();
    assert_eq!(
        code(f.service.do_exec(&f.exec_req("c1", "e1")).unwrap_err()),
        containerd_shim::protos::ttrpc::Code::ALREADY_EXISTS
    );
}

#[tokio::test]
async fn a_finished_exec_is_waited_for_and_deleted() {
    let f = fixture();
    f.running("c1").await;
    f.service.do_exec(&f.exec_req("c1", "e1")).unwrap();
    f.start("c1", "e1").await.unwrap();
    let err = f.delete("c1", "e1").await.unwrap_err();
    assert_eq!(
        code(err),
        containerd_shim::protos::ttrpc::Code::FAILED_PRECONDITION,
        "running"
    );
    f.fake.guest().exit("c1", "e1", 4);
    assert_eq!(f.wait("c1", "e1").await.exit_status, 4);
    assert_eq!(f.delete("c1", "e1").await.unwrap().exit_status, 4);
    assert_eq!(
        code(f.state("c1", "e1").unwrap_err()),
        containerd_shim::protos::ttrpc::Code::NOT_FOUND
    );
    // The container runs on.
    assert_eq!(
        f.state("c1", "").unwrap().status,
        TaskStatus::RUNNING.into()
    );
}

#[tokio::test]
async fn exec_output_reaches_its_stdout_file() {
    let f = fixture();
    f.running("c1").await;
    let out = f.dir.path().join("exec.out");
    std::fs::write(&out, b"").unwrap();
    let mut req = f.exec_req("c1", "e1");
    req.stdout = out.to_string_lossy().into_owned();
    f.service.do_exec(&req).unwrap();
    f.start("c1", "e1").await.unwrap();
    f.fake.guest().push_output("c1", "e1", false, b"hello\n");
    f.fake.guest().exit("c1", "e1", 0);
    f.wait("c1", "e1").await;
    assert_eq!(std::fs::read(&out).unwrap(), b"hello\n");
}

#[tokio::test]
async fn close_io_closes_the_stdin_of_the_process() {
    let f = fixture();
    f.running("c1").await;
    let fifo = f.dir.path().join("stdin");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let mut req = f.exec_req("c1", "e1");
    req.stdin = fifo.to_string_lossy().into_owned();
    f.service.do_exec(&req).unwrap();
    f.start("c1", "e1").await.unwrap();
    let close = api::CloseIORequest {
        id: "c1".into(),
        exec_id: "e1".into(),
        stdin: true,
        ..Default::default()
    };
    f.service.close_io(&ctx(), close).await.unwrap();
    for _ in 0..200 {
        if f.fake.guest().stdin_closed("c1", "e1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(f.fake.guest().stdin_closed("c1", "e1"));
}

// --- Delete, Shutdown ----------------------------------------------------------------------

#[tokio::test]
async fn a_running_task_is_not_deleted() {
    let f = fixture();
    f.running("c1").await;
    let err = f.delete("c1", "").await.unwrap_err();
    assert_eq!(
        code(err),
        containerd_shim::protos::ttrpc::Code::FAILED_PRECONDITION
    );
    assert_eq!(f.fake.launcher.running(), 1);
}

#[tokio::test]
async fn deleting_the_last_task_stops_the_vm_and_removes_its_files() {
    let f = fixture();
    f.running("c1").await;
    f.fake.guest().exit("c1", "", 0);
    f.wait("c1", "").await;
    let deleted = f.delete("c1", "").await.unwrap();
    assert_eq!(deleted.pid, 40_000);
    assert!(f.fake.guest().destroyed(), "DestroySandbox");
    assert_eq!(f.fake.guest().count("RemoveContainer"), 1);
    assert_eq!(f.fake.launcher.running(), 0);
    assert!(
        f.fake.mounts.mounted().is_empty(),
        "{:?}",
        f.fake.mounts.mounted()
    );
    assert!(!f.sandbox_dir("c1").exists());
    let deletes = f.events.of::<TaskDelete>();
    assert_eq!((deletes[0].id.as_str(), deletes[0].exit_status), ("c1", 0));
}

#[tokio::test]
async fn a_created_task_can_be_deleted_without_starting() {
    let f = fixture();
    f.create("c1").await.unwrap();
    let deleted = f.delete("c1", "").await.unwrap();
    assert_eq!(deleted.exit_status, VM_GONE_STATUS);
    assert_eq!(f.fake.launcher.running(), 0);
}

#[tokio::test]
async fn delete_of_an_unknown_task_is_not_found() {
    let f = fixture();
    assert_eq!(
        code(f.delete("nope", "").await.unwrap_err()),
        containerd_shim::protos::ttrpc::Code::NOT_FOUND
    );
}

#[tokio::test]
async fn shutdown_without_tasks_ends_the_shim() {
    let f = fixture();
    f.service.do_shutdown();
    assert!(f.exited().await);
}

#[tokio::test]
async fn shutdown_with_tasks_waits_for_the_last_delete() {
    let f = fixture();
    f.create("c1").await.unwrap();
    f.service.do_shutdown();
    assert!(!f.exited().await, "a task is left");
    f.delete("c1", "").await.unwrap();
    let ended = tokio::time::timeout(SHUTDOWN_GRACE * 3, f.exit.wait()).await;
    assert!(ended.is_ok(), "the shim ends after its last task");
}

// --- Pids, Stats, Pause, Update, Connect, OOM ------------------------------------------------

#[tokio::test]
async fn pids_are_the_guest_processes_of_the_task() {
    let f = fixture();
    f.running("c1").await;
    f.service.do_exec(&f.exec_req("c1", "e1")).unwrap();
    let exec_pid = f.start("c1", "e1").await.unwrap();
    let req = api::PidsRequest {
        id: "c1".into(),
        ..Default::default()
    };
    let pids: Vec<u32> = f
        .service
        .pids(&ctx(), req)
        .await
        .unwrap()
        .processes
        .iter()
        .map(|p| p.pid)
        .collect();
    assert_eq!(pids.len(), 2);
    assert!(pids.contains(&exec_pid));
}

#[tokio::test]
async fn stats_are_containerd_metrics() {
    let f = fixture();
    f.running("c1").await;
    let req = api::StatsRequest {
        id: "c1".into(),
        ..Default::default()
    };
    let stats = f.service.stats(&ctx(), req).await.unwrap();
    assert!(
        stats.stats.type_url.contains("io.containerd.cgroups"),
        "{}",
        stats.stats.type_url
    );
}

#[tokio::test]
async fn requests_for_an_unknown_task_do_not_reach_the_guest() {
    let f = fixture();
    f.running("c1").await;
    let before = f.fake.guest().calls().len();
    let req = api::StatsRequest {
        id: "c2".into(),
        ..Default::default()
    };
    assert!(f.service.stats(&ctx(), req).await.is_err());
    assert!(f.service.do_pause("c2", true).await.is_err());
    assert_eq!(f.fake.guest().calls().len(), before);
}

#[tokio::test]
async fn pause_and_resume_show_in_state_and_events() {
    let f = fixture();
    f.running("c1").await;
    f.service.do_pause("c1", true).await.unwrap();
    assert!(f.fake.guest().paused("c1"));
    assert_eq!(f.state("c1", "").unwrap().status, TaskStatus::PAUSED.into());
    f.service.do_pause("c1", false).await.unwrap();
    assert_eq!(
        f.state("c1", "").unwrap().status,
        TaskStatus::RUNNING.into()
    );
    assert_eq!(f.events.of::<TaskPaused>().len(), 1);
    assert_eq!(f.events.of::<TaskResumed>().len(), 1);
}

#[tokio::test]
async fn update_hands_the_resources_to_the_guest() {
    let f = fixture();
    f.running("c1").await;
    let resources = br#"{"pids":{"limit":10}}"#.to_vec();
    let req = api::UpdateTaskRequest {
        id: "c1".into(),
        resources: MessageField::some(Any {
            value: resources.clone(),
            ..Default::default()
        }),
        ..Default::default()
    };
    f.service.update(&ctx(), req).await.unwrap();
    assert_eq!(f.fake.guest().updates("c1"), vec![resources]);
    let empty = api::UpdateTaskRequest {
        id: "c1".into(),
        ..Default::default()
    };
    assert!(f.service.update(&ctx(), empty).await.is_err());
}

#[tokio::test]
async fn connect_names_the_shim_and_the_vmm() {
    let f = fixture();
    f.create("c1").await.unwrap();
    let answer = f
        .service
        .connect(&ctx(), api::ConnectRequest::default())
        .await
        .unwrap();
    assert_eq!(answer.shim_pid, std::process::id());
    assert_eq!(answer.task_pid, 40_000);
}

#[tokio::test]
async fn an_oom_kill_of_a_task_is_published() {
    let f = fixture();
    f.running("c1").await;
    f.fake.guest().oom("c1");
    for _ in 0..200 {
        if !f.events.of::<TaskOOM>().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ooms = f.events.of::<TaskOOM>();
    assert_eq!(ooms.len(), 1);
    assert_eq!(ooms[0].container_id, "c1");
}

#[tokio::test]
async fn an_oom_kill_of_a_stranger_is_not_published() {
    let f = fixture();
    f.running("c1").await;
    f.fake.guest().oom("not-ours");
    f.fake.guest().oom("c1");
    for _ in 0..200 {
        if !f.events.of::<TaskOOM>().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ooms = f.events.of::<TaskOOM>();
    assert_eq!(ooms.len(), 1, "only the shim's own container");
    assert_eq!(ooms[0].container_id, "c1");
}

#[tokio::test]
async fn a_flood_of_oom_reports_is_coalesced_and_strangers_are_dropped() {
    let f = fixture();
    f.running("c1").await;
    let guest = f.fake.guest();
    for i in 0..50 {
        guest.oom("c1");
        guest.oom(&format!("stranger-{i}"));
    }
    // Every report was taken (the last one, a stranger's, is then dropped at once) ...
    for _ in 0..400 {
        if guest.pending_ooms() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(guest.pending_ooms(), 0, "the watcher took every report");
    tokio::time::sleep(Duration::from_millis(50)).await;
    // ... and published one event, for the shim's own container.
    let ooms = f.events.of::<TaskOOM>();
    assert_eq!(ooms.len(), 1, "{ooms:?}");
    assert_eq!(ooms[0].container_id, "c1");
}

#[tokio::test]
async fn an_oom_kill_reported_after_the_task_was_deleted_is_published() {
    // Seen in the test host: the task's exit (137) came first, its Delete removed it, and only
    // then did the guest's OOM report arrive. It is still a container of this pod.
    let f = fixture();
    f.create_pod_with_app().await;
    f.start("pod", "").await.unwrap();
    f.start("app", "").await.unwrap();
    f.fake.guest().exit("app", "", 137);
    f.wait("app", "").await;
    f.delete("app", "").await.unwrap();
    f.fake.guest().oom("app");
    for _ in 0..200 {
        if !f.events.of::<TaskOOM>().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ooms = f.events.of::<TaskOOM>();
    assert_eq!(ooms.len(), 1, "{ooms:?}");
    assert_eq!(ooms[0].container_id, "app");
}

// --- Pods ----------------------------------------------------------------------------------

#[tokio::test]
async fn a_pods_containers_join_the_sandbox_vm() {
    let f = fixture();
    f.service
        .do_create(&f.create_req("pod", &[(POD, "sandbox")]))
        .await
        .unwrap();
    let pid = f
        .service
        .do_create(&f.create_req("app", &[(POD, "container"), (POD_SANDBOX, "pod")]))
        .await
        .unwrap();
    assert_eq!(f.fake.launcher.launched().len(), 1, "one VM per pod");
    assert_eq!(pid, 40_000);
    assert!(f.fake.guest().has_container("app"));
}

#[tokio::test]
async fn a_container_of_another_pod_is_refused() {
    let f = fixture();
    f.service
        .do_create(&f.create_req("pod", &[(POD, "sandbox")]))
        .await
        .unwrap();
    let err = f
        .service
        .do_create(&f.create_req("app", &[(POD, "container"), (POD_SANDBOX, "other")]))
        .await
        .unwrap_err();
    assert_eq!(
        code(err),
        containerd_shim::protos::ttrpc::Code::FAILED_PRECONDITION
    );
    assert_eq!(f.fake.launcher.launched().len(), 1);
}

#[tokio::test]
async fn a_pod_container_without_its_sandbox_boots_nothing() {
    let f = fixture();
    let err = f
        .service
        .do_create(&f.create_req("app", &[(POD, "container"), (POD_SANDBOX, "pod")]))
        .await
        .unwrap_err();
    assert_eq!(
        code(err),
        containerd_shim::protos::ttrpc::Code::FAILED_PRECONDITION
    );
    assert!(f.fake.launcher.launched().is_empty());
}

#[tokio::test]
async fn the_pod_vm_is_sized_from_the_sandbox_annotations() {
    let f = fixture();
    let small = fixture();
    f.service
        .do_create(&f.create_req(
            "pod",
            &[
                (POD, "sandbox"),
                ("io.kubernetes.cri.sandbox-memory", "1073741824"),
            ],
        ))
        .await
        .unwrap();
    small
        .service
        .do_create(&small.create_req("pod", &[(POD, "sandbox")]))
        .await
        .unwrap();
    let big = f.fake.launcher.launched()[0].config.memory_mib;
    let default = small.fake.launcher.launched()[0].config.memory_mib;
    assert!(big >= 1024 && big > default, "{big} vs {default}");
}

#[tokio::test]
async fn the_pod_vm_stays_until_its_last_container_is_deleted() {
    let f = fixture();
    f.create_pod_with_app().await;
    f.delete("pod", "").await.unwrap();
    assert_eq!(f.fake.launcher.running(), 1, "app still runs in it");
    assert!(!f.fake.guest().destroyed());
    f.delete("app", "").await.unwrap();
    assert_eq!(f.fake.launcher.running(), 0);
    assert!(!f.sandbox_dir("pod").exists());
}

// --- No lock across a boot or an agent call ------------------------------------------------

#[tokio::test]
async fn state_and_kill_answer_while_another_container_is_being_created() {
    let f = fixture();
    f.service
        .do_create(&f.create_req("pod", &[(POD, "sandbox")]))
        .await
        .unwrap();
    f.start("pod", "").await.unwrap();
    let hold = f.fake.guest().hold("CreateContainer");
    let service = f.service.clone();
    let req = f.create_req("app", &[(POD, "container"), (POD_SANDBOX, "pod")]);
    let creating = tokio::spawn(async move { service.do_create(&req).await });
    tokio::time::timeout(Duration::from_secs(5), hold.entered())
        .await
        .expect("the create reached the agent");
    // The create waits in the agent; the pod's other task still answers.
    assert_eq!(
        f.state("pod", "").unwrap().status,
        TaskStatus::RUNNING.into()
    );
    tokio::time::timeout(Duration::from_secs(5), f.kill("pod", "", 10, false))
        .await
        .expect("Kill answered during the create")
        .unwrap();
    // And the task being created is not visible yet.
    assert_eq!(
        code(f.state("app", "").unwrap_err()),
        containerd_shim::protos::ttrpc::Code::NOT_FOUND
    );
    hold.release();
    creating.await.unwrap().unwrap();
    assert!(f.state("app", "").is_ok());
}

#[tokio::test]
async fn a_start_in_progress_blocks_a_second_start_but_not_state() {
    let f = fixture();
    f.create("c1").await.unwrap();
    let hold = f.fake.guest().hold("StartContainer");
    let service = f.service.clone();
    let first = tokio::spawn(async move {
        service
            .do_start(&api::StartRequest {
                id: "c1".into(),
                ..Default::default()
            })
            .await
    });
    tokio::time::timeout(Duration::from_secs(5), hold.entered())
        .await
        .unwrap();
    assert_eq!(
        f.state("c1", "").unwrap().status,
        TaskStatus::CREATED.into()
    );
    let second = f.start("c1", "").await.unwrap_err();
    assert_eq!(
        code(second),
        containerd_shim::protos::ttrpc::Code::FAILED_PRECONDITION
    );
    let delete = f.delete("c1", "").await.unwrap_err();
    assert_eq!(
        code(delete),
        containerd_shim::protos::ttrpc::Code::FAILED_PRECONDITION
    );
    hold.release();
    first.await.unwrap().unwrap();
    assert_eq!(f.fake.guest().count("StartContainer"), 1);
    assert_eq!(
        f.state("c1", "").unwrap().status,
        TaskStatus::RUNNING.into()
    );
}

#[tokio::test]
async fn topics_are_containerds() {
    let f = fixture();
    f.running("c1").await;
    f.fake.guest().exit("c1", "", 0);
    f.wait("c1", "").await;
    f.delete("c1", "").await.unwrap();
    assert_eq!(
        f.events.topics(),
        [
            topics::TASK_CREATE_EVENT_TOPIC,
            topics::TASK_START_EVENT_TOPIC,
            topics::TASK_EXIT_EVENT_TOPIC,
            topics::TASK_DELETE_EVENT_TOPIC,
        ]
    );
}

// --- The pod's host cgroup -------------------------------------------------------------------

/// A cgroup path no host has, so nothing real is made or removed by these tests (the fake
/// launcher does not touch cgroups; the sandbox's cleanup finds nothing to remove).
fn unit_cgroup() -> String {
    format!("/husk-unit-{}/pod", std::process::id())
}

#[tokio::test]
async fn the_pod_vm_starts_in_the_sandbox_cgroup_with_its_size_as_limits() {
    let f = fixture();
    f.create_pod_in_cgroup(
        &unit_cgroup(),
        &[
            ("io.kubernetes.cri.sandbox-memory", "268435456"),
            ("io.kubernetes.cri.sandbox-cpu-quota", "150000"),
            ("io.kubernetes.cri.sandbox-cpu-period", "100000"),
        ],
    )
    .await
    .unwrap();
    let launched = &f.fake.launcher.launched()[0];
    let placement = launched.cgroup.clone().expect("a host cgroup");
    assert_eq!(
        placement.dir,
        Path::new("/sys/fs/cgroup").join(unit_cgroup().trim_start_matches('/'))
    );
    let guest_mib = launched.config.memory_mib;
    assert!(guest_mib >= 256, "{guest_mib}");
    assert_eq!(
        placement.limits,
        HostLimits {
            memory_max: (guest_mib + 32) * 1024 * 1024,
            pids_max: husk_sandbox::cgroup::PIDS_MAX,
            cpu_max: Some((150_000, 100_000)),
        }
    );
    assert_eq!(launched.config.vcpus, 2, "1.5 CPUs round up to 2 vCPUs");
    // Recorded for the cleanup after a crash, and gone with the sandbox.
    let record = f.sandbox_dir("pod").join(husk_sandbox::vm::CGROUP_RECORD);
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        placement.dir.to_string_lossy()
    );
    f.delete("pod", "").await.unwrap();
    assert!(!f.sandbox_dir("pod").exists());
}

#[tokio::test]
async fn a_pod_without_a_cpu_quota_gets_no_cpu_max() {
    let f = fixture();
    f.create_pod_in_cgroup(&unit_cgroup(), &[]).await.unwrap();
    let launched = &f.fake.launcher.launched()[0];
    let limits = launched.cgroup.clone().unwrap().limits;
    assert_eq!(limits.cpu_max, None);
    assert_eq!(
        limits.memory_max,
        (launched.config.memory_mib + 32) * 1024 * 1024
    );
}

#[tokio::test]
async fn a_systemd_cgroups_path_from_cri_names_the_scope_in_its_slices() {
    let f = fixture();
    f.create_pod_in_cgroup("kubepods-besteffort-pod12.slice:cri-containerd:pod", &[])
        .await
        .unwrap();
    let dir = f.fake.launcher.launched()[0].cgroup.clone().unwrap().dir;
    assert_eq!(
        dir,
        Path::new(
            "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/\
             kubepods-besteffort-pod12.slice/cri-containerd-pod.scope"
        )
    );
}

#[tokio::test]
async fn a_cgroups_path_out_of_the_root_is_an_invalid_argument_and_boots_nothing() {
    let f = fixture();
    for path in ["/a/../../etc", "/", "x.slice:p:../n"] {
        let err = f.create_pod_in_cgroup(path, &[]).await.unwrap_err();
        assert_eq!(
            code(err),
            containerd_shim::protos::ttrpc::Code::INVALID_ARGUMENT,
            "{path}"
        );
    }
    assert!(f.fake.launcher.launched().is_empty());
    assert!(!f.sandbox_dir("pod").exists());
}

#[tokio::test]
async fn a_spec_without_cgroups_path_leaves_the_vmm_where_the_shim_is() {
    let f = fixture();
    f.create("solo").await.unwrap();
    assert_eq!(f.fake.launcher.launched()[0].cgroup, None);
    assert!(!f
        .sandbox_dir("solo")
        .join(husk_sandbox::vm::CGROUP_RECORD)
        .exists());
}
