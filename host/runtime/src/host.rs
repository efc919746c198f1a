//! What `husk check` finds out about the host: the kind of KVM, cgroup v2, the guest files and
//! the monitor. Facts are gathered from /dev, /proc and /sys by [`gather_kvm`] and friends;
//! judging them is pure ([`classify_kvm`], [`cgroup_mode`], [`check_guest_file`]) and unit-tested.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The KVM device.
pub const DEV_KVM: &str = "/dev/kvm";

/// What the host's `/dev/kvm` can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmKind {
    /// Backed by hardware virtualization: a standard guest kernel boots at full speed.
    Hardware { extension: &'static str },
    /// PVM (module `kvm_pvm`) without VMX/SVM: only PVM-enabled guest kernels run at speed; a
    /// standard guest is emulated instruction by instruction and fails.
    Pvm,
    /// No `/dev/kvm`.
    Missing,
    /// `/dev/kvm` exists but cannot be opened read-write.
    NoAccess(String),
    /// `/dev/kvm` exists but the CPU shows neither VMX nor SVM.
    Unknown,
}

/// Facts about KVM on this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvmFacts {
    /// `None` if /dev/kvm is missing, `Some(Err(reason))` if it cannot be opened read-write.
    pub dev_kvm: Option<Result<(), String>>,
    /// The CPU advertises `vmx` (Intel VT-x).
    pub vmx: bool,
    /// The CPU advertises `svm` (AMD-V).
    pub svm: bool,
    /// Loaded KVM modules among `kvm_intel`, `kvm_amd`, `kvm_pvm` (as /sys/module shows them).
    pub modules: Vec<String>,
}

/// Reads the KVM facts from the running system.
pub fn gather_kvm() -> KvmFacts {
    let dev_kvm = match OpenOptions::new().read(true).write(true).open(DEV_KVM) {
        Ok(_) => Some(Ok(())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => None,
        Err(err) => Some(Err(err.to_string())),
    };
    let flags = cpu_flags(&read_prefix("/proc/cpuinfo", 1024 * 1024));
    let modules = ["kvm_intel", "kvm_amd", "kvm_pvm"]
        .into_iter()
        .filter(|m| Path::new("/sys/module").join(m).exists())
        .map(String::from)
        .collect();
    KvmFacts {
        dev_kvm,
        vmx: flags.iter().any(|f| f == "vmx"),
        svm: flags.iter().any(|f| f == "svm"),
        modules,
    }
}

/// The first `flags` line of /proc/cpuinfo, split into words.
pub fn cpu_flags(cpuinfo: &str) -> Vec<String> {
    cpuinfo
        .lines()
        .find(|line| line.starts_with("flags"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, flags)| flags.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// Judges the KVM facts like husk-vmm's own start-up check: PVM wins over everything else (with
/// `kvm_pvm` loaded, /dev/kvm is PVM's); otherwise the CPU must show `vmx` or `svm`.
pub fn classify_kvm(facts: &KvmFacts) -> KvmKind {
    let has = |name: &str| facts.modules.iter().any(|m| m == name);
    match &facts.dev_kvm {
        None => KvmKind::Missing,
        Some(Err(reason)) => KvmKind::NoAccess(reason.clone()),
        Some(Ok(())) if has("kvm_pvm") => KvmKind::Pvm,
        Some(Ok(())) if facts.vmx => KvmKind::Hardware {
            extension: "VMX (Intel VT-x)",
        },
        Some(Ok(())) if facts.svm => KvmKind::Hardware {
            extension: "SVM (AMD-V)",
        },
        Some(Ok(())) => KvmKind::Unknown,
    }
}

/// How cgroups are mounted at /sys/fs/cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupMode {
    /// cgroup v2 only ("unified"): what husk needs.
    Unified,
    /// v1 controllers with a v2 hierarchy beside them (often at /sys/fs/cgroup/unified).
    Hybrid,
    /// cgroup v1 only.
    Legacy,
    /// No cgroup file system mounted.
    None,
}

/// The cgroup mode from the text of /proc/self/mounts.
pub fn cgroup_mode(mounts: &str) -> CgroupMode {
    let mut v1 = false;
    let mut v2_elsewhere = false;
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_source), Some(target), Some(fstype)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        match fstype {
            "cgroup2" if target == "/sys/fs/cgroup" => return CgroupMode::Unified,
            "cgroup2" => v2_elsewhere = true,
            "cgroup" => v1 = true,
            _ => {}
        }
    }
    match (v1, v2_elsewhere) {
        (true, true) => CgroupMode::Hybrid,
        (true, false) => CgroupMode::Legacy,
        (false, true) => CgroupMode::Hybrid,
        (false, false) => CgroupMode::None,
    }
}

