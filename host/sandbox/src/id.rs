//! Container IDs: validated before they are ever joined to a path.
//!
//! The rules follow runc's: non-empty, not `.` or `..`, only the characters `[A-Za-z0-9_.-]`
//! (runc also allows `+`; husk does not), at most [`MAX_LEN`] bytes. A valid ID is therefore a
//! single path component that cannot climb out of `--root`.

use std::fmt;

/// The longest ID accepted, in bytes: the agent protocol's limit
/// ([`husk_agent_protocol::MAX_ID_LEN`]), so that every ID the host accepts the guest accepts too.
/// (A longer one would not fit a sandbox's socket path anyway; containerd's own limit is 76.)
pub const MAX_LEN: usize = husk_agent_protocol::MAX_ID_LEN;

/// Why a string is not a valid container ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The ID is the empty string.
    #[error("invalid container ID: it is empty")]
    Empty,
    /// `.` and `..` name directories, not containers.
    #[error("invalid container ID {0:?}: `.` and `..` are not allowed")]
    Dots(String),
    /// Longer than [`MAX_LEN`].
    #[error("invalid container ID: {len} bytes long, the limit is {MAX_LEN}")]
    TooLong { len: usize },
    /// A character outside `[A-Za-z0-9_.-]` (this includes `/`).
    #[error(
        "invalid container ID {id:?}: character {bad:?} is not allowed (only A-Z a-z 0-9 _ . -)"
    )]
    BadChar { id: String, bad: char },
}

/// A validated container ID.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerId(String);

impl ContainerId {
    /// Validates `id` (see the module documentation).
    pub fn new(id: &str) -> Result<Self, IdError> {
        if id.is_empty() {
            return Err(IdError::Empty);
        }
        if id.len() > MAX_LEN {
            return Err(IdError::TooLong { len: id.len() });
        }
        if id == "." || id == ".." {
            return Err(IdError::Dots(id.to_owned()));
        }
        if let Some(bad) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(IdError::BadChar {
                id: id.to_owned(),
                bad,
            });
        }
        Ok(Self(id.to_owned()))
    }

    /// The ID as a string (also a safe single path component).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ContainerId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_host_and_the_agent_share_one_id_rule() {
        let long = "a".repeat(MAX_LEN);
        let too_long = "a".repeat(MAX_LEN + 1);
        for id in [
            "c1",
            "abc-123_x.y",
            long.as_str(),
            too_long.as_str(),
            "",
            ".",
            "..",
            "a/b",
            "a+b",
            "ü",
            "sp ace",
            "x\0y",
            "-lead",
        ] {
            assert_eq!(
                ContainerId::new(id).is_ok(),
                husk_agent_protocol::validate::validate_id("container id", id).is_ok(),
                "{id:?}"
            );
        }
    }

    use super::*;

    #[test]
    fn accepts_runc_style_ids() {
        for id in [
            "a",
            "abc-123",
            "A_b.c",
            "..a",
            "a..",
            "x".repeat(MAX_LEN).as_str(),
        ] {
            assert_eq!(ContainerId::new(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(ContainerId::new(""), Err(IdError::Empty));
    }

    #[test]
    fn rejects_dot_and_dotdot() {
        assert!(matches!(ContainerId::new("."), Err(IdError::Dots(_))));
        assert!(matches!(ContainerId::new(".."), Err(IdError::Dots(_))));
    }

    #[test]
    fn rejects_slashes_and_traversal() {
        for id in ["../x", "a/b", "/abs", "x/.."] {
            assert!(
                matches!(ContainerId::new(id), Err(IdError::BadChar { bad: '/', .. })),
                "{id}"
            );
        }
    }

    #[test]
    fn rejects_other_characters() {
        for (id, bad) in [
            ("a b", ' '),
            ("a+b", '+'),
            ("é", 'é'),
            ("a\0", '\0'),
            ("a:b", ':'),
        ] {
            assert_eq!(
                ContainerId::new(id),
                Err(IdError::BadChar { id: id.into(), bad })
            );
        }
    }

    #[test]
    fn rejects_too_long() {
        let id = "x".repeat(MAX_LEN + 1);
        assert_eq!(
            ContainerId::new(&id),
            Err(IdError::TooLong { len: MAX_LEN + 1 })
        );
    }

    #[test]
    fn error_names_the_bad_character() {
        let message = ContainerId::new("../x").unwrap_err().to_string();
        assert!(message.contains("\"../x\""), "{message}");
        assert!(message.contains("'/'"), "{message}");
    }
}
