//! Signal names for `kill ID [SIGNAL]`, as runc accepts them: a number (`9`), a name with or
//! without `SIG` in any case (`KILL`, `SIGKILL`, `sigkill`), or a real-time signal
//! (`SIGRTMIN+3`, `RTMAX-1`). The default is SIGTERM. Numbers are Linux x86_64's, which is also
//! the guest's.

/// The signal `kill` sends when none is named.
pub const DEFAULT: i32 = 15;

const SIGRTMIN: i32 = 34;
const SIGRTMAX: i32 = 64;

/// Linux's standard signals (x86_64 numbering).
const NAMES: [(&str, i32); 31] = [
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// A signal name or number that is not a Linux signal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown signal {0:?}: use a number from 1 to 64 or a name like SIGTERM, KILL or SIGRTMIN+1"
)]
pub struct UnknownSignal(pub String);

/// Parses a signal as `runc kill` does (see the module documentation).
pub fn parse(raw: &str) -> Result<i32, UnknownSignal> {
    let unknown = || UnknownSignal(raw.chars().take(64).collect());
    if let Ok(number) = raw.parse::<i32>() {
        return if (1..=SIGRTMAX).contains(&number) {
            Ok(number)
        } else {
            Err(unknown())
        };
    }
    let upper = raw.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(&(_, number)) = NAMES.iter().find(|(n, _)| *n == name) {
        return Ok(number);
    }
    // SIGIOT and SIGPOLL are aliases.
    match name {
        "IOT" => return Ok(6),
        "POLL" => return Ok(29),
        _ => {}
    }
    realtime(name).ok_or_else(unknown)
}

/// `RTMIN`, `RTMIN+n`, `RTMAX`, `RTMAX-n`, within the real-time range.
fn realtime(name: &str) -> Option<i32> {
    let (base, rest, sign) = if let Some(rest) = name.strip_prefix("RTMIN") {
        (SIGRTMIN, rest, 1)
    } else if let Some(rest) = name.strip_prefix("RTMAX") {
        (SIGRTMAX, rest, -1)
    } else {
        return None;
    };
    let offset = match rest {
        "" => 0,
        _ => {
            let digits = match sign {
                1 => rest.strip_prefix('+')?,
                _ => rest.strip_prefix('-')?,
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.parse::<i32>().ok()?
        }
    };
    let number = base.checked_add(sign * offset.min(SIGRTMAX))?;
    (SIGRTMIN..=SIGRTMAX).contains(&number).then_some(number)
}

/// The signals a foreground `run` or `exec` passes on to its process in the guest: those sent to
/// stop or poke a process (TERM, INT, HUP, QUIT, USR1, USR2), as runc does.
pub const FORWARDED: [i32; 6] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGTERM,
];

/// Receives the [`FORWARDED`] signals instead of letting them end this process. Needs a tokio
/// runtime with signal handling.
pub struct Forwarded {
    streams: Vec<(i32, tokio::signal::unix::Signal)>,
}

impl Forwarded {
    pub fn new() -> std::io::Result<Forwarded> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut streams = Vec::new();
        for number in FORWARDED {
            streams.push((number, signal(SignalKind::from_raw(number))?));
        }
        Ok(Forwarded { streams })
    }

    /// The next signal received (its number).
    pub async fn recv(&mut self) -> u32 {
        std::future::poll_fn(|cx| {
            for (number, stream) in &mut self.streams {
                if stream.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(number.unsigned_abs());
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names() {
        assert_eq!(parse("9"), Ok(9));
        assert_eq!(parse("KILL"), Ok(9));
        assert_eq!(parse("SIGKILL"), Ok(9));
        assert_eq!(parse("sigterm"), Ok(15));
        assert_eq!(parse("hup"), Ok(1));
        assert_eq!(parse("SIGWINCH"), Ok(28));
        assert_eq!(parse("IOT"), Ok(6));
    }

    #[test]
    fn realtime_signals() {
        assert_eq!(parse("SIGRTMIN"), Ok(34));
        assert_eq!(parse("RTMIN+3"), Ok(37));
        assert_eq!(parse("SIGRTMAX"), Ok(64));
        assert_eq!(parse("SIGRTMAX-2"), Ok(62));
        assert!(parse("RTMIN+31").is_err());
        assert!(parse("RTMIN-1").is_err());
        assert!(parse("RTMAX+1").is_err());
        assert!(parse("RTMIN+").is_err());
        assert!(parse("RTMIN+99999999999").is_err());
    }

    #[test]
    fn out_of_range_and_unknown() {
        for raw in ["0", "65", "-9", "", "SIG", "KILLALL", "SIGTERM "] {
            assert!(parse(raw).is_err(), "{raw:?}");
        }
        assert!(parse("NOPE")
            .unwrap_err()
            .to_string()
            .contains("unknown signal \"NOPE\""));
    }
}
