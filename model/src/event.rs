//! Events as clients send them, validated.
//!
//! An event is one flat JSON object: the common fields `event_id`, `event_type`,
//! `user_id`, `timestamp` (RFC 3339 or epoch milliseconds) and `schema_version`,
//! then the typed fields its type needs. `properties` and unknown top-level
//! fields are kept verbatim (schema evolution) and never interpreted.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::time::EventTime;

/// The kind of an event; decides its topic and which typed fields it needs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum EventType {
    #[default]
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

    /// The position of a built-in type in [`EventType::BUILT_IN`] (a dense,
    /// stable code for compact encodings and array indexes); `None` for custom types.
    pub fn built_in_code(&self) -> Option<u8> {
        match self {
            EventType::PageView => Some(0),
            EventType::Login => Some(1),
            EventType::Follow => Some(2),
            EventType::Search => Some(3),
            EventType::PostCreated => Some(4),
            EventType::View => Some(5),
            EventType::Like => Some(6),
            EventType::Comment => Some(7),
            EventType::Share => Some(8),
            EventType::AdImpression => Some(9),
            EventType::AdClick => Some(10),
            EventType::AdConversion => Some(11),
            EventType::ProfileUpdate => Some(12),
            EventType::Custom(_) => None,
        }
    }

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
    /// Every device class, in the order of [`Device::code`].
    pub const ALL: [Device; 5] = [
        Device::Ios,
        Device::Android,
        Device::Web,
        Device::Other,
        Device::Unknown,
    ];

    /// A small stable number (the wire encoding's, and the pipelines' keys).
    #[inline]
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The device of [`Device::code`] `code`, if any.
    #[inline]
    pub fn from_code(code: u8) -> Option<Device> {
        Device::ALL.get(code as usize).copied()
    }

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
    WrongType {
        field: String,
        expected: &'static str,
    },
    #[error("unknown event_type `{0}`")]
    UnknownEventType(String),
    #[error("invalid value for `{field}`: {detail}")]
    InvalidValue { field: String, detail: String },
    #[error("timestamp {timestamp} is outside the accepted window ({detail})")]
    TimestampOutOfRange {
        timestamp: String,
        detail: &'static str,
    },
    #[error("field `{field}` is too long ({len} > {max})")]
    TooLong {
        field: String,
        len: usize,
        max: usize,
    },
    #[error("event is too late for its window")]
    TooLate,
}

impl EventError {
    /// Never: the same event is rejected the same way every time, so the
    /// client must fix it rather than resend it.
    pub fn is_retryable(&self) -> bool {
        false
    }

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
    pub fn from_json(
        raw: &[u8],
        received_at: EventTime,
        limits: &Limits,
    ) -> Result<Event, EventError> {
        let text = std::str::from_utf8(raw).map_err(|_| EventError::InvalidUtf8)?;
        let fields = parse_fields(text)?;
        fields.validate(received_at, limits)
    }

