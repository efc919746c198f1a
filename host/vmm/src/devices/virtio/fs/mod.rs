//! virtio-fs: shares a host directory with the guest (`mount -t virtiofs TAG /mnt`).
//!
//! FUSE requests arrive on a high-priority queue (FORGET, INTERRUPT) and one request queue; both
//! are served the same way, on the event loop: the chain is validated (bounds, direction, size),
//! then fuse-backend-rs's virtio-fs [`Server`] decodes the request and runs it on its [`Vfs`]
//! (which negotiates the FUSE options and refuses `.`, `..` and `/` in names that create or
//! remove entries), whose only file system is a [`PassthroughFs`] of the shared directory at `/`.
//!
//! Confinement to the shared directory rests on PassthroughFs's design and on its configuration
//! here: every inode is an `O_PATH | O_NOFOLLOW` fd opened relative to its parent's fd (symlinks
//! are never followed on the host; the guest resolves them itself); `..` of the root is the root;
//! only regular files and directories are ever opened (no device nodes, FIFOs or sockets);
//! file handles (`open_by_handle_at`), extended attributes, writeback caching and DAX are off;
//! the thread serving requests has no CAP_MKNOD, so the guest cannot create device nodes that
//! host users could open.

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::FsOptions;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::api::{Vfs, VfsOptions};
use fuse_backend_rs::passthrough::{CachePolicy, Config as PassthroughConfig, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use husk_vmm_config::FsSpec;
pub use husk_vmm_config::{validate_tag, TagError, TAG_MAX_LEN};
use virtio_queue::{DescriptorChain, Queue, QueueT};

use super::{
    collect_chain, ActivateContext, ChainError, DescBuf, DeviceError, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMem;

/// Device type: file system.
pub const TYPE_FS: u32 = 26;
/// Number of request queues (offered in the config space; the hiprio queue comes first).
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// Size of the high-priority queue (FORGET, INTERRUPT).
pub const HIPRIO_QUEUE_SIZE: u16 = 128;
/// Size of each request queue. Linux caps a request at `queue size - 4` pages (and at 256), so
/// 1024 lets it send 1 MiB reads and writes.
pub const REQUEST_QUEUE_SIZE: u16 = 1024;
/// Largest chain accepted (both directions together): the FUSE server's 1 MiB buffer plus
/// headers, with room to spare.
pub const MAX_CHAIN_BYTES: u64 = 2 << 20;
/// Most descriptors in one chain.
pub const MAX_CHAIN_DESCS: usize = REQUEST_QUEUE_SIZE as usize;
/// Size of the FUSE request header (`fuse_in_header`).
pub const FUSE_IN_HEADER_LEN: u64 = 40;
/// Size of the FUSE reply header (`fuse_out_header`).
pub const FUSE_OUT_HEADER_LEN: u64 = 16;
/// Config space: tag[36], then num_request_queues (le32).
const CONFIG_LEN: usize = TAG_MAX_LEN + 4;
const QUEUE_SIZES: [u16; 1 + NUM_REQUEST_QUEUES as usize] = [HIPRIO_QUEUE_SIZE, REQUEST_QUEUE_SIZE];

/// A shared directory to serve (from `--fs`, see [`FsSpec`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The shared directory (canonical: symlinks in the path given by the user are resolved
    /// once, here).
    pub path: PathBuf,
    /// The tag the guest mounts.
    pub tag: String,
}

impl TryFrom<&FsSpec> for FsConfig {
    type Error = FsError;

    /// Checks the tag and resolves the path, which must be an existing UTF-8 directory.
    fn try_from(spec: &FsSpec) -> Result<Self, Self::Error> {
        validate_tag(&spec.tag)?;
        let path = std::fs::canonicalize(&spec.path).map_err(|err| FsError::SharedDir {
            path: spec.path.clone(),
            err,
        })?;
        if !path.is_dir() {
            return Err(FsError::NotADirectory(path));
        }
        if path.to_str().is_none() {
            return Err(FsError::NotUtf8(path));
        }
        Ok(FsConfig {
            path,
            tag: spec.tag.clone(),
        })
    }
}

/// Errors while creating the device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is invalid.
    #[error(transparent)]
    BadTag(#[from] TagError),
    /// Two shared directories have the same tag.
    #[error("the virtio-fs tag {0:?} is used twice")]
    DuplicateTag(String),
    /// The shared directory cannot be resolved.
    #[error("shared directory {}: {err}", path.display())]
    SharedDir {
        /// The path given.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
    /// The shared directory is not a directory.
    #[error("shared directory {}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// The resolved shared directory path is not UTF-8.
    #[error("shared directory {}: the path is not UTF-8", .0.display())]
    NotUtf8(PathBuf),
    /// The shared directory path cannot be used.
    #[error("shared directory {0}: the path must be UTF-8 without NUL bytes")]
    BadPath(PathBuf),
    /// The passthrough file system could not open the shared directory.
    #[error("cannot share the directory {path}: {err}")]
    Open {
        /// The shared directory.
        path: PathBuf,
        /// The error.
        err: std::io::Error,
    },
    /// CAP_MKNOD could not be dropped.
    #[error("cannot drop CAP_MKNOD from the thread serving virtio-fs: {0}")]
    Capability(String),
    /// The passthrough file system could not be mounted in the FUSE server's VFS.
    #[error("cannot share the directory {path}: {err}")]
    Mount {
        /// The shared directory.
        path: PathBuf,
        /// The error.
        err: fuse_backend_rs::api::vfs::VfsError,
    },
}

/// Why one request failed (the chain is returned with nothing written).
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// The chain failed validation.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The readable part cannot hold a FUSE header.
    #[error("request of {0} readable bytes is shorter than the FUSE header")]
    ShortHeader(u64),
    /// The writable part is smaller than a FUSE reply header (FORGET aside).
    #[error("reply buffer of {0} bytes is shorter than the FUSE reply header")]
    ShortReply(u64),
    /// The buffers could not be mapped.
    #[error("cannot map the descriptor buffers: {0}")]
    Buffers(fuse_backend_rs::transport::Error),
    /// The FUSE server rejected the message.
    #[error("FUSE request failed: {0}")]
    Fuse(fuse_backend_rs::Error),
}

type Fs = PassthroughFs<()>;

struct Active {
    mem: GuestMem,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// The virtio-fs device.
pub struct VirtioFs {
    tag: String,
    vfs: Arc<Vfs>,
    server: Server<Arc<Vfs>>,
    active: Option<Active>,
}

/// The passthrough configuration: confinement first (no file handles, no xattrs, no DAX, no
/// mount-id games), close-to-open caching as the guest expects of a local file system.
fn passthrough_config(root: &Path) -> Result<PassthroughConfig, FsError> {
    let root_dir = root
        .to_str()
        .filter(|s| !s.contains('\0'))
        .ok_or_else(|| FsError::BadPath(root.to_path_buf()))?
        .to_string();
    Ok(PassthroughConfig {
        root_dir,
        cache_policy: CachePolicy::Auto,
        writeback: false,
        xattr: false,
        // Imported below, before the VFS mounts it (the VFS then negotiates the options).
        do_import: false,
        inode_file_handles: false,
        dax_file_size: None,
        seal_size: false,
        enable_mntid: false,
        use_host_ino: false,
        killpriv_v2: false,
        no_open: false,
        no_opendir: false,
        no_readdir: false,
        ..PassthroughConfig::default()
    })
}

/// FUSE options offered to the guest (intersected with the guest's): large requests (1 MiB
/// reads and writes in one request), parallel lookups, READDIRPLUS. Not offered: writeback
/// caching, DAX, zero-message open, killpriv_v2, ioctl.
fn vfs_options() -> VfsOptions {
    VfsOptions {
        no_open: false,
        no_opendir: false,
        no_writeback: true,
        killpriv_v2: false,
        no_readdir: false,
        seal_size: false,
        out_opts: FsOptions::ASYNC_READ
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::BIG_WRITES
            | FsOptions::ASYNC_DIO
            | FsOptions::AUTO_INVAL_DATA
            | FsOptions::MAX_PAGES
            | FsOptions::ATOMIC_O_TRUNC
            | FsOptions::CACHE_SYMLINKS
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO,
        ..VfsOptions::default()
    }
}

/// Drops CAP_MKNOD from the calling thread's effective and permitted sets (for good: switching
/// the effective uid back to 0 after a request does not bring it back). Device nodes the guest
/// would create in the share could be opened by host users; FIFOs and sockets need no
/// capability.
fn drop_mknod_capability() -> Result<(), FsError> {
    for set in [caps::CapSet::Effective, caps::CapSet::Permitted] {
        caps::drop(None, set, caps::Capability::CAP_MKNOD)
            .map_err(|e| FsError::Capability(e.to_string()))?;
    }
    Ok(())
}

impl VirtioFs {
    /// Shares `config.path` under `config.tag`.
    ///
    /// Must be called on the thread that will serve the queues (the event loop): it drops
    /// CAP_MKNOD from that thread. PassthroughFs sets the process umask to 0 (the guest's mode
    /// bits are applied as sent), so the monitor creates its own files (console, vsock socket)
    /// before this.
    pub fn new(config: &FsConfig) -> Result<Self, FsError> {
        validate_tag(&config.tag)?;
        drop_mknod_capability()?;
        let open_err = |err| FsError::Open {
            path: config.path.clone(),
            err,
        };
        let fs = Fs::new(passthrough_config(&config.path)?).map_err(open_err)?;
        fs.import().map_err(open_err)?;
        let vfs = Vfs::new(vfs_options());
        vfs.mount(Box::new(fs), "/").map_err(|err| FsError::Mount {
            path: config.path.clone(),
            err,
        })?;
        let vfs = Arc::new(vfs);
        Ok(VirtioFs {
            tag: config.tag.clone(),
            server: Server::new(vfs.clone()),
            vfs,
            active: None,
        })
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        for (dst, src) in config.iter_mut().zip(self.tag.bytes().take(TAG_MAX_LEN)) {
            *dst = src;
        }
        if let Some(n) = config.get_mut(TAG_MAX_LEN..) {
            n.copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        }
        config
    }

    /// Serves one request; returns the number of bytes written into the chain.
    fn serve(
        server: &Server<Arc<Vfs>>,
        mem: &GuestMem,
        chain: DescriptorChain<&GuestMem>,
    ) -> Result<u32, RequestError> {
        let descs = collect_chain(chain.clone(), MAX_CHAIN_BYTES, MAX_CHAIN_DESCS)?;
        let readable = DescBuf::readable(&descs).len();
        if readable < FUSE_IN_HEADER_LEN {
            return Err(RequestError::ShortHeader(readable));
        }
        let writable = DescBuf::writable(&descs).len();
        if writable != 0 && writable < FUSE_OUT_HEADER_LEN {
            return Err(RequestError::ShortReply(writable));
        }
        // The buffers are mapped again from the chain; every one is bounds-checked against guest
        // memory again there, so a guest rewriting its descriptors meanwhile only confuses itself.
        let reader =
            Reader::from_descriptor_chain(mem, chain.clone()).map_err(RequestError::Buffers)?;
        let writer = VirtioFsWriter::new(mem, chain).map_err(RequestError::Buffers)?;
        let written = server
            .handle_message(reader, writer.into(), None, None)
            .map_err(RequestError::Fuse)?;
        // The writer never exceeds the writable length, itself at most MAX_CHAIN_BYTES.
        Ok(u32::try_from(written).unwrap_or(0))
    }
}

impl VirtioDevice for VirtioFs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = self.config_space();
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        if let Some(src) = config.get(start..) {
            for (dst, b) in data.iter_mut().zip(src) {
                *dst = *b;
            }
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), DeviceError> {
        if ctx.queues.len() != QUEUE_SIZES.len() {
            return Err(DeviceError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: ctx.queues.len(),
            });
        }
        self.active = Some(Active {
            mem: ctx.mem,
            queues: ctx.queues,
            interrupt: ctx.interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        // Forget every inode and open file the old driver had; the next driver starts with
        // FUSE_INIT on a fresh root.
        fuse_backend_rs::api::filesystem::FileSystem::destroy(&*self.vfs);
    }

    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let queue = active
            .queues
            .get_mut(index)
            .ok_or(DeviceError::NoSuchQueue(index))?;
        let mut used_any = false;
        while let Some(chain) = queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let len = match Self::serve(&self.server, &active.mem, chain) {
                Ok(len) => len,
                Err(e) => {
                    crate::guest_warn!("virtio-fs {}: queue {index}: {e}", self.tag);
                    0
                }
            };
            queue
                .add_used(&active.mem, head, len)
                .map_err(DeviceError::Queue)?;
            used_any = true;
        }
        if used_any
            && queue
                .needs_notification(&active.mem)
                .map_err(DeviceError::Queue)?
        {
            active.interrupt.signal_used();
        }
        Ok(())
    }
}
