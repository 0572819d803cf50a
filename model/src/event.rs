//! Events as clients send them, validated.
//!
//! An event is one flat JSON object: the common fields `event_id`, `event_type`,
//! `user_id`, `timestamp` (RFC 3339 or epoch milliseconds) and `schema_version`,
//! then the typed fields its type needs. `properties` and unknown top-level
//! fields are kept verbatim (schema evolution) and never interpreted.

use std::fmt;
use std::time::Duration;

use crate::time::EventTime;

/// The kind of an event; decides its topic and which typed fields it needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    PageView,
    Login,
    Follow,
    Search,
    PostCreated,
    View,
    Like,
    Comment,
    Share,
    AdImpression,
    AdClick,
    AdConversion,
    ProfileUpdate,
    /// `custom.<name>`; holds the whole wire name, `custom.` included.
    Custom(Box<str>),
}

impl EventType {
    /// Every built-in type, in wire order.
    pub const BUILT_IN: [EventType; 13] = [
        EventType::PageView,
        EventType::Login,
        EventType::Follow,
        EventType::Search,
        EventType::PostCreated,
        EventType::View,
        EventType::Like,
        EventType::Comment,
        EventType::Share,
        EventType::AdImpression,
        EventType::AdClick,
        EventType::AdConversion,
        EventType::ProfileUpdate,
    ];

    /// The wire name, e.g. `page_view` or `custom.poll_vote`.
    pub fn as_str(&self) -> &str {
        match self {
            EventType::PageView => "page_view",
            EventType::Login => "login",
            EventType::Follow => "follow",
            EventType::Search => "search",
            EventType::PostCreated => "post_created",
            EventType::View => "view",
            EventType::Like => "like",
            EventType::Comment => "comment",
            EventType::Share => "share",
            EventType::AdImpression => "ad_impression",
            EventType::AdClick => "ad_click",
            EventType::AdConversion => "ad_conversion",
            EventType::ProfileUpdate => "profile_update",
            EventType::Custom(name) => name,
        }
    }

    /// Parses a wire name; `None` for an unknown type. A custom name is
    /// `custom.` followed by 1 to 64 characters of `[A-Za-z0-9_.-]`.
    pub fn parse(name: &str) -> Option<EventType> {
        let built_in = Self::BUILT_IN.iter().find(|t| t.as_str() == name);
        if let Some(t) = built_in {
            return Some(t.clone());
        }
        let custom = name.strip_prefix("custom.")?;
        let valid = !custom.is_empty()
            && custom.len() <= 64
            && custom
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        valid.then(|| EventType::Custom(name.into()))
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The client's device class; `Unknown` when the event does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Device {
    Ios,
    Android,
    Web,
    Other,
    #[default]
    Unknown,
}

impl Device {
    /// The tag value: `ios`, `android`, `web`, `other` or `unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Ios => "ios",
            Device::Android => "android",
            Device::Web => "web",
            Device::Other => "other",
            Device::Unknown => "unknown",
        }
    }

    /// Parses a client-sent device; `None` when it is not one of the four classes.
    pub fn parse(text: &str) -> Option<Device> {
        match text {
            "ios" => Some(Device::Ios),
            "android" => Some(Device::Android),
            "web" => Some(Device::Web),
            "other" => Some(Device::Other),
            _ => None,
        }
    }
}

/// An ISO 3166 alpha-2 country code (upper case), or unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Country(pub [u8; 2]);

impl Country {
    /// The country of an event that did not say.
    pub const UNKNOWN: Country = Country([0, 0]);

    /// Parses two ASCII letters (either case); `None` otherwise.
    pub fn parse(text: &str) -> Option<Country> {
        match text.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
                Some(Country([a.to_ascii_uppercase(), b.to_ascii_uppercase()]))
            }
            _ => None,
        }
    }

    /// The tag value: the code, or `unknown`.
    pub fn as_str(&self) -> &str {
        if *self == Country::UNKNOWN {
            "unknown"
        } else {
            // Only ever built from two ASCII letters.
            std::str::from_utf8(&self.0).unwrap_or("unknown")
        }
    }
}

