//! The traffic pipeline: events per minute and per hour by country, device and
//! event type, and distinct active users per window (HyperLogLog).

use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use smallvec::smallvec;
use tidemark_model::{
    Country, Device, Event, EventTime, EventType, FieldValue, Point, Tier, Watermark,
};

use crate::error::ProcessorError;
use crate::hll::Hll;
use crate::intern::Names;
use crate::partial::{row_key, Partial, WindowId};
use crate::pipeline::{Finisher, Pipeline};
use crate::pipeline::{Measurement, PipelineSpec, StateReach};
use crate::window::{millis, Slot, Tumbling};

/// The tiers of the window sets, by [`WindowId::kind`].
const TIERS: [Tier; 3] = [Tier::Rt, Tier::Hourly, Tier::Daily];

pub use crate::watermark::DEFAULT_ALLOWED_LATENESS;

/// Distinct custom event types tracked; beyond this they share one key so a
/// flood of made-up names cannot grow the state without bound.
const MAX_CUSTOM_TYPES: usize = 1024;
const OVERFLOW_CUSTOM: &str = "custom.other";
const BUILT_IN: usize = EventType::BUILT_IN.len();

/// One window's counts.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counts {
    /// Compact key (see [`pack`]) -> event count.
    counts: FxHashMap<u64, i64>,
    users: Hll,
}

/// Event types as small indices: the built-in types first, then the custom
/// names seen, at most [`MAX_CUSTOM_TYPES`] of them.
#[derive(Debug, Clone)]
struct EventTypes {
    custom: Names,
}

impl Default for EventTypes {
    fn default() -> Self {
        EventTypes {
            custom: Names::new(MAX_CUSTOM_TYPES, OVERFLOW_CUSTOM),
        }
    }
}

impl EventTypes {
    fn index(&mut self, t: &EventType) -> u16 {
        match t {
            EventType::Custom(name) => (BUILT_IN + self.custom.intern(name) as usize) as u16,
            built_in => built_in.built_in_code().map_or(0, u16::from),
        }
    }

    fn name(&self, idx: u16) -> &str {
        let idx = idx as usize;
        match idx.checked_sub(BUILT_IN) {
            None => EventType::BUILT_IN[idx].as_str(),
            Some(custom) => self.custom.name(custom as u32),
        }
    }
}

/// Packs (event type, country, device) into one integer key.
#[inline]
fn pack(type_idx: u16, country: Country, device: Device) -> u64 {
    ((type_idx as u64) << 32)
        | ((country.0[0] as u64) << 24)
        | ((country.0[1] as u64) << 16)
        | u64::from(device.code())
}

fn unpack(key: u64) -> (u16, Country, Device) {
    let type_idx = (key >> 32) as u16;
    let country = Country([(key >> 24) as u8, (key >> 16) as u8]);
    let device = u8::try_from(key & 0xffff)
        .ok()
        .and_then(Device::from_code)
        .unwrap_or(Device::Unknown);
    (type_idx, country, device)
}

/// Tumbling 1-minute (`rt`), 1-hour (`hourly`) and 1-day (`daily`) traffic windows.
///
/// Points: `traffic` (tags `country`, `device`, `event_type`; field `events`)
/// and `active_users` (no tags; field `users`), at the window start.
#[derive(Debug, Clone)]
pub struct TrafficPipeline {
    sets: [Tumbling<Counts>; 3],
    types: EventTypes,
    allowed_lateness_ms: i64,
    last_wm: Watermark,
}

#[derive(Serialize, Deserialize)]
struct TrafficState {
    windows: Vec<(u8, i64, Slot<Counts>)>,
    custom_types: Vec<String>,
    last_wm: Watermark,
}

impl Default for TrafficPipeline {
    fn default() -> Self {
        TrafficPipeline::new(DEFAULT_ALLOWED_LATENESS)
    }
}

impl TrafficPipeline {
    pub const NAME: &'static str = "traffic";

    /// A pipeline whose fired windows accept late events for `allowed_lateness`.
    pub fn new(allowed_lateness: Duration) -> Self {
        TrafficPipeline {
            sets: std::array::from_fn(|kind| Tumbling::new(kind, TIERS[kind])),
            types: EventTypes::default(),
            allowed_lateness_ms: millis(allowed_lateness),
            last_wm: EventTime::MIN,
        }
    }

    /// Number of windows held (open or fired but still accepting late events).
    pub fn open_windows(&self) -> usize {
        self.sets.iter().map(Tumbling::len).sum()
    }

