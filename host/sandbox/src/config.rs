//! husk's configuration: `/etc/husk/config.toml` (or `--config FILE`) over built-in defaults.
//!
//! Every key is optional; unknown keys and bad values are errors naming the key. Paths not set in
//! the file are discovered (see [`Discovery`]): the guest kernel and initramfs next to husk's
//! install prefix (`<prefix>/share/husk/`), else in the build tree the binary runs from
//! (`<checkout>/target/guest/`); husk-vmm next to the husk binary, else on `$PATH`.

use std::ffi::OsString;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the configuration is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/husk/config.toml";
/// The largest configuration file read, in bytes.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// The guest kernel's file name, in `<prefix>/share/husk/` and in `target/guest/`.
pub const KERNEL_FILE: &str = "vmlinux";
/// The initramfs's file name, in `<prefix>/share/husk/` and in `target/guest/`.
pub const INITRAMFS_FILE: &str = "initramfs.cpio.gz";
/// The monitor's binary name.
pub const VMM_BINARY: &str = "husk-vmm";

/// Hard bounds on the `[limits]` keys themselves.
/// husk-vmm's own limit (`--vcpus 1..=32`).
const MAX_VCPUS_CEILING: u32 = 32;
/// The smallest console cap accepted, so a boot log always fits.
const MIN_CONSOLE_BYTES: u64 = 64 * 1024;
const MAX_MEMORY_MIB_CEILING: u32 = 1024 * 1024;
const MIN_MEMORY_MIB_FLOOR: u32 = 32;
const MAX_OVERHEAD_MIB: u32 = 64 * 1024;
/// Bounds of `vmm.host_memory_mib`: below 8 MiB husk-vmm itself does not fit.
const MIN_HOST_MEMORY_MIB: u32 = 8;
const MAX_HOST_MEMORY_MIB: u32 = 64 * 1024;

/// Errors reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read (or, when named with `--config`, does not exist).
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file is larger than [`MAX_CONFIG_BYTES`].
    #[error("configuration file {path} is larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge { path: PathBuf },
    /// TOML syntax error, unknown key or value of the wrong type.
    #[error("configuration file {path}, line {line}, column {column}: {key}{message}")]
    Parse {
        path: PathBuf,
        /// `key `a.b`: ` or empty when the error is not about one key.
        key: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A value of the right type but out of range or inconsistent.
    #[error("configuration {origin}: key `{key}`: {message}")]
    Invalid {
        origin: Origin,
        key: &'static str,
        message: String,
    },
    /// The husk binary's own path is needed to find the guest files and cannot be read.
    #[error("cannot find the husk binary's own path: {0}")]
    CurrentExe(#[source] io::Error),
}

/// Where the configuration came from, for messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Origin {
    /// A file that was read.
    File(PathBuf),
    /// No file: built-in defaults only (also what a deserialized [`Config`] says, since its
    /// origin is not serialized).
    #[default]
    Defaults,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "file {}", path.display()),
            Origin::Defaults => f.write_str("built-in defaults"),
        }
    }
}

