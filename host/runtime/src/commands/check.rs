//! `husk check`: can this host run husk, and if not, what to do. Prints one line per check, the
//! effective configuration, and exits with `HOST_NOT_READY` when anything required is missing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::CommandError;
use crate::cli::Cli;
use crate::config::{self, Config, Discovery, Origin};
use crate::host::{self, CgroupMode, GuestFile, KvmKind};
use crate::{bundle, exit, sizing};

/// Arguments of `husk check`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Also check that this bundle can be loaded (config.json, rootfs, process).
    #[arg(long, short = 'b', value_name = "DIR")]
    pub bundle: Option<PathBuf>,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// What was checked (`kvm`, `guest kernel`, ...).
    pub name: &'static str,
    /// Whether it passed.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do about a failure.
    pub advice: Option<String>,
}

impl Item {
    fn ok(name: &'static str, detail: String) -> Self {
        Self {
            name,
            ok: true,
            detail,
            advice: None,
        }
    }

    fn fail(name: &'static str, detail: String, advice: impl Into<String>) -> Self {
        Self {
            name,
            ok: false,
            detail,
            advice: Some(advice.into()),
        }
    }
}

/// The advice for a host whose KVM cannot boot a standard guest.
pub const NEED_HARDWARE_KVM: &str =
    "run husk on an x86_64 host whose CPU has VMX (Intel) or SVM (AMD): bare metal, \
or a cloud VM with nested virtualization enabled";

/// Judges the KVM kind.
pub fn kvm_item(kind: &KvmKind) -> Item {
    const NAME: &str = "kvm";
    match kind {
        KvmKind::Hardware { extension } => Item::ok(
            NAME,
            format!("{} is backed by hardware virtualization: {extension}", host::DEV_KVM),
        ),
        KvmKind::Pvm => Item::fail(
            NAME,
            format!(
                "{} is PVM (module kvm_pvm) and the CPU has neither vmx nor svm: a standard guest kernel \
                 cannot boot on it (its kernel code would be emulated instruction by instruction)",
                host::DEV_KVM
            ),
            NEED_HARDWARE_KVM,
        ),
        KvmKind::Missing => Item::fail(
            NAME,
            format!("{} does not exist", host::DEV_KVM),
            format!(
                "load kvm_intel or kvm_amd (modprobe); on a VM, enable nested virtualization; else {NEED_HARDWARE_KVM}"
            ),
        ),
        KvmKind::NoAccess(reason) => Item::fail(
            NAME,
            format!("cannot open {} read-write: {reason}", host::DEV_KVM),
            "run husk as root, or as a member of the group that owns /dev/kvm",
        ),
        KvmKind::Unknown => Item::fail(
            NAME,
            format!(
                "{} exists but the CPU shows neither vmx nor svm: a standard guest cannot run at a usable speed",
                host::DEV_KVM
            ),
            NEED_HARDWARE_KVM,
        ),
    }
}

/// Judges the cgroup mode.
pub fn cgroup_item(mode: CgroupMode) -> Item {
    const NAME: &str = "cgroup v2";
    const ADVICE: &str = "boot the host with cgroup v2 only (systemd.unified_cgroup_hierarchy=1 on the kernel command line)";
    match mode {
        CgroupMode::Unified => Item::ok(NAME, "/sys/fs/cgroup is cgroup2".into()),
        CgroupMode::Hybrid => Item::fail(
            NAME,
            "hybrid hierarchy: cgroup v1 controllers at /sys/fs/cgroup, cgroup2 elsewhere".into(),
            ADVICE,
        ),
        CgroupMode::Legacy => Item::fail(NAME, "cgroup v1 only".into(), ADVICE),
        CgroupMode::None => Item::fail(
            NAME,
            "no cgroup file system is mounted".into(),
            "mount cgroup2 at /sys/fs/cgroup",
        ),
    }
}

/// Checks a guest file named by the configuration.
fn guest_file_item(name: &'static str, key: &str, path: &Path, kind: GuestFile) -> Item {
    match host::check_guest_file(path, kind) {
        Ok(()) => Item::ok(name, path.display().to_string()),
        Err(detail) => Item::fail(
            name,
            detail,
            format!(
                "build it with `make guest` (target/guest/), install it in <prefix>/share/husk/, or set {key} in {}",
                config::DEFAULT_CONFIG_PATH
            ),
        ),
    }
}

fn vmm_item(path: &Path) -> Item {
    match host::check_executable(path) {
        Ok(()) => Item::ok("husk-vmm", path.display().to_string()),
        Err(detail) => Item::fail(
            "husk-vmm",
            detail,
            format!(
                "install husk-vmm beside husk or on $PATH, or set vmm.path in {}",
                config::DEFAULT_CONFIG_PATH
            ),
        ),
    }
}

fn root_item(root: &Path) -> Item {
    const NAME: &str = "state root";
    match std::fs::metadata(root) {
        Ok(meta) if meta.is_dir() => Item::ok(NAME, format!("{} exists", root.display())),
        Ok(_) => Item::fail(
            NAME,
            format!("{} is not a directory", root.display()),
            "remove it or choose another --root",
        ),
        Err(_) => Item::ok(
            NAME,
            format!("{} will be created on first use", root.display()),
        ),
    }
}

