//! The ttrpc service: checks the API version of every request and dispatches to the manager.

use std::sync::Arc;

use async_trait::async_trait;
use husk_agent_protocol::agent::*;
use husk_agent_protocol::agent_ttrpc::Agent;
use husk_agent_protocol::validate::{check_size, validate_id};
use husk_agent_protocol::{
    API_VERSION, API_VERSION_METADATA_KEY, MAX_DNS_ENTRIES, MAX_HOSTNAME_LEN, MAX_PATH_LEN,
};
use ttrpc::r#async::TtrpcContext;

use crate::container::{AgentError, Manager};

/// The agent's ttrpc service.
pub struct Service {
    manager: Arc<Manager>,
    /// Whether the agent is the guest's PID 1 (it may then change the hostname and DNS).
    is_pid1: bool,
}

impl Service {
    pub fn new(manager: Arc<Manager>, is_pid1: bool) -> Self {
        Service { manager, is_pid1 }
    }
}

fn status(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn to_ttrpc(method: &str, e: AgentError) -> ttrpc::Error {
    tracing::info!(method, error = %e, "request failed");
    status(e.code(), e.to_string())
}

/// Refuses requests that do not carry our API version.
fn check_version(ctx: &TtrpcContext) -> ttrpc::Result<()> {
    let got = ctx
        .metadata
        .get(API_VERSION_METADATA_KEY)
        .and_then(|v| v.first())
        .map(String::as_str);
    match got {
        Some(v) if v == API_VERSION.to_string() => Ok(()),
        Some(v) => Err(status(
            ttrpc::Code::FAILED_PRECONDITION,
            format!("API version mismatch: request speaks v{v}, this agent speaks v{API_VERSION}"),
        )),
        None => Err(status(
            ttrpc::Code::FAILED_PRECONDITION,
            format!("request carries no {API_VERSION_METADATA_KEY} metadata; this agent speaks v{API_VERSION}"),
        )),
    }
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let rest = l.strip_prefix(key)?.strip_prefix(':')?;
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
        })
        .unwrap_or(0)
        .saturating_mul(1024)
}

fn write_resolv_conf(servers: &[String], search: &[String]) -> Result<(), AgentError> {
    let mut text = String::new();
    for s in servers {
        if s.parse::<std::net::IpAddr>().is_err() {
            return Err(AgentError::Invalid(format!(
                "DNS server {s:?} is not an IP address"
            )));
        }
        text.push_str(&format!("nameserver {s}\n"));
    }
    if !search.is_empty() {
        for d in search {
            let ok = !d.is_empty()
                && d.len() <= 253
                && d.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
            if !ok {
                return Err(AgentError::Invalid(format!(
                    "DNS search domain {d:?} is invalid"
                )));
            }
        }
        text.push_str(&format!("search {}\n", search.join(" ")));
    }
    std::fs::create_dir_all("/etc").map_err(|source| AgentError::Io {
        what: "mkdir /etc".into(),
        source,
    })?;
    std::fs::write("/etc/resolv.conf", text).map_err(|source| AgentError::Io {
        what: "writing /etc/resolv.conf".into(),
        source,
    })
}

#[async_trait]
impl Agent for Service {
    async fn check(&self, _ctx: &TtrpcContext, req: CheckRequest) -> ttrpc::Result<CheckResponse> {
        // Check answers even across versions, so that the client can report the mismatch.
        if req.api_version != API_VERSION {
            tracing::warn!(
                client = req.api_version,
                agent = API_VERSION,
                "client speaks another API version"
            );
        }
        Ok(CheckResponse {
            api_version: API_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            ..Default::default()
        })
    }

    async fn get_guest_details(
        &self,
        ctx: &TtrpcContext,
        _: GetGuestDetailsRequest,
    ) -> ttrpc::Result<GuestDetails> {
        check_version(ctx)?;
        let kernel_release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        Ok(GuestDetails {
            kernel_release,
            mem_total_bytes: meminfo("MemTotal"),
            mem_available_bytes: meminfo("MemAvailable"),
            cpus: u32::try_from(cpus).unwrap_or(u32::MAX),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            api_version: API_VERSION,
            ..Default::default()
        })
    }

