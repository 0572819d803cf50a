//! Event generators shared by the property tests.

use proptest::prelude::*;

use crate::event::{Country, Device, Event, EventType};
use crate::time::EventTime;

fn event_type() -> impl Strategy<Value = EventType> {
    prop_oneof![
        (0..EventType::BUILT_IN.len()).prop_map(|i| EventType::BUILT_IN[i].clone()),
        "[A-Za-z0-9_.-]{1,64}".prop_map(|n| EventType::Custom(format!("custom.{n}").into())),
    ]
}

fn device() -> impl Strategy<Value = Device> {
    prop_oneof![
        Just(Device::Ios),
        Just(Device::Android),
        Just(Device::Web),
        Just(Device::Other),
        Just(Device::Unknown),
    ]
}

fn country() -> impl Strategy<Value = Country> {
    prop_oneof![
        Just(Country::UNKNOWN),
        "[A-Z]{2}".prop_map(|c| Country::parse(&c).unwrap_or_default())
    ]
}

/// Text with characters JSON must escape, and non-ASCII.
fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _\"\\\\/\n\t\u{1}é😀-]{1,24}"
}

fn opt_text() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(text())
}

fn finite() -> impl Strategy<Value = Option<f64>> {
    proptest::option::of(prop_oneof![
        -1e12f64..1e12,
        Just(0.0),
        Just(0.1),
        Just(1e300)
    ])
}

fn extra() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(
        (text(), any::<i32>(), "[a-z_]{1,10}").prop_map(|(s, n, k)| {
            let s = serde_json::to_string(&s).unwrap_or_default();
            format!("{{\"properties\":{{\"note\":{s},\"n\":{n}}},\"x_{k}\":[1,{{\"a\":null}}]}}")
        }),
    )
}

/// Any event the model can hold, with finite amounts.
pub(crate) fn event() -> impl Strategy<Value = Event> {
    let common = (
        event_type(),
        text(),
        text(),
        -4_000_000_000_000i64..4_000_000_000_000,
        any::<i64>(),
        any::<u32>(),
    );
    let ids = (
        opt_text(),
        proptest::collection::vec(text(), 0..4),
        opt_text(),
        opt_text(),
        opt_text(),
    );
    let rest = (
        finite(),
        finite(),
        device(),
        country(),
        opt_text(),
        opt_text(),
        proptest::option::of(any::<u64>()),
        opt_text(),
        opt_text(),
        extra(),
    );
    (common, ids, rest).prop_map(|(c, i, r)| Event {
        event_type: c.0,
        event_id: c.1,
        user_id: c.2,
        timestamp: EventTime(c.3),
        received_at: EventTime(c.4),
        schema_version: c.5,
        post_id: i.0,
        hashtags: i.1,
        campaign_id: i.2,
        ad_id: i.3,
        impression_id: i.4,
        cost: r.0,
        revenue: r.1,
        device: r.2,
        country: r.3,
        session_id: r.4,
        page: r.5,
        duration_ms: r.6,
        age_band: r.7,
        segment: r.8,
        extra: r.9,
    })
}

/// An event that passes validation: required ids present, tags without a
/// leading `#` and storable as tags, received when it happened.
pub(crate) fn valid_event() -> impl Strategy<Value = Event> {
    event().prop_map(|mut ev| {
        ev.received_at = ev.timestamp;
        // What becomes a tag must be storable as one.
        let storable = |s: String| {
            if crate::point::is_storable_tag_value(&s) {
                s
            } else {
                "tag-1".to_owned()
            }
        };
        ev.hashtags = ev.hashtags.into_iter().map(storable).collect();
        ev.campaign_id = ev.campaign_id.map(storable);
        ev.segment = ev.segment.map(storable);
        let id = || Some("id-1".to_owned());
        match ev.event_type {
            EventType::View
            | EventType::Like
            | EventType::Comment
            | EventType::Share
            | EventType::PostCreated => {
                ev.post_id = ev.post_id.or_else(id);
            }
            EventType::AdImpression => {
                ev.campaign_id = ev.campaign_id.or_else(id);
                ev.ad_id = ev.ad_id.or_else(id);
                ev.impression_id = ev.impression_id.or_else(id);
            }
            EventType::AdClick | EventType::AdConversion => {
                ev.campaign_id = ev.campaign_id.or_else(id);
                ev.impression_id = ev.impression_id.or_else(id);
            }
            _ => {}
        }
        ev
    })
}
