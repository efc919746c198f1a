//! Fuzzing harness shared by the `cargo fuzz` target in `guest-agent/protocol/fuzz` and by a
//! plain test over pseudo-random, truncated and oversized inputs (so `cargo test` runs it too).
//!
//! The bytes play the agent's side of a connection: ttrpc frames are read with ttrpc's own frame
//! reader (the one the client's connection uses), each payload is decoded as a ttrpc `Response`
//! and its status mapped like the client does, and the inner payload is then decoded as every
//! response type of the API and checked with the client's own response checks. The whole input
//! also goes straight to the `Response` and typed decoders, so short inputs reach them too. Any
//! panic is a bug.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use protobuf::Message;
use ttrpc::proto::{
    GenMessage, GenMessageError, Response, MESSAGE_TYPE_DATA, MESSAGE_TYPE_RESPONSE,
};

use crate::agent::{
    CheckResponse, CreateContainerResponse, Empty, ExecProcessResponse, GuestDetails,
    ListProcessesResponse, OOMEvent, ReadStreamResponse, StatsContainerResponse,
    WaitProcessResponse, WriteStdinResponse,
};
use crate::client::{check_exit, check_oom, check_read, check_version, check_written, map_err};
use crate::MAX_IO_CHUNK;

/// Frames read from one input at most (each may carry up to 4 MiB).
const MAX_FRAMES: usize = 64;

/// Polls a future that never waits: reading frames from a byte slice is always ready.
fn ready<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => Some(out),
        Poll::Pending => None,
    }
}

/// Decodes `payload` as every response type of the API and runs the client's checks on it.
/// `request_len` stands for what the request asked (bytes sent to stdin, `max_len` of a read).
pub fn fuzz_typed_payload(payload: &[u8], request_len: usize) {
    if let Ok(resp) = CheckResponse::parse_from_bytes(payload) {
        let _ = check_version(resp);
    }
    if let Ok(resp) = WaitProcessResponse::parse_from_bytes(payload) {
        if let Ok(status) = check_exit(&resp) {
            assert!((0..=255).contains(&status.code) || status.code == status.signal + 128);
        }
    }
    if let Ok(resp) = WriteStdinResponse::parse_from_bytes(payload) {
        if let Ok(n) = check_written(resp.written, request_len) {
            assert!(n <= request_len);
        }
    }
    if let Ok(resp) = ReadStreamResponse::parse_from_bytes(payload) {
        if let Ok(Some(data)) = check_read("ReadStdout", resp, request_len) {
            assert!(data.len() <= MAX_IO_CHUNK);
            assert!(request_len == 0 || data.len() <= request_len);
        }
    }
    if let Ok(resp) = OOMEvent::parse_from_bytes(payload) {
        if let Ok(id) = check_oom(resp) {
            assert!(crate::validate::validate_id("container id", &id).is_ok());
        }
    }
    // Responses the client hands on without further checks: decoding must not panic.
    let _ = GuestDetails::parse_from_bytes(payload);
    let _ = CreateContainerResponse::parse_from_bytes(payload);
    let _ = ExecProcessResponse::parse_from_bytes(payload);
    let _ = ListProcessesResponse::parse_from_bytes(payload);
    let _ = StatsContainerResponse::parse_from_bytes(payload);
    let _ = Empty::parse_from_bytes(payload);
}

/// Decodes `payload` as a ttrpc `Response` the way the client does: a non-OK status becomes a
/// [`crate::ClientError::Rpc`] (message bounded), otherwise the inner payload is decoded as each
/// response type.
pub fn fuzz_response_payload(payload: &[u8], request_len: usize) {
    let Ok(resp) = Response::parse_from_bytes(payload) else {
        return;
    };
    if resp.status().code() != ttrpc::Code::OK {
        let err = map_err("Fuzz", ttrpc::Error::RpcStatus(resp.status().clone()));
        if let crate::ClientError::Rpc { message, .. } = &err {
            assert!(message.len() <= crate::client::MAX_STATUS_MESSAGE);
        }
        let _ = err.to_string();
        return;
    }
    fuzz_typed_payload(&resp.payload, request_len);
}