    fn partial(types: &EventTypes, window: WindowId, w: &Counts) -> Partial {
        let rows = w
            .counts
            .iter()
            .map(|(&key, &n)| {
                let (type_idx, country, device) = unpack(key);
                (
                    row_key([country.as_str(), device.as_str(), types.name(type_idx)]),
                    smallvec![n],
                )
            })
            .collect();
        Partial::new(window, rows, Some(w.users.clone()))
    }
}

/// Stage 2 of traffic: `traffic` points from the summed counts and
/// `active_users` from the union of the workers' sketches.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrafficFinisher;

impl Finisher for TrafficFinisher {
    fn finish(&self, merged: &Partial, out: &mut Vec<Point>) {
        let Some(&tier) = TIERS.get(merged.window.kind as usize) else {
            return;
        };
        let time = EventTime(merged.window.start);
        for (key, values) in &merged.rows {
            let [country, device, event_type] = &key[..] else {
                continue;
            };
            out.push(Point {
                measurement: "traffic".to_string(),
                tier,
                // Already in key order.
                tags: vec![
                    ("country".to_string(), country.to_string()),
                    ("device".to_string(), device.to_string()),
                    ("event_type".to_string(), event_type.to_string()),
                ],
                fields: vec![(
                    "events".to_string(),
                    FieldValue::Int(values.first().copied().unwrap_or(0)),
                )],
                time,
            });
        }
        let users = merged.users.as_ref().map_or(0, |u| u.estimate() as i64);
        out.push(Point {
            measurement: "active_users".to_string(),
            tier,
            tags: Vec::new(),
            fields: vec![("users".to_string(), FieldValue::Int(users))],
            time,
        });
    }
}

impl Pipeline for TrafficPipeline {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn on_event(&mut self, ev: &Event) {
        let ts = ev.timestamp.0;
        let user = Hll::hash_user(&ev.user_id);
        let key = pack(self.types.index(&ev.event_type), ev.country, ev.device);
        let horizon = self.last_wm.0.saturating_sub(self.allowed_lateness_ms);
        for set in &mut self.sets {
            if let Some(w) = set.change_at(ts, horizon) {
                *w.counts.entry(key).or_insert(0) += 1;
                w.users.insert(user);
            }
        }
    }

    fn on_watermark(&mut self, wm: Watermark, out: &mut Vec<Partial>) {
        self.last_wm = self.last_wm.max(wm);
        let wm = self.last_wm.0;
        let lateness = self.allowed_lateness_ms;
        let types = &self.types;
        for set in &mut self.sets {
            set.fire(wm, lateness, |id, w| out.push(Self::partial(types, id, w)));
        }
    }

    fn early(&self, out: &mut Vec<Partial>) {
        for set in &self.sets {
            set.early(|id, w| out.push(Self::partial(&self.types, id, w)));
        }
    }

    fn snapshot(&self) -> Result<Vec<u8>, ProcessorError> {
        let state = TrafficState {
            windows: self
                .sets
                .iter()
                .enumerate()
                .flat_map(|(i, s)| s.iter().map(move |(start, w)| (i as u8, start, w.clone())))
                .collect(),
            custom_types: self
                .types
                .custom
                .names()
                .iter()
                .map(|n| n.to_string())
                .collect(),
            last_wm: self.last_wm,
        };
        bincode::serialize(&state)
            .map_err(|e| ProcessorError::Snapshot(format!("traffic state: {e}")))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ProcessorError> {
        let state: TrafficState = bincode::deserialize(state)
            .map_err(|e| ProcessorError::CorruptCheckpoint(format!("traffic state: {e}")))?;
        let mut fresh =
            TrafficPipeline::new(Duration::from_millis(self.allowed_lateness_ms as u64));
        fresh.types.custom = Names::from_names(state.custom_types, &fresh.types.custom)
            .map_err(|e| ProcessorError::CorruptCheckpoint(format!("traffic event types: {e}")))?;
        fresh.last_wm = state.last_wm;
        for (i, start, w) in state.windows {
            let set = fresh.sets.get_mut(i as usize).ok_or_else(|| {
                ProcessorError::CorruptCheckpoint(format!("traffic state: window set {i}"))
            })?;
            set.insert(start, w);
        }
        *self = fresh;
        Ok(())
    }
}

/// The traffic pipeline in the [registry](crate::registry).
#[derive(Debug, Clone, Copy, Default)]
pub struct TrafficSpec;

impl PipelineSpec for TrafficSpec {
    fn name(&self) -> &'static str {
        TrafficPipeline::NAME
    }