/// Reads /proc/self/mounts (bounded) and judges it.
pub fn gather_cgroup_mode() -> CgroupMode {
    cgroup_mode(&read_prefix("/proc/self/mounts", 4 * 1024 * 1024))
}

/// What a guest file must start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestFile {
    /// An ELF kernel image (`vmlinux`).
    Kernel,
    /// A gzip-compressed or plain `newc` cpio archive.
    Initramfs,
}

/// Checks that `path` is a readable regular file of the right kind, by its first bytes.
pub fn check_guest_file(path: &Path, kind: GuestFile) -> Result<(), String> {
    let mut file = File::open(path).map_err(|err| describe_open_error(path, &err))?;
    let meta = file
        .metadata()
        .map_err(|err| format!("{}: {err}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    let mut magic = [0u8; 6];
    let read = file
        .read(&mut magic)
        .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
    let magic = magic.get(..read).unwrap_or_default();
    match kind {
        GuestFile::Kernel if magic.starts_with(b"\x7fELF") => {
            has_pvh_note(&mut file).map_err(|why| format!("{}: {why}", path.display()))
        }
        GuestFile::Kernel => Err(format!(
            "{} is not an ELF kernel image (vmlinux)",
            path.display()
        )),
        GuestFile::Initramfs if magic.starts_with(b"\x1f\x8b") || magic == b"070701" => Ok(()),
        GuestFile::Initramfs => Err(format!(
            "{} is neither a gzip-compressed nor a newc cpio archive",
            path.display()
        )),
    }
}

/// The ELF note type of the PVH entry point (`XEN_ELFNOTE_PHYS32_ENTRY`), name "Xen".
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
/// Bounds for parsing a kernel's program headers and notes.
const MAX_PROGRAM_HEADERS: u16 = 128;
const MAX_NOTE_SEGMENT: u64 = 1024 * 1024;

/// Whether an ELF file is a 64-bit x86 kernel with a PVH entry note, which husk-vmm boots. Every
/// offset and size read from the file is bounded before use.
fn has_pvh_note(file: &mut (impl Read + io::Seek)) -> Result<(), String> {
    let mut header = [0u8; 64];
    read_at(file, 0, &mut header).map_err(|e| format!("cannot read the ELF header: {e}"))?;
    let field = |at: usize, len: usize| header.get(at..at.saturating_add(len)).unwrap_or_default();
    if field(4, 2) != [2, 1] || le_u16(field(18, 2)) != Some(62) {
        return Err("not a 64-bit little-endian x86_64 ELF kernel".into());
    }
    let ph_offset = le_u64(field(32, 8)).unwrap_or_default();
    let ph_size = le_u16(field(54, 2)).unwrap_or_default();
    let ph_count = le_u16(field(56, 2)).unwrap_or_default();
    if ph_size != 56 || ph_count > MAX_PROGRAM_HEADERS {
        return Err(format!(
            "unexpected ELF program headers ({ph_count} of {ph_size} bytes)"
        ));
    }
    for index in 0..u64::from(ph_count) {
        let mut ph = [0u8; 56];
        let at = index
            .checked_mul(56)
            .and_then(|o| o.checked_add(ph_offset))
            .ok_or("ELF program header offset overflows")?;
        read_at(file, at, &mut ph).map_err(|e| format!("cannot read a program header: {e}"))?;
        let ph_field =
            |at: usize, len: usize| ph.get(at..at.saturating_add(len)).unwrap_or_default();
        const PT_NOTE: u32 = 4;
        if le_u32(ph_field(0, 4)) != Some(PT_NOTE) {
            continue;
        }
        let offset = le_u64(ph_field(8, 8)).unwrap_or_default();
        let size = le_u64(ph_field(32, 8)).unwrap_or_default();
        if size > MAX_NOTE_SEGMENT {
            return Err(format!(
                "an ELF note segment of {size} bytes is implausibly large"
            ));
        }
        let mut notes = vec![0u8; usize::try_from(size).unwrap_or_default()];
        read_at(file, offset, &mut notes)
            .map_err(|e| format!("cannot read a note segment: {e}"))?;
        if notes_have(&notes, b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY) {
            return Ok(());
        }
    }
    Err("no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): build the kernel with CONFIG_PVH=y".into())
}

/// Whether a note segment holds a note with `name` (NUL included) and `kind`.
fn notes_have(mut notes: &[u8], name: &[u8], kind: u32) -> bool {
    let align4 = |n: usize| n.checked_add(3).map(|v| v & !3);
    while notes.len() >= 12 {
        let word = |at: usize| notes.get(at..at + 4).and_then(le_u32);
        let (Some(namesz), Some(descsz), Some(note_type)) = (word(0), word(4), word(8)) else {
            return false;
        };
        let (Ok(namesz), Ok(descsz)) = (usize::try_from(namesz), usize::try_from(descsz)) else {
            return false;
        };
        let name_end = 12usize.checked_add(namesz);
        let note_name = name_end.and_then(|end| notes.get(12..end));
        if note_type == kind && note_name == Some(name) {
            return true;
        }
        let next = align4(namesz)
            .and_then(|n| n.checked_add(12))
            .and_then(|n| align4(descsz).and_then(|d| n.checked_add(d)));
        match next.and_then(|n| notes.get(n..)) {
            Some(rest) => notes = rest,
            None => return false,
        }
    }
    false
}

fn read_at(file: &mut (impl Read + io::Seek), offset: u64, buf: &mut [u8]) -> io::Result<()> {
    file.seek(io::SeekFrom::Start(offset))?;
    file.read_exact(buf)
}

fn le_u16(bytes: &[u8]) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.try_into().ok()?))
}