/// Loads the bundle as `create` will, and sizes its microVM.
fn bundle_item(dir: &Path, config: &Config) -> Item {
    let failed = |detail: String| Item {
        name: "bundle",
        ok: false,
        detail,
        advice: None,
    };
    let bundle = match bundle::load(dir) {
        Ok(bundle) => bundle,
        Err(err) => return failed(err.to_string()),
    };
    let resources = bundle
        .spec
        .linux()
        .as_ref()
        .and_then(|linux| linux.resources().as_ref());
    match sizing::vm_size(resources, config) {
        Ok(size) => Item::ok(
            "bundle",
            format!(
                "{}: rootfs {}; microVM of {} vCPU{} and {} MiB",
                bundle.dir.display(),
                bundle.rootfs.display(),
                size.vcpus,
                if size.vcpus == 1 { "" } else { "s" },
                size.memory_mib
            ),
        ),
        Err(err) => failed(err.to_string()),
    }
}

/// Every check for this host and configuration.
pub fn items(config: &Config, root: &Path, bundle: Option<&Path>) -> Vec<Item> {
    let mut items = vec![
        kvm_item(&host::classify_kvm(&host::gather_kvm())),
        guest_file_item(
            "guest kernel",
            "guest.kernel",
            &config.guest.kernel,
            GuestFile::Kernel,
        ),
        guest_file_item(
            "guest initramfs",
            "guest.initramfs",
            &config.guest.initramfs,
            GuestFile::Initramfs,
        ),
        vmm_item(&config.vmm.path),
        cgroup_item(host::gather_cgroup_mode()),
        root_item(root),
    ];
    if let Some(dir) = bundle {
        items.push(bundle_item(dir, config));
    }
    items
}

/// The report: one line per check (with advice under failures), then the configuration.
pub fn report(items: &[Item], config: &Config) -> String {
    let mut out = String::new();
    for item in items {
        let status = if item.ok { "ok  " } else { "FAIL" };
        let _ = writeln!(out, "{status}  {}: {}", item.name, item.detail);
        if let Some(advice) = &item.advice {
            let _ = writeln!(out, "      -> {advice}");
        }
    }
    let origin = match &config.origin {
        Origin::File(path) => format!("from {}", path.display()),
        Origin::Defaults => format!(
            "built-in defaults: {} does not exist",
            config::DEFAULT_CONFIG_PATH
        ),
    };
    let _ = writeln!(out, "\n# effective configuration ({origin})");
    out.push_str(&config.to_toml());
    let failed = items.iter().filter(|item| !item.ok).count();
    if failed == 0 {
        out.push_str("\nthis host can run husk\n");
    } else {
        let _ = writeln!(
            out,
            "\n{failed} problem{} found: this host cannot run husk as configured",
            if failed == 1 { "" } else { "s" }
        );
    }
    out
}

/// Runs `husk check`.
pub fn run(cli: &Cli, args: &Args) -> Result<u8, CommandError> {
    let (path, explicit) = cli.options().config_path();
    let config = config::load(&path, explicit, &Discovery::from_process()?)?;
    let items = items(&config, &cli.root(), args.bundle.as_deref());
    super::print(&report(&items, &config))?;
    Ok(if items.iter().all(|item| item.ok) {
        exit::SUCCESS
    } else {
        exit::HOST_NOT_READY
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_fails_with_advice() {
        let item = kvm_item(&KvmKind::Pvm);
        assert!(!item.ok);
        assert!(item.detail.contains("PVM"), "{}", item.detail);
        let advice = item.advice.unwrap();
        assert!(
            advice.contains("VMX") && advice.contains("nested virtualization"),
            "{advice}"
        );
    }

    #[test]
    fn hardware_kvm_passes() {
        let item = kvm_item(&KvmKind::Hardware {
            extension: "SVM (AMD-V)",
        });
        assert!(item.ok);
        assert!(item.detail.contains("SVM"));
    }

    #[test]
    fn hybrid_cgroups_fail() {
        assert!(!cgroup_item(CgroupMode::Hybrid).ok);
        assert!(cgroup_item(CgroupMode::Unified).ok);
    }

    #[test]
    fn report_counts_problems_and_prints_the_configuration() {
        let discovery = Discovery {
            exe: "/usr/bin/husk".into(),
            path_var: None,
        };
        let dir = tempfile::tempdir().unwrap();
        let config = config::load(&dir.path().join("absent"), false, &discovery).unwrap();
        let items = [
            Item::ok("a", "fine".into()),
            Item::fail("b", "broken".into(), "fix b"),
        ];
        let text = report(&items, &config);
        assert!(text.contains("ok    a: fine\n"), "{text}");
        assert!(text.contains("FAIL  b: broken\n      -> fix b\n"), "{text}");
        assert!(text.contains("[vm]\nvcpus = 1\n"), "{text}");
        assert!(text.contains("1 problem found"), "{text}");
    }
}