    async fn create_sandbox(
        &self,
        ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        check_version(ctx)?;
        let r = async {
            validate_id("sandbox id", &req.sandbox_id)?;
            check_size("hostname", req.hostname.len(), MAX_HOSTNAME_LEN)?;
            check_size("DNS servers", req.dns_servers.len(), MAX_DNS_ENTRIES)?;
            check_size("DNS search domains", req.dns_search.len(), MAX_DNS_ENTRIES)?;
            for s in req.dns_servers.iter().chain(req.dns_search.iter()) {
                check_size("DNS entry", s.len(), MAX_PATH_LEN)?;
            }
            let changes_guest = !req.hostname.is_empty()
                || !req.dns_servers.is_empty()
                || !req.dns_search.is_empty();
            if changes_guest && !self.is_pid1 {
                return Err(AgentError::Precondition(
                    "hostname and DNS are set only by the agent running as the guest's PID 1"
                        .into(),
                ));
            }
            if !req.hostname.is_empty() {
                nix::unistd::sethostname(&req.hostname).map_err(|e| AgentError::Io {
                    what: "sethostname".into(),
                    source: e.into(),
                })?;
            }
            if !req.dns_servers.is_empty() || !req.dns_search.is_empty() {
                write_resolv_conf(&req.dns_servers, &req.dns_search)?;
            }
            self.manager.mount_sandbox_storages(&req.storages)
        }
        .await;
        r.map(|_| Empty::default())
            .map_err(|e| to_ttrpc("CreateSandbox", e))
    }

    async fn destroy_sandbox(
        &self,
        ctx: &TtrpcContext,
        req: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        check_version(ctx)?;
        validate_id("sandbox id", &req.sandbox_id)
            .map_err(|e| to_ttrpc("DestroySandbox", e.into()))?;
        self.manager
            .destroy_sandbox()
            .await
            .map(|_| Empty::default())
            .map_err(|e| to_ttrpc("DestroySandbox", e))
    }

