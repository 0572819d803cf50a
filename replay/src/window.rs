//! Which rebuilt points a replay of `[from, to]` keeps.
//!
//! A point's time is its window's start; its length is the tier's step,
//! except trending, whose `window` tag names the hopping window's size. A
//! window starting before `from` lacks the events before it that were not
//! read, and one ending after `to` lacks the events after it: neither is
//! complete, so neither is written (or compared).

use std::time::Duration;

use tidemark_model::{EventTime, Point};

/// The length of the window a point stands for.
pub fn window_length(p: &Point) -> Duration {
    if let Some(size) = p.tag("window").and_then(parse_minutes) {
        return size;
    }
    p.tier.step()
}

/// `"15m"` → 15 minutes.
fn parse_minutes(text: &str) -> Option<Duration> {
    let n: u64 = text.strip_suffix('m')?.parse().ok()?;
    Some(Duration::from_secs(60 * n))
}

/// Whether the point's window lies inside `[from, to]`.
pub fn inside(p: &Point, from: EventTime, to: EventTime) -> bool {
    p.time >= from && p.time.plus(window_length(p)) <= to
}

#[cfg(test)]
mod tests {
    use tidemark_model::{FieldValue, Tier};

    use super::*;

    fn point(measurement: &str, tier: Tier, t: i64, tags: &[(&str, &str)]) -> Point {
        Point::new(
            measurement,
            tier,
            EventTime(t),
            tags.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            vec![("n".into(), FieldValue::Int(1))],
        )
    }

    #[test]
    fn keeps_only_whole_windows_inside_the_range() {
        let (from, to) = (EventTime(3_600_000), EventTime(7_200_000));
        let minute = |t| point("traffic", Tier::Rt, t, &[]);
        assert!(inside(&minute(3_600_000), from, to));
        assert!(inside(&minute(7_140_000), from, to));
        assert!(!inside(&minute(3_540_000), from, to));
        assert!(!inside(&minute(7_200_000), from, to));
        assert!(inside(
            &point("traffic", Tier::Hourly, 3_600_000, &[]),
            from,
            to
        ));
        assert!(!inside(&point("traffic", Tier::Daily, 0, &[]), from, to));
        let trending = |t, w| point("trending", Tier::Rt, t, &[("tag", "a"), ("window", w)]);
        assert!(inside(&trending(6_300_000, "15m"), from, to));
        assert!(!inside(&trending(6_360_000, "15m"), from, to));
        assert!(inside(&trending(6_360_000, "5m"), from, to));
    }
}