// ---- the file's schema: every key optional, unknown keys rejected ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileConfig {
    guest: FileGuest,
    vmm: FileVmm,
    vm: FileVm,
    console: FileConsole,
    limits: FileLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileGuest {
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileVmm {
    path: Option<PathBuf>,
    host_memory_mib: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileVm {
    vcpus: Option<u32>,
    memory_mib: Option<u32>,
    memory_overhead_mib: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileConsole {
    log_dir: Option<PathBuf>,
    max_bytes: Option<u64>,
    kernel_messages: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct FileLimits {
    max_vcpus: Option<u32>,
    min_memory_mib: Option<u32>,
    max_memory_mib: Option<u32>,
}

// ---- the effective configuration ----

/// The effective configuration: file values over discovered paths and built-in defaults.
/// Serializes to the same TOML schema the file uses (what `husk check` prints); deserializes
/// from it too (how the runtime hands a configuration it loaded to its supervisor), without the
/// checks [`load`] makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub guest: GuestConfig,
    pub vmm: VmmConfig,
    pub vm: VmConfig,
    pub console: ConsoleConfig,
    pub limits: Limits,
    /// Where it came from (not serialized: [`Origin::Defaults`] once deserialized).
    #[serde(skip)]
    pub origin: Origin,
}

/// `[guest]`: what the microVM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// The guest kernel (an uncompressed ELF `vmlinux` with a PVH entry).
    pub kernel: PathBuf,
    /// The initramfs whose `/init` is husk-agent.
    pub initramfs: PathBuf,
}

/// `[vmm]`: the monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmmConfig {
    /// The husk-vmm binary.
    pub path: PathBuf,
    /// Host memory (MiB) husk-vmm may use beyond the guest's memory: added to it in the
    /// sandbox's host cgroup `memory.max` (see `crate::cgroup`).
    pub host_memory_mib: u32,
}

/// `[vm]`: the size of a microVM when the spec sets no resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// vCPUs of a microVM whose spec sets no CPU limit.
    pub vcpus: u32,
    /// Memory (MiB) available to the containers of a microVM whose spec sets no memory limit.
    pub memory_mib: u32,
    /// Memory (MiB) added to the containers' memory for the guest kernel and agent.
    pub memory_overhead_mib: u32,
}

/// `[console]`: the guest's serial console.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Directory of the per-container console logs (`<log_dir>/<id>.log`).
    pub log_dir: PathBuf,
    /// Size cap of one console log in bytes (husk-vmm `--console-max-bytes`); output beyond
    /// it is discarded, so a guest printing forever cannot fill the disk.
    pub max_bytes: u64,
    /// Whether the guest kernel prints its boot messages to the console. Off by default: the
    /// kernel boots with `quiet` (warnings, errors and panics still reach the log), because
    /// every byte on the serial console is a VM exit (about 40% of a boot's time in the test host).
    pub kernel_messages: bool,
}

/// `[limits]`: bounds on what a spec may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The most vCPUs one microVM gets.
    pub max_vcpus: u32,
    /// The least memory (MiB) one microVM gets, overhead included.
    pub min_memory_mib: u32,
    /// The most memory (MiB) one microVM gets, overhead included.
    pub max_memory_mib: u32,
}

/// Built-in defaults for the numeric keys and the console directory.
pub mod defaults {
    pub const VCPUS: u32 = 1;
    pub const MEMORY_MIB: u32 = 256;
    pub const MEMORY_OVERHEAD_MIB: u32 = 64;
    pub const HOST_MEMORY_MIB: u32 = 32;
    pub const CONSOLE_LOG_DIR: &str = "/var/log/husk";
    pub const CONSOLE_MAX_BYTES: u64 = 16 * 1024 * 1024;
    pub const MAX_VCPUS: u32 = 16;
    pub const MIN_MEMORY_MIB: u32 = 128;
    pub const MAX_MEMORY_MIB: u32 = 16 * 1024;
}

/// What default paths are derived from: the husk binary's path and `$PATH`.
#[derive(Debug, Clone)]
pub struct Discovery {
    /// The running husk binary (`/proc/self/exe`).
    pub exe: PathBuf,
    /// The `PATH` environment variable.
    pub path_var: Option<OsString>,
}

impl Discovery {
    /// Discovery from the running process.
    pub fn from_process() -> Result<Self, ConfigError> {
        Ok(Self {
            exe: std::env::current_exe().map_err(ConfigError::CurrentExe)?,
            path_var: std::env::var_os("PATH"),
        })
    }

