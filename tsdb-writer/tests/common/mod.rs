//! Points and tag sets shared by the store tests.

use std::collections::BTreeMap;

use tidemark_model::{EventTime, FieldValue, Point, Tier};

/// A `traffic` point with an integer and a float field.
pub fn point(tier: Tier, country: &str, device: &str, t: i64, events: i64, ratio: f64) -> Point {
    Point::new(
        "traffic",
        tier,
        EventTime(t),
        vec![
            ("country".into(), country.into()),
            ("device".into(), device.into()),
        ],
        vec![
            ("events".into(), FieldValue::Int(events)),
            ("ratio".into(), FieldValue::Float(ratio)),
        ],
    )
}

/// A tag set from pairs.
pub fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
