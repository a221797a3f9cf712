//! Counting a message's elements before decoding it. A protobuf message's
//! size does not bound what decoding it costs: an empty entry of a repeated
//! message field is two bytes on the wire and a whole struct in memory, so a
//! 16 MiB body of them decodes into gigabytes. [`check`] walks the wire
//! format once, guided by the schema `build.rs` extracts from the protos, and
//! refuses a message with more than a given number of message elements
//! (nested messages, list entries and map entries) before anything is
//! allocated for it.

use prost::encoding::{WireType, decode_key, decode_varint};

mod table {
    include!(concat!(env!("OUT_DIR"), "/opamp_elements.rs"));
}

/// A message type and its place in the schema table.
pub trait Elements {
    const SCHEMA: u16;
}

impl Elements for super::AgentToServer {
    const SCHEMA: u16 = table::AGENT_TO_SERVER;
}

impl Elements for super::ServerToAgent {
    const SCHEMA: u16 = table::SERVER_TO_AGENT;
}

/// Why a message was refused before decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TooMany {
    #[error("more than {0} elements")]
    Elements(usize),
    #[error("nested more than {0} levels deep")]
    Depth(usize),
}

/// Nesting deeper than this is refused (prost's own recursion limit is 100).
const MAX_DEPTH: usize = 64;

/// Checks that `bytes`, a message of type `M`, holds at most `limit` message
/// elements at any depth. Malformed input is left for the decoder to report.
pub fn check<M: Elements>(bytes: &[u8], limit: usize) -> Result<(), TooMany> {
    // Each element and each level of nesting takes at least two bytes (a key
    // and a length): a message shorter than this, a heartbeat say, is within
    // both bounds unread.
    if bytes.len() < 2 * (limit.min(MAX_DEPTH) + 1) {
        return Ok(());
    }
    walked(bytes, M::SCHEMA, limit)
}

fn walked(bytes: &[u8], schema: u16, limit: usize) -> Result<(), TooMany> {
    let mut budget = limit;
    walk(bytes, schema, &mut budget, 0).map_err(|e| match e {
        Walk::Budget => TooMany::Elements(limit),
        Walk::Depth => TooMany::Depth(MAX_DEPTH),
    })
}

enum Walk {
    Budget,
    Depth,
}

fn walk(mut buf: &[u8], message: u16, budget: &mut usize, depth: usize) -> Result<(), Walk> {
    if depth > MAX_DEPTH {
        return Err(Walk::Depth);
    }
    let fields = table::SCHEMA[usize::from(message)];
    while !buf.is_empty() {
        // Anything malformed stops the walk; decoding reports it.
        let Ok((number, wire_type)) = decode_key(&mut buf) else {
            return Ok(());
        };
        let skip = match wire_type {
            WireType::Varint => match decode_varint(&mut buf) {
                Ok(_) => 0,
                Err(_) => return Ok(()),
            },
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => {
                let Ok(len) = decode_varint(&mut buf) else {
                    return Ok(());
                };
                let Some(len) = usize::try_from(len).ok().filter(|l| *l <= buf.len()) else {
                    return Ok(());
                };
                if let Some(&(_, child)) = fields.iter().find(|(n, _)| *n == number) {
                    *budget = budget.checked_sub(1).ok_or(Walk::Budget)?;
                    walk(&buf[..len], child, budget, depth + 1)?;
                }
                len
            }
            WireType::StartGroup | WireType::EndGroup => return Ok(()),
        };
        if skip > buf.len() {
            return Ok(());
        }
        buf = &buf[skip..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;
    use crate::proto::{AgentDescription, AgentToServer, AnyValue, ArrayValue, KeyValue, any_value};

    fn attrs(n: usize) -> AgentToServer {
        AgentToServer {
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![KeyValue::default(); n],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_message_too_short_to_break_a_bound_is_judged_as_the_walk_judges_it() {
        let nested = |levels: usize| {
            let mut value = AnyValue::default();
            for _ in 0..levels {
                value = AnyValue {
                    value: Some(any_value::Value::ArrayValue(ArrayValue { values: vec![value] })),
                };
            }
            AgentToServer {
                agent_description: Some(AgentDescription {
                    identifying_attributes: vec![KeyValue {
                        key: String::new(),
                        value: Some(value),
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }
        };
        let messages = (0..40).map(attrs).chain((0..40).map(nested));
        for bytes in messages.map(|m| m.encode_to_vec()) {
            for limit in 0..100 {
                let walked = walked(&bytes, AgentToServer::SCHEMA, limit);
                assert_eq!(
                    check::<AgentToServer>(&bytes, limit),
                    walked,
                    "{} bytes, limit {limit}",
                    bytes.len()
                );
            }
        }
    }

    #[test]
    fn counts_every_nested_message_and_list_entry() {
        // The description, then one per attribute.
        let bytes = attrs(10).encode_to_vec();
        assert_eq!(check::<AgentToServer>(&bytes, 11), Ok(()));
        assert_eq!(check::<AgentToServer>(&bytes, 10), Err(TooMany::Elements(10)));
    }

    #[test]
    fn values_nested_in_values_count_too() {
        let mut value = AnyValue::default();
        for _ in 0..70 {
            value = AnyValue {
                value: Some(any_value::Value::ArrayValue(ArrayValue { values: vec![value] })),
            };
        }
        let msg = AgentToServer {
            agent_description: Some(AgentDescription {
                identifying_attributes: vec![KeyValue {
                    key: "k".into(),
                    value: Some(value),
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let bytes = msg.encode_to_vec();
        assert_eq!(check::<AgentToServer>(&bytes, 1_000), Err(TooMany::Depth(MAX_DEPTH)));
    }

    #[test]
    fn a_body_of_empty_entries_is_refused_before_it_is_decoded() {
        // One description holding a million empty attributes: 2 MB on the
        // wire, about 100 MB decoded.
        let bytes = attrs(1_000_000).encode_to_vec();
        assert!(bytes.len() < 3 << 20);
        assert_eq!(check::<AgentToServer>(&bytes, 100_000), Err(TooMany::Elements(100_000)));
    }

    #[test]
    fn garbage_is_left_to_the_decoder() {
        for bytes in [&b"\xff\xff\xff"[..], b"\x0a\x05ab", b"\x0b"] {
            assert_eq!(check::<AgentToServer>(bytes, 10), Ok(()));
        }
    }
}
