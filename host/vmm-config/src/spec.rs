//! The values of `--block PATH[,ro]` and `--fs PATH,tag=TAG`, parsed and written back.
//!
//! Both are parsed from raw `OsStr` bytes, so a path need not be UTF-8 to travel from a front end
//! to husk-vmm; `Display` is for humans and logs (lossy for such paths), [`BlockSpec::to_arg`]
//! and [`FsSpec::to_arg`] give the exact argument.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::str::FromStr;

/// Longest virtio-fs tag (the device's config space field is 36 bytes, NUL-padded).
pub const TAG_MAX_LEN: usize = 36;

/// Why a virtio-fs tag is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TagError {
    /// The tag is empty.
    #[error("the virtio-fs tag is empty")]
    Empty,
    /// The tag is longer than [`TAG_MAX_LEN`] bytes.
    #[error("the virtio-fs tag {0:?} is {len} bytes long; at most {TAG_MAX_LEN} are allowed", len = .0.len())]
    TooLong(String),
    /// The tag contains a character other than printable ASCII without ','.
    #[error("the virtio-fs tag {tag:?} contains {c:?}; only printable ASCII without ',' or spaces is allowed")]
    BadChar {
        /// The tag.
        tag: String,
        /// The first character refused.
        c: char,
    },
}

/// Why a `--block` or `--fs` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// `--block PATH,OPT` with an option other than `ro` or `rw`.
    #[error("unknown block option {0:?} (expected ro or rw)")]
    BlockOption(String),
    /// `--block` with an empty path.
    #[error("empty block device path")]
    EmptyBlockPath,
    /// `--fs` without `,tag=TAG`.
    #[error("{0:?}: expected PATH,tag=TAG")]
    FsSyntax(String),
    /// `--fs PATH,OPT` with an option other than `tag=TAG`.
    #[error("unknown virtio-fs option {0:?} (expected tag=TAG)")]
    FsOption(String),
    /// `--fs` with an empty path.
    #[error("empty shared directory path")]
    EmptyFsPath,
    /// A shared directory whose path contains ',', which [`FsSpec::new`] refuses.
    #[error("shared directory {}: the path contains ',', which --fs PATH,tag=TAG cannot carry", .0.display())]
    FsPathComma(PathBuf),
    /// The virtio-fs tag is invalid.
    #[error(transparent)]
    Tag(#[from] TagError),
}

/// Checks a virtio-fs tag: 1 to [`TAG_MAX_LEN`] bytes of printable ASCII other than ','.
pub fn validate_tag(tag: &str) -> Result<(), TagError> {
    if tag.is_empty() {
        return Err(TagError::Empty);
    }
    if tag.len() > TAG_MAX_LEN {
        return Err(TagError::TooLong(tag.to_string()));
    }
    if let Some(c) = tag.chars().find(|c| !c.is_ascii_graphic() || *c == ',') {
        return Err(TagError::BadChar {
            tag: tag.to_string(),
            c,
        });
    }
    Ok(())
}

/// Splits `bytes` at its last ','.
fn split_last_comma(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().rposition(|b| *b == b',')?;
    Some((bytes.get(..at)?, bytes.get(at + 1..)?))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn path_from(bytes: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes.to_vec()))
}

/// `--block PATH[,ro]`: a virtio-blk disk backed by a raw image.
///
/// `PATH,rw` is accepted too (and written back when the path itself contains ',', so that the
/// last ',' still separates the option).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSpec {
    /// The raw image.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
}

impl BlockSpec {
    /// The `--block` value that parses back into `self`.
    pub fn to_arg(&self) -> OsString {
        let mut arg = self.path.as_os_str().to_os_string();
        if self.read_only {
            arg.push(",ro");
        } else if self.path.as_os_str().as_bytes().contains(&b',') {
            arg.push(",rw");
        }
        arg
    }
}

impl TryFrom<&OsStr> for BlockSpec {
    type Error = SpecError;

    fn try_from(value: &OsStr) -> Result<Self, Self::Error> {
        let bytes = value.as_bytes();
        let (path, read_only) = match split_last_comma(bytes) {
            Some((p, b"ro")) => (p, true),
            Some((p, b"rw")) => (p, false),
            Some((_, opt)) => return Err(SpecError::BlockOption(lossy(opt))),
            None => (bytes, false),
        };
        if path.is_empty() {
            return Err(SpecError::EmptyBlockPath);
        }
        Ok(BlockSpec {
            path: path_from(path),
            read_only,
        })
    }
}

impl FromStr for BlockSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BlockSpec::try_from(OsStr::new(s))
    }
}

impl fmt::Display for BlockSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_arg().to_string_lossy())
    }
}

/// `--fs PATH,tag=TAG`: a host directory shared with the guest over virtio-fs.
///
/// The path is kept as given; husk-vmm resolves it and checks that it is a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsSpec {
    /// The shared directory.
    pub path: PathBuf,
    /// The tag the guest mounts.
    pub tag: String,
}

impl FsSpec {
    /// A shared directory; refuses an empty path, a path containing ',' and an invalid tag.
    pub fn new(path: impl Into<PathBuf>, tag: impl Into<String>) -> Result<Self, SpecError> {
        let path = path.into();
        let tag = tag.into();
        validate_tag(&tag)?;
        let bytes = path.as_os_str().as_bytes();
        if bytes.is_empty() {
            return Err(SpecError::EmptyFsPath);
        }
        if bytes.contains(&b',') {
            return Err(SpecError::FsPathComma(path));
        }
        Ok(FsSpec { path, tag })
    }

    /// The `--fs` value that parses back into `self`.
    pub fn to_arg(&self) -> OsString {
        let mut arg = self.path.as_os_str().to_os_string();
        arg.push(",tag=");
        arg.push(&self.tag);
        arg
    }
}

impl TryFrom<&OsStr> for FsSpec {
    type Error = SpecError;

    fn try_from(value: &OsStr) -> Result<Self, Self::Error> {
        let bytes = value.as_bytes();
        let (path, option) =
            split_last_comma(bytes).ok_or_else(|| SpecError::FsSyntax(lossy(bytes)))?;
        let tag = option
            .strip_prefix(b"tag=")
            .ok_or_else(|| SpecError::FsOption(lossy(option)))?;
        // A tag that is not UTF-8 gets U+FFFD here, which validate_tag refuses.
        let tag = lossy(tag);
        validate_tag(&tag)?;
        if path.is_empty() {
            return Err(SpecError::EmptyFsPath);
        }
        Ok(FsSpec {
            path: path_from(path),
            tag,
        })
    }
}

impl FromStr for FsSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FsSpec::try_from(OsStr::new(s))
    }
}

impl fmt::Display for FsSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_arg().to_string_lossy())
    }
}

/// clap's value parser for `--block`: from the raw argument, UTF-8 or not.
pub(crate) fn parse_block(value: OsString) -> Result<BlockSpec, SpecError> {
    BlockSpec::try_from(value.as_os_str())
}

/// clap's value parser for `--fs`: from the raw argument, UTF-8 or not.
pub(crate) fn parse_fs(value: OsString) -> Result<FsSpec, SpecError> {
    FsSpec::try_from(value.as_os_str())
}