    /// The event as JSON in the client contract (round-trips through [`Event::from_json`]).
    pub fn to_json(&self) -> String {
        let mut out = String::with_capacity(192 + self.extra.as_ref().map_or(0, |e| e.len()));
        out.push('{');
        push_key(&mut out, "event_id", true);
        push_json_str(&mut out, &self.event_id);
        push_key(&mut out, "event_type", false);
        push_json_str(&mut out, self.event_type.as_str());
        push_key(&mut out, "user_id", false);
        push_json_str(&mut out, &self.user_id);
        push_key(&mut out, "timestamp", false);
        out.push_str(&self.timestamp.0.to_string());
        push_key(&mut out, "schema_version", false);
        out.push_str(&self.schema_version.to_string());
        let strings = [
            ("post_id", &self.post_id),
            ("campaign_id", &self.campaign_id),
            ("ad_id", &self.ad_id),
            ("impression_id", &self.impression_id),
            ("session_id", &self.session_id),
            ("page", &self.page),
            ("age_band", &self.age_band),
            ("segment", &self.segment),
        ];
        for (key, value) in strings {
            if let Some(v) = value {
                push_key(&mut out, key, false);
                push_json_str(&mut out, v);
            }
        }
        if !self.hashtags.is_empty() {
            push_key(&mut out, "hashtags", false);
            out.push('[');
            for (i, tag) in self.hashtags.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_json_str(&mut out, tag);
            }
            out.push(']');
        }
        for (key, value) in [("cost", self.cost), ("revenue", self.revenue)] {
            // JSON has no NaN or infinity; such a value cannot have come from a client.
            if let Some(v) = value.filter(|v| v.is_finite()) {
                push_key(&mut out, key, false);
                out.push_str(
                    &serde_json::Number::from_f64(v)
                        .map_or_else(|| "null".into(), |n| n.to_string()),
                );
            }
        }
        if let Some(ms) = self.duration_ms {
            push_key(&mut out, "duration_ms", false);
            out.push_str(&ms.to_string());
        }
        if self.device != Device::Unknown {
            push_key(&mut out, "device", false);
            push_json_str(&mut out, self.device.as_str());
        }
        if self.country != Country::UNKNOWN {
            push_key(&mut out, "country", false);
            push_json_str(&mut out, self.country.as_str());
        }
        if let Some(extra) = &self.extra {
            let inner = extra
                .trim()
                .strip_prefix('{')
                .and_then(|e| e.strip_suffix('}'))
                .map(str::trim);
            if let Some(inner) = inner.filter(|i| !i.is_empty()) {
                out.push(',');
                out.push_str(inner);
            }
        }
        out.push('}');
        out
    }
}

fn push_key(out: &mut String, key: &str, first: bool) {
    if !first {
        out.push(',');
    }
    out.push('"');
    out.push_str(key);
    out.push_str("\":");
}

/// Appends `s` as a JSON string literal.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[start..i]);
        if escape.is_empty() {
            out.push_str(&format!("\\u{b:04x}"));
        } else {
            out.push_str(escape);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// One JSON value of a known field, kept as whatever type the client sent so
/// that a type mismatch becomes a precise [`EventError::WrongType`].
#[derive(Debug)]
enum Scalar<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    UInt(u64),
    Float(f64),
    Null,
    Other,
}

impl<'de> de::Deserialize<'de> for Scalar<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v)))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Scalar::UInt(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

/// The `hashtags` value as sent.
#[derive(Debug)]
enum Tags<'a> {
    List(Vec<Cow<'a, str>>),
    Null,
    /// Not an array, or an array with a non-string element.
    Wrong,
}

impl<'de> de::Deserialize<'de> for Tags<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TagsVisitor)
    }
}

struct TagsVisitor;

impl<'de> Visitor<'de> for TagsVisitor {
    type Value = Tags<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut tags = Vec::with_capacity(seq.size_hint().unwrap_or(4).min(64));
        let mut wrong = false;
        while let Some(item) = seq.next_element::<Scalar<'de>>()? {
            match item {
                Scalar::Str(s) => tags.push(s),
                _ => wrong = true,
            }
        }
        Ok(if wrong { Tags::Wrong } else { Tags::List(tags) })
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Tags::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Tags::Null)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Tags::Wrong)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Tags::Wrong)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Tags::Wrong)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Tags::Wrong)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Tags::Wrong)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Tags::Wrong)
    }
}

/// A top-level key: a known field, or an unknown one kept for `extra`.
enum Key<'a> {
    EventId,
    EventType,
    UserId,
    Timestamp,
    SchemaVersion,
    PostId,
    Hashtags,
    CampaignId,
    AdId,
    ImpressionId,
    Cost,
    Revenue,
    Device,
    Country,
    SessionId,
    Page,
    DurationMs,
    AgeBand,
    Segment,
    Properties,
    Unknown(Cow<'a, str>),
}

impl<'a> Key<'a> {
    fn from_name(name: Cow<'a, str>) -> Key<'a> {
        match &*name {
            "event_id" => Key::EventId,
            "event_type" => Key::EventType,
            "user_id" => Key::UserId,
            "timestamp" => Key::Timestamp,
            "schema_version" => Key::SchemaVersion,
            "post_id" => Key::PostId,
            "hashtags" => Key::Hashtags,
            "campaign_id" => Key::CampaignId,
            "ad_id" => Key::AdId,
            "impression_id" => Key::ImpressionId,
            "cost" => Key::Cost,
            "revenue" => Key::Revenue,
            "device" => Key::Device,
            "country" => Key::Country,
            "session_id" => Key::SessionId,
            "page" => Key::Page,
            "duration_ms" => Key::DurationMs,
            "age_band" => Key::AgeBand,
            "segment" => Key::Segment,
            "properties" => Key::Properties,
            _ => Key::Unknown(name),
        }
    }
}

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_str(KeyVisitor)
    }
}

