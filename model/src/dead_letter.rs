//! Records of the `dead-letter` topic: events refused by ingest and events
//! the processor could no longer count, in one JSON shape so one consumer
//! reads both.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use crate::EventError;

/// The most of a refused body kept in its letter: enough to see what was
/// wrong, bounded so one huge line cannot fill the topic.
pub const RAW_LIMIT_BYTES: usize = 4 * 1024;

/// One dead letter, e.g.
/// `{"reason":"missing_field","error":"missing field `user_id`","stage":"ingest","raw":"{...}"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter<'a> {
    /// The machine-readable code ([`EventError::reason`]).
    pub reason: Cow<'a, str>,
    /// What was wrong, for a person.
    pub error: Cow<'a, str>,
    /// Which part refused it: `ingest` or `processor`.
    pub stage: Cow<'a, str>,
    /// The event as text: the body ingest received (cut at
    /// [`RAW_LIMIT_BYTES`]) or the event the processor decoded, as JSON.
    pub raw: Cow<'a, str>,
}

impl<'a> DeadLetter<'a> {
    /// An event ingest refused, with the bytes it was sent.
    pub fn refused(error: &EventError, raw: &'a [u8]) -> Self {
        let kept = &raw[..raw.len().min(RAW_LIMIT_BYTES)];
        DeadLetter {
            reason: Cow::Borrowed(error.reason()),
            error: Cow::Owned(error.to_string()),
            stage: Cow::Borrowed("ingest"),
            raw: String::from_utf8_lossy(kept),
        }
    }

    /// An event too late for its window, as the processor decoded it.
    pub fn too_late(event_json: String) -> Self {
        let error = EventError::TooLate;
        DeadLetter {
            reason: Cow::Borrowed(error.reason()),
            error: Cow::Owned(error.to_string()),
            stage: Cow::Borrowed("processor"),
            raw: Cow::Owned(event_json),
        }
    }

    /// The letter's JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a struct of strings always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_stages_write_the_same_shape() {
        let refused = DeadLetter::refused(&EventError::NotAnObject, b"[1]");
        let late = DeadLetter::too_late(r#"{"event_id":"a4"}"#.to_string());
        for letter in [&refused, &late] {
            let text = letter.to_json();
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            let mut keys: Vec<_> = value.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            assert_eq!(keys, ["error", "raw", "reason", "stage"], "{text}");
            assert_eq!(&serde_json::from_str::<DeadLetter>(&text).unwrap(), letter);
        }
        assert_eq!(refused.reason, "not_an_object");
        assert_eq!(late.reason, "too_late");
        assert_eq!(late.stage, "processor");
    }

    #[test]
    fn a_refused_body_is_cut_at_the_limit_without_splitting_a_character() {
        let body = "é".repeat(RAW_LIMIT_BYTES);
        let letter = DeadLetter::refused(&EventError::NotAnObject, body.as_bytes());
        assert!(
            letter.raw.len() <= RAW_LIMIT_BYTES + 3,
            "{}",
            letter.raw.len()
        );
        assert!(letter.raw.starts_with("éé"));
    }
}
