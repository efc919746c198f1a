//! Checks, before anything else, that the host's /dev/kvm can run a standard Linux guest.

use std::path::Path;

/// Why the host's KVM cannot run a standard guest.
#[derive(Debug, thiserror::Error)]
pub enum HostCheckError {
    /// /dev/kvm is missing or cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is the kvm module loaded and do you have access?)")]
    NoKvm(std::io::Error),
    /// The KVM backend is PVM, which emulates a standard guest's kernel instruction by instruction.
    #[error(
        "/dev/kvm is backed by PVM (module kvm_pvm): a standard guest kernel would be emulated \
         instruction by instruction and not boot in useful time; run husk on a host with VMX/SVM \
         (bare metal or nested virtualization), or pass --allow-emulated-kvm for tiny payloads"
    )]
    Pvm,
    /// The CPU has no hardware virtualization.
    #[error(
        "the CPU shows neither vmx nor svm in /proc/cpuinfo: /dev/kvm cannot run a standard \
         guest at a usable speed; pass --allow-emulated-kvm for tiny payloads only"
    )]
    NoHardwareVirt,
}

/// Fails unless /dev/kvm exists and is backed by hardware virtualization.
pub fn check_host_kvm() -> Result<(), HostCheckError> {
    std::fs::File::open("/dev/kvm").map_err(HostCheckError::NoKvm)?;
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Err(HostCheckError::Pvm);
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if !cpuinfo_has_hw_virt(&cpuinfo) {
        return Err(HostCheckError::NoHardwareVirt);
    }
    Ok(())
}

/// Whether a /proc/cpuinfo text lists `vmx` or `svm` among the flags.
pub fn cpuinfo_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(|l| l.split_whitespace())
        .any(|f| f == "vmx" || f == "svm")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_with_svm_count_as_hardware_virtualization() {
        assert!(cpuinfo_has_hw_virt("flags\t\t: fpu vme svm sse\n"));
    }

    #[test]
    fn flags_without_vmx_or_svm_do_not() {
        assert!(!cpuinfo_has_hw_virt("flags\t\t: fpu vme sse vmxnot\n"));
    }
}