    fn measurements(&self) -> &'static [Measurement] {
        &[
            Measurement {
                name: "traffic",
                tiers: &TIERS,
            },
            Measurement {
                name: "active_users",
                tiers: &TIERS,
            },
        ]
    }

    fn reach(&self) -> StateReach {
        StateReach::default()
    }

    fn stage1(&self, allowed_lateness: Duration) -> Box<dyn Pipeline> {
        Box::new(TrafficPipeline::new(allowed_lateness))
    }

    fn stage2(&self, _allowed_lateness: Duration) -> Box<dyn Finisher> {
        Box::new(TrafficFinisher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::solo::Solo;

    fn solo() -> Solo<TrafficPipeline> {
        Solo::new(
            TrafficPipeline::default(),
            TrafficFinisher,
            DEFAULT_ALLOWED_LATENESS,
        )
    }

    pub(crate) fn ev(
        id: &str,
        user: &str,
        t: EventType,
        ts: i64,
        country: &str,
        device: Device,
    ) -> Event {
        Event {
            event_id: id.into(),
            event_type: t,
            user_id: user.into(),
            timestamp: EventTime(ts),
            country: Country::parse(country).unwrap_or(Country::UNKNOWN),
            device,
            ..Event::default()
        }
    }

    fn count(
        points: &[Point],
        tier: Tier,
        time: i64,
        country: &str,
        device: &str,
        t: &str,
    ) -> Option<i64> {
        points
            .iter()
            .rev()
            .find(|p| {
                p.measurement == "traffic"
                    && p.tier == tier
                    && p.time == EventTime(time)
                    && p.tag("country") == Some(country)
                    && p.tag("device") == Some(device)
                    && p.tag("event_type") == Some(t)
            })
            .and_then(|p| p.field("events"))
            .map(|v| match v {
                FieldValue::Int(n) => n,
                FieldValue::Float(f) => f as i64,
            })
    }

    fn users(points: &[Point], tier: Tier, time: i64) -> Option<FieldValue> {
        points
            .iter()
            .rev()
            .find(|p| {
                p.measurement == "active_users" && p.tier == tier && p.time == EventTime(time)
            })
            .and_then(|p| p.field("users"))
    }

    #[test]
    fn counts_per_minute_and_hour_and_fires_on_watermark() {
        let mut p = solo();
        let mut out = Vec::new();
        let base = 3_600_000;
        p.on_event(
            &ev("1", "u1", EventType::Login, base + 1_000, "de", Device::Ios),
            &mut out,
        );
        p.on_event(
            &ev(
                "2",
                "u2",
                EventType::Login,
                base + 59_999,
                "de",
                Device::Ios,
            ),
            &mut out,
        );
        p.on_event(
            &ev("3", "u1", EventType::Like, base + 60_000, "us", Device::Web),
            &mut out,
        );
        p.on_event(
            &ev(
                "4",
                "u3",
                EventType::Custom("custom.poll".into()),
                base + 2_000,
                "",
                Device::Unknown,
            ),
            &mut out,
        );
        assert!(out.is_empty());
        p.on_watermark(EventTime(base + 59_999), &mut out);
        assert!(out.is_empty(), "window ends at base+60s");
        p.on_watermark(EventTime(base + 60_000), &mut out);
        assert_eq!(count(&out, Tier::Rt, base, "DE", "ios", "login"), Some(2));
        assert_eq!(
            count(&out, Tier::Rt, base, "unknown", "unknown", "custom.poll"),
            Some(1)
        );
        assert_eq!(
            count(&out, Tier::Rt, base + 60_000, "US", "web", "like"),
            None
        );
        assert_eq!(users(&out, Tier::Rt, base), Some(FieldValue::Int(3)));
        assert_eq!(out.len(), 3);
        let tags: Vec<&str> = out[0].tags.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(tags, ["country", "device", "event_type"]);
        out.clear();
        p.on_watermark(EventTime(2 * base), &mut out);
        assert_eq!(
            count(&out, Tier::Rt, base + 60_000, "US", "web", "like"),
            Some(1)
        );
        assert_eq!(
            count(&out, Tier::Hourly, base, "DE", "ios", "login"),
            Some(2)
        );
        assert_eq!(users(&out, Tier::Hourly, base), Some(FieldValue::Int(3)));
        // The day closes too: the daily tier holds the same totals.
        out.clear();
        p.on_watermark(EventTime(base + 86_400_000), &mut out);
        assert_eq!(count(&out, Tier::Daily, 0, "DE", "ios", "login"), Some(2));
        assert_eq!(users(&out, Tier::Daily, 0), Some(FieldValue::Int(3)));
        // Firing again emits nothing new.
        out.clear();
        p.on_watermark(EventTime(base + 86_400_001), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn late_event_within_lateness_re_emits_then_window_is_dropped() {
        let mut p = solo();
        let mut out = Vec::new();
        p.on_event(
            &ev("1", "u1", EventType::View, 10_000, "fr", Device::Android),
            &mut out,
        );
        p.on_watermark(EventTime(60_000), &mut out);
        assert_eq!(count(&out, Tier::Rt, 0, "FR", "android", "view"), Some(1));
        out.clear();
        p.on_event(
            &ev("2", "u2", EventType::View, 20_000, "fr", Device::Android),
            &mut out,
        );
        p.on_watermark(EventTime(61_000), &mut out);
        assert_eq!(count(&out, Tier::Rt, 0, "FR", "android", "view"), Some(2));
        assert_eq!(users(&out, Tier::Rt, 0), Some(FieldValue::Int(2)));
        out.clear();
        p.on_watermark(EventTime(120_000), &mut out);
        assert!(out.is_empty());
        assert_eq!(
            p.pipeline.open_windows(),
            2,
            "the 1 h and 1 d windows stay open"
        );
        // Beyond the lateness the window is gone and a stray event is ignored.
        p.on_event(
            &ev("3", "u3", EventType::View, 30_000, "fr", Device::Android),
            &mut out,
        );
        p.on_watermark(EventTime(121_000), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn early_reports_open_windows_only() {
        let mut p = solo();
        let mut out = Vec::new();
        p.on_event(
            &ev("1", "u1", EventType::Search, 1_000, "gb", Device::Web),
            &mut out,
        );
        p.on_event(
            &ev("2", "u1", EventType::Search, 61_000, "gb", Device::Web),
            &mut out,
        );
        p.on_watermark(EventTime(60_000), &mut out);
        out.clear();
        p.early(&mut out);
        assert_eq!(count(&out, Tier::Rt, 0, "GB", "web", "search"), None);
        assert_eq!(
            count(&out, Tier::Rt, 60_000, "GB", "web", "search"),
            Some(1)
        );
        assert_eq!(count(&out, Tier::Hourly, 0, "GB", "web", "search"), Some(2));
    }

    #[test]
    fn snapshot_restore_round_trips() {
        let mut p = solo();
        let mut out = Vec::new();
        p.on_event(
            &ev(
                "1",
                "u1",
                EventType::Custom("custom.x".into()),
                1_000,
                "it",
                Device::Other,
            ),
            &mut out,
        );
        let snap = p.snapshot();
        let mut q = solo();
        q.restore(&snap).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        p.on_watermark(EventTime(4_000_000), &mut a);
        q.on_watermark(EventTime(4_000_000), &mut b);
        assert_eq!(a, b);
        assert_eq!(count(&b, Tier::Rt, 0, "IT", "other", "custom.x"), Some(1));
        assert!(q.pipeline.restore(b"garbage").is_err());
    }

    #[test]
    fn extreme_timestamps_do_not_panic() {
        let mut p = solo();
        let mut out = Vec::new();
        for ts in [i64::MIN, i64::MIN + 1, -1, i64::MAX] {
            p.on_event(
                &ev("x", "u", EventType::Login, ts, "de", Device::Web),
                &mut out,
            );
        }
        p.on_watermark(EventTime::MAX, &mut out);
        assert!(out.iter().any(|p| p.time == EventTime(-60_000)));
    }

    #[test]
    fn custom_types_are_bounded() {
        let mut p = solo();
        let mut out = Vec::new();
        for i in 0..(MAX_CUSTOM_TYPES + 10) {
            let t = EventType::Custom(format!("custom.t{i}").into());
            p.on_event(&ev(&i.to_string(), "u", t, 0, "de", Device::Web), &mut out);
        }
        p.on_watermark(EventTime(60_000), &mut out);
        assert_eq!(
            count(&out, Tier::Rt, 0, "DE", "web", OVERFLOW_CUSTOM),
            Some(10)
        );
    }
}