    async fn create_container(
        &self,
        ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<CreateContainerResponse> {
        check_version(ctx)?;
        let id = req.container_id.clone();
        let pid = self
            .manager
            .create(req)
            .await
            .map_err(|e| to_ttrpc("CreateContainer", e))?;
        tracing::info!(container = %id, pid, "created");
        Ok(CreateContainerResponse {
            pid: u32::try_from(pid).unwrap_or(0),
            ..Default::default()
        })
    }

    async fn start_container(
        &self,
        ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        check_version(ctx)?;
        self.manager
            .start(&req.container_id)
            .await
            .map(|_| Empty::default())
            .map_err(|e| to_ttrpc("StartContainer", e))
    }

    async fn remove_container(
        &self,
        ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        check_version(ctx)?;
        self.manager
            .remove(&req.container_id)
            .await
            .map(|_| Empty::default())
            .map_err(|e| to_ttrpc("RemoveContainer", e))
    }

    async fn exec_process(
        &self,
        ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ExecProcessResponse> {
        check_version(ctx)?;
        let pid = self
            .manager
            .exec(&req.container_id, &req.exec_id, &req.process_json)
            .await
            .map_err(|e| to_ttrpc("ExecProcess", e))?;
        Ok(ExecProcessResponse {
            pid: u32::try_from(pid).unwrap_or(0),
            ..Default::default()
        })
    }

    async fn signal_process(
        &self,
        ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        check_version(ctx)?;
        self.manager
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .map(|_| Empty::default())
            .map_err(|e| to_ttrpc("SignalProcess", e))
    }

    async fn wait_process(
        &self,
        ctx: &TtrpcContext,
        req: ProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        check_version(ctx)?;
        let p = self
            .manager
            .process(&req.container_id, &req.exec_id)
            .map_err(|e| to_ttrpc("WaitProcess", e))?;
        let exit = p.wait().await.map_err(|e| to_ttrpc("WaitProcess", e))?;
        self.manager.note_oom_kills_of(&req.container_id);
        Ok(WaitProcessResponse {
            exit_code: exit.code,
            signal: exit.signal,
            ..Default::default()
        })
    }

    async fn write_stdin(
        &self,
        ctx: &TtrpcContext,
        req: WriteStdinRequest,
    ) -> ttrpc::Result<WriteStdinResponse> {
        check_version(ctx)?;
        let n = self
            .manager
            .write_stdin(&req.container_id, &req.exec_id, &req.data)
            .await
            .map_err(|e| to_ttrpc("WriteStdin", e))?;
        Ok(WriteStdinResponse {
            written: u32::try_from(n).unwrap_or(u32::MAX),
            ..Default::default()
        })
    }

    async fn close_stdin(&self, ctx: &TtrpcContext, req: ProcessRequest) -> ttrpc::Result<Empty> {
        check_version(ctx)?;
        self.manager
            .close_stdin(&req.container_id, &req.exec_id)
            .await
            .map(|_| Empty::default())
            .map_err(|e| to_ttrpc("CloseStdin", e))
    }

    async fn read_stdout(
        &self,
        ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        check_version(ctx)?;
        read_stream(&self.manager, req, false).await
    }

    async fn read_stderr(
        &self,
        ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        check_version(ctx)?;
        read_stream(&self.manager, req, true).await
    }

    async fn tty_win_resize(
        &self,
        ctx: &TtrpcContext,
        req: TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        check_version(ctx)?;
        self.manager
            .resize(&req.container_id, &req.exec_id, req.rows, req.cols)
            .map(|_| Empty::default())
            .map_err(|e| to_ttrpc("TtyWinResize", e))
    }

    async fn list_processes(
        &self,
        ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        check_version(ctx)?;
        let pids = self
            .manager
            .list_processes(&req.container_id)
            .map_err(|e| to_ttrpc("ListProcesses", e))?;
        Ok(ListProcessesResponse {
            pids,
            ..Default::default()
        })
    }

    async fn stats_container(
        &self,
        ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        check_version(ctx)?;
        self.manager
            .stats(&req.container_id)
            .map_err(|e| to_ttrpc("StatsContainer", e))
    }

    async fn update_container(
        &self,
        ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        check_version(ctx)?;
        self.manager
            .update(&req.container_id, &req.resources_json)
            .map(|_| Empty::default())
            .map_err(|e| to_ttrpc("UpdateContainer", e))
    }

    async fn pause_container(
        &self,
        ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        check_version(ctx)?;
        self.manager
            .freeze(&req.container_id, true)
            .await
            .map(|_| Empty::default())
            .map_err(|e| to_ttrpc("PauseContainer", e))
    }

    async fn resume_container(
        &self,
        ctx: &TtrpcContext,
        req: ContainerRequest,
    ) -> ttrpc::Result<Empty> {
        check_version(ctx)?;
        self.manager
            .freeze(&req.container_id, false)
            .await
            .map(|_| Empty::default())
            .map_err(|e| to_ttrpc("ResumeContainer", e))
    }

    async fn get_oom_event(
        &self,
        ctx: &TtrpcContext,
        _: GetOOMEventRequest,
    ) -> ttrpc::Result<OOMEvent> {
        check_version(ctx)?;
        let id = self
            .manager
            .next_oom()
            .await
            .map_err(|e| to_ttrpc("GetOOMEvent", e))?;
        Ok(OOMEvent {
            container_id: id,
            ..Default::default()
        })
    }
}

async fn read_stream(
    m: &Manager,
    req: ReadStreamRequest,
    stderr: bool,
) -> ttrpc::Result<ReadStreamResponse> {
    let method = if stderr { "ReadStderr" } else { "ReadStdout" };
    let data = m
        .read(&req.container_id, &req.exec_id, stderr, req.max_len)
        .await
        .map_err(|e| to_ttrpc(method, e))?;
    Ok(match data {
        Some(data) => ReadStreamResponse {
            data,
            eof: false,
            ..Default::default()
        },
        None => ReadStreamResponse {
            data: Vec::new(),
            eof: true,
            ..Default::default()
        },
    })
}