struct KeyVisitor;

impl<'de> Visitor<'de> for KeyVisitor {
    type Value = Key<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Key::from_name(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Key::from_name(Cow::Owned(v.to_owned())))
    }
}

/// The top-level fields of one event, borrowed from the input where possible.
#[derive(Default)]
struct RawFields<'a> {
    event_id: Option<Scalar<'a>>,
    event_type: Option<Scalar<'a>>,
    user_id: Option<Scalar<'a>>,
    timestamp: Option<Scalar<'a>>,
    schema_version: Option<Scalar<'a>>,
    post_id: Option<Scalar<'a>>,
    hashtags: Option<Tags<'a>>,
    campaign_id: Option<Scalar<'a>>,
    ad_id: Option<Scalar<'a>>,
    impression_id: Option<Scalar<'a>>,
    cost: Option<Scalar<'a>>,
    revenue: Option<Scalar<'a>>,
    device: Option<Scalar<'a>>,
    country: Option<Scalar<'a>>,
    session_id: Option<Scalar<'a>>,
    page: Option<Scalar<'a>>,
    duration_ms: Option<Scalar<'a>>,
    age_band: Option<Scalar<'a>>,
    segment: Option<Scalar<'a>>,
    /// `properties` and unknown fields, in the order they came.
    extra: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'de> de::Deserialize<'de> for RawFields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(FieldsVisitor)
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = RawFields<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut f = RawFields::default();
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let slot = match key {
                Key::EventId => &mut f.event_id,
                Key::EventType => &mut f.event_type,
                Key::UserId => &mut f.user_id,
                Key::Timestamp => &mut f.timestamp,
                Key::SchemaVersion => &mut f.schema_version,
                Key::PostId => &mut f.post_id,
                Key::CampaignId => &mut f.campaign_id,
                Key::AdId => &mut f.ad_id,
                Key::ImpressionId => &mut f.impression_id,
                Key::Cost => &mut f.cost,
                Key::Revenue => &mut f.revenue,
                Key::Device => &mut f.device,
                Key::Country => &mut f.country,
                Key::SessionId => &mut f.session_id,
                Key::Page => &mut f.page,
                Key::DurationMs => &mut f.duration_ms,
                Key::AgeBand => &mut f.age_band,
                Key::Segment => &mut f.segment,
                Key::Hashtags => {
                    f.hashtags = Some(map.next_value()?);
                    continue;
                }
                Key::Properties => {
                    let raw: &'de RawValue = map.next_value()?;
                    f.extra.push((Cow::Borrowed("properties"), raw));
                    continue;
                }
                Key::Unknown(name) => {
                    let raw: &'de RawValue = map.next_value()?;
                    f.extra.push((name, raw));
                    continue;
                }
            };
            *slot = Some(map.next_value()?);
        }
        Ok(f)
    }
}

fn parse_fields(text: &str) -> Result<RawFields<'_>, EventError> {
    serde_json::from_str::<RawFields<'_>>(text).map_err(|e| {
        // The visitors accept every value inside the object, so a data error means
        // the top level was not an object; tell that apart from broken JSON.
        if e.is_data() && serde_json::from_str::<IgnoredAny>(text).is_ok() {
            EventError::NotAnObject
        } else {
            EventError::InvalidJson(e.to_string())
        }
    })
}

fn wrong_type(field: &str, expected: &'static str) -> EventError {
    EventError::WrongType {
        field: field.to_owned(),
        expected,
    }
}

fn invalid(field: &str, detail: impl Into<String>) -> EventError {
    EventError::InvalidValue {
        field: field.to_owned(),
        detail: detail.into(),
    }
}

