//! Fuzzing harness shared by the `cargo fuzz` target in `host/sandbox/fuzz` and by a plain test
//! over pseudo-random inputs (so `cargo test` runs it too).
//!
//! The bytes play the VMM's side of the hybrid vsock handshake: the reply to `CONNECT <port>` is
//! read with [`crate::vsock`]'s bounded line reader, delivered in pieces of input-chosen sizes
//! with interruptions, and parsed as `OK <port>`. Checked: no panic, at most
//! [`crate::vsock::MAX_REPLY`] bytes consumed, and not one byte past the newline (those belong to
//! the guest connection that follows).

use std::io::{self, Read};

use crate::vsock::{parse_ok, read_line, MAX_REPLY};

/// Delivers `data` in pieces whose sizes come from `sizes`, returning `Interrupted` when a size
/// byte asks for it.
struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
    consumed: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let size = match self.sizes.split_first() {
            Some((first, rest)) => {
                self.sizes = rest;
                *first
            }
            None => u8::MAX,
        };
        if size == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let n = usize::from(size).min(buf.len()).min(self.data.len());
        let (now, later) = self.data.split_at(n);
        buf.get_mut(..n)
            .ok_or_else(|| io::Error::other("buffer"))?
            .copy_from_slice(now);
        self.data = later;
        self.consumed += n;
        Ok(n)
    }
}

/// The fuzz entry point: `[nsizes][nsizes x piece size][reply bytes...]`.
pub fn fuzz_vsock_reply(data: &[u8]) {
    let (sizes, reply) = match data.split_first() {
        Some((n, rest)) => rest.split_at(usize::from(*n % 16).min(rest.len())),
        None => (&[][..], data),
    };
    let mut reader = Chunked {
        data: reply,
        sizes,
        consumed: 0,
    };
    let line = match read_line(&mut reader) {
        Ok(Some(line)) => line,
        Ok(None) => {
            assert!(reply.is_empty());
            return;
        }
        Err(_) => return,
    };
    assert!(reader.consumed <= MAX_REPLY + 1);
    let newline = reply.iter().position(|b| *b == b'\n');
    match newline {
        // The newline was within reach: everything up to it, and nothing after it, is read.
        Some(at) if at < MAX_REPLY => assert_eq!(reader.consumed, at + 1),
        _ => assert!(reader.consumed <= MAX_REPLY),
    }
    if let Some(port) = parse_ok(&line) {
        assert!(line.starts_with("OK "));
        assert_eq!(
            line.get(3..).and_then(|p| p.parse::<u32>().ok()),
            Some(port)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift: deterministic pseudo-random inputs without a dependency.
    fn inputs(count: usize, len: usize) -> Vec<Vec<u8>> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..count)
            .map(|_| {
                (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn harness_survives_random_inputs() {
        for input in inputs(500, 64) {
            fuzz_vsock_reply(&input);
        }
    }

    /// Valid replies, every truncation of them, piecewise delivery, and oversized lines.
    #[test]
    fn harness_survives_truncated_and_oversized_replies() {
        let replies: [&[u8]; 6] = [
            b"OK 1073741824\nttrpc bytes",
            b"OK 4294967295\n",
            b"OK 4294967296\n",
            b"OK -1\n",
            b"\xff\xfeOK 5\n",
            &[b'9'; 100],
        ];
        for reply in replies {
            for len in 0..=reply.len() {
                for sizes in [&[][..], &[1, 0, 1, 3][..], &[0, 0, 200][..]] {
                    let mut input = vec![u8::try_from(sizes.len()).unwrap_or(0)];
                    input.extend_from_slice(sizes);
                    input.extend_from_slice(&reply[..len]);
                    fuzz_vsock_reply(&input);
                }
            }
        }
    }

    #[test]
    fn only_ok_with_a_port_is_accepted() {
        assert_eq!(parse_ok("OK 1073741824"), Some(1_073_741_824));
        for reply in [
            "OK",
            "OK ",
            "OK x",
            "OK 4294967296",
            "ok 5",
            " OK 5",
            "OK 5 6",
            "OK -1",
        ] {
            assert_eq!(parse_ok(reply), None, "{reply:?}");
        }
    }
}
