//! `husk list`: the containers under `--root`, as runc's table or JSON.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::CommandError;
use crate::cli::Cli;
use crate::exit;
use crate::store::Store;

/// Output formats of `husk list`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns: ID PID STATUS BUNDLE CREATED OWNER.
    #[default]
    Table,
    /// A JSON array of objects, like `runc list --format json`.
    Json,
}

/// Arguments of `husk list`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output format.
    #[arg(long, short = 'f', value_enum, default_value_t)]
    pub format: Format,
    /// Print only the IDs.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// One line of `husk list` (runc's `containerState` fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    /// 0 when the container has no process.
    pub pid: i32,
    pub status: String,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    pub created: String,
    pub owner: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::HashMap<String, String>>,
}

/// The containers of `store`, sorted by ID. Records that cannot be read are logged and skipped.
pub fn entries(store: &Store) -> Result<Vec<Entry>, CommandError> {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let mut entries = Vec::new();
    for (id, record) in store.list()? {
        let record = match record {
            Ok(record) => record,
            Err(err) => {
                tracing::warn!("skipping container {id}: {err}");
                continue;
            }
        };
        let state = record.current_state();
        let owner = fs::metadata(store.container_dir(&id))
            .map(|meta| user_name(&passwd, meta.uid()))
            .unwrap_or_default();
        entries.push(Entry {
            oci_version: state.version().clone(),
            id: id.to_string(),
            pid: state.pid().unwrap_or(0),
            status: state.status().to_string(),
            bundle: state.bundle().clone(),
            rootfs: record.rootfs,
            created: record.created,
            owner,
            annotations: state.annotations().clone(),
        });
    }
    Ok(entries)
}

/// The user name of `uid` from /etc/passwd's text, else `#uid` (as runc prints unknown owners).
fn user_name(passwd: &str, uid: u32) -> String {
    passwd
        .lines()
        .filter_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let id: u32 = fields.nth(1)?.parse().ok()?;
            (id == uid).then(|| name.to_owned())
        })
        .next()
        .unwrap_or_else(|| format!("#{uid}"))
}

/// runc's table: columns separated by at least three spaces, aligned.
pub fn table(entries: &[Entry]) -> String {
    let header = ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"].map(String::from);
    let rows: Vec<[String; 6]> = std::iter::once(header)
        .chain(entries.iter().map(|e| {
            [
                e.id.clone(),
                e.pid.to_string(),
                e.status.clone(),
                display(&e.bundle),
                e.created.clone(),
                e.owner.clone(),
            ]
        }))
        .collect();
    let mut widths = [0usize; 6];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}   ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

/// Runs `husk list`.
pub fn run(cli: &Cli, args: &Args) -> Result<u8, CommandError> {
    let entries = entries(&Store::new(cli.root()))?;
    let text = if args.quiet {
        entries.iter().map(|e| format!("{}\n", e.id)).collect()
    } else {
        match args.format {
            Format::Table => table(&entries),
            Format::Json => {
                let json = serde_json::to_string(&entries)
                    .map_err(|err| CommandError::Output(std::io::Error::other(err)))?;
                format!("{json}\n")
            }
        }
    };
    super::print(&text)?;
    Ok(exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, pid: i32) -> Entry {
        Entry {
            oci_version: "1.1.0".into(),
            id: id.into(),
            pid,
            status: "running".into(),
            bundle: "/b".into(),
            rootfs: "/b/rootfs".into(),
            created: "2026-11-23T09:00:00.000000000Z".into(),
            owner: "root".into(),
            annotations: None,
        }
    }

    #[test]
    fn table_aligns_columns() {
        let text = table(&[entry("long-name", 7), entry("a", 12345)]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("ID          PID     STATUS"), "{text}");
        assert!(
            lines[1].starts_with("long-name   7       running"),
            "{text}"
        );
        assert!(
            lines[2].starts_with("a           12345   running"),
            "{text}"
        );
        assert!(lines[2].ends_with("root"), "{text}");
    }

    #[test]
    fn empty_table_is_the_header() {
        assert_eq!(table(&[]), "ID   PID   STATUS   BUNDLE   CREATED   OWNER\n");
    }

    #[test]
    fn owner_names_come_from_passwd() {
        let passwd =
            "root:x:0:0:root:/root:/bin/sh\nbob:x:1000:1000::/home/bob:/bin/sh\nbad line\n";
        assert_eq!(user_name(passwd, 0), "root");
        assert_eq!(user_name(passwd, 1000), "bob");
        assert_eq!(user_name(passwd, 7), "#7");
    }
}