/// The fuzz entry point: `data` is what the agent sent on the connection.
pub fn fuzz_agent_responses(data: &[u8]) {
    // The request size the checks compare against comes from the first two bytes, so both
    // "asked for little" and "asked for a full chunk" are explored.
    let request_len = match data {
        [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
        _ => MAX_IO_CHUNK,
    };
    fuzz_typed_payload(data, request_len);
    fuzz_response_payload(data, request_len);

    let mut reader = data;
    for _ in 0..MAX_FRAMES {
        match ready(GenMessage::read_from(&mut reader)) {
            Some(Ok(msg)) => {
                if matches!(msg.header.type_, MESSAGE_TYPE_RESPONSE | MESSAGE_TYPE_DATA) {
                    fuzz_response_payload(&msg.payload, request_len);
                }
            }
            // An oversized or malformed frame fails its stream only; the connection goes on.
            Some(Err(GenMessageError::ReturnError(..))) => {}
            Some(Err(GenMessageError::InternalError(_))) | None => break,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use ttrpc::proto::{MessageHeader, Status, MESSAGE_LENGTH_MAX};

    use super::*;
    use crate::client::ExitStatus;
    use crate::ClientError;

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

    /// One ttrpc response frame carrying `inner` with `status`.
    fn frame(stream_id: u32, inner: &[u8], status: Option<Status>) -> Vec<u8> {
        let mut resp = Response::new();
        resp.payload = inner.to_vec();
        if let Some(status) = status {
            resp.set_status(status);
        }
        let body = resp.write_to_bytes().unwrap();
        let header = MessageHeader::new_response(stream_id, body.len() as u32);
        let mut out = Vec::new();
        ready(header.write_to(&mut out)).unwrap().unwrap();
        out.extend_from_slice(&body);
        out
    }

    /// A well-formed connection: one frame of each checked response type.
    fn valid_stream() -> Vec<u8> {
        let mut out = vec![8, 0];
        let check = CheckResponse {
            api_version: crate::API_VERSION,
            agent_version: "0.1.0".into(),
            ..Default::default()
        };
        out.extend(frame(1, &check.write_to_bytes().unwrap(), None));
        let wait = WaitProcessResponse {
            exit_code: 137,
            signal: 9,
            ..Default::default()
        };
        out.extend(frame(3, &wait.write_to_bytes().unwrap(), None));
        let read = ReadStreamResponse {
            data: b"hello".to_vec(),
            ..Default::default()
        };
        out.extend(frame(5, &read.write_to_bytes().unwrap(), None));
        let oom = OOMEvent {
            container_id: "ctr-1".into(),
            ..Default::default()
        };
        out.extend(frame(7, &oom.write_to_bytes().unwrap(), None));
        let mut status = Status::new();
        status.set_code(ttrpc::Code::NOT_FOUND);
        status.set_message("x".repeat(10_000));
        out.extend(frame(9, &[], Some(status)));
        out
    }

    #[test]
    fn harness_survives_random_inputs() {
        for input in inputs(300, 600) {
            fuzz_agent_responses(&input);
        }
    }

    #[test]
    fn harness_survives_truncated_and_corrupted_frames() {
        let stream = valid_stream();
        for len in 0..=stream.len() {
            fuzz_agent_responses(&stream[..len]);
        }
        for (i, input) in inputs(64, 1).into_iter().enumerate() {
            let mut corrupt = stream.clone();
            let at = (i * 7919) % corrupt.len();
            corrupt[at] ^= input[0] | 1;
            fuzz_agent_responses(&corrupt);
        }
    }

    /// A frame header announcing more than ttrpc's limit is refused without reading it all in;
    /// one announcing more than is there ends the connection.
    #[test]
    fn harness_survives_oversized_frames() {
        for len in [MESSAGE_LENGTH_MAX as u32 + 1, u32::MAX, 1 << 20] {
            let header = MessageHeader::new_response(1, len);
            let mut out = vec![0, 0];
            ready(header.write_to(&mut out)).unwrap().unwrap();
            out.extend_from_slice(&[0x0a; 64]);
            fuzz_agent_responses(&out);
        }
    }

    #[test]
    fn exit_status_must_match_the_signal() {
        let wait = |exit_code, signal| {
            check_exit(&WaitProcessResponse {
                exit_code,
                signal,
                ..Default::default()
            })
        };
        assert_eq!(wait(3, 0).unwrap(), ExitStatus { code: 3, signal: 0 });
        assert_eq!(
            wait(137, 9).unwrap(),
            ExitStatus {
                code: 137,
                signal: 9
            }
        );
        for (code, signal) in [
            (-1, 0),
            (256, 0),
            (0, 9),
            (i32::MAX, 9),
            (i32::MIN, i32::MAX),
            (193, 65),
            (147, 19),
            (156, 28),
            (127, -1),
        ] {
            assert!(
                matches!(
                    wait(code, signal),
                    Err(ClientError::BadResponse {
                        method: "WaitProcess",
                        ..
                    })
                ),
                "{code}/{signal} accepted"
            );
        }
    }

    #[test]
    fn oversized_reads_and_writes_are_refused() {
        let read = |n: usize, eof| ReadStreamResponse {
            data: vec![0; n],
            eof,
            ..Default::default()
        };
        assert_eq!(
            check_read("ReadStdout", read(4, false), 4).unwrap(),
            Some(vec![0; 4])
        );
        assert!(matches!(
            check_read("ReadStdout", read(5, false), 4),
            Err(ClientError::BadResponse { .. })
        ));
        assert!(check_read("ReadStdout", read(MAX_IO_CHUNK, false), 0).is_ok());
        assert!(check_read("ReadStdout", read(MAX_IO_CHUNK + 1, false), 0).is_err());
        assert_eq!(check_read("ReadStdout", read(0, true), 4).unwrap(), None);
        assert_eq!(check_written(3, 3).unwrap(), 3);
        assert!(check_written(4, 3).is_err());
        assert!(check_written(u32::MAX, 3).is_err());
    }

    #[test]
    fn oom_event_ids_and_status_messages_are_bounded() {
        let oom = |id: &str| {
            check_oom(OOMEvent {
                container_id: id.into(),
                ..Default::default()
            })
        };
        assert_eq!(oom("ctr-1").unwrap(), "ctr-1");
        for id in ["", "../x", "a\nb", &"a".repeat(crate::MAX_ID_LEN + 1)] {
            assert!(
                matches!(oom(id), Err(ClientError::BadResponse { .. })),
                "{id:?}"
            );
        }
        let mut status = Status::new();
        status.set_code(ttrpc::Code::INTERNAL);
        status.set_message("é".repeat(crate::client::MAX_STATUS_MESSAGE));
        let ClientError::Rpc { message, .. } = map_err("X", ttrpc::Error::RpcStatus(status)) else {
            panic!("not an Rpc error");
        };
        assert!(message.len() <= crate::client::MAX_STATUS_MESSAGE && message.len() > 1000);
    }

    #[test]
    fn version_mismatch_is_refused() {
        let resp = CheckResponse {
            api_version: crate::API_VERSION + 1,
            ..Default::default()
        };
        assert!(matches!(
            check_version(resp),
            Err(ClientError::VersionMismatch { .. })
        ));
    }
}
