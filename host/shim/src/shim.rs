//! The shim's process-level commands (containerd's shim v2 protocol) as containerd-shim runs
//! them: `delete` (clean up after a shim that died) and the long-lived server's task service;
//! `start` is in start.rs.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{ExitSignal, Shim};
use containerd_shim::protos::api::DeleteResponse;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::{Config, Error, Flags, StartOpts};
use husk_sandbox::id::ContainerId;
use tracing::warn;

use crate::service::Service;
use crate::{start, vm};

/// Removes the socket named by the bundle's `address` file when no shim listens on it any more
/// (a shim that was killed leaves it; the crate removes it only at a clean exit).
fn remove_dead_socket(address_file: &Path) {
    let Ok(address) = std::fs::read_to_string(address_file) else {
        return;
    };
    let address = address.trim();
    let path = Path::new(address.strip_prefix("unix://").unwrap_or(address));
    if !path.is_absolute() || address.len() > 4096 {
        return;
    }
    let is_socket = std::fs::symlink_metadata(path)
        .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
        .unwrap_or(false);
    if !is_socket {
        return;
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => {
            if let Err(err) = std::fs::remove_file(path) {
                warn!(path = %path.display(), %err, "cannot remove the dead shim's socket");
            }
        }
        // Someone still serves it (another task of the group): keep it.
        _ => {}
    }
}

/// Exit status reported by `delete` for a task whose shim died (as runc's shim: SIGKILL).
const KILLED_STATUS: u32 = 128 + 9;

/// The shim: one per microVM.
pub struct HuskShim {
    id: String,
    namespace: String,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for HuskShim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        HuskShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // main.rs answers `start` itself (both of containerd's start protocols); this is the
        // same path for the flag protocol, should the crate ever call it.
        let request = start::StartRequest {
            protocol: start::Protocol::Flags,
            id: opts.id,
            namespace: opts.namespace,
            grpc_address: opts.address,
            ttrpc_address: opts.ttrpc_address,
            debug: opts.debug,
            socket_dir: None,
            options_type: None,
        };
        start::serve(&request)
            .await
            .map_err(|e| Error::Other(e.to_string()))
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        // The shim of this task died: remove what its VM left (a VM is named after the task that
        // booted it, the standalone container or the pod's sandbox).
        let cleanup = async {
            let config = vm::load_config().map_err(|e| e.to_string())?;
            let id = ContainerId::new(&self.id).map_err(|e| e.to_string())?;
            vm::cleanup_leftovers(&config, &id).map_err(|e| e.to_string())
        };
        if let Err(err) = cleanup.await {
            warn!(id = %self.id, %err, "cleanup of the sandbox failed");
        }
        let rootfs = Path::new("rootfs");
        while nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
        remove_dead_socket(Path::new("address"));
        Ok(DeleteResponse {
            exit_status: KILLED_STATUS,
            exited_at: MessageField::some(Timestamp::from(SystemTime::now())),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        Service::new(
            Arc::new(crate::service::Remote::new(
                publisher,
                self.namespace.clone(),
            )),
            self.namespace.clone(),
            self.exit.clone(),
            crate::service::Settings::from_environment(),
        )
    }
}
