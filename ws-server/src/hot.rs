//! The hot cache of points: the newest hour of the live database's `rt`
//! tier, kept from the final updates the WebSocket channels follow, so REST
//! reads and ad-hoc queries of that hour never touch the store.
//!
//! It mirrors the live database (the live processor's updates), so it is
//! read only while that database is served. It covers, per measurement,
//! only what it saw whole: from a little after the first point it saw
//! (earlier minutes may have been finalised before it listened), and after
//! missed updates it starts over. A read reaching before that, or into
//! another tier, goes to the store. Points replace points of the same
//! measurement, tags and minute, as in the store, so late corrections are
//! kept the same way.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tidemark_model::{EventTime, Point, Tier, Update};
use tidemark_tsdb_writer::{Aggregator, MetricQuery, Series, Store, StoreError};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

/// What the cache keeps: an hour and the minute still being finalised.
pub const HOT_SPAN: Duration = Duration::from_secs(61 * 60);

/// A measurement is counted complete this long after its first point seen:
/// shards finalise the same minute at slightly different moments, so the
/// first minutes seen may lack the points of a shard that was quicker.
const SETTLING: Duration = Duration::from_secs(2 * 60);

#[derive(Debug, Default)]
struct Measurement {
    /// The time of the first point seen since (re)starting.
    first_seen: Option<EventTime>,
    /// Per minute, per tags (in key order): the newest point.
    minutes: BTreeMap<EventTime, BTreeMap<Vec<(String, String)>, Point>>,
}

#[derive(Debug, Default)]
struct Points {
    by_measurement: BTreeMap<String, Measurement>,
    newest: Option<EventTime>,
}

impl Points {
    /// Reads of `measurement` from here on are answered.
    fn covered_from(&self, measurement: &str) -> Option<EventTime> {
        let m = self.by_measurement.get(measurement)?;
        let oldest = self.newest?.minus(HOT_SPAN);
        Some(m.first_seen?.plus(SETTLING).max(oldest))
    }
}

/// The newest hour of final `rt` points (see the module documentation).
#[derive(Debug, Default)]
pub struct HotPoints {
    points: RwLock<Points>,
}

impl HotPoints {
    /// Keeps the final `rt` points of `update`.
    pub fn apply(&self, update: &Update) {
        if !update.is_final {
            return;
        }
        let mut points = self.points.write().unwrap_or_else(|e| e.into_inner());
        for point in update.points.iter().filter(|p| p.tier == Tier::Rt) {
            let mut tags = point.tags.clone();
            tags.sort();
            let m = points
                .by_measurement
                .entry(point.measurement.clone())
                .or_default();
            m.first_seen.get_or_insert(point.time);
            m.minutes
                .entry(point.time)
                .or_default()
                .insert(tags, point.clone());
            points.newest = Some(points.newest.map_or(point.time, |n| n.max(point.time)));
        }
        let Some(newest) = points.newest else {
            return;
        };
        let oldest = newest.minus(HOT_SPAN);
        for m in points.by_measurement.values_mut() {
            m.minutes = m.minutes.split_off(&oldest);
        }
    }

    /// Forgets everything: updates were missed.
    pub fn reset(&self) {
        *self.points.write().unwrap_or_else(|e| e.into_inner()) = Points::default();
    }

    /// Whether reads of `measurement` in `tier` from `from` on are answered here.
    pub fn covers(&self, tier: Tier, measurement: &str, from: EventTime) -> bool {
        let points = self.points.read().unwrap_or_else(|e| e.into_inner());
        tier == Tier::Rt && points.covered_from(measurement).is_some_and(|c| from >= c)
    }

    fn visit(&self, measurement: &str, from: EventTime, to: EventTime, mut f: impl FnMut(&Point)) {
        let points = self.points.read().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = points.by_measurement.get(measurement) {
            for by_tags in m.minutes.range(from..to).map(|(_, p)| p) {
                by_tags.values().for_each(&mut f);
            }
        }
    }

    /// Keeps the cache fed from `updates` until they end.
    pub(crate) async fn follow(self: Arc<Self>, mut updates: broadcast::Receiver<Update>) {
        loop {
            match updates.recv().await {
                Ok(update) => self.apply(&update),
                Err(RecvError::Lagged(_)) => self.reset(),
                Err(RecvError::Closed) => return,
            }
        }
    }
}

/// A store whose reads of the newest hour come from [`HotPoints`].
#[derive(Debug)]
pub struct HotStore {
    pub hot: Arc<HotPoints>,
    pub store: Arc<dyn Store>,
}

#[async_trait]
impl Store for HotStore {
    async fn ensure_schema(&self) -> Result<(), StoreError> {
        self.store.ensure_schema().await
    }

    async fn write(&self, points: &[Point]) -> Result<(), StoreError> {
        self.store.write(points).await
    }

