//! A small blocking CRI (v1) client for the end-to-end tests: containerd's CRI plugin over its
//! unix socket, with the `k8s-cri` bindings and tonic. Each call runs on a tokio runtime of the
//! client's own, so tests stay synchronous.
//!
//! ```no_run
//! use husk_e2e::containerd::{Containerd, Options, HUSK_HANDLER, IMAGE};
//! use husk_e2e::cri::{self, Cri};
//!
//! let containerd = Containerd::start_with(Options { cri: true, ..Options::default() });
//! let cri = Cri::connect(containerd.socket());
//! let pod = cri::pod_config("web", "uid-1");
//! let pod_id = cri.run_pod_sandbox(&pod, HUSK_HANDLER).unwrap();
//! let config = cri::container_config("app", IMAGE, &["sleep", "1000"]);
//! let id = cri.create_container(&pod_id, &config, &pod).unwrap();
//! cri.start_container(&id).unwrap();
//! let out = cri.exec_sync(&id, &["echo", "hi"], 30).unwrap();
//! assert_eq!(out.stdout, b"hi\n");
//! cri.stop_pod_sandbox(&pod_id).unwrap();
//! cri.remove_pod_sandbox(&pod_id).unwrap();
//! ```

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
pub use k8s_cri::v1 as api;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

/// A CRI call's error: the gRPC status containerd answered (boxed: it is large).
pub type CriError = Box<tonic::Status>;
/// A CRI call's result.
pub type CriResult<T> = Result<T, CriError>;