    /// The directories searched for the guest kernel and initramfs, in order:
    /// `<prefix>/share/husk` when the binary is `<prefix>/bin/husk` (an installation), then
    /// `<T>/guest` for the nearest ancestor `<T>` of the binary named `target` (a cargo build tree,
    /// where `make guest` puts them).
    pub fn guest_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        let bin_dir = self.exe.parent();
        if let Some(prefix) = bin_dir
            .filter(|dir| dir.file_name().is_some_and(|name| name == "bin"))
            .and_then(Path::parent)
        {
            dirs.push(prefix.join("share").join("husk"));
        }
        if let Some(target) = bin_dir
            .into_iter()
            .flat_map(Path::ancestors)
            .find(|dir| dir.file_name().is_some_and(|name| name == "target"))
        {
            dirs.push(target.join("guest"));
        }
        dirs
    }

    /// The first `<dir>/<file>` that exists among [`Self::guest_dirs`], else the first candidate,
    /// else `/usr/share/husk/<file>` (reported missing by `husk check`).
    fn guest_file(&self, file: &str, exists: &dyn Fn(&Path) -> bool) -> PathBuf {
        let candidates: Vec<PathBuf> = self.guest_dirs().iter().map(|d| d.join(file)).collect();
        candidates
            .iter()
            .find(|path| exists(path))
            .or(candidates.first())
            .cloned()
            .unwrap_or_else(|| PathBuf::from("/usr/share/husk").join(file))
    }

    /// husk-vmm next to the husk binary if there, else the first on `$PATH`, else the path next
    /// to the husk binary (reported missing by `husk check`).
    fn vmm(&self, exists: &dyn Fn(&Path) -> bool) -> PathBuf {
        let beside = self
            .exe
            .parent()
            .map(|dir| dir.join(VMM_BINARY))
            .unwrap_or_else(|| PathBuf::from(VMM_BINARY));
        if exists(&beside) {
            return beside;
        }
        self.path_var
            .iter()
            .flat_map(std::env::split_paths)
            .filter(|dir| dir.is_absolute())
            .map(|dir| dir.join(VMM_BINARY))
            .find(|path| exists(path))
            .unwrap_or(beside)
    }
}

/// Loads the configuration. A missing file is an error only when `explicit` (named with
/// `--config`); otherwise built-in defaults apply.
pub fn load(path: &Path, explicit: bool, discovery: &Discovery) -> Result<Config, ConfigError> {
    let text = match read_bounded(path) {
        Ok(text) => Some(text),
        Err(source) if source.kind() == io::ErrorKind::NotFound && !explicit => None,
        Err(source) if source.kind() == io::ErrorKind::FileTooLarge => {
            return Err(ConfigError::TooLarge {
                path: path.to_path_buf(),
            })
        }
        Err(source) => {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let (file, origin) = match text {
        Some(text) => (parse(path, &text)?, Origin::File(path.to_path_buf())),
        None => (FileConfig::default(), Origin::Defaults),
    };
    resolve(file, origin, discovery, &|p: &Path| p.exists())
}

/// Reads at most [`MAX_CONFIG_BYTES`]; a longer file is `FileTooLarge`.
fn read_bounded(path: &Path) -> io::Result<String> {
    let mut text = String::new();
    fs::File::open(path)?
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(io::ErrorKind::FileTooLarge.into());
    }
    Ok(text)
}

/// Parses the TOML text, naming the key and position of any error.
fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    let parse_error = |key: String, err: toml::de::Error| {
        let offset = err.span().map_or(0, |span| span.start);
        let (line, column) = line_column(text, offset);
        ConfigError::Parse {
            path: path.to_path_buf(),
            key,
            line,
            column,
            message: err.message().to_owned(),
        }
    };
    let deserializer =
        toml::Deserializer::parse(text).map_err(|err| parse_error(String::new(), err))?;
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let key = err.path().to_string();
        let key = if key.is_empty() || key == "." {
            String::new()
        } else {
            format!("key `{key}`: ")
        };
        parse_error(key, err.into_inner())
    })
}

/// 1-based line and column (in characters) of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count().saturating_add(1);
    let column = before
        .rsplit('\n')
        .next()
        .map_or(0, |last| last.chars().count())
        .saturating_add(1);
    (line, column)
}

