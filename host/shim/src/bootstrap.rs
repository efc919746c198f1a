//! containerd's shim bootstrap protocol (containerd 2.3+): on `start`, containerd writes one
//! protobuf `containerd.runtime.bootstrap.v1.BootstrapParams` message to the shim's stdin and
//! reads one `BootstrapResult` message from its stdout. Older containerd lines pass the same
//! facts as flags and environment variables, and the runtime options (a protobuf `Any`) on
//! stdin, and read the shim's address as plain text.
//!
//! Only the fields husk uses are typed here; every other field is skipped, as protobuf readers
//! do. The wire format is read with the `protobuf` crate's stream reader: a malformed message is
//! an error, never a panic.

use containerd_shim::protos::protobuf::rt::WireType;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{CodedInputStream, CodedOutputStream, Message};

/// The most a `start` request may hold on stdin: containerd's messages are a few hundred bytes.
pub const MAX_INPUT: usize = 1 << 20;

/// Log level of `BootstrapParams.log_level` at and below which the shim logs debug messages
/// (`LOG_LEVEL_DEBUG`; levels are an open enum: INFO = 0, more verbose is negative).
pub const LOG_LEVEL_DEBUG: i32 = -4;

/// The task API version husk's shim serves (`containerd.task.v2`).
pub const TASK_API_VERSION: i32 = 2;

/// Errors decoding a bootstrap message.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// Not a well-formed protobuf message of the expected shape.
    #[error("malformed bootstrap message: {0}")]
    Malformed(String),
    /// A field has another wire type than the protocol gives it.
    #[error("bootstrap field {field} has wire type {wire:?}, not {want:?}")]
    WireType {
        field: u32,
        wire: WireType,
        want: WireType,
    },
    /// Encoding the answer failed.
    #[error("cannot encode the bootstrap result: {0}")]
    Encode(String),
}

impl From<containerd_shim::protos::protobuf::Error> for BootstrapError {
    fn from(err: containerd_shim::protos::protobuf::Error) -> Self {
        BootstrapError::Malformed(err.to_string())
    }
}

/// `BootstrapParams`, the fields husk reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BootstrapParams {
    /// 1: the task (container or sandbox) ID.
    pub instance_id: String,
    /// 2: the containerd namespace.
    pub namespace: String,
    /// 3: the log level containerd asks for.
    pub log_level: i32,
    /// 4: containerd's version.
    pub containerd_version: String,
    /// 5: containerd's ttrpc address (events are published there).
    pub containerd_ttrpc_address: String,
    /// 6: containerd's gRPC address.
    pub containerd_grpc_address: String,
    /// 7: the containerd binary (for `containerd publish`).
    pub containerd_binary: String,
    /// 8: typed extensions (`Extension { Any value = 1 }`); the runtime options are one of them.
    pub extensions: Vec<Any>,
    /// 9: where the shim should put its socket (optional).
    pub socket_dir: Option<String>,
}

impl BootstrapParams {
    /// Decodes a `BootstrapParams` message.
    pub fn decode(bytes: &[u8]) -> Result<Self, BootstrapError> {
        let mut input = CodedInputStream::from_bytes(bytes);
        let mut params = BootstrapParams::default();
        while let Some(tag) = input.read_raw_tag_or_eof()? {
            let (field, wire) = split_tag(tag)?;
            match field {
                1 => params.instance_id = read_string(&mut input, field, wire)?,
                2 => params.namespace = read_string(&mut input, field, wire)?,
                3 => {
                    expect_wire(field, wire, WireType::Varint)?;
                    params.log_level = input.read_int32()?;
                }
                4 => params.containerd_version = read_string(&mut input, field, wire)?,
                5 => params.containerd_ttrpc_address = read_string(&mut input, field, wire)?,
                6 => params.containerd_grpc_address = read_string(&mut input, field, wire)?,
                7 => params.containerd_binary = read_string(&mut input, field, wire)?,
                8 => {
                    expect_wire(field, wire, WireType::LengthDelimited)?;
                    if let Some(value) = decode_extension(&input.read_bytes()?)? {
                        params.extensions.push(value);
                    }
                }
                9 => params.socket_dir = Some(read_string(&mut input, field, wire)?),
                _ => input.skip_field(wire)?,
            }
        }
        Ok(params)
    }