fn le_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn le_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Checks that `path` is an executable regular file.
pub fn check_executable(path: &Path) -> Result<(), String> {
    let meta = fs::metadata(path).map_err(|err| describe_open_error(path, &err))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not executable", path.display()));
    }
    Ok(())
}

fn describe_open_error(path: &Path, err: &io::Error) -> String {
    if err.kind() == io::ErrorKind::NotFound {
        format!("{} does not exist", path.display())
    } else {
        format!("cannot open {}: {err}", path.display())
    }
}

/// The first `limit` bytes of a (proc) file as text, empty if unreadable.
fn read_prefix(path: &str, limit: u64) -> String {
    let mut text = String::new();
    if let Ok(file) = File::open(path) {
        let _ = file.take(limit).read_to_string(&mut text);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(dev: Option<Result<(), String>>, vmx: bool, svm: bool, modules: &[&str]) -> KvmFacts {
        KvmFacts {
            dev_kvm: dev,
            vmx,
            svm,
            modules: modules.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    #[test]
    fn pvm_without_vmx_or_svm() {
        let f = facts(Some(Ok(())), false, false, &["kvm_pvm"]);
        assert_eq!(classify_kvm(&f), KvmKind::Pvm);
    }

    #[test]
    fn pvm_module_wins_over_cpu_flags() {
        let f = facts(Some(Ok(())), true, false, &["kvm_pvm"]);
        assert_eq!(classify_kvm(&f), KvmKind::Pvm);
    }

    #[test]
    fn hardware_intel_and_amd() {
        assert!(matches!(
            classify_kvm(&facts(Some(Ok(())), true, false, &["kvm_intel"])),
            KvmKind::Hardware { extension } if extension.starts_with("VMX")
        ));
        assert!(matches!(
            classify_kvm(&facts(Some(Ok(())), false, true, &["kvm_amd"])),
            KvmKind::Hardware { extension } if extension.starts_with("SVM")
        ));
    }

    #[test]
    fn missing_inaccessible_and_unknown() {
        assert_eq!(
            classify_kvm(&facts(None, true, false, &[])),
            KvmKind::Missing
        );
        assert_eq!(
            classify_kvm(&facts(Some(Err("denied".into())), true, false, &[])),
            KvmKind::NoAccess("denied".into())
        );
        assert_eq!(
            classify_kvm(&facts(Some(Ok(())), false, false, &["kvm_intel"])),
            KvmKind::Unknown
        );
    }

    #[test]
    fn cpu_flags_from_cpuinfo() {
        let cpuinfo = "processor\t: 0\nflags\t\t: fpu vme svm lm\n\nprocessor\t: 1\nflags\t: fpu\n";
        assert_eq!(cpu_flags(cpuinfo), ["fpu", "vme", "svm", "lm"]);
        assert!(cpu_flags("").is_empty());
    }

    #[test]
    fn cgroup_modes() {
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        assert_eq!(cgroup_mode(unified), CgroupMode::Unified);
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup_mode(hybrid), CgroupMode::Hybrid);
        let legacy = "cgroup /sys/fs/cgroup/memory cgroup rw,memory 0 0\n";
        assert_eq!(cgroup_mode(legacy), CgroupMode::Legacy);
        assert_eq!(
            cgroup_mode("proc /proc proc rw 0 0\nbad\n"),
            CgroupMode::None
        );
    }

    /// A minimal x86_64 ELF with one PT_NOTE segment holding `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[18..20].copy_from_slice(&62u16.to_le_bytes());
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = 64;
        elf[ph..ph + 4].copy_from_slice(&4u32.to_le_bytes());
        elf[ph + 8..ph + 16].copy_from_slice(&120u64.to_le_bytes());
        elf[ph + 32..ph + 40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        elf.extend_from_slice(notes);
        elf
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    #[test]
    fn pvh_note_is_found_after_other_notes() {
        let mut notes = note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        notes.extend(note(b"Xen\0", 18, &0x0100_0000u32.to_le_bytes()));
        let elf = elf_with_notes(&notes);
        has_pvh_note(&mut io::Cursor::new(elf)).unwrap();
    }

    #[test]
    fn kernel_without_pvh_note_is_refused() {
        let elf = elf_with_notes(&note(b"Xen\0", 17, &[0; 4]));
        let err = has_pvh_note(&mut io::Cursor::new(elf)).unwrap_err();
        assert!(err.contains("CONFIG_PVH=y"), "{err}");
    }

    #[test]
    fn hostile_note_sizes_do_not_panic() {
        let mut bad = note(b"Xen\0", 18, &[0; 4]);
        bad[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!notes_have(&bad, b"Xen\0", 18));
        bad[0..4].copy_from_slice(&4u32.to_le_bytes());
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        bad[8..12].copy_from_slice(&17u32.to_le_bytes());
        assert!(!notes_have(&bad, b"Xen\0", 18));
        assert!(!notes_have(&[1, 2, 3], b"Xen\0", 18));
        let mut elf = elf_with_notes(&[]);
        elf[64 + 32..64 + 40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(has_pvh_note(&mut io::Cursor::new(elf)).is_err());
        let mut elf = elf_with_notes(&[]);
        elf[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(has_pvh_note(&mut io::Cursor::new(elf)).is_err());
    }

    #[test]
    fn non_x86_64_elf_is_refused() {
        let mut elf = elf_with_notes(&note(b"Xen\0", 18, &[0; 4]));
        elf[18..20].copy_from_slice(&183u16.to_le_bytes());
        let err = has_pvh_note(&mut io::Cursor::new(elf)).unwrap_err();
        assert!(err.contains("x86_64"), "{err}");
    }

    #[test]
    fn guest_files_are_recognised_by_magic() {
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("vmlinux");
        fs::write(&elf, elf_with_notes(&note(b"Xen\0", 18, &[0; 4]))).unwrap();
        let gz = dir.path().join("initramfs.cpio.gz");
        fs::write(&gz, b"\x1f\x8b\x08\x00").unwrap();
        let cpio = dir.path().join("initramfs.cpio");
        fs::write(&cpio, b"070701000").unwrap();
        let text = dir.path().join("text");
        fs::write(&text, b"hello").unwrap();
        check_guest_file(&elf, GuestFile::Kernel).unwrap();
        check_guest_file(&gz, GuestFile::Initramfs).unwrap();
        check_guest_file(&cpio, GuestFile::Initramfs).unwrap();
        assert!(check_guest_file(&text, GuestFile::Kernel)
            .unwrap_err()
            .contains("not an ELF"));
        assert!(check_guest_file(&elf, GuestFile::Initramfs).is_err());
        assert!(
            check_guest_file(&dir.path().join("absent"), GuestFile::Kernel)
                .unwrap_err()
                .contains("does not exist")
        );
        assert!(check_guest_file(dir.path(), GuestFile::Kernel)
            .unwrap_err()
            .contains("not a regular file"));
    }

    #[test]
    fn executables_need_the_x_bit() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("husk-vmm");
        fs::write(&file, b"#!/bin/sh\n").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_executable(&file)
            .unwrap_err()
            .contains("not executable"));
        fs::set_permissions(&file, fs::Permissions::from_mode(0o755)).unwrap();
        check_executable(&file).unwrap();
        assert!(check_executable(dir.path()).is_err());
    }
}
