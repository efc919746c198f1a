//! Checks applied to identifiers and sizes on both sides of the API.

use crate::{MAX_ID_LEN, MAX_PATH_LEN};

/// Why an identifier or a size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// The identifier is empty.
    #[error("{kind} is empty")]
    EmptyId {
        /// What the identifier names (container id, exec id, ...).
        kind: &'static str,
    },
    /// The identifier is longer than allowed.
    #[error("{kind} is {len} bytes long; the limit is {max}")]
    IdTooLong {
        /// What the identifier names.
        kind: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The identifier is `.` or `..` or contains a character outside `[A-Za-z0-9_.-]`.
    #[error("{kind} {id:?} is invalid: only A-Z a-z 0-9 _ . - are allowed, and not '.' or '..'")]
    BadId {
        /// What the identifier names.
        kind: &'static str,
        /// The identifier (bounded by the length check).
        id: String,
    },
    /// A byte buffer is larger than allowed.
    #[error("{what} is {len} bytes; the limit is {max}")]
    TooLarge {
        /// What the buffer holds.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A path is not absolute.
    #[error("{what} {path:?} must be an absolute path")]
    RelativePath {
        /// What the path is for.
        what: &'static str,
        /// The path.
        path: String,
    },
}

/// Validates an identifier (container, exec or sandbox id) before it touches a path.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), ValidationError> {
    if id.is_empty() {
        return Err(ValidationError::EmptyId { kind });
    }
    if id.len() > MAX_ID_LEN {
        return Err(ValidationError::IdTooLong {
            kind,
            len: id.len(),
            max: MAX_ID_LEN,
        });
    }
    let charset_ok = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !charset_ok || id == "." || id == ".." {
        return Err(ValidationError::BadId {
            kind,
            id: id.to_owned(),
        });
    }
    Ok(())
}

/// Refuses a buffer larger than `max` bytes.
pub fn check_size(what: &'static str, len: usize, max: usize) -> Result<(), ValidationError> {
    if len > max {
        return Err(ValidationError::TooLarge { what, len, max });
    }
    Ok(())
}

/// Refuses a path that is not absolute or is longer than [`MAX_PATH_LEN`].
pub fn check_abs_path(what: &'static str, path: &str) -> Result<(), ValidationError> {
    check_size(what, path.len(), MAX_PATH_LEN)?;
    if !path.starts_with('/') {
        return Err(ValidationError::RelativePath {
            what,
            path: path.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn accepts_typical_ids() {
        assert_eq!(validate_id("container id", "abc-123_x.y"), Ok(()));
        assert_eq!(validate_id("container id", &"a".repeat(MAX_ID_LEN)), Ok(()));
    }

    #[test]
    fn refuses_traversal_and_separators() {
        for id in ["..", ".", "../x", "a/b", "/abs", "x\0y", "sp ace", "ü"] {
            assert!(
                matches!(
                    validate_id("container id", id),
                    Err(ValidationError::BadId { .. })
                ),
                "{id:?} accepted"
            );
        }
    }

    #[test]
    fn refuses_empty_and_long_ids() {
        assert_eq!(
            validate_id("exec id", ""),
            Err(ValidationError::EmptyId { kind: "exec id" })
        );
        assert!(matches!(
            validate_id("exec id", &"a".repeat(MAX_ID_LEN + 1)),
            Err(ValidationError::IdTooLong { .. })
        ));
    }

    #[test]
    fn refuses_relative_and_oversize_paths() {
        assert!(check_abs_path("rootfs", "rootfs").is_err());
        assert!(check_abs_path("rootfs", &format!("/{}", "a".repeat(MAX_PATH_LEN))).is_err());
        assert_eq!(check_abs_path("rootfs", "/run/rootfs"), Ok(()));
    }

    #[test]
    fn refuses_oversize_buffers() {
        assert!(check_size("spec", 11, 10).is_err());
        assert!(check_size("spec", 10, 10).is_ok());
    }
}