/// A connection to a CRI runtime service (and its image service) on a unix socket.
#[derive(Debug)]
pub struct Cri {
    rt: tokio::runtime::Runtime,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

/// A pod in the node's network namespace (no CNI needed; containerd then keeps the node's UTS
/// namespace too, so no hostname, as kubelet does), namespace `husk-e2e`, no log directory (set
/// `log_directory`, which must exist, for containers with a `log_path`).
pub fn pod_config(name: &str, uid: &str) -> api::PodSandboxConfig {
    api::PodSandboxConfig {
        metadata: Some(api::PodSandboxMetadata {
            name: name.to_owned(),
            uid: uid.to_owned(),
            namespace: "husk-e2e".to_owned(),
            attempt: 0,
        }),
        // No hostname: as kubelet does for a pod in the node's network (and UTS) namespace.
        linux: Some(api::LinuxPodSandboxConfig {
            security_context: Some(api::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A container of `image` running `command`, for a [`pod_config`] pod (no log path; set
/// `log_path` with a pod log directory to get one).
pub fn container_config(name: &str, image: &str, command: &[&str]) -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.to_owned(),
            attempt: 0,
        }),
        image: Some(api::ImageSpec {
            image: image.to_owned(),
            ..Default::default()
        }),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        // As kubelet sets them for a container of a [`pod_config`] pod: the pod's network and
        // IPC, a PID namespace of its own.
        linux: Some(api::LinuxContainerConfig {
            security_context: Some(api::LinuxContainerSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The namespaces of a [`pod_config`] pod and its containers: the node's network (no CNI here),
/// the pod's IPC, a PID namespace per container.
fn namespaces() -> api::NamespaceOption {
    api::NamespaceOption {
        network: api::NamespaceMode::Node as i32,
        pid: api::NamespaceMode::Container as i32,
        ipc: api::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A bind mount of host directory `host` on `container` (read-write), like a Kubernetes
/// emptyDir volume.
pub fn bind_mount(host: &Path, container: &str) -> api::Mount {
    api::Mount {
        container_path: container.to_owned(),
        host_path: host.to_string_lossy().into_owned(),
        ..Default::default()
    }
}

impl Cri {
    /// Connects to the CRI service on `socket`; panics when it cannot.
    pub fn connect(socket: &Path) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("cannot build a tokio runtime: {e}"));
        let path: PathBuf = socket.to_owned();
        let channel =
            rt
                .block_on(
                    // The URI is required by tonic and unused: the connector dials the socket.
                    Endpoint::from_static("http://[::]:50051").connect_with_connector(
                        tower::service_fn(move |_: Uri| {
                            let path = path.clone();
                            async move {
                                Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?))
                            }
                        }),
                    ),
                )
                .unwrap_or_else(|e| panic!("cannot connect to CRI at {}: {e}", socket.display()));
        Cri {
            rt,
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        }
    }

    /// Runs `call` on the runtime service.
    pub fn runtime<F, Fut, T>(&self, call: F) -> CriResult<T>
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.rt
            .block_on(call(self.runtime.clone()))
            .map(tonic::Response::into_inner)
            .map_err(Box::new)
    }

    /// Runs `call` on the image service.
    pub fn images<F, Fut, T>(&self, call: F) -> CriResult<T>
    where
        F: FnOnce(ImageServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.rt
            .block_on(call(self.images.clone()))
            .map(tonic::Response::into_inner)
            .map_err(Box::new)
    }

    /// `Version`: the runtime's name and version.
    pub fn version(&self) -> CriResult<api::VersionResponse> {
        self.runtime(|mut c| async move { c.version(api::VersionRequest::default()).await })
    }

    /// `Status`: the runtime's conditions, and (CRI 1.30+, containerd 2.x) its runtime handlers
    /// with the features each supports.
    pub fn status(&self) -> CriResult<api::StatusResponse> {
        self.runtime(|mut c| async move { c.status(api::StatusRequest { verbose: false }).await })
    }

    /// `ImageStatus` of `image`: `None` when the CRI plugin does not know it.
    pub fn image_status(&self, image: &str) -> CriResult<Option<api::Image>> {
        let request = api::ImageStatusRequest {
            image: Some(api::ImageSpec {
                image: image.to_owned(),
                ..Default::default()
            }),
            verbose: false,
        };
        self.images(|mut c| async move { c.image_status(request).await })
            .map(|r| r.image)
    }

    /// `RunPodSandbox` with runtime handler `handler`; returns the pod sandbox ID.
    pub fn run_pod_sandbox(
        &self,
        config: &api::PodSandboxConfig,
        handler: &str,
    ) -> CriResult<String> {
        let request = api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_owned(),
        };
        self.runtime(|mut c| async move { c.run_pod_sandbox(request).await })
            .map(|r| r.pod_sandbox_id)
    }

    /// `PodSandboxStatus`.
    pub fn pod_sandbox_status(&self, pod_id: &str) -> CriResult<api::PodSandboxStatus> {
        let request = api::PodSandboxStatusRequest {
            pod_sandbox_id: pod_id.to_owned(),
            verbose: false,
        };
        self.runtime(|mut c| async move { c.pod_sandbox_status(request).await })
            .and_then(|r| {
                r.status
                    .ok_or_else(|| missing("PodSandboxStatus", "status"))
            })
    }

    /// `StopPodSandbox`.
    pub fn stop_pod_sandbox(&self, pod_id: &str) -> CriResult<()> {
        let request = api::StopPodSandboxRequest {
            pod_sandbox_id: pod_id.to_owned(),
        };
        self.runtime(|mut c| async move { c.stop_pod_sandbox(request).await })
            .map(drop)
    }

    /// `RemovePodSandbox`.
    pub fn remove_pod_sandbox(&self, pod_id: &str) -> CriResult<()> {
        let request = api::RemovePodSandboxRequest {
            pod_sandbox_id: pod_id.to_owned(),
        };
        self.runtime(|mut c| async move { c.remove_pod_sandbox(request).await })
            .map(drop)
    }

    /// `ListPodSandbox` (all of them).
    pub fn list_pod_sandboxes(&self) -> CriResult<Vec<api::PodSandbox>> {
        let request = api::ListPodSandboxRequest::default();
        self.runtime(|mut c| async move { c.list_pod_sandbox(request).await })
            .map(|r| r.items)
    }

    /// `CreateContainer` in pod `pod_id` (created from `pod`); returns the container ID.
    pub fn create_container(
        &self,
        pod_id: &str,
        config: &api::ContainerConfig,
        pod: &api::PodSandboxConfig,
    ) -> CriResult<String> {
        let request = api::CreateContainerRequest {
            pod_sandbox_id: pod_id.to_owned(),
            config: Some(config.clone()),
            sandbox_config: Some(pod.clone()),
        };
        self.runtime(|mut c| async move { c.create_container(request).await })
            .map(|r| r.container_id)
    }

    /// `StartContainer`.
    pub fn start_container(&self, id: &str) -> CriResult<()> {
        let request = api::StartContainerRequest {
            container_id: id.to_owned(),
        };
        self.runtime(|mut c| async move { c.start_container(request).await })
            .map(drop)
    }

    /// `StopContainer` with a grace period of `timeout` seconds.
    pub fn stop_container(&self, id: &str, timeout: i64) -> CriResult<()> {
        let request = api::StopContainerRequest {
            container_id: id.to_owned(),
            timeout,
        };
        self.runtime(|mut c| async move { c.stop_container(request).await })
            .map(drop)
    }

    /// `RemoveContainer`.
    pub fn remove_container(&self, id: &str) -> CriResult<()> {
        let request = api::RemoveContainerRequest {
            container_id: id.to_owned(),
        };
        self.runtime(|mut c| async move { c.remove_container(request).await })
            .map(drop)
    }

    /// `ContainerStatus`.
    pub fn container_status(&self, id: &str) -> CriResult<api::ContainerStatus> {
        let request = api::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        };
        self.runtime(|mut c| async move { c.container_status(request).await })
            .and_then(|r| r.status.ok_or_else(|| missing("ContainerStatus", "status")))
    }

    /// `ContainerStats`.
    pub fn container_stats(&self, id: &str) -> CriResult<api::ContainerStats> {
        let request = api::ContainerStatsRequest {
            container_id: id.to_owned(),
        };
        self.runtime(|mut c| async move { c.container_stats(request).await })
            .and_then(|r| r.stats.ok_or_else(|| missing("ContainerStats", "stats")))
    }

    /// `ListContainers` (all of them).
    pub fn list_containers(&self) -> CriResult<Vec<api::Container>> {
        let request = api::ListContainersRequest::default();
        self.runtime(|mut c| async move { c.list_containers(request).await })
            .map(|r| r.containers)
    }

    /// `ExecSync` of `cmd` in container `id`, with a timeout of `timeout` seconds.
    pub fn exec_sync(
        &self,
        id: &str,
        cmd: &[&str],
        timeout: i64,
    ) -> CriResult<api::ExecSyncResponse> {
        let request = api::ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout,
        };
        self.runtime(|mut c| async move { c.exec_sync(request).await })
    }
}

fn missing(call: &str, field: &str) -> CriError {
    Box::new(tonic::Status::internal(format!(
        "{call} answered without {field}"
    )))
}
