//! Loading the guest: the kernel ELF through its PVH entry, the initrd, the command line and
//! the PVH start info with its memory map.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryRegion};

use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIGH_RAM_START, MEMMAP_MAX_ENTRIES, MEMMAP_START,
    MMIO_HOLE_START, MODLIST_START, PVH_INFO_START,
};
use crate::memory::{e820_entries, GuestMem};

/// Command line every guest gets; `--cmdline` and the virtio-mmio devices are appended.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule";

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const PAGE_SIZE: u64 = 4096;

/// Errors while loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open the kernel {path}: {err}")]
    OpenKernel {
        /// The path given.
        path: String,
        /// The error.
        err: std::io::Error,
    },
    /// The kernel is not a loadable ELF.
    #[error("cannot load the kernel {path} as an ELF vmlinux: {err}")]
    LoadKernel {
        /// The path given.
        path: String,
        /// The loader's error.
        err: linux_loader::loader::Error,
    },
    /// The kernel ELF has no PVH entry note.
    #[error("the kernel {0} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): build it with CONFIG_PVH=y")]
    NoPvhEntry(String),
    /// The initrd cannot be opened or read.
    #[error("cannot read the initrd {path}: {err}")]
    Initrd {
        /// The path given.
        path: String,
        /// The error.
        err: std::io::Error,
    },
    /// The initrd does not fit in guest memory after the kernel.
    #[error("the initrd ({size} bytes) does not fit in guest memory after the kernel; give the guest more memory")]
    InitrdTooLarge {
        /// Size of the initrd.
        size: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("cannot copy the initrd into guest memory: {0}")]
    InitrdCopy(vm_memory::GuestMemoryError),
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing the command line to guest memory failed.
    #[error("cannot write the command line into guest memory: {0}")]
    CmdlineCopy(linux_loader::loader::Error),
    /// Writing the PVH start info failed.
    #[error("cannot write the PVH start info: {0}")]
    StartInfo(linux_loader::configurator::Error),
    /// Too many memory map entries.
    #[error("the memory map has {0} entries, more than {MEMMAP_MAX_ENTRIES}")]
    MemmapTooLarge(usize),
}

/// Where the loaded kernel starts.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// PVH entry point (32-bit protected mode).
    pub entry: u64,
    /// First address after the kernel image.
    pub end: u64,
}

/// Loads the ELF at `path` and returns its PVH entry point.
pub fn load_kernel(mem: &GuestMem, path: &Path) -> Result<LoadedKernel, BootError> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(|err| BootError::OpenKernel {
        path: shown.clone(),
        err,
    })?;
    let result =
        Elf::load(mem, None, &mut file, Some(GuestAddress(HIGH_RAM_START))).map_err(|err| {
            BootError::LoadKernel {
                path: shown.clone(),
                err,
            }
        })?;
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
            entry: entry.raw_value(),
            end: result.kernel_end,
        }),
        _ => Err(BootError::NoPvhEntry(shown)),
    }
}

/// Loads the initrd at `path` at the top of the RAM below the MMIO hole, page aligned.
/// Returns its (address, size).
pub fn load_initrd(mem: &GuestMem, path: &Path, kernel_end: u64) -> Result<(u64, u64), BootError> {
    let shown = path.display().to_string();
    let initrd_err = |err| BootError::Initrd {
        path: shown.clone(),
        err,
    };
    let mut file = File::open(path).map_err(initrd_err)?;
    let size = file.metadata().map_err(initrd_err)?.len();
    let low_ram_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().raw_value().saturating_add(r.len()))
        .unwrap_or(0)
        .min(MMIO_HOLE_START);
    let addr = low_ram_end
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= kernel_end && size > 0)
        .ok_or(BootError::InitrdTooLarge { size })?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { size })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(BootError::InitrdCopy)?;
    Ok((addr, size))
}

/// Builds the command line: defaults, then the device announcements, then the user's part.
pub fn build_cmdline(devices: &[String], user: &str) -> Result<Cmdline, BootError> {
    let mut text = String::from(DEFAULT_CMDLINE);
    for dev in devices {
        text.push(' ');
        text.push_str(dev);
    }
    if !user.trim().is_empty() {
        text.push(' ');
        text.push_str(user.trim());
    }
    Cmdline::try_from(&text, CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)
}

/// Writes the command line, the memory map, the module list and the PVH start info.
pub fn write_boot_info(
    mem: &GuestMem,
    cmdline: &Cmdline,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(BootError::CmdlineCopy)?;
    let memmap: Vec<hvm_memmap_table_entry> = e820_entries(mem)
        .into_iter()
        .map(|(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    if memmap.len() > MEMMAP_MAX_ENTRIES {
        return Err(BootError::MemmapTooLarge(memmap.len()));
    }
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut modules = Vec::new();
    if let Some((paddr, size)) = initrd {
        modules.push(hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        });
        start_info.nr_modules = 1;
        start_info.modlist_paddr = MODLIST_START;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMem>(&params, mem).map_err(BootError::StartInfo)
}

/// Reads back the NUL-terminated command line written at `CMDLINE_START` (for tests/logging).
pub fn read_cmdline(mem: &GuestMem) -> Option<String> {
    let mut buf = vec![0u8; CMDLINE_MAX_SIZE];
    mem.read_slice(&mut buf, GuestAddress(CMDLINE_START)).ok()?;
    let end = buf.iter().position(|b| *b == 0)?;
    String::from_utf8(buf.get(..end)?.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    #[test]
    fn cmdline_is_defaults_then_devices_then_user_part() {
        let cmdline =
            build_cmdline(&["virtio_mmio.device=4K@0xd0000000:5".into()], "quiet").unwrap();
        assert_eq!(
            cmdline.as_cstring().unwrap().to_str().unwrap(),
            format!("{DEFAULT_CMDLINE} virtio_mmio.device=4K@0xd0000000:5 quiet")
        );
    }

    #[test]
    fn oversized_cmdline_is_refused() {
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(matches!(
            build_cmdline(&[], &long),
            Err(BootError::Cmdline(_))
        ));
    }

    #[test]
    fn missing_kernel_names_the_path() {
        let mem = create_guest_memory(32).unwrap();
        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn start_info_points_at_cmdline_and_memmap() {
        let mem = create_guest_memory(32).unwrap();
        let cmdline = build_cmdline(&[], "").unwrap();
        write_boot_info(&mem, &cmdline, Some((0x100_0000, 0x1000))).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0x100_0000, 0x1000));
        assert_eq!(read_cmdline(&mem).unwrap(), DEFAULT_CMDLINE);
    }
}
