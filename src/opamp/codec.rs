//! Bytes to OpAMP messages and back: the WebSocket varint header, gzip bodies
//! and size limits. No I/O; used by the server and by the simulator alike.

use std::io::Read;

use bytes::Bytes;
use flate2::Compression;
use flate2::read::{GzEncoder, MultiGzDecoder};
use prost::Message;

use crate::proto::elements::{self, Elements, TooMany};

/// The default largest message, after decompression.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// The most message elements (nested messages, list and map entries) one
/// message may hold: far above what an agent reports (attributes, component
/// health, config files), and it bounds what decoding a message can allocate
/// to some tens of MiB whatever its bytes say.
pub const MAX_MESSAGE_ELEMENTS: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("message is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("message holds {0}")]
    TooMany(#[from] TooMany),
    #[error("WebSocket header {0} is not 0")]
    BadHeader(u64),
    #[error("malformed protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("malformed gzip body: {0}")]
    Gzip(std::io::Error),
    #[error("unsupported Content-Encoding {0:?}")]
    UnsupportedEncoding(String),
}

/// Decodes one WebSocket binary frame.
///
/// Current clients put a varint header (always 0) before the protobuf; clients
/// from before November 2022 send the bare protobuf. A protobuf message never
/// starts with a 0x00 byte (field number 0 is invalid), so a leading 0x00 is
/// the header and anything else is a headerless message.
pub fn decode_ws<M: Message + Default + Elements>(frame: &[u8], limit: usize) -> Result<M, DecodeError> {
    if frame.len() > limit {
        return Err(DecodeError::TooLarge {
            size: frame.len(),
            limit,
        });
    }
    let payload = match frame.first() {
        Some(0x00) => &frame[1..],
        Some(b) if *b >= 0x80 => {
            // A multi-byte varint header can only be a non-zero header.
            let header = prost::encoding::decode_varint(&mut &frame[..])?;
            return Err(DecodeError::BadHeader(header));
        }
        _ => frame,
    };
    decode(payload)
}

/// Decodes a message whose element count is within [`MAX_MESSAGE_ELEMENTS`].
fn decode<M: Message + Default + Elements>(bytes: &[u8]) -> Result<M, DecodeError> {
    elements::check::<M>(bytes, MAX_MESSAGE_ELEMENTS)?;
    Ok(M::decode(bytes)?)
}

/// Encodes a message as a WebSocket binary frame: header 0, then the protobuf.
pub fn encode_ws<M: Message>(msg: &M) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + msg.encoded_len());
    out.push(0x00);
    msg.encode(&mut out).expect("a Vec grows as needed");
    out
}

/// Decodes a plain-HTTP request body, inflating it first when the client sent
/// `Content-Encoding: gzip`. The limit applies to the inflated size.
pub fn decode_http<M: Message + Default + Elements>(
    body: &[u8],
    content_encoding: Option<&str>,
    limit: usize,
) -> Result<M, DecodeError> {
    let encoding = content_encoding.map(str::trim).unwrap_or("");
    if encoding.eq_ignore_ascii_case("gzip") || encoding.eq_ignore_ascii_case("x-gzip") {
        let inflated = gunzip(body, limit)?;
        decode(&inflated)
    } else if encoding.is_empty() || encoding.eq_ignore_ascii_case("identity") {
        if body.len() > limit {
            return Err(DecodeError::TooLarge {
                size: body.len(),
                limit,
            });
        }
        decode(body)
    } else {
        Err(DecodeError::UnsupportedEncoding(encoding.to_string()))
    }
}

/// Encodes a plain-HTTP body, gzipped when `gzip` is set.
pub fn encode_http<M: Message>(msg: &M, gzip: bool) -> Bytes {
    let raw = msg.encode_to_vec();
    if !gzip {
        return raw.into();
    }
    let mut out = Vec::with_capacity(raw.len() / 2 + 32);
    GzEncoder::new(&raw[..], Compression::fast())
        .read_to_end(&mut out)
        .expect("gzip into memory cannot fail");
    out.into()
}

/// True when an `Accept-Encoding` header value allows gzip.
pub fn accepts_gzip(accept_encoding: &str) -> bool {
    accept_encoding.split(',').any(|part| {
        let mut it = part.split(';');
        let coding = it.next().unwrap_or("").trim();
        let refused = it.any(|p| {
            matches!(
                p.trim().replace(' ', "").as_str(),
                "q=0" | "q=0.0" | "q=0.00" | "q=0.000"
            )
        });
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
    })
}

