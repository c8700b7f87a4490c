//! The lake's own state, `_vigil/state.json`: the export cursors (the
//! durable watermark), the chunk being written, the gold dates to rebuild
//! and what the lake was made with (schema version, key id, date shift).
//! It is written after the data files it accounts for, so a crash leaves
//! either the previous state (the chunk is written again, under the same
//! file names) or the new one.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// The state object's path in the lake.
pub const STATE_PATH: &str = "_vigil/state.json";
/// Its `format` value.
pub const FORMAT: &str = "vigil-lake";

/// Which cursor a chunk advances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Readings,
    Scores,
}

/// A chunk whose files may be partly written: `after < cursor <= upto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub stream: Stream,
    pub after: i64,
    pub upto: i64,
}

/// `_vigil/state.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub format: String,
    pub schema_version: u32,
    /// The lake key's id (`LakeKey::id`).
    pub key_id: String,
    pub date_shift_max_days: u16,
    /// Highest reading cursor exported.
    pub readings_cursor: i64,
    /// Highest score history id exported.
    pub scores_cursor: i64,
    /// Highest erasure tombstone id applied.
    pub tombstones_cursor: i64,
    pub pending: Option<Pending>,
    /// Silver dates whose gold vitals must be rebuilt.
    pub gold_dirty: BTreeSet<String>,
    /// When this state was written (UTC µs).
    pub updated_us: i64,
}

impl State {
    pub fn new(schema_version: u32, key_id: &str, date_shift_max_days: u16) -> Self {
        Self {
            format: FORMAT.to_owned(),
            schema_version,
            key_id: key_id.to_owned(),
            date_shift_max_days,
            readings_cursor: 0,
            scores_cursor: 0,
            tombstones_cursor: 0,
            pending: None,
            gold_dirty: BTreeSet::new(),
            updated_us: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_as_json() {
        let mut s = State::new(1, "abcd", 7);
        s.pending = Some(Pending {
            stream: Stream::Readings,
            after: 5,
            upto: 9,
        });
        s.gold_dirty.insert("2026-01-02".into());
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"stream\":\"readings\""), "{text}");
        assert_eq!(serde_json::from_str::<State>(&text).unwrap(), s);
    }
}
