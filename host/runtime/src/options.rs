//! husk's global options as plain values: what the library needs of the command line's global
//! flags (the command line builds them, `Cli::options`), so that the sandbox modules do not
//! depend on the command line.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config::DEFAULT_CONFIG_PATH;
use crate::logging::LogFormat;

/// The global options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The directory of container state (`--root`), absolute.
    pub root: PathBuf,
    /// Where log lines go (`--log`), if not to standard error.
    pub log: Option<PathBuf>,
    /// The format of log lines (`--log-format`).
    pub log_format: LogFormat,
    /// Whether debug messages are logged too (`--debug`).
    pub debug: bool,
    /// husk's configuration file when named (`--config`).
    pub config: Option<PathBuf>,
    /// Whether containers are placed in systemd scopes (`--systemd-cgroup`).
    pub systemd_cgroup: bool,
}

impl Options {
    /// The configuration file to read, and whether the user named it explicitly.
    pub fn config_path(&self) -> (PathBuf, bool) {
        match &self.config {
            Some(path) => (path.clone(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        }
    }

    /// The global flags, repeated for husk's helpers (the supervisor, the detached exec relay),
    /// with paths made absolute.
    pub fn global_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--root".into(), self.root.clone().into()];
        if let Some(log) = &self.log {
            args.push("--log".into());
            args.push(
                std::path::absolute(log)
                    .unwrap_or_else(|_| log.clone())
                    .into(),
            );
        }
        args.push("--log-format".into());
        args.push(
            match self.log_format {
                LogFormat::Text => "text",
                LogFormat::Json => "json",
            }
            .into(),
        );
        if self.debug {
            args.push("--debug".into());
        }
        if let Some(config) = &self.config {
            args.push("--config".into());
            args.push(
                std::path::absolute(config)
                    .unwrap_or_else(|_| config.clone())
                    .into(),
            );
        }
        if self.systemd_cgroup {
            args.push("--systemd-cgroup".into());
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> Options {
        Options {
            root: "/run/husk-test".into(),
            log: None,
            log_format: LogFormat::Text,
            debug: false,
            config: None,
            systemd_cgroup: false,
        }
    }

    #[test]
    fn the_default_config_file_is_not_explicit() {
        assert_eq!(
            options().config_path(),
            (PathBuf::from(DEFAULT_CONFIG_PATH), false)
        );
        let named = Options {
            config: Some("/etc/other.toml".into()),
            ..options()
        };
        assert_eq!(
            named.config_path(),
            (PathBuf::from("/etc/other.toml"), true)
        );
    }

    #[test]
    fn global_args_repeat_every_flag_with_absolute_paths() {
        let all = Options {
            log: Some("husk.log".into()),
            log_format: LogFormat::Json,
            debug: true,
            config: Some("/etc/husk/other.toml".into()),
            systemd_cgroup: true,
            ..options()
        };
        let log = std::env::current_dir().unwrap().join("husk.log");
        let expected: Vec<OsString> = [
            "--root".into(),
            OsString::from("/run/husk-test"),
            "--log".into(),
            log.into(),
            "--log-format".into(),
            "json".into(),
            "--debug".into(),
            "--config".into(),
            "/etc/husk/other.toml".into(),
            "--systemd-cgroup".into(),
        ]
        .to_vec();
        assert_eq!(all.global_args(), expected);
        let fewest: Vec<OsString> = vec![
            "--root".into(),
            "/run/husk-test".into(),
            "--log-format".into(),
            "text".into(),
        ];
        assert_eq!(options().global_args(), fewest);
    }
}
