//! virtio-blk over a raw disk image: read, write, flush, get-id; read-only honoured.
//!
//! A request is a chain: a 16-byte header (type, reserved, sector) in device-readable buffers,
//! then data (readable for writes, writable for reads), then one writable status byte. Every
//! size and sector range is checked against the chain and the disk before any I/O.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use husk_vmm_config::BlockSpec;
use virtio_queue::Queue;

use super::{
    drain_queue, ActivateContext, DescBuf, DeviceError, Interrupt, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_VERSION_1,
};
use crate::memory::GuestMem;

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Sector size.
pub const SECTOR_SIZE: u64 = 512;
/// Largest data transfer per request (Linux sends at most 1.25 MiB by default).
pub const MAX_REQUEST_BYTES: u64 = 8 << 20;
/// Largest number of data segments per request (offered as seg_max).
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
const BOUNCE_SIZE: usize = 64 * 1024;

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// Length of the device id returned by GET_ID.
pub const ID_LEN: usize = 20;
const HEADER_LEN: u64 = 16;

/// A disk image to serve (from `--block`, see [`BlockSpec`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw image.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
}

impl From<&BlockSpec> for BlockConfig {
    fn from(spec: &BlockSpec) -> Self {
        BlockConfig {
            path: spec.path.clone(),
            read_only: spec.read_only,
        }
    }
}

/// Errors while opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open the disk image {path}: {err}")]
    Open {
        /// Path of the image.
        path: String,
        /// The error.
        err: std::io::Error,
    },
}

struct Active {
    mem: GuestMem,
    queue: Queue,
    interrupt: Arc<Interrupt>,
}

/// The block device.
pub struct Block {
    file: File,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_LEN],
    active: Option<Active>,
    bounce: Vec<u8>,
}

