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
        GuestFile::Kernel if magic.starts_with(b"\x7fELF") => Ok(()),
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

    #[test]
    fn guest_files_are_recognised_by_magic() {
        let dir = tempfile::tempdir().unwrap();
        let elf = dir.path().join("vmlinux");
        fs::write(&elf, b"\x7fELF\x02\x01rest").unwrap();
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