/// A validated event, enriched by ingest with the time it was received.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Event {
    pub event_id: String,
    pub event_type: EventType,
    pub user_id: String,
    /// Event time: when it happened on the client.
    pub timestamp: EventTime,
    /// When ingest received it (processing time); drives latency metrics only.
    pub received_at: EventTime,
    pub schema_version: u32,
    pub post_id: Option<String>,
    pub hashtags: Vec<String>,
    pub campaign_id: Option<String>,
    pub ad_id: Option<String>,
    pub impression_id: Option<String>,
    pub cost: Option<f64>,
    pub revenue: Option<f64>,
    pub device: Device,
    pub country: Country,
    pub session_id: Option<String>,
    pub page: Option<String>,
    pub duration_ms: Option<u64>,
    pub age_band: Option<String>,
    pub segment: Option<String>,
    /// `properties` and unknown top-level fields, kept verbatim as the text of
    /// one JSON object (`{"properties":{...},"new_field":1}`); `None` when absent.
    pub extra: Option<String>,
}

impl Default for EventType {
    fn default() -> Self {
        EventType::PageView
    }
}

/// Size and time limits applied while validating events.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Longest accepted string field, in bytes.
    pub max_string_bytes: usize,
    /// Most hashtags on one event.
    pub max_hashtags: usize,
    /// Largest `extra` (properties plus unknown fields), in bytes of JSON.
    pub max_extra_bytes: usize,
    /// How far in the past an event time may be, relative to receipt.
    pub max_past: Duration,
    /// How far in the future an event time may be, relative to receipt.
    pub max_future: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_string_bytes: 256,
            max_hashtags: 32,
            max_extra_bytes: 8 * 1024,
            max_past: Duration::from_secs(7 * 24 * 3600),
            max_future: Duration::from_secs(5 * 60),
        }
    }
}

/// Why one event was rejected. [`EventError::reason`] is the stable,
/// machine-readable code used in replies, the dead-letter topic and metrics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EventError {
    #[error("invalid JSON: {0}")]
    InvalidJson(String),
    #[error("invalid UTF-8 in event")]
    InvalidUtf8,
    #[error("event is not a JSON object")]
    NotAnObject,
    #[error("missing field `{0}`")]
    MissingField(&'static str),
    #[error("field `{field}` must be {expected}")]
    WrongType { field: String, expected: &'static str },
    #[error("unknown event_type `{0}`")]
    UnknownEventType(String),
    #[error("invalid value for `{field}`: {detail}")]
    InvalidValue { field: String, detail: String },
    #[error("timestamp {timestamp} is outside the accepted window ({detail})")]
    TimestampOutOfRange { timestamp: String, detail: &'static str },
    #[error("field `{field}` is too long ({len} > {max})")]
    TooLong { field: String, len: usize, max: usize },
    #[error("event is too late for its window")]
    TooLate,
}

impl EventError {
    /// Stable machine-readable reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            EventError::InvalidJson(_) => "invalid_json",
            EventError::InvalidUtf8 => "invalid_utf8",
            EventError::NotAnObject => "not_an_object",
            EventError::MissingField(_) => "missing_field",
            EventError::WrongType { .. } => "wrong_type",
            EventError::UnknownEventType(_) => "unknown_event_type",
            EventError::InvalidValue { .. } => "invalid_value",
            EventError::TimestampOutOfRange { .. } => "timestamp_out_of_range",
            EventError::TooLong { .. } => "too_long",
            EventError::TooLate => "too_late",
        }
    }
}

impl Event {
    /// Parses and validates one event from the bytes of one JSON object.
    /// `received_at` becomes the event's receipt time and anchors the skew window.
    pub fn from_json(raw: &[u8], received_at: EventTime, limits: &Limits) -> Result<Event, EventError> {
        todo!("parse {} bytes at {received_at:?} with {limits:?}", raw.len())
    }

    /// The event as JSON in the client contract (round-trips through [`Event::from_json`]).
    pub fn to_json(&self) -> String {
        todo!()
    }
}