    /// Whether containerd asks for debug logs.
    pub fn debug(&self) -> bool {
        self.log_level <= LOG_LEVEL_DEBUG
    }
}

/// `BootstrapResult`: what the shim answers.
#[derive(Debug, Clone, PartialEq)]
pub struct BootstrapResult {
    /// 1: the task API version served at `address`.
    pub version: i32,
    /// 2: where the shim listens (`unix:///...`).
    pub address: String,
    /// 3: `ttrpc` or `grpc`.
    pub protocol: String,
}

impl BootstrapResult {
    /// The answer of a ttrpc shim serving task API v2 at `address`.
    pub fn ttrpc(address: &str) -> Self {
        BootstrapResult {
            version: TASK_API_VERSION,
            address: address.to_owned(),
            protocol: "ttrpc".to_owned(),
        }
    }

    /// Encodes the message.
    pub fn encode(&self) -> Result<Vec<u8>, BootstrapError> {
        let mut bytes = Vec::new();
        let encode = |out: &mut CodedOutputStream| {
            out.write_int32(1, self.version)?;
            out.write_string(2, &self.address)?;
            out.write_string(3, &self.protocol)?;
            out.flush()
        };
        encode(&mut CodedOutputStream::vec(&mut bytes))
            .map_err(|err| BootstrapError::Encode(err.to_string()))?;
        Ok(bytes)
    }
}

/// `Extension { google.protobuf.Any value = 1; }`: its value, if set.
fn decode_extension(bytes: &[u8]) -> Result<Option<Any>, BootstrapError> {
    let mut input = CodedInputStream::from_bytes(bytes);
    let mut value = None;
    while let Some(tag) = input.read_raw_tag_or_eof()? {
        let (field, wire) = split_tag(tag)?;
        if field == 1 {
            expect_wire(field, wire, WireType::LengthDelimited)?;
            value = Some(Any::parse_from_bytes(&input.read_bytes()?)?);
        } else {
            input.skip_field(wire)?;
        }
    }
    Ok(value)
}

fn split_tag(tag: u32) -> Result<(u32, WireType), BootstrapError> {
    let field = tag >> 3;
    let wire = WireType::new(tag & 7)
        .ok_or_else(|| BootstrapError::Malformed(format!("invalid wire type in tag {tag:#x}")))?;
    if field == 0 {
        return Err(BootstrapError::Malformed("field number 0".to_owned()));
    }
    Ok((field, wire))
}

fn expect_wire(field: u32, wire: WireType, want: WireType) -> Result<(), BootstrapError> {
    if wire == want {
        Ok(())
    } else {
        Err(BootstrapError::WireType { field, wire, want })
    }
}