/// Fills in defaults and validates every value.
fn resolve(
    file: FileConfig,
    origin: Origin,
    discovery: &Discovery,
    exists: &dyn Fn(&Path) -> bool,
) -> Result<Config, ConfigError> {
    let invalid = |key: &'static str, message: String| ConfigError::Invalid {
        origin: origin.clone(),
        key,
        message,
    };
    let absolute = |key: &'static str, path: Option<PathBuf>| match path {
        Some(path) if !path.is_absolute() => Err(invalid(
            key,
            format!("{} is not an absolute path", path.display()),
        )),
        other => Ok(other),
    };
    let kernel = absolute("guest.kernel", file.guest.kernel)?
        .unwrap_or_else(|| discovery.guest_file(KERNEL_FILE, exists));
    let initramfs = absolute("guest.initramfs", file.guest.initramfs)?
        .unwrap_or_else(|| discovery.guest_file(INITRAMFS_FILE, exists));
    let vmm = absolute("vmm.path", file.vmm.path)?.unwrap_or_else(|| discovery.vmm(exists));
    let host_memory_mib = file
        .vmm
        .host_memory_mib
        .unwrap_or(defaults::HOST_MEMORY_MIB);
    in_range(
        "vmm.host_memory_mib",
        host_memory_mib,
        MIN_HOST_MEMORY_MIB,
        MAX_HOST_MEMORY_MIB,
    )
    .map_err(|m| invalid("vmm.host_memory_mib", m))?;
    let log_dir = absolute("console.log_dir", file.console.log_dir)?
        .unwrap_or_else(|| PathBuf::from(defaults::CONSOLE_LOG_DIR));

    let max_bytes = file
        .console
        .max_bytes
        .unwrap_or(defaults::CONSOLE_MAX_BYTES);
    if max_bytes < MIN_CONSOLE_BYTES {
        return Err(invalid(
            "console.max_bytes",
            format!("{max_bytes} is below the minimum of {MIN_CONSOLE_BYTES} bytes"),
        ));
    }

    let limits = Limits {
        max_vcpus: file.limits.max_vcpus.unwrap_or(defaults::MAX_VCPUS),
        min_memory_mib: file
            .limits
            .min_memory_mib
            .unwrap_or(defaults::MIN_MEMORY_MIB),
        max_memory_mib: file
            .limits
            .max_memory_mib
            .unwrap_or(defaults::MAX_MEMORY_MIB),
    };
    in_range("limits.max_vcpus", limits.max_vcpus, 1, MAX_VCPUS_CEILING)
        .map_err(|m| invalid("limits.max_vcpus", m))?;
    in_range(
        "limits.min_memory_mib",
        limits.min_memory_mib,
        MIN_MEMORY_MIB_FLOOR,
        MAX_MEMORY_MIB_CEILING,
    )
    .map_err(|m| invalid("limits.min_memory_mib", m))?;
    in_range(
        "limits.max_memory_mib",
        limits.max_memory_mib,
        limits.min_memory_mib,
        MAX_MEMORY_MIB_CEILING,
    )
    .map_err(|m| invalid("limits.max_memory_mib", m))?;

    let vm = VmConfig {
        vcpus: file.vm.vcpus.unwrap_or(defaults::VCPUS),
        memory_mib: file.vm.memory_mib.unwrap_or(defaults::MEMORY_MIB),
        memory_overhead_mib: file
            .vm
            .memory_overhead_mib
            .unwrap_or(defaults::MEMORY_OVERHEAD_MIB),
    };
    in_range("vm.vcpus", vm.vcpus, 1, limits.max_vcpus).map_err(|m| invalid("vm.vcpus", m))?;
    in_range(
        "vm.memory_overhead_mib",
        vm.memory_overhead_mib,
        0,
        MAX_OVERHEAD_MIB,
    )
    .map_err(|m| invalid("vm.memory_overhead_mib", m))?;
    // The default VM (containers' memory plus overhead) must itself be within the limits.
    let total = vm.memory_mib.saturating_add(vm.memory_overhead_mib);
    if vm.memory_mib == 0 || total < limits.min_memory_mib || total > limits.max_memory_mib {
        return Err(invalid(
            "vm.memory_mib",
            format!(
                "{} MiB plus the overhead of {} MiB must be between limits.min_memory_mib ({}) and limits.max_memory_mib ({})",
                vm.memory_mib, vm.memory_overhead_mib, limits.min_memory_mib, limits.max_memory_mib
            ),
        ));
    }

    Ok(Config {
        guest: GuestConfig { kernel, initramfs },
        vmm: VmmConfig {
            path: vmm,
            host_memory_mib,
        },
        vm,
        console: ConsoleConfig {
            log_dir,
            max_bytes,
            kernel_messages: file.console.kernel_messages.unwrap_or(false),
        },
        limits,
        origin,
    })
}