/// Inflates at most `limit` bytes; a body that inflates beyond it is refused
/// without inflating the rest (a gzip bomb costs us `limit` bytes, no more).
/// A body of several gzip members (legal, and what some clients send) is
/// inflated whole.
fn gunzip(body: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let mut out = Vec::new();
    MultiGzDecoder::new(body)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(DecodeError::Gzip)?;
    if out.len() > limit {
        return Err(DecodeError::TooLarge { size: out.len(), limit });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{AgentToServer, ServerToAgent};

    fn sample() -> AgentToServer {
        AgentToServer {
            instance_uid: vec![1u8; 16].into(),
            sequence_num: 7,
            capabilities: 0x3,
            ..Default::default()
        }
    }

    #[test]
    fn ws_with_and_without_header() {
        let msg = sample();
        let framed = encode_ws(&msg);
        assert_eq!(framed[0], 0);
        assert_eq!(decode_ws::<AgentToServer>(&framed, 1024).unwrap(), msg);
        let bare = msg.encode_to_vec();
        assert_eq!(decode_ws::<AgentToServer>(&bare, 1024).unwrap(), msg);
        // An empty message is valid: header alone, or nothing at all.
        assert_eq!(
            decode_ws::<ServerToAgent>(&[0], 1024).unwrap(),
            ServerToAgent::default()
        );
        assert_eq!(decode_ws::<ServerToAgent>(&[], 1024).unwrap(), ServerToAgent::default());
    }

    #[test]
    fn ws_rejects_nonzero_multibyte_header_and_oversize() {
        assert!(matches!(
            decode_ws::<AgentToServer>(&[0x80, 0x01, 0x0a], 1024),
            Err(DecodeError::BadHeader(128))
        ));
        let framed = encode_ws(&sample());
        assert!(matches!(
            decode_ws::<AgentToServer>(&framed, 4),
            Err(DecodeError::TooLarge { .. })
        ));
    }

    #[test]
    fn http_plain_and_gzip() {
        let msg = sample();
        let plain = encode_http(&msg, false);
        assert_eq!(decode_http::<AgentToServer>(&plain, None, 1024).unwrap(), msg);
        let gz = encode_http(&msg, true);
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        assert_eq!(decode_http::<AgentToServer>(&gz, Some("gzip"), 1024).unwrap(), msg);
        assert!(matches!(
            decode_http::<AgentToServer>(&gz, Some("br"), 1024),
            Err(DecodeError::UnsupportedEncoding(_))
        ));
        assert!(matches!(
            decode_http::<AgentToServer>(&plain, Some("gzip"), 1024),
            Err(DecodeError::Gzip(_))
        ));
    }

    #[test]
    fn gzip_limit_applies_after_inflating() {
        let big = AgentToServer {
            instance_uid: vec![0u8; 100_000].into(),
            ..Default::default()
        };
        let gz = encode_http(&big, true);
        assert!(gz.len() < 1_000, "zeros compress well");
        assert!(matches!(
            decode_http::<AgentToServer>(&gz, Some("gzip"), 10_000),
            Err(DecodeError::TooLarge {
                size: 10_001,
                limit: 10_000
            })
        ));
    }

    #[test]
    fn a_body_of_several_gzip_members_is_inflated_whole() {
        let raw = sample().encode_to_vec();
        let (head, tail) = raw.split_at(raw.len() / 2);
        let mut body = Vec::new();
        for part in [head, tail] {
            GzEncoder::new(part, Compression::fast())
                .read_to_end(&mut body)
                .unwrap();
        }
        assert_eq!(
            decode_http::<AgentToServer>(&body, Some("gzip"), 1024).unwrap(),
            sample()
        );
    }

    #[test]
    fn many_empty_entries_are_refused_before_they_are_decoded() {
        use crate::proto::{AgentDescription, KeyValue};
        let bomb = AgentToServer {
            agent_description: Some(AgentDescription {
                non_identifying_attributes: vec![KeyValue::default(); MAX_MESSAGE_ELEMENTS],
                ..Default::default()
            }),
            ..Default::default()
        };
        let gz = encode_http(&bomb, true);
        assert!(matches!(
            decode_http::<AgentToServer>(&gz, Some("gzip"), DEFAULT_MAX_MESSAGE_BYTES),
            Err(DecodeError::TooMany(TooMany::Elements(MAX_MESSAGE_ELEMENTS)))
        ));
        assert!(matches!(
            decode_ws::<AgentToServer>(&encode_ws(&bomb), DEFAULT_MAX_MESSAGE_BYTES),
            Err(DecodeError::TooMany(_))
        ));
    }

    #[test]
    fn accept_encoding() {
        assert!(accepts_gzip("gzip"));
        assert!(accepts_gzip("deflate, gzip;q=0.5"));
        assert!(accepts_gzip("*"));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("identity"));
        assert!(!accepts_gzip(""));
    }
}
