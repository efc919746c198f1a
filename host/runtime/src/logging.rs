//! Logging like runc's: `--log FILE` (default: standard error), `--log-format text|json`, `--debug`.
//!
//! Text lines look like logrus's text formatter (`time="..." level=info msg="..."`), JSON lines carry
//! `level`, `msg` and `time` (RFC 3339, UTC) plus the event's other fields, one object per line,
//! which is what container engines parse out of runc's log file.

use std::fmt::{self, Write as _};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The format of log lines, as runc's `--log-format`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `time="..." level=info msg="..."`
    #[default]
    Text,
    /// `{"level":"info","msg":"...","time":"..."}`
    Json,
}

/// Errors setting up logging.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The `--log` file cannot be opened for appending.
    #[error("cannot open log file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A global subscriber was already installed (a bug: logging is set up once).
    #[error("logging is already initialised")]
    AlreadyInitialised,
}

/// Installs the process-wide logger. Without `log`, lines go to standard error.
pub fn init(log: Option<&Path>, format: LogFormat, debug: bool) -> Result<(), LogError> {
    let level = if debug {
        LevelFilter::DEBUG
    } else {
        LevelFilter::INFO
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .event_format(RuncFormat { format });
    let result = match log {
        Some(path) => {
            let file = open_log(path)?;
            builder.with_writer(Mutex::new(file)).try_init()
        }
        None => builder.with_writer(io::stderr).try_init(),
    };
    result.map_err(|_| LogError::AlreadyInitialised)
}

/// Opens the log file like runc: created 0644 if absent, appended to, each write synchronous
/// (`O_SYNC`), so a line is on disk when the runtime exits.
fn open_log(path: &Path) -> Result<File, LogError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .custom_flags(libc::O_SYNC)
        .open(path)
        .map_err(|source| LogError::Open {
            path: path.to_path_buf(),
            source,
        })
}

/// logrus's level names, which runc's log consumers expect.
fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "error",
        Level::WARN => "warning",
        Level::INFO => "info",
        Level::DEBUG => "debug",
        Level::TRACE => "trace",
    }
}

/// Formats events as runc does (see the module documentation).
struct RuncFormat {
    format: LogFormat,
}

/// Collects an event's message and fields as strings.
#[derive(Default)]
struct Fields {
    msg: String,
    others: Vec<(&'static str, String)>,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.push(field, format!("{value:?}"));
    }
}

impl Fields {
    fn push(&mut self, field: &Field, value: String) {
        if field.name() == "message" {
            self.msg = value;
        } else {
            self.others.push((field.name(), value));
        }
    }
}

impl<S, N> FormatEvent<S, N> for RuncFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let mut time = String::new();
        SystemTime.format_time(&mut Writer::new(&mut time))?;
        let level = level_name(event.metadata().level());
        let line = match self.format {
            LogFormat::Json => json_line(level, &time, &fields),
            LogFormat::Text => text_line(level, &time, &fields),
        };
        writeln!(writer, "{line}")
    }
}

fn json_line(level: &str, time: &str, fields: &Fields) -> String {
    let mut map = serde_json::Map::new();
    for (key, value) in &fields.others {
        map.insert((*key).to_owned(), serde_json::Value::String(value.clone()));
    }
    map.insert("level".into(), level.into());
    map.insert("msg".into(), fields.msg.clone().into());
    map.insert("time".into(), time.into());
    serde_json::Value::Object(map).to_string()
}

fn text_line(level: &str, time: &str, fields: &Fields) -> String {
    let mut line = format!("time={time:?} level={level} msg={:?}", fields.msg);
    for (key, value) in &fields.others {
        // Writing into a String cannot fail.
        let _ = write!(line, " {key}={value:?}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Fields {
        Fields {
            msg: "container \"a\" created".into(),
            others: vec![("id", "a".into())],
        }
    }

    #[test]
    fn json_line_has_runc_keys() {
        let line = json_line("info", "2026-11-23T09:00:00.000000Z", &sample());
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["level"], "info");
        assert_eq!(value["msg"], "container \"a\" created");
        assert_eq!(value["time"], "2026-11-23T09:00:00.000000Z");
        assert_eq!(value["id"], "a");
    }

    #[test]
    fn text_line_quotes_values() {
        let line = text_line("warning", "T", &sample());
        assert_eq!(
            line,
            r#"time="T" level=warning msg="container \"a\" created" id="a""#
        );
    }

    #[test]
    fn levels_use_logrus_names() {
        assert_eq!(level_name(&Level::WARN), "warning");
        assert_eq!(level_name(&Level::ERROR), "error");
    }
}