/// `Err(message)` unless `min <= value <= max`.
fn in_range(key: &str, value: u32, min: u32, max: u32) -> Result<(), String> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(format!("{key} = {value} is out of range {min}..={max}"))
    }
}

impl Config {
    /// The effective configuration as TOML, in the file's schema.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|err| format!("# cannot render: {err}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discovery(exe: &str) -> Discovery {
        Discovery {
            exe: PathBuf::from(exe),
            path_var: Some("/opt/bin:relative:/usr/bin".into()),
        }
    }

    fn discovery_at(exe: &str) -> Discovery {
        Discovery {
            exe: PathBuf::from(exe),
            path_var: None,
        }
    }

    fn resolve_text(text: &str) -> Result<Config, ConfigError> {
        let file = parse(Path::new("/etc/husk/config.toml"), text)?;
        resolve(
            file,
            Origin::File("/etc/husk/config.toml".into()),
            &discovery("/usr/bin/husk"),
            &|_| false,
        )
    }

    fn error(text: &str) -> String {
        resolve_text(text).unwrap_err().to_string()
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = resolve_text("").unwrap();
        assert_eq!(config.vm.vcpus, defaults::VCPUS);
        assert_eq!(config.vm.memory_mib, defaults::MEMORY_MIB);
        assert_eq!(config.guest.kernel, Path::new("/usr/share/husk/vmlinux"));
        assert_eq!(
            config.guest.initramfs,
            Path::new("/usr/share/husk/initramfs.cpio.gz")
        );
        assert_eq!(config.vmm.path, Path::new("/usr/bin/husk-vmm"));
        assert_eq!(config.console.log_dir, Path::new(defaults::CONSOLE_LOG_DIR));
    }

    #[test]
    fn file_values_override_defaults() {
        let config = resolve_text(
            "[guest]\nkernel = \"/k\"\ninitramfs = \"/i\"\n[vmm]\npath = \"/v\"\n\
             [vm]\nvcpus = 2\nmemory_mib = 512\nmemory_overhead_mib = 32\n\
             [console]\nlog_dir = \"/l\"\nmax_bytes = 1048576\nkernel_messages = true\n[limits]\nmax_vcpus = 4\nmin_memory_mib = 64\nmax_memory_mib = 1024\n",
        )
        .unwrap();
        assert_eq!(config.guest.kernel, Path::new("/k"));
        assert_eq!(config.guest.initramfs, Path::new("/i"));
        assert_eq!(config.vmm.path, Path::new("/v"));
        assert_eq!(
            config.vm,
            VmConfig {
                vcpus: 2,
                memory_mib: 512,
                memory_overhead_mib: 32
            }
        );
        assert_eq!(config.console.log_dir, Path::new("/l"));
        assert_eq!(config.console.max_bytes, 1_048_576);
        assert!(config.console.kernel_messages);
        assert_eq!(
            config.limits,
            Limits {
                max_vcpus: 4,
                min_memory_mib: 64,
                max_memory_mib: 1024
            }
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let message = error("[vm]\nvcpus = 1\ncpus = 2\n");
        assert!(message.contains("unknown field `cpus`"), "{message}");
        assert!(message.contains("line 3"), "{message}");
    }

    #[test]
    fn unknown_section_is_named() {
        let message = error("[network]\n");
        assert!(message.contains("unknown field `network`"), "{message}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let message = error("[vm]\nvcpus = \"two\"\n");
        assert!(message.contains("key `vm.vcpus`"), "{message}");
        assert!(message.contains("line 2"), "{message}");
    }

    #[test]
    fn negative_number_names_the_key() {
        let message = error("[vm]\nmemory_mib = -5\n");
        assert!(message.contains("key `vm.memory_mib`"), "{message}");
    }

    #[test]
    fn syntax_error_has_a_position() {
        let message = error("[vm\n");
        assert!(message.contains("line 1"), "{message}");
    }

    #[test]
    fn relative_paths_are_rejected() {
        let message = error("[guest]\nkernel = \"vmlinux\"\n");
        assert!(message.contains("key `guest.kernel`"), "{message}");
        assert!(message.contains("not an absolute path"), "{message}");
    }

    #[test]
    fn tiny_console_cap_is_rejected() {
        assert!(error("[console]\nmax_bytes = 10\n").contains("key `console.max_bytes`"));
    }

    #[test]
    fn vcpu_limit_above_the_monitors_is_rejected() {
        assert!(error("[limits]\nmax_vcpus = 33\n").contains("key `limits.max_vcpus`"));
    }

    #[test]
    fn zero_vcpus_is_rejected() {
        assert!(error("[vm]\nvcpus = 0\n").contains("key `vm.vcpus`"));
    }

    #[test]
    fn vcpus_above_the_limit_are_rejected() {
        let message = error("[vm]\nvcpus = 8\n[limits]\nmax_vcpus = 4\n");
        assert!(message.contains("key `vm.vcpus`"), "{message}");
    }

    #[test]
    fn memory_below_the_minimum_is_rejected() {
        let message = error("[vm]\nmemory_mib = 16\nmemory_overhead_mib = 0\n");
        assert!(message.contains("key `vm.memory_mib`"), "{message}");
    }

    #[test]
    fn inverted_limits_are_rejected() {
        let message = error("[limits]\nmin_memory_mib = 512\nmax_memory_mib = 256\n");
        assert!(message.contains("key `limits.max_memory_mib`"), "{message}");
    }

    #[test]
    fn build_tree_guest_files_are_found() {
        let discovery = discovery("/src/husk/target/release/husk");
        let exists = |p: &Path| p.starts_with("/src/husk/target/guest");
        assert_eq!(
            discovery.guest_file(KERNEL_FILE, &exists),
            Path::new("/src/husk/target/guest/vmlinux")
        );
    }

    #[test]
    fn install_prefix_comes_before_the_build_tree() {
        let discovery = discovery("/usr/local/bin/husk");
        assert_eq!(
            discovery.guest_dirs(),
            vec![PathBuf::from("/usr/local/share/husk")]
        );
        let discovery = Discovery {
            exe: "/w/target/x86_64-unknown-linux-musl/debug/husk".into(),
            path_var: None,
        };
        assert_eq!(
            discovery.guest_dirs(),
            vec![PathBuf::from("/w/target/guest")]
        );
        let discovery = discovery_at("/home/u/husk");
        assert!(discovery.guest_dirs().is_empty());
        assert_eq!(
            discovery.guest_file(KERNEL_FILE, &|_| false),
            Path::new("/usr/share/husk/vmlinux")
        );
    }

    #[test]
    fn vmm_is_found_on_path_when_not_beside_husk() {
        let exists = |p: &Path| p == Path::new("/usr/bin/husk-vmm");
        assert_eq!(
            discovery("/home/u/husk").vmm(&exists),
            Path::new("/usr/bin/husk-vmm")
        );
        let nothing = |_: &Path| false;
        assert_eq!(
            discovery("/home/u/husk").vmm(&nothing),
            Path::new("/home/u/husk-vmm")
        );
    }

    #[test]
    fn missing_default_file_gives_defaults_but_missing_explicit_file_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("absent.toml");
        let config = load(&path, false, &discovery("/usr/bin/husk")).unwrap();
        assert_eq!(config.origin, Origin::Defaults);
        let err = load(&path, true, &discovery("/usr/bin/husk")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");
    }

    #[test]
    fn oversized_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.toml");
        let comment = format!("# {}\n", "x".repeat(1000));
        fs::write(&path, comment.repeat(1100)).unwrap();
        let err = load(&path, true, &discovery("/usr/bin/husk")).unwrap_err();
        assert!(matches!(err, ConfigError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn effective_config_round_trips_through_the_file_schema() {
        let config = resolve_text("[vm]\nvcpus = 3\n").unwrap();
        let reparsed = resolve_text(&config.to_toml()).unwrap();
        assert_eq!(reparsed, config);
    }

    #[test]
    fn line_column_counts_from_one() {
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("ab", 0), (1, 1));
        assert_eq!(line_column("ab", 99), (1, 3));
    }
}