/// Refuses a value that could not be stored as the tag it becomes (see
/// [`crate::point::is_storable_tag_value`]).
fn check_tag_value(field: &str, value: &str) -> Result<(), EventError> {
    if crate::point::is_storable_tag_value(value) {
        return Ok(());
    }
    Err(invalid(
        field,
        "must be non-empty, without control characters or backslashes",
    ))
}

fn check_len(field: &str, s: &str, limits: &Limits) -> Result<(), EventError> {
    if s.len() > limits.max_string_bytes {
        return Err(EventError::TooLong {
            field: field.to_owned(),
            len: s.len(),
            max: limits.max_string_bytes,
        });
    }
    Ok(())
}

/// An optional string field; `null` counts as absent.
fn opt_str<'a>(
    v: Option<Scalar<'a>>,
    field: &'static str,
    limits: &Limits,
) -> Result<Option<Cow<'a, str>>, EventError> {
    match v {
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::Str(s)) => {
            check_len(field, &s, limits)?;
            Ok(Some(s))
        }
        Some(_) => Err(wrong_type(field, "a string")),
    }
}

/// A required, non-empty string field.
fn req_str<'a>(
    v: Option<Scalar<'a>>,
    field: &'static str,
    limits: &Limits,
) -> Result<Cow<'a, str>, EventError> {
    let s = opt_str(v, field, limits)?.ok_or(EventError::MissingField(field))?;
    if s.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    Ok(s)
}

fn opt_f64(v: Option<Scalar<'_>>, field: &'static str) -> Result<Option<f64>, EventError> {
    match v {
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::Int(n)) => Ok(Some(n as f64)),
        Some(Scalar::UInt(n)) => Ok(Some(n as f64)),
        Some(Scalar::Float(n)) => Ok(Some(n)),
        Some(_) => Err(wrong_type(field, "a number")),
    }
}

fn opt_u64(v: Option<Scalar<'_>>, field: &'static str) -> Result<Option<u64>, EventError> {
    match v {
        None | Some(Scalar::Null) => Ok(None),
        Some(Scalar::UInt(n)) => Ok(Some(n)),
        Some(Scalar::Int(n)) => Err(invalid(field, format!("{n} is negative"))),
        Some(_) => Err(wrong_type(field, "a non-negative integer")),
    }
}

fn owned(s: Option<Cow<'_, str>>) -> Option<String> {
    s.map(Cow::into_owned)
}