fn read_string(
    input: &mut CodedInputStream,
    field: u32,
    wire: WireType,
) -> Result<String, BootstrapError> {
    expect_wire(field, wire, WireType::LengthDelimited)?;
    Ok(input.read_string()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What containerd 2.3 writes on stdin for `ctr run --runtime io.containerd.husk.v2 ... id1`
    /// in namespace `default`, assembled by hand from bootstrap.proto's field numbers (so the
    /// test does not check the decoder against its own encoder): instance_id "id1",
    /// namespace "default", log_level -4 (a 10-byte varint), containerd_version "2.3.4",
    /// the two addresses, the binary, one extension (an Any of type
    /// "runtimeoptions.v1.Options" with 2 value bytes) and socket_dir "/run/c/s".
    fn recorded_2_3() -> Vec<u8> {
        let mut b = Vec::new();
        let mut field = |tag: u8, value: &[u8]| {
            b.push(tag);
            b.push(value.len() as u8);
            b.extend_from_slice(value);
        };
        field(0x0a, b"id1");
        field(0x12, b"default");
        field(0x22, b"2.3.4");
        field(0x2a, b"unix:///run/containerd/containerd.sock.ttrpc");
        field(0x32, b"/run/containerd/containerd.sock");
        field(0x3a, b"/usr/bin/containerd");
        // Any { type_url = 1, value = 2 }, inside Extension { value = 1 }.
        let mut any = vec![0x0a, 25];
        any.extend_from_slice(b"runtimeoptions.v1.Options");
        any.extend_from_slice(&[0x12, 2, 0x08, 0x01]);
        let mut extension = vec![0x0a, any.len() as u8];
        extension.extend_from_slice(&any);
        field(0x42, &extension);
        field(0x4a, b"/run/c/s");
        // log_level = -4: field 3, varint, sign-extended to 64 bits.
        b.extend_from_slice(&[
            0x18, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ]);
        b
    }

    #[test]
    fn a_recorded_2_3_request_decodes_field_by_field() {
        let params = BootstrapParams::decode(&recorded_2_3()).unwrap();
        assert_eq!(params.instance_id, "id1");
        assert_eq!(params.namespace, "default");
        assert_eq!(params.log_level, -4);
        assert!(params.debug());
        assert_eq!(params.containerd_version, "2.3.4");
        assert_eq!(
            params.containerd_ttrpc_address,
            "unix:///run/containerd/containerd.sock.ttrpc"
        );
        assert_eq!(
            params.containerd_grpc_address,
            "/run/containerd/containerd.sock"
        );
        assert_eq!(params.containerd_binary, "/usr/bin/containerd");
        assert_eq!(params.extensions.len(), 1);
        assert_eq!(params.extensions[0].type_url, "runtimeoptions.v1.Options");
        assert_eq!(params.extensions[0].value, vec![0x08, 0x01]);
        assert_eq!(params.socket_dir.as_deref(), Some("/run/c/s"));
    }

    #[test]
    fn unknown_fields_are_skipped() {
        let mut bytes = recorded_2_3();
        // field 15 (varint 7), field 16 (length-delimited), field 17 (fixed32).
        bytes.extend_from_slice(&[0x78, 0x07, 0x82, 0x01, 0x02, b'h', b'i']);
        bytes.extend_from_slice(&[0x8d, 0x01, 1, 2, 3, 4]);
        let params = BootstrapParams::decode(&bytes).unwrap();
        assert_eq!(params.instance_id, "id1");
        assert_eq!(params.socket_dir.as_deref(), Some("/run/c/s"));
    }

    #[test]
    fn info_level_is_not_debug_and_defaults_are_empty() {
        let params = BootstrapParams::decode(&[0x0a, 1, b'x']).unwrap();
        assert_eq!(params.instance_id, "x");
        assert_eq!(params.log_level, 0);
        assert!(!params.debug());
        assert!(params.extensions.is_empty());
        assert_eq!(params.socket_dir, None);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let recorded = recorded_2_3();
        // Every truncation of a valid message that cuts a field short.
        for len in 1..recorded.len() {
            let _ = BootstrapParams::decode(&recorded[..len]);
        }
        for bad in [
            &[0x0a, 5, b'a'][..],          // length past the end
            &[0x0a, 2, 0xff, 0xfe][..],    // invalid UTF-8 in a string
            &[0x08, 0x01][..],             // instance_id as a varint
            &[0x1a, 0x01, 0x00][..],       // log_level length-delimited
            &[0x0f][..],                   // wire type 7
            &[0x02, 0x00][..],             // field number 0
            &[0x42, 0x02, 0x0a, 0x05][..], // extension whose Any runs past its end
        ] {
            assert!(BootstrapParams::decode(bad).is_err(), "{bad:?} decoded");
        }
    }

    #[test]
    fn runtime_options_of_older_containerd_decode_as_a_different_identity() {
        // containerd 1.x/2.0-2.2 write the runtime options as a bare Any: field 1 (type_url)
        // reads as instance_id and field 2 (value) as namespace, which is why the caller
        // compares the identity with the command line before trusting the message.
        let mut any = Any::new();
        any.type_url = "runtimeoptions.v1.Options".to_owned();
        any.value = b"\x0a\x04conf".to_vec();
        let params = BootstrapParams::decode(&any.write_to_bytes().unwrap()).unwrap();
        assert_eq!(params.instance_id, "runtimeoptions.v1.Options");
        assert_ne!(params.namespace, "default");
    }

    #[test]
    fn the_result_encodes_as_containerd_reads_it() {
        let bytes = BootstrapResult::ttrpc("unix:///run/containerd/s/ab")
            .encode()
            .unwrap();
        let mut want = vec![0x08, 0x02, 0x12, 27];
        want.extend_from_slice(b"unix:///run/containerd/s/ab");
        want.extend_from_slice(&[0x1a, 5]);
        want.extend_from_slice(b"ttrpc");
        assert_eq!(bytes, want);
    }
}
