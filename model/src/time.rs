//! Event time: milliseconds since the Unix epoch, UTC.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A point in event time, in milliseconds since the Unix epoch (UTC).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct EventTime(pub i64);

/// A watermark: the assertion that no more events at or before this time are expected.
pub type Watermark = EventTime;

impl EventTime {
    /// The earliest representable time; a watermark that has seen nothing.
    pub const MIN: EventTime = EventTime(i64::MIN);
    /// The latest representable time.
    pub const MAX: EventTime = EventTime(i64::MAX);

    /// Milliseconds since the epoch.
    pub fn millis(self) -> i64 {
        self.0
    }

    /// The current wall-clock time. Only drivers and ingest call this; pipelines never do.
    pub fn now() -> EventTime {
        EventTime(chrono::Utc::now().timestamp_millis())
    }

    /// Start of the window of `size` that contains this time (aligned to the epoch).
    pub fn floor(self, size: Duration) -> EventTime {
        let size = size.as_millis() as i64;
        EventTime(self.0.div_euclid(size) * size)
    }

    /// This time moved forward by `d`, saturating.
    pub fn plus(self, d: Duration) -> EventTime {
        EventTime(self.0.saturating_add(d.as_millis() as i64))
    }

    /// This time moved back by `d`, saturating.
    pub fn minus(self, d: Duration) -> EventTime {
        EventTime(self.0.saturating_sub(d.as_millis() as i64))
    }

    /// Parses RFC 3339 (`2026-11-23T08:00:00Z`) or epoch milliseconds (`1795420800000`).
    pub fn parse(text: &str) -> Option<EventTime> {
        let text = text.trim();
        if let Ok(ms) = text.parse::<i64>() {
            return Some(EventTime(ms));
        }
        chrono::DateTime::parse_from_rfc3339(text)
            .ok()
            .map(|t| EventTime(t.timestamp_millis()))
    }

    /// RFC 3339 in UTC with a `Z` suffix; milliseconds only when they are not zero.
    pub fn to_rfc3339(self) -> String {
        match chrono::DateTime::from_timestamp_millis(self.0) {
            Some(t) if self.0 % 1000 == 0 => t.format("%Y-%m-%dT%H:%M:%SZ").to_string(),
            Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            None => self.0.to_string(),
        }
    }
}

impl fmt::Display for EventTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        let a = EventTime::parse("2026-11-23T08:00:00Z").unwrap();
        let b = EventTime::parse(&a.0.to_string()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.to_rfc3339(), "2026-11-23T08:00:00Z");
        assert!(EventTime::parse("yesterday").is_none());
    }

    #[test]
    fn floors_to_window_start() {
        let t = EventTime(61_500);
        assert_eq!(t.floor(Duration::from_secs(60)), EventTime(60_000));
        assert_eq!(
            EventTime(-1).floor(Duration::from_secs(60)),
            EventTime(-60_000)
        );
    }
}
