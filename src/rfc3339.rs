//! Times as RFC 3339 text in UTC, to the second (`2024-05-01T12:00:00Z`): the
//! one form the API, the notes and the commands show. Pure.
//!
//! Also a serde `with` module for `SystemTime` fields, and [`option`] for
//! `Option<SystemTime>` ones.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serializer};

/// `t` as RFC 3339, to the second.
pub fn format(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Milliseconds since the Unix epoch (how rollout state keeps time) as RFC 3339.
pub fn format_millis(ms: u64) -> String {
    format(UNIX_EPOCH + Duration::from_millis(ms))
}

/// Reads what [`format`] writes (and other RFC 3339 forms: fractions, offsets).
pub fn parse(s: &str) -> Result<SystemTime, humantime::TimestampError> {
    humantime::parse_rfc3339_weak(s)
}

pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_seconds(*t))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
    parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
}

/// For `Option<SystemTime>` fields: `None` is null.
pub mod option {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => super::serialize(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| super::parse(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_in_utc_and_back() {
        let t = UNIX_EPOCH + Duration::from_millis(1_714_564_800_250);
        assert_eq!(format(t), "2024-05-01T12:00:00Z");
        assert_eq!(format_millis(1_714_564_800_250), "2024-05-01T12:00:00Z");
        assert_eq!(parse("2024-05-01T12:00:00Z").unwrap(), t - Duration::from_millis(250));
        assert!(parse("yesterday").is_err());
    }
}
