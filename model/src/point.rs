//! Points: the results of processing, as the store keeps them.
//!
//! A point is identified by its tier (retention policy), measurement, sorted tags
//! and time (the window start). Writing a point with the same identity again
//! overwrites it, which is what makes re-emission and replay idempotent.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::EventTime;

/// A retention tier: a retention policy in InfluxDB, a partition of the embedded store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tier {
    /// 1-minute points, kept 7 days.
    Rt,
    /// 1-hour points, kept 400 days.
    Hourly,
    /// 1-day points, kept 5 years.
    Daily,
}

impl Tier {
    pub const ALL: [Tier; 3] = [Tier::Rt, Tier::Hourly, Tier::Daily];

    /// The retention policy name: `rt`, `hourly` or `daily`.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Rt => "rt",
            Tier::Hourly => "hourly",
            Tier::Daily => "daily",
        }
    }

    /// How long points of this tier are kept.
    pub fn retention(self) -> Duration {
        const DAY: u64 = 24 * 3600;
        match self {
            Tier::Rt => Duration::from_secs(7 * DAY),
            Tier::Hourly => Duration::from_secs(400 * DAY),
            Tier::Daily => Duration::from_secs(5 * 365 * DAY),
        }
    }

    /// The window size of this tier's points.
    pub fn step(self) -> Duration {
        match self {
            Tier::Rt => Duration::from_secs(60),
            Tier::Hourly => Duration::from_secs(3600),
            Tier::Daily => Duration::from_secs(24 * 3600),
        }
    }

    /// The step as written in queries: `1m`, `1h`, `1d`.
    pub fn step_name(self) -> &'static str {
        match self {
            Tier::Rt => "1m",
            Tier::Hourly => "1h",
            Tier::Daily => "1d",
        }
    }

    /// The tier whose points have this step (`1m`, `1h`, `1d`).
    pub fn from_step(step: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| t.step_name() == step)
    }

    /// The tier whose retention policy has this name.
    pub fn from_name(name: &str) -> Option<Tier> {
        Tier::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// A field value: integers stay integers (line protocol `42i`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum FieldValue {
    Int(i64),
    Float(f64),
}

impl FieldValue {
    pub fn as_f64(self) -> f64 {
        match self {
            FieldValue::Int(v) => v as f64,
            FieldValue::Float(v) => v,
        }
    }
}

/// One result: measurement, sorted tags, fields, timestamp = window start, in a tier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub measurement: String,
    pub tier: Tier,
    /// Sorted by key; keys unique.
    pub tags: Vec<(String, String)>,
    /// Sorted by key; keys unique; never empty.
    pub fields: Vec<(String, FieldValue)>,
    pub time: EventTime,
}

impl Point {
    /// Builds a point, sorting tags and fields by key.
    pub fn new(
        measurement: impl Into<String>,
        tier: Tier,
        time: EventTime,
        mut tags: Vec<(String, String)>,
        mut fields: Vec<(String, FieldValue)>,
    ) -> Point {
        tags.sort_by(|a, b| a.0.cmp(&b.0));
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        Point {
            measurement: measurement.into(),
            tier,
            tags,
            fields,
            time,
        }
    }

    /// The value of a tag, if present.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The value of a field, if present.
    pub fn field(&self, key: &str) -> Option<FieldValue> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// The series key in line-protocol form: `measurement,k1=v1,k2=v2` (escaped).
    pub fn series_key(&self) -> String {
        let mut out = String::new();
        escape_into(&mut out, &self.measurement, b", ");
        for (k, v) in &self.tags {
            out.push(',');
            escape_into(&mut out, k, b",= ");
            out.push('=');
            escape_into(&mut out, v, b",= ");
        }
        out
    }

    /// Appends this point as one line of InfluxDB line protocol (millisecond
    /// precision), without the trailing newline.
    pub fn write_line_protocol(&self, out: &mut String) {
        out.push_str(&self.series_key());
        for (i, (k, v)) in self.fields.iter().enumerate() {
            out.push(if i == 0 { ' ' } else { ',' });
            escape_into(out, k, b",= ");
            out.push('=');
            match v {
                FieldValue::Int(v) => {
                    let _ = write!(out, "{v}i");
                }
                FieldValue::Float(v) => {
                    // `{:?}` keeps a decimal point and round-trips exactly.
                    let _ = write!(out, "{v:?}");
                }
            }
        }
        let _ = write!(out, " {}", self.time.millis());
    }

    /// This point as one line of line protocol.
    pub fn to_line_protocol(&self) -> String {
        let mut out = String::new();
        self.write_line_protocol(&mut out);
        out
    }
}

/// Whether `value` can be a tag value in every store: InfluxDB's line
/// protocol has no escape for a newline, and a backslash before a separator
/// reads as an escape, so neither control characters nor backslashes
/// survive a write; nor does an empty value. Input that would become a tag
/// (hashtags, campaign ids, segments) is refused at ingest unless it passes.
pub fn is_storable_tag_value(value: &str) -> bool {
    !value.is_empty() && !value.chars().any(|c| c.is_control() || c == '\\')
}

fn escape_into(out: &mut String, text: &str, special: &[u8]) {
    for c in text.chars() {
        if c.is_ascii() && special.contains(&(c as u8)) {
            out.push('\\');
        }
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_protocol_sorts_and_escapes() {
        let p = Point::new(
            "traffic",
            Tier::Rt,
            EventTime(60_000),
            vec![
                ("device".into(), "ios".into()),
                ("country".into(), "a b".into()),
            ],
            vec![
                ("events".into(), FieldValue::Int(3)),
                ("avg".into(), FieldValue::Float(1.0)),
            ],
        );
        assert_eq!(
            p.to_line_protocol(),
            "traffic,country=a\\ b,device=ios avg=1.0,events=3i 60000"
        );
    }

    #[test]
    fn tiers_round_trip_by_step_and_name() {
        for t in Tier::ALL {
            assert_eq!(Tier::from_step(t.step_name()), Some(t));
            assert_eq!(Tier::from_name(t.name()), Some(t));
        }
    }
}