/// What went wrong with one request; reported to the guest as a status byte.
#[derive(Debug, PartialEq, Eq)]
enum RequestError {
    /// Bad framing, size or range: IOERR.
    Invalid(&'static str),
    /// Host I/O failed: IOERR.
    Io,
    /// Unknown request type: UNSUPP.
    Unsupported(u32),
}

impl Block {
    /// Opens the image at `path`.
    pub fn open(config: &BlockConfig) -> Result<Self, BlockError> {
        let path = &config.path;
        let open_err = |err| BlockError::Open {
            path: path.display().to_string(),
            err,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(path)
            .map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        if size % SECTOR_SIZE != 0 {
            crate::guest_warn!(
                "disk image {} is not a multiple of 512 bytes; the last {} bytes are not visible",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        Ok(Block {
            file,
            read_only: config.read_only,
            capacity_sectors: size / SECTOR_SIZE,
            id: Self::make_id(path),
            active: None,
            bounce: Vec::new(),
        })
    }

    fn make_id(path: &Path) -> [u8; ID_LEN] {
        let mut id = [0u8; ID_LEN];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (dst, src) in id.iter_mut().zip(name.bytes()) {
            *dst = src;
        }
        id
    }

    /// Checks that `len` bytes at `sector` are inside the disk; returns the byte offset.
    fn disk_range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if len % SECTOR_SIZE != 0 {
            return Err(RequestError::Invalid(
                "data length is not a multiple of 512",
            ));
        }
        let end = sector
            .checked_add(len / SECTOR_SIZE)
            .ok_or(RequestError::Invalid("sector overflow"))?;
        if end > self.capacity_sectors {
            return Err(RequestError::Invalid("request past the end of the disk"));
        }
        Ok(sector * SECTOR_SIZE)
    }

    /// Serves one request. Returns the bytes written into the guest's writable buffers
    /// (without the status byte) or an error.
    fn execute(
        &mut self,
        mem: &GuestMem,
        kind: u32,
        sector: u64,
        input: &DescBuf,
        output: &DescBuf,
        data_out_len: u64,
    ) -> Result<u32, RequestError> {
        match kind {
            T_IN => {
                let offset = self.disk_range(sector, data_out_len)?;
                self.copy_disk_to_guest(mem, output, offset, data_out_len)?;
                u32::try_from(data_out_len).map_err(|_| RequestError::Invalid("too long"))
            }
            T_OUT => {
                if self.read_only {
                    return Err(RequestError::Invalid("write to a read-only disk"));
                }
                let len = input.len().saturating_sub(HEADER_LEN);
                let offset = self.disk_range(sector, len)?;
                self.copy_guest_to_disk(mem, input, offset, len)?;
                Ok(0)
            }
            T_FLUSH => {
                if !self.read_only {
                    self.file.sync_data().map_err(|_| RequestError::Io)?;
                }
                Ok(0)
            }
            T_GET_ID => {
                let n = data_out_len.min(ID_LEN as u64) as usize;
                let id = self.id.get(..n).ok_or(RequestError::Io)?;
                output
                    .write_at(mem, 0, id)
                    .map_err(|_| RequestError::Invalid("bad id buffer"))?;
                Ok(n as u32)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    fn copy_disk_to_guest(
        &mut self,
        mem: &GuestMem,
        output: &DescBuf,
        disk_offset: u64,
        len: u64,
    ) -> Result<(), RequestError> {
        let mut done: u64 = 0;
        while done < len {
            let n = ((len - done) as usize).min(BOUNCE_SIZE);
            self.bounce.resize(n, 0);
            self.file
                .read_exact_at(&mut self.bounce, disk_offset + done)
                .map_err(|_| RequestError::Io)?;
            output
                .write_at(mem, done, &self.bounce)
                .map_err(|_| RequestError::Invalid("data buffer not writable"))?;
            done += n as u64;
        }
        Ok(())
    }

    fn copy_guest_to_disk(
        &mut self,
        mem: &GuestMem,
        input: &DescBuf,
        disk_offset: u64,
        len: u64,
    ) -> Result<(), RequestError> {
        let mut done: u64 = 0;
        while done < len {
            let n = ((len - done) as usize).min(BOUNCE_SIZE);
            self.bounce.resize(n, 0);
            input
                .read_at(mem, HEADER_LEN + done, &mut self.bounce)
                .map_err(|_| RequestError::Invalid("data buffer not readable"))?;
            self.file
                .write_all_at(&self.bounce, disk_offset + done)
                .map_err(|_| RequestError::Io)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Parses and serves one chain; returns the used length (0 if no status could be written).
    fn handle_chain(&mut self, mem: &GuestMem, descs: &[super::Desc]) -> u32 {
        let input = DescBuf::readable(descs);
        let output = DescBuf::writable(descs);
        let Some(status_offset) = output.len().checked_sub(1) else {
            crate::guest_warn!("virtio-blk: request without a writable status byte; dropped");
            return 0;
        };
        let mut header = [0u8; HEADER_LEN as usize];
        let result = if input.read_at(mem, 0, &mut header).is_err() {
            Err(RequestError::Invalid(
                "request header shorter than 16 bytes",
            ))
        } else {
            let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let mut sector_bytes = [0u8; 8];
            sector_bytes.copy_from_slice(&header[8..16]);
            let sector = u64::from_le_bytes(sector_bytes);
            self.execute(mem, kind, sector, &input, &output, status_offset)
        };
        let (status, written) = match result {
            Ok(n) => (S_OK, n),
            Err(RequestError::Unsupported(kind)) => {
                tracing::debug!("virtio-blk: unsupported request type {kind}");
                (S_UNSUPP, 0)
            }
            Err(e) => {
                crate::guest_warn!("virtio-blk: request failed: {e:?}");
                (S_IOERR, 0)
            }
        };
        if output.write_at(mem, status_offset, &[status]).is_err() {
            return 0;
        }
        written.saturating_add(1)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let ro = if self.read_only { F_RO } else { 0 };
        VIRTIO_F_VERSION_1 | F_FLUSH | F_SEG_MAX | ro
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (le64), size_max (le32, unused), seg_max (le32)
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), DeviceError> {
        let got = ctx.queues.len();
        let queue = ctx
            .queues
            .into_iter()
            .next()
            .filter(|_| got == 1)
            .ok_or(DeviceError::QueueCount { expected: 1, got })?;
        self.active = Some(Active {
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        if index != 0 {
            return Err(DeviceError::NoSuchQueue(index));
        }
        let Some(mut active) = self.active.take() else {
            return Ok(());
        };
        let result = self.drain(&mut active);
        self.active = Some(active);
        result
    }
}

impl Block {
    fn drain(&mut self, active: &mut Active) -> Result<(), DeviceError> {
        let limits = (MAX_REQUEST_BYTES + HEADER_LEN + 1, usize::from(QUEUE_SIZE));
        let mem = &active.mem;
        drain_queue(
            "virtio-blk",
            mem,
            &mut active.queue,
            &active.interrupt,
            limits,
            |descs| self.handle_chain(mem, descs),
        )
    }
}

#[cfg(test)]
mod tests;
