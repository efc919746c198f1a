//! Mount option strings (`ro`, `nosuid`, `rbind`, `mode=755`, ...) to mount(2) flags and data.

/// Parsed mount options.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: libc::c_ulong,
    pub propagation: libc::c_ulong,
    pub data: String,
    pub bind: bool,
    pub recursive: bool,
}

/// A propagation mode name to its flags (`rprivate` → MS_PRIVATE|MS_REC).
pub fn parse_propagation(name: &str) -> Option<libc::c_ulong> {
    let f = match name {
        "private" => libc::MS_PRIVATE,
        "rprivate" => libc::MS_PRIVATE | libc::MS_REC,
        "shared" => libc::MS_SHARED,
        "rshared" => libc::MS_SHARED | libc::MS_REC,
        "slave" => libc::MS_SLAVE,
        "rslave" => libc::MS_SLAVE | libc::MS_REC,
        "unbindable" => libc::MS_UNBINDABLE,
        "runbindable" => libc::MS_UNBINDABLE | libc::MS_REC,
        _ => return None,
    };
    Some(f)
}

/// Splits options into flags, propagation and file-system data (anything not a flag).
pub fn parse_mount_options<S: AsRef<str>>(options: &[S]) -> MountOptions {
    let mut out = MountOptions::default();
    let mut data = Vec::new();
    for opt in options {
        let opt = opt.as_ref();
        let (set, clear): (libc::c_ulong, libc::c_ulong) = match opt {
            "ro" => (libc::MS_RDONLY, 0),
            "rw" => (0, libc::MS_RDONLY),
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "dirsync" => (libc::MS_DIRSYNC, 0),
            "mand" => (libc::MS_MANDLOCK, 0),
            "nomand" => (0, libc::MS_MANDLOCK),
            "noatime" => (libc::MS_NOATIME, 0),
            "atime" => (0, libc::MS_NOATIME),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "diratime" => (0, libc::MS_NODIRATIME),
            "relatime" => (libc::MS_RELATIME, 0),
            "norelatime" => (0, libc::MS_RELATIME),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "nostrictatime" => (0, libc::MS_STRICTATIME),
            "bind" => {
                out.bind = true;
                continue;
            }
            "rbind" => {
                out.bind = true;
                out.recursive = true;
                continue;
            }
            other => {
                if let Some(p) = parse_propagation(other) {
                    out.propagation = p;
                } else if !other.is_empty() {
                    data.push(other);
                }
                continue;
            }
        };
        out.flags = (out.flags | set) & !clear;
    }
    out.data = data.join(",");
    out
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn splits_flags_and_data() {
        let o = parse_mount_options(&["nosuid", "strictatime", "mode=755", "size=65536k"]);
        assert_eq!(o.flags, libc::MS_NOSUID | libc::MS_STRICTATIME);
        assert_eq!(o.data, "mode=755,size=65536k");
        assert!(!o.bind);
    }

    #[test]
    fn understands_bind_and_propagation() {
        let o = parse_mount_options(&["rbind", "ro", "rprivate"]);
        assert!(o.bind && o.recursive);
        assert_eq!(o.flags, libc::MS_RDONLY);
        assert_eq!(o.propagation, libc::MS_PRIVATE | libc::MS_REC);
    }

    #[test]
    fn later_options_win() {
        assert_eq!(parse_mount_options(&["ro", "rw"]).flags, 0);
    }
}
