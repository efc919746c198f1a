//! Resolving a path inside a container's root file system without leaving it.
//!
//! Symlinks are followed relative to the root (an absolute link target restarts at the root) and
//! `..` never climbs above it, like openat2(RESOLVE_IN_ROOT). Components that do not exist yet are
//! appended as they are, so the caller can create them.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};

/// Most symlinks followed while resolving one path (the kernel's own limit).
const MAX_SYMLINKS: usize = 40;

/// Resolves `unsafe_path` (absolute or relative, interpreted inside `root`) to a path under `root`.
pub fn resolve_in_root(root: &Path, unsafe_path: &str) -> io::Result<PathBuf> {
    let mut resolved: Vec<String> = Vec::new();
    let mut pending: VecDeque<String> = unsafe_path.split('/').map(str::to_owned).collect();
    let mut links = 0usize;
    while let Some(c) = pending.pop_front() {
        match c.as_str() {
            "" | "." => continue,
            ".." => {
                resolved.pop();
                continue;
            }
            _ => {}
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(resolved.iter());
        candidate.push(&c);
        match std::fs::symlink_metadata(&candidate) {
            Ok(md) if md.file_type().is_symlink() => {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(io::Error::other(format!(
                        "too many symbolic links resolving {unsafe_path:?}"
                    )));
                }
                let target = std::fs::read_link(&candidate)?;
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    resolved.clear();
                }
                for (i, part) in target.split('/').enumerate() {
                    pending.insert(i, part.to_owned());
                }
            }
            Ok(_) => resolved.push(c),
            Err(e) if e.kind() == io::ErrorKind::NotFound => resolved.push(c),
            Err(e) => return Err(e),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(resolved.iter());
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A scratch root with an `etc` directory, removed with everything in it on drop.
    struct Root(PathBuf);

    impl std::ops::Deref for Root {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Root {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tempdir() -> Root {
        let d = std::env::temp_dir().join(format!(
            "husk-rootpath-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("etc")).expect("mkdir");
        Root(d)
    }

    #[test]
    fn dotdot_stays_inside() {
        let root = tempdir();
        assert_eq!(
            resolve_in_root(&root, "/../../x").expect("resolves"),
            root.join("x")
        );
        assert_eq!(
            resolve_in_root(&root, "a/../../../etc").expect("resolves"),
            root.join("etc")
        );
    }

    #[test]
    fn absolute_symlink_is_rooted() {
        let root = tempdir();
        symlink("/etc", root.join("link")).expect("symlink");
        symlink("../../../../etc", root.join("rel")).expect("symlink");
        assert_eq!(
            resolve_in_root(&root, "/link/passwd").expect("resolves"),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(&root, "/rel").expect("resolves"),
            root.join("etc")
        );
    }

    #[test]
    fn symlink_loops_fail() {
        let root = tempdir();
        symlink("/loop", root.join("loop")).expect("symlink");
        assert!(resolve_in_root(&root, "/loop").is_err());
    }
}