    async fn query(&self, query: &MetricQuery) -> Result<Vec<Series>, StoreError> {
        if !self.hot.covers(query.tier, &query.measurement, query.from) {
            return self.store.query(query).await;
        }
        let mut aggregator = Aggregator::new(query);
        self.hot
            .visit(&query.measurement, query.from, query.to, |point| {
                let tag = |k: &str| point.tag(k);
                if !aggregator.selects(tag) {
                    return;
                }
                let value = point
                    .fields
                    .iter()
                    .find(|(k, _)| *k == query.field)
                    .map(|(_, v)| v.as_f64());
                if let Some(value) = value {
                    aggregator.add(point.time, tag, value);
                }
            });
        Ok(aggregator.finish())
    }

    async fn points(
        &self,
        tier: Tier,
        measurement: &str,
        from: EventTime,
        to: EventTime,
    ) -> Result<Vec<Point>, StoreError> {
        if !self.hot.covers(tier, measurement, from) {
            return self.store.points(tier, measurement, from, to).await;
        }
        let mut out = Vec::new();
        self.hot
            .visit(measurement, from, to, |point| out.push(point.clone()));
        Ok(out)
    }

    fn kind(&self) -> &'static str {
        self.store.kind()
    }
}

#[cfg(test)]
mod tests {
    use tidemark_model::FieldValue;
    use tidemark_tsdb_writer::sqlite::SqliteStore;
    use tidemark_tsdb_writer::Aggregate;

    use super::*;

    const T0: i64 = 1_795_420_800_000;

    fn point(minute: i64, country: &str, events: i64) -> Point {
        Point::new(
            "traffic",
            Tier::Rt,
            EventTime(T0 + minute * 60_000),
            vec![
                ("event_type".into(), "like".into()),
                ("country".into(), country.into()),
            ],
            vec![("events".into(), FieldValue::Int(events))],
        )
    }

    fn update(minute: i64, is_final: bool, points: Vec<Point>) -> Update {
        Update {
            window_start: EventTime(T0 + minute * 60_000),
            is_final,
            newest_received_at: EventTime(0),
            points,
        }
    }

    fn query(from_minute: i64, to_minute: i64, group_by: &[&str]) -> MetricQuery {
        MetricQuery {
            measurement: "traffic".into(),
            field: "events".into(),
            tier: Tier::Rt,
            from: EventTime(T0 + from_minute * 60_000),
            to: EventTime(T0 + to_minute * 60_000),
            filters: Vec::new(),
            group_by: group_by.iter().map(|g| g.to_string()).collect(),
            aggregate: Aggregate::Sum,
        }
    }

    #[tokio::test]
    async fn the_newest_hour_is_answered_as_the_store_answers_it() {
        let hot = Arc::new(HotPoints::default());
        let store = Arc::new(SqliteStore::open_in_memory().unwrap());
        store.ensure_schema().await.unwrap();
        for minute in 0..90 {
            let points = vec![point(minute, "DE", minute), point(minute, "FR", 1)];
            store.write(&points).await.unwrap();
            hot.apply(&update(minute, true, points));
        }
        // A late correction replaces, early results are not kept.
        let corrected = vec![point(80, "DE", 1000)];
        store.write(&corrected).await.unwrap();
        hot.apply(&update(80, true, corrected));
        hot.apply(&update(89, false, vec![point(89, "DE", 5555)]));

        // Before the newest hour and in other tiers, the store answers.
        assert!(!hot.covers(Tier::Rt, "traffic", EventTime(T0 + 27 * 60_000)));
        assert!(!hot.covers(Tier::Hourly, "traffic", EventTime(T0 + 60 * 60_000)));
        assert!(!hot.covers(Tier::Rt, "ads", EventTime(T0 + 60 * 60_000)));
        assert!(hot.covers(Tier::Rt, "traffic", EventTime(T0 + 28 * 60_000)));

        let both = HotStore {
            hot: Arc::clone(&hot),
            store: store.clone(),
        };
        for q in [
            query(30, 90, &["country"]),
            query(30, 90, &[]),
            query(75, 85, &["event_type", "country"]),
            query(0, 90, &["country"]),
        ] {
            assert_eq!(
                both.query(&q).await.unwrap(),
                store.query(&q).await.unwrap(),
                "{q:?}"
            );
        }
        let mut from_hot = both
            .points(Tier::Rt, "traffic", q_time(80), q_time(81))
            .await
            .unwrap();
        from_hot.sort_by(|a, b| a.tags.cmp(&b.tags));
        assert_eq!(from_hot.len(), 2);
        assert_eq!(from_hot[0].fields[0].1.as_f64(), 1000.0);
    }

    fn q_time(minute: i64) -> EventTime {
        EventTime(T0 + minute * 60_000)
    }

    #[test]
    fn a_measurement_counts_as_complete_only_after_it_settles() {
        let hot = HotPoints::default();
        hot.apply(&update(10, true, vec![point(10, "DE", 1)]));
        assert!(!hot.covers(Tier::Rt, "traffic", q_time(10)));
        assert!(hot.covers(Tier::Rt, "traffic", q_time(12)));
        hot.reset();
        assert!(!hot.covers(Tier::Rt, "traffic", q_time(12)));
    }
}