impl RawFields<'_> {
    fn validate(self, received_at: EventTime, limits: &Limits) -> Result<Event, EventError> {
        let event_id = req_str(self.event_id, "event_id", limits)?;
        let type_name = match self.event_type {
            None | Some(Scalar::Null) => return Err(EventError::MissingField("event_type")),
            Some(Scalar::Str(s)) => s,
            Some(_) => return Err(wrong_type("event_type", "a string")),
        };
        let event_type = EventType::parse(&type_name).ok_or_else(|| {
            // Bound what is echoed back: the name came from the client.
            let shown: String = type_name.chars().take(80).collect();
            EventError::UnknownEventType(shown)
        })?;
        let user_id = req_str(self.user_id, "user_id", limits)?;
        let timestamp = match self.timestamp {
            None | Some(Scalar::Null) => return Err(EventError::MissingField("timestamp")),
            Some(Scalar::Int(ms)) => EventTime(ms),
            Some(Scalar::UInt(ms)) => {
                EventTime(i64::try_from(ms).map_err(|_| invalid("timestamp", "out of range"))?)
            }
            Some(Scalar::Str(s)) => {
                check_len("timestamp", &s, limits)?;
                EventTime::parse(&s)
                    .ok_or_else(|| invalid("timestamp", "not RFC 3339 or epoch milliseconds"))?
            }
            Some(_) => {
                return Err(wrong_type(
                    "timestamp",
                    "an RFC 3339 string or epoch milliseconds",
                ))
            }
        };
        if timestamp < received_at.minus(limits.max_past) {
            return Err(EventError::TimestampOutOfRange {
                timestamp: timestamp.to_rfc3339(),
                detail: "too far in the past",
            });
        }
        if timestamp > received_at.plus(limits.max_future) {
            return Err(EventError::TimestampOutOfRange {
                timestamp: timestamp.to_rfc3339(),
                detail: "too far in the future",
            });
        }
        let schema_version = match self.schema_version {
            None | Some(Scalar::Null) => 1,
            Some(Scalar::UInt(v)) => {
                u32::try_from(v).map_err(|_| invalid("schema_version", "out of range"))?
            }
            Some(Scalar::Int(v)) => {
                return Err(invalid("schema_version", format!("{v} is negative")))
            }
            Some(_) => return Err(wrong_type("schema_version", "an integer")),
        };

        let post_id = opt_str(self.post_id, "post_id", limits)?;
        let campaign_id = opt_str(self.campaign_id, "campaign_id", limits)?;
        if let Some(id) = &campaign_id {
            check_tag_value("campaign_id", id)?;
        }
        let ad_id = opt_str(self.ad_id, "ad_id", limits)?;
        let impression_id = opt_str(self.impression_id, "impression_id", limits)?;
        let required: &[(&'static str, bool)] = match event_type {
            EventType::View
            | EventType::Like
            | EventType::Comment
            | EventType::Share
            | EventType::PostCreated => &[("post_id", post_id.is_some())],
            EventType::AdImpression => &[
                ("campaign_id", campaign_id.is_some()),
                ("ad_id", ad_id.is_some()),
                ("impression_id", impression_id.is_some()),
            ],
            EventType::AdClick | EventType::AdConversion => &[
                ("campaign_id", campaign_id.is_some()),
                ("impression_id", impression_id.is_some()),
            ],
            _ => &[],
        };
        if let Some((field, _)) = required.iter().find(|(_, present)| !present) {
            return Err(EventError::MissingField(field));
        }

        let hashtags = match self.hashtags {
            None | Some(Tags::Null) => Vec::new(),
            Some(Tags::Wrong) => return Err(wrong_type("hashtags", "an array of strings")),
            Some(Tags::List(list)) => {
                if list.len() > limits.max_hashtags {
                    return Err(EventError::TooLong {
                        field: "hashtags".into(),
                        len: list.len(),
                        max: limits.max_hashtags,
                    });
                }
                let mut tags = Vec::with_capacity(list.len());
                for tag in list {
                    check_len("hashtags", &tag, limits)?;
                    let tag = tag.trim_start_matches('#');
                    if !tag.is_empty() {
                        check_tag_value("hashtags", tag)?;
                        tags.push(tag.to_owned());
                    }
                }
                tags
            }
        };

        let device = match self.device {
            None | Some(Scalar::Null) => Device::Unknown,
            Some(Scalar::Str(s)) => Device::parse(&s)
                .ok_or_else(|| invalid("device", "must be one of ios, android, web, other"))?,
            Some(_) => return Err(wrong_type("device", "a string")),
        };
        let country = match self.country {
            None | Some(Scalar::Null) => Country::UNKNOWN,
            Some(Scalar::Str(s)) => Country::parse(&s)
                .ok_or_else(|| invalid("country", "must be an ISO 3166 alpha-2 code"))?,
            Some(_) => return Err(wrong_type("country", "a string")),
        };

        let extra = if self.extra.is_empty() {
            None
        } else {
            let mut out = String::with_capacity(
                2 + self
                    .extra
                    .iter()
                    .map(|(k, v)| k.len() + v.get().len() + 4)
                    .sum::<usize>(),
            );
            out.push('{');
            for (i, (key, value)) in self.extra.iter().enumerate() {
                if key == "properties" && !value.get().starts_with('{') {
                    return Err(wrong_type("properties", "an object"));
                }
                if i > 0 {
                    out.push(',');
                }
                push_json_str(&mut out, key);
                out.push(':');
                out.push_str(value.get());
            }
            out.push('}');
            if out.len() > limits.max_extra_bytes {
                return Err(EventError::TooLong {
                    field: "properties".into(),
                    len: out.len(),
                    max: limits.max_extra_bytes,
                });
            }
            Some(out)
        };

        Ok(Event {
            event_id: event_id.into_owned(),
            event_type,
            user_id: user_id.into_owned(),
            timestamp,
            received_at,
            schema_version,
            post_id: owned(post_id),
            hashtags,
            campaign_id: owned(campaign_id),
            ad_id: owned(ad_id),
            impression_id: owned(impression_id),
            cost: opt_f64(self.cost, "cost")?,
            revenue: opt_f64(self.revenue, "revenue")?,
            device,
            country,
            session_id: owned(opt_str(self.session_id, "session_id", limits)?),
            page: owned(opt_str(self.page, "page", limits)?),
            duration_ms: opt_u64(self.duration_ms, "duration_ms")?,
            age_band: owned(opt_str(self.age_band, "age_band", limits)?),
            segment: match opt_str(self.segment, "segment", limits)? {
                Some(segment) => {
                    check_tag_value("segment", &segment)?;
                    Some(segment.into_owned())
                }
                None => None,
            },
            extra,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn device_codes_round_trip() {
        for (code, device) in Device::ALL.into_iter().enumerate() {
            assert_eq!(device.code() as usize, code);
            assert_eq!(Device::from_code(code as u8), Some(device));
        }
        assert_eq!(Device::from_code(5), None);
    }
    use crate::test_support;

    const NOW: EventTime = EventTime(1_795_420_800_000);

    fn parse(json: &str) -> Result<Event, EventError> {
        Event::from_json(json.as_bytes(), NOW, &Limits::default())
    }

    /// A valid `view` event with `field` replaced (or added) by `value`.
    fn view_with(field: &str, value: &str) -> String {
        let mut fields = vec![
            ("event_id", r#""e1""#.to_owned()),
            ("event_type", r#""view""#.to_owned()),
            ("user_id", r#""u1""#.to_owned()),
            ("timestamp", NOW.0.to_string()),
            ("post_id", r#""p1""#.to_owned()),
        ];
        match fields.iter_mut().find(|(k, _)| *k == field) {
            Some(slot) => slot.1 = value.to_owned(),
            None => fields.push((field, value.to_owned())),
        }
        let body: Vec<String> = fields
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!("{{{}}}", body.join(","))
    }

    fn without(field: &str) -> String {
        view_with(field, "")
    }

    #[test]
    fn parses_a_full_event() {
        let json = r##"{"event_id":"e1","event_type":"ad_impression","user_id":"u1",
            "timestamp":"2026-11-23T08:00:00Z","schema_version":2,"campaign_id":"c1","ad_id":"a1",
            "impression_id":"i1","cost":0.5,"device":"android","country":"de","hashtags":["#rust","tide"],
            "session_id":"s1","page":"/feed","duration_ms":1200,"age_band":"25-34","segment":"pro",
            "properties":{"color":"blue","n":[1,2]},"new_field":{"x":true}}"##;
        let ev = parse(json).unwrap();
        assert_eq!(ev.event_type, EventType::AdImpression);
        assert_eq!(
            ev.timestamp,
            EventTime::parse("2026-11-23T08:00:00Z").unwrap()
        );
        assert_eq!(ev.received_at, NOW);
        assert_eq!(ev.schema_version, 2);
        assert_eq!(ev.cost, Some(0.5));
        assert_eq!(ev.device, Device::Android);
        assert_eq!(ev.country, Country(*b"DE"));
        assert_eq!(ev.hashtags, vec!["rust", "tide"]);
        assert_eq!(ev.duration_ms, Some(1200));
        assert_eq!(ev.segment.as_deref(), Some("pro"));
        assert_eq!(
            ev.extra.as_deref(),
            Some(r#"{"properties":{"color":"blue","n":[1,2]},"new_field":{"x":true}}"#)
        );
    }

    #[test]
    fn defaults_optional_fields() {
        let ev = parse(&view_with("post_id", r#""p\n1""#)).unwrap();
        assert_eq!(ev.schema_version, 1);
        assert_eq!(ev.device, Device::Unknown);
        assert_eq!(ev.country, Country::UNKNOWN);
        assert_eq!(ev.post_id.as_deref(), Some("p\n1"));
        assert!(ev.hashtags.is_empty());
        assert_eq!(ev.extra, None);
        let ev = parse(&view_with("device", "null")).unwrap();
        assert_eq!(ev.device, Device::Unknown);
    }

    #[test]
    fn rejects_invalid_utf8() {
        let mut raw = view_with("post_id", r#""p""#).into_bytes();
        let at = raw.iter().position(|&b| b == b'p').unwrap();
        raw[at] = 0xff;
        let err = Event::from_json(&raw, NOW, &Limits::default()).unwrap_err();
        assert_eq!(err.reason(), "invalid_utf8");
    }

    #[test]
    fn rejects_broken_json_and_non_objects() {
        for bad in ["{", "{\"event_id\":}", "", "{} x", "[1,"] {
            assert_eq!(parse(bad).unwrap_err().reason(), "invalid_json", "{bad:?}");
        }
        for not_object in ["[1,2]", "\"event\"", "12", "null"] {
            assert_eq!(
                parse(not_object).unwrap_err(),
                EventError::NotAnObject,
                "{not_object:?}"
            );
        }
    }

    #[test]
    fn rejects_missing_fields() {
        for field in ["event_id", "event_type", "user_id", "timestamp", "post_id"] {
            assert_eq!(
                parse(&without(field)).unwrap_err(),
                EventError::MissingField(field)
            );
        }
        let click = r#"{"event_id":"e","event_type":"ad_click","user_id":"u","timestamp":1795420800000,"campaign_id":"c"}"#;
        assert_eq!(
            parse(click).unwrap_err(),
            EventError::MissingField("impression_id")
        );
        let imp = r#"{"event_id":"e","event_type":"ad_impression","user_id":"u","timestamp":1795420800000,"campaign_id":"c","impression_id":"i"}"#;
        assert_eq!(parse(imp).unwrap_err(), EventError::MissingField("ad_id"));
    }

    #[test]
    fn rejects_wrong_types() {
        let cases = [
            ("event_id", "1"),
            ("event_type", "[]"),
            ("user_id", "{}"),
            ("timestamp", "true"),
            ("timestamp", "1.5"),
            ("schema_version", "\"1\""),
            ("post_id", "7"),
            ("hashtags", "\"rust\""),
            ("hashtags", "[\"a\",1]"),
            ("cost", "\"1\""),
            ("revenue", "[]"),
            ("device", "1"),
            ("country", "false"),
            ("duration_ms", "1.5"),
            ("session_id", "{}"),
            ("properties", "[1]"),
        ];
        for (field, value) in cases {
            match parse(&view_with(field, value)) {
                Err(EventError::WrongType { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}={value}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_unknown_event_types() {
        for name in ["\"clicked\"", "\"custom.\"", "\"custom.a b\""] {
            assert_eq!(
                parse(&view_with("event_type", name)).unwrap_err().reason(),
                "unknown_event_type"
            );
        }
        let ev = parse(&view_with("event_type", "\"custom.poll_vote\"")).unwrap();
        assert_eq!(ev.event_type, EventType::Custom("custom.poll_vote".into()));
    }

    #[test]
    fn rejects_invalid_values() {
        let cases = [
            ("event_id", "\"\""),
            ("user_id", "\"\""),
            ("device", "\"tv\""),
            ("country", "\"DEU\""),
            ("country", "\"1A\""),
            ("duration_ms", "-5"),
            ("schema_version", "-1"),
            ("timestamp", "\"yesterday\""),
        ];
        for (field, value) in cases {
            match parse(&view_with(field, value)) {
                Err(EventError::InvalidValue { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}={value}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_timestamps_outside_the_window() {
        let limits = Limits::default();
        let past = NOW.minus(limits.max_past).0 - 1;
        let future = NOW.plus(limits.max_future).0 + 1;
        for ts in [past, future] {
            let err = parse(&view_with("timestamp", &ts.to_string())).unwrap_err();
            assert_eq!(err.reason(), "timestamp_out_of_range");
        }
        for ts in [past + 1, future - 1] {
            assert!(parse(&view_with("timestamp", &ts.to_string())).is_ok());
        }
    }

    #[test]
    fn rejects_oversized_fields() {
        let limits = Limits {
            max_string_bytes: 8,
            max_hashtags: 2,
            max_extra_bytes: 40,
            ..Limits::default()
        };
        let check = |field: &str, value: &str, expect: &str| match Event::from_json(
            view_with(field, value).as_bytes(),
            NOW,
            &limits,
        ) {
            Err(EventError::TooLong { field: f, .. }) => assert_eq!(f, expect),
            other => panic!("{field}: {other:?}"),
        };
        check("post_id", "\"123456789\"", "post_id");
        check("user_id", "\"123456789\"", "user_id");
        check("hashtags", r#"["a","b","c"]"#, "hashtags");
        check("hashtags", r#"["123456789"]"#, "hashtags");
        check(
            "properties",
            r#"{"k":"0123456789012345678901234567890123456789"}"#,
            "properties",
        );
        check(
            "other",
            r#""0123456789012345678901234567890123456789""#,
            "properties",
        );
        assert!(Event::from_json(
            view_with("post_id", "\"12345678\"").as_bytes(),
            NOW,
            &limits
        )
        .is_ok());
    }

    #[test]
    fn keeps_unknown_fields_with_escaped_keys() {
        let ev = parse(&view_with("we\\\"ird", r#"{"a" : 1}"#)).unwrap();
        assert_eq!(ev.extra.as_deref(), Some(r#"{"we\"ird":{"a" : 1}}"#));
        let back = Event::from_json(ev.to_json().as_bytes(), NOW, &Limits::default()).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn writes_the_client_contract() {
        let ev = Event {
            event_id: "e1".into(),
            event_type: EventType::Like,
            user_id: "u\"1".into(),
            timestamp: NOW,
            received_at: NOW,
            schema_version: 1,
            post_id: Some("p1".into()),
            extra: Some(r#"{"properties":{"a":1}}"#.into()),
            ..Event::default()
        };
        assert_eq!(
            ev.to_json(),
            r#"{"event_id":"e1","event_type":"like","user_id":"u\"1","timestamp":1795420800000,"schema_version":1,"post_id":"p1","properties":{"a":1}}"#
        );
    }

    proptest! {
        #[test]
        fn json_round_trips(ev in test_support::valid_event()) {
            let json = ev.to_json();
            let limits = Limits { max_string_bytes: 1024, ..Limits::default() };
            let back = Event::from_json(json.as_bytes(), ev.received_at, &limits);
            prop_assert_eq!(back, Ok(ev), "{}", json);
        }

        #[test]
        fn from_json_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Event::from_json(&bytes, NOW, &Limits::default());
        }
    }
}

#[cfg(test)]
mod built_in_code_tests {
    use super::EventType;

    #[test]
    fn codes_are_positions_in_built_in() {
        for (i, t) in EventType::BUILT_IN.iter().enumerate() {
            assert_eq!(t.built_in_code(), Some(i as u8), "{t}");
        }
        assert_eq!(
            EventType::parse("custom.x").and_then(|t| t.built_in_code()),
            None
        );
    }
    #[test]
    fn values_that_become_tags_must_be_storable_as_tags() {
        use crate::{Event, EventError, EventTime, Limits};

        let base = r#""event_id":"e","user_id":"u","timestamp":1795420800000"#;
        let cases = [
            (
                r#""event_type":"page_view","hashtags":["ok","a\nb"]"#,
                "hashtags",
            ),
            (
                r#""event_type":"page_view","hashtags":["ends\\"]"#,
                "hashtags",
            ),
            (
                r#""event_type":"ad_impression","campaign_id":"c\t1","impression_id":"i""#,
                "campaign_id",
            ),
            (
                r#""event_type":"ad_impression","campaign_id":"","impression_id":"i""#,
                "campaign_id",
            ),
            (
                r#""event_type":"profile_update","segment":"pro\u0000""#,
                "segment",
            ),
        ];
        let at = EventTime(1_795_420_800_000);
        for (fields, field) in cases {
            let raw = format!("{{{base},{fields}}}");
            match Event::from_json(raw.as_bytes(), at, &Limits::default()) {
                Err(EventError::InvalidValue { field: f, .. }) => assert_eq!(f, field, "{raw}"),
                other => panic!("{raw}: {other:?}"),
            }
        }
        let fine = format!(r#"{{{base},"event_type":"page_view","hashtags":["a b,c=d","été"]}}"#);
        let ev = Event::from_json(fine.as_bytes(), at, &Limits::default()).unwrap();
        assert_eq!(ev.hashtags, ["a b,c=d", "été"]);
    }
}
