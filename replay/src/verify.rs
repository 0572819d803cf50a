//! `--verify`: the rebuilt points against a reference database, point by
//! point and field by field.
//!
//! Points are matched by identity (tier, measurement, tags, window start),
//! the identity under which a store overwrites. Values compare as `f64`,
//! exactly: the processor's output is deterministic to the bit, and a store
//! may not keep integers and floats apart (InfluxDB's JSON).

use std::collections::BTreeMap;
use std::fmt;

use tidemark_model::{EventTime, FieldValue, Point, Tier};
use tidemark_tsdb_writer::Store;

use crate::{window, ReplayError};

/// A point's identity: what a store overwrites by.
type Identity = (Tier, String, Vec<(String, String)>, EventTime);

/// One difference between the reference and the rebuilt points.
#[derive(Debug, Clone, PartialEq)]
pub enum Difference {
    /// In the reference, not rebuilt.
    Missing(Point),
    /// Rebuilt, not in the reference.
    Extra(Point),
    /// In both, with these fields differing: (field, reference, rebuilt).
    Changed {
        point: Point,
        fields: Vec<(String, Option<FieldValue>, Option<FieldValue>)>,
    },
}

impl Difference {
    fn point(&self) -> &Point {
        match self {
            Difference::Missing(p) | Difference::Extra(p) => p,
            Difference::Changed { point, .. } => point,
        }
    }

    /// `missing`, `extra` or `changed`.
    pub fn kind(&self) -> &'static str {
        match self {
            Difference::Missing(_) => "missing",
            Difference::Extra(_) => "extra",
            Difference::Changed { .. } => "changed",
        }
    }
}

fn value(v: Option<FieldValue>) -> String {
    match v {
        None => "absent".into(),
        Some(FieldValue::Int(i)) => i.to_string(),
        Some(FieldValue::Float(f)) => format!("{f:?}"),
    }
}

impl fmt::Display for Difference {
    /// `changed rt engagement,country=US,segment=a 2026-11-25T10:00:00Z engagement_score: 10 -> 12`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.point();
        write!(
            f,
            "{:<7} {} {} {}",
            self.kind(),
            p.tier.name(),
            p.series_key(),
            p.time.to_rfc3339()
        )?;
        match self {
            Difference::Missing(p) | Difference::Extra(p) => {
                for (k, v) in &p.fields {
                    write!(f, " {k}={}", value(Some(*v)))?;
                }
            }
            Difference::Changed { fields, .. } => {
                for (k, reference, rebuilt) in fields {
                    write!(f, " {k}: {} -> {}", value(*reference), value(*rebuilt))?;
                }
            }
        }
        Ok(())
    }
}

fn identity(p: &Point) -> Identity {
    (p.tier, p.measurement.clone(), p.tags.clone(), p.time)
}

fn same(a: Option<FieldValue>, b: Option<FieldValue>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => {
            let (a, b) = (a.as_f64(), b.as_f64());
            a.to_bits() == b.to_bits() || a == b
        }
        (None, None) => true,
        _ => false,
    }
}

/// Every difference between `reference` and `rebuilt`, in identity order. A
/// point given twice counts with its last value (later writes overwrite).
pub fn diff(reference: Vec<Point>, rebuilt: Vec<Point>) -> Vec<Difference> {
    let index = |points: Vec<Point>| -> BTreeMap<Identity, Point> {
        points.into_iter().map(|p| (identity(&p), p)).collect()
    };
    let (mut reference, rebuilt) = (index(reference), index(rebuilt));
    let mut out = Vec::new();
    for (id, new) in rebuilt {
        let Some(old) = reference.remove(&id) else {
            out.push((id, Difference::Extra(new)));
            continue;
        };
        let mut names: Vec<&String> = old
            .fields
            .iter()
            .chain(&new.fields)
            .map(|(k, _)| k)
            .collect();
        names.sort();
        names.dedup();
        let fields: Vec<_> = names
            .into_iter()
            .filter_map(|k| {
                let (a, b) = (old.field(k), new.field(k));
                (!same(a, b)).then(|| (k.clone(), a, b))
            })
            .collect();
        if !fields.is_empty() {
            out.push((id, Difference::Changed { point: new, fields }));
        }
    }
    out.extend(
        reference
            .into_iter()
            .map(|(id, p)| (id, Difference::Missing(p))),
    );
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.into_iter().map(|(_, d)| d).collect()
}

/// The points of `measurements` in every tier whose windows lie inside
/// `[from, to]`.
pub async fn stored_points(
    store: &dyn Store,
    measurements: &[&str],
    from: EventTime,
    to: EventTime,
) -> Result<Vec<Point>, ReplayError> {
    let mut out = Vec::new();
    for tier in Tier::ALL {
        for m in measurements {
            let points = store.points(tier, m, from, to).await?;
            out.extend(points.into_iter().filter(|p| window::inside(p, from, to)));
        }
    }
    Ok(out)
}

/// Counts per kind: (missing, extra, changed).
pub fn counts(diffs: &[Difference]) -> (usize, usize, usize) {
    let n = |k: &str| diffs.iter().filter(|d| d.kind() == k).count();
    (n("missing"), n("extra"), n("changed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(tags: &[(&str, &str)], t: i64, fields: &[(&str, FieldValue)]) -> Point {
        Point::new(
            "engagement",
            Tier::Rt,
            EventTime(t),
            tags.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            fields.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        )
    }

    #[test]
    fn reports_missing_extra_and_changed_fields() {
        use FieldValue::{Float, Int};
        let us = [("country", "US")];
        let de = [("country", "DE")];
        let reference = vec![
            p(&us, 0, &[("score", Int(10)), ("avg", Float(1.5))]),
            p(&de, 0, &[("score", Int(3))]),
            p(&us, 60_000, &[("score", Int(1))]),
        ];
        let rebuilt = vec![
            p(&us, 0, &[("score", Int(12)), ("avg", Float(1.5))]),
            p(&us, 60_000, &[("score", Float(1.0))]),
            p(&us, 120_000, &[("score", Int(7))]),
        ];
        let d = diff(reference, rebuilt);
        assert_eq!(counts(&d), (1, 1, 1), "{d:#?}");
        let text: Vec<String> = d.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            [
                "missing rt engagement,country=DE 1970-01-01T00:00:00Z score=3",
                "changed rt engagement,country=US 1970-01-01T00:00:00Z score: 10 -> 12",
                "extra   rt engagement,country=US 1970-01-01T00:02:00Z score=7",
            ]
        );
    }

    #[test]
    fn a_field_present_on_one_side_only_is_a_change() {
        let a = p(&[], 0, &[("n", FieldValue::Int(1))]);
        let b = p(
            &[],
            0,
            &[("n", FieldValue::Int(1)), ("ctr", FieldValue::Float(0.5))],
        );
        let d = diff(vec![a], vec![b]);
        assert_eq!(d.len(), 1);
        assert_eq!(
            d[0].to_string().split_once("Z ").unwrap().1,
            "ctr: absent -> 0.5"
        );
    }
}
