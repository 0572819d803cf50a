//! The ads pipeline: impression → click → conversion joined by `impression_id`,
//! and per-campaign delivery and performance per 1 m, 1 h and 1 d.
//!
//! Attribution is decided in event time, not at arrival: a click (or
//! conversion) waits until the watermark reaches its own time and is then
//! matched against the impressions (or clicks) known at that moment. Any event
//! at or before its time that has not arrived by then would be late, so the
//! outcome does not depend on arrival order or batch sizes. A click or
//! conversion that itself arrives late (at or behind the watermark) is decided
//! on arrival. An impression that arrives late, after a click on it has been
//! decided, does not revise that click, and likewise a late click does not
//! revise a conversion already decided.
//!
//! Memory: impressions are kept for `attribution_window + allowed_lateness`
//! past their time, attributed clicks for `conversion_window +
//! allowed_lateness` past their latest time, pending clicks and conversions
//! only until the watermark passes them (the out-of-orderness), and windows
//! until their end plus the lateness. So the join state is bounded by the
//! impression rate times about 31 minutes plus the attributed click rate times
//! about 24 hours, and the aggregates by the campaigns × devices × countries
//! active in the open windows.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tidemark_model::{
    Country, Device, Event, EventTime, EventType, FieldValue, Point, Tier, Watermark,
};

use crate::{Pipeline, ProcessorError};

/// Click times remembered per impression; repeated clicks beyond this keep
/// the newest, so one impression id cannot grow the state without bound.
const MAX_CLICKS_PER_IMPRESSION: usize = 16;
/// Tag value of an ad event without a campaign.
const UNKNOWN_CAMPAIGN: &str = "unknown";
const MEASUREMENT: &str = "ads";

/// Join windows and lateness of the ads pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdsConfig {
    /// How long after an impression a click on it is attributed.
    pub attribution_window: Duration,
    /// How long after a click a conversion on it is attributed.
    pub conversion_window: Duration,
    /// How long a fired window still accepts events; must match the driver's.
    pub allowed_lateness: Duration,
}

impl Default for AdsConfig {
    fn default() -> Self {
        AdsConfig {
            attribution_window: Duration::from_secs(30 * 60),
            conversion_window: Duration::from_secs(24 * 3600),
            allowed_lateness: crate::traffic::DEFAULT_ALLOWED_LATENESS,
        }
    }
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

const DEVICES: [Device; 5] = [
    Device::Ios,
    Device::Android,
    Device::Web,
    Device::Other,
    Device::Unknown,
];

fn device_index(d: Device) -> u8 {
    match d {
        Device::Ios => 0,
        Device::Android => 1,
        Device::Web => 2,
        Device::Other => 3,
        Device::Unknown => 4,
    }
}

/// (campaign, device index, country) of the counted event.
type AggKey = (String, u8, [u8; 2]);

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Agg {
    impressions: i64,
    clicks: i64,
    clicks_unattributed: i64,
    conversions: i64,
    spend: f64,
    revenue: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Window {
    aggs: BTreeMap<AggKey, Agg>,
    fired: bool,
    /// Changed since it last fired.
    dirty: bool,
}

#[derive(Debug, Clone)]
struct WindowSet {
    size_ms: i64,
    tier: Tier,
    windows: BTreeMap<i64, Window>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Impression {
    time: i64,
    campaign: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Clicks {
    campaign: String,
    /// Attributed click times, ascending.
    times: Vec<i64>,
}

impl Clicks {
    fn latest(&self) -> i64 {
        self.times.last().copied().unwrap_or(i64::MIN)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum Kind {
    // Clicks sort first so a conversion in the same millisecond sees its click.
    Click,
    Conversion,
}

/// A click or conversion waiting for the watermark to reach its time.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    impression_id: Option<String>,
    campaign: Option<String>,
    device: u8,
    country: [u8; 2],
    revenue: f64,
}

/// Pending order: event time, kind, arrival sequence.
type PendingKey = (i64, Kind, u64);

/// Per-campaign ad windows (`rt`, `hourly`, `daily`) with the click and
/// conversion attribution joins.
///
/// Points: `ads` with tags `campaign_id`, `country`, `device` (of the counted
/// event) and fields `impressions`, `clicks`, `clicks_unattributed`,
/// `conversions` (Int), `spend`, `revenue` (Float) and, when their divisor is
/// not zero, `ctr`, `cvr`, `cpa`, `roas` (Float), at the window start.
#[derive(Debug, Clone)]
pub struct AdsPipeline {
    sets: [WindowSet; 3],
    attribution_ms: i64,
    conversion_ms: i64,
    lateness_ms: i64,
    impressions: FxHashMap<String, Impression>,
    /// (time, impression id), for eviction in time order.
    impression_index: BTreeSet<(i64, String)>,
    clicks: FxHashMap<String, Clicks>,
    /// (latest click time, impression id), for eviction in time order.
    click_index: BTreeSet<(i64, String)>,
    pending: BTreeMap<PendingKey, Pending>,
    seq: u64,
    last_wm: Watermark,
}

#[derive(Serialize, Deserialize)]
struct AdsState {
    windows: Vec<(u8, i64, Window)>,
    impressions: Vec<(String, Impression)>,
    clicks: Vec<(String, Clicks)>,
    pending: Vec<(PendingKey, Pending)>,
    seq: u64,
    last_wm: Watermark,
}

impl Default for AdsPipeline {
    fn default() -> Self {
        AdsPipeline::new(AdsConfig::default())
    }
}

fn finite_or_zero(v: Option<f64>) -> f64 {
    v.filter(|v| v.is_finite()).unwrap_or(0.0)
}

fn ratio(num: f64, den: f64) -> Option<f64> {
    if den == 0.0 {
        return None;
    }
    let r = num / den;
    r.is_finite().then_some(r)
}

impl AdsPipeline {
    pub const NAME: &'static str = "ads";

    pub fn new(config: AdsConfig) -> Self {
        let set = |size_ms, tier| WindowSet {
            size_ms,
            tier,
            windows: BTreeMap::new(),
        };
        AdsPipeline {
            sets: [
                set(60_000, Tier::Rt),
                set(3_600_000, Tier::Hourly),
                set(86_400_000, Tier::Daily),
            ],
            attribution_ms: millis(config.attribution_window),
            conversion_ms: millis(config.conversion_window),
            lateness_ms: millis(config.allowed_lateness),
            impressions: FxHashMap::default(),
            impression_index: BTreeSet::new(),
            clicks: FxHashMap::default(),
            click_index: BTreeSet::new(),
            pending: BTreeMap::new(),
            seq: 0,
            last_wm: EventTime::MIN,
        }
    }

    fn config(&self) -> AdsConfig {
        let d = |ms: i64| Duration::from_millis(ms.max(0) as u64);
        AdsConfig {
            attribution_window: d(self.attribution_ms),
            conversion_window: d(self.conversion_ms),
            allowed_lateness: d(self.lateness_ms),
        }
    }

    /// Entries held by the joins: impressions, impressions with attributed
    /// clicks, and clicks and conversions awaiting the watermark.
    pub fn join_state_len(&self) -> usize {
        self.impressions.len() + self.clicks.len() + self.pending.len()
    }

    /// Number of windows held (open or fired but still accepting late events).
    pub fn open_windows(&self) -> usize {
        self.sets.iter().map(|s| s.windows.len()).sum()
    }

    /// Adds to the aggregates of every tier's window holding `ts`, unless that
    /// window was already dropped as of watermark `wm`.
    fn count(&mut self, wm: i64, ts: i64, key: &AggKey, f: impl Fn(&mut Agg)) {
        let horizon = wm.saturating_sub(self.lateness_ms);
        for set in &mut self.sets {
            let start = ts.saturating_sub(ts.rem_euclid(set.size_ms));
            if start.saturating_add(set.size_ms) <= horizon {
                continue;
            }
            let w = set.windows.entry(start).or_default();
            match w.aggs.get_mut(key) {
                Some(a) => f(a),
                None => {
                    let mut a = Agg::default();
                    f(&mut a);
                    w.aggs.insert(key.clone(), a);
                }
            }
            if w.fired {
                w.dirty = true;
            }
        }
    }

    fn on_impression(&mut self, ev: &Event) {
        let ts = ev.timestamp.0;
        let campaign = ev
            .campaign_id
            .clone()
            .unwrap_or_else(|| UNKNOWN_CAMPAIGN.to_string());
        let cost = finite_or_zero(ev.cost);
        let key = (campaign.clone(), device_index(ev.device), ev.country.0);
        self.count(self.last_wm.0, ts, &key, |a| {
            a.impressions += 1;
            a.spend += cost;
        });
        let Some(id) = ev.impression_id.as_ref() else {
            return;
        };
        // An impression already past its attribution horizon could never be
        // matched before eviction; keeping it would only leak.
        if self.impression_expired(ts, self.last_wm.0) {
            return;
        }
        match self.impressions.get_mut(id) {
            // A repeated impression id keeps its earliest time, which is
            // independent of arrival order.
            Some(imp) if imp.time <= ts => {}
            Some(imp) => {
                self.impression_index.remove(&(imp.time, id.clone()));
                imp.time = ts;
                imp.campaign = campaign;
                self.impression_index.insert((ts, id.clone()));
            }
            None => {
                self.impressions
                    .insert(id.clone(), Impression { time: ts, campaign });
                self.impression_index.insert((ts, id.clone()));
            }
        }
    }

    fn impression_expired(&self, time: i64, wm: i64) -> bool {
        wm > time
            .saturating_add(self.attribution_ms)
            .saturating_add(self.lateness_ms)
    }

    fn click_expired(&self, latest: i64, wm: i64) -> bool {
        wm > latest
            .saturating_add(self.conversion_ms)
            .saturating_add(self.lateness_ms)
    }

    /// Attributes a click or conversion and counts it; `wm` is the watermark
    /// that decides which windows are already dropped.
    fn decide(&mut self, wm: i64, ts: i64, kind: Kind, p: Pending) {
        match kind {
            Kind::Click => {
                let imp = p.impression_id.as_ref().and_then(|id| {
                    self.impressions.get(id).filter(|imp| {
                        imp.time <= ts && ts <= imp.time.saturating_add(self.attribution_ms)
                    })
                });
                let attributed = imp.is_some();
                let campaign = p
                    .campaign
                    .clone()
                    .or_else(|| imp.map(|i| i.campaign.clone()))
                    .unwrap_or_else(|| UNKNOWN_CAMPAIGN.to_string());
                let key = (campaign.clone(), p.device, p.country);
                if attributed {
                    self.count(wm, ts, &key, |a| a.clicks += 1);
                    if let Some(id) = p.impression_id {
                        self.remember_click(id, campaign, ts, wm);
                    }
                } else {
                    self.count(wm, ts, &key, |a| a.clicks_unattributed += 1);
                }
            }
            Kind::Conversion => {
                let click = p.impression_id.as_ref().and_then(|id| {
                    self.clicks.get(id).filter(|c| {
                        c.times
                            .iter()
                            .any(|&t| t <= ts && ts <= t.saturating_add(self.conversion_ms))
                    })
                });
                // Unattributed conversions are not reported.
                let Some(click) = click else {
                    return;
                };
                let campaign = p.campaign.unwrap_or_else(|| click.campaign.clone());
                let key = (campaign, p.device, p.country);
                let revenue = p.revenue;
                self.count(wm, ts, &key, |a| {
                    a.conversions += 1;
                    a.revenue += revenue;
                });
            }
        }
    }

    fn remember_click(&mut self, id: String, campaign: String, ts: i64, wm: i64) {
        match self.clicks.get_mut(&id) {
            Some(c) => {
                let old_latest = c.latest();
                let pos = c.times.partition_point(|&t| t <= ts);
                c.times.insert(pos, ts);
                if c.times.len() > MAX_CLICKS_PER_IMPRESSION {
                    c.times.remove(0);
                }
                let new_latest = c.latest();
                if new_latest != old_latest {
                    self.click_index.remove(&(old_latest, id.clone()));
                    self.click_index.insert((new_latest, id));
                }
            }
            None => {
                if self.click_expired(ts, wm) {
                    return;
                }
                self.click_index.insert((ts, id.clone()));
                self.clicks.insert(
                    id,
                    Clicks {
                        campaign,
                        times: vec![ts],
                    },
                );
            }
        }
    }

    fn evict(&mut self, wm: i64) {
        while let Some((t, _)) = self.impression_index.first() {
            if !self.impression_expired(*t, wm) {
                break;
            }
            if let Some((_, id)) = self.impression_index.pop_first() {
                self.impressions.remove(&id);
            }
        }
        while let Some((t, _)) = self.click_index.first() {
            if !self.click_expired(*t, wm) {
                break;
            }
            if let Some((_, id)) = self.click_index.pop_first() {
                self.clicks.remove(&id);
            }
        }
    }

    fn emit(set: &WindowSet, start: i64, w: &Window, out: &mut Vec<Point>) {
        let time = EventTime(start);
        for ((campaign, device, country), a) in &w.aggs {
            let device = DEVICES
                .get(*device as usize)
                .copied()
                .unwrap_or(Device::Unknown);
            let mut fields = vec![
                ("impressions".to_string(), FieldValue::Int(a.impressions)),
                ("clicks".to_string(), FieldValue::Int(a.clicks)),
                (
                    "clicks_unattributed".to_string(),
                    FieldValue::Int(a.clicks_unattributed),
                ),
                ("conversions".to_string(), FieldValue::Int(a.conversions)),
            ];
            let floats = [
                ("spend", a.spend.is_finite().then_some(a.spend)),
                ("revenue", a.revenue.is_finite().then_some(a.revenue)),
                ("ctr", ratio(a.clicks as f64, a.impressions as f64)),
                ("cvr", ratio(a.conversions as f64, a.clicks as f64)),
                ("cpa", ratio(a.spend, a.conversions as f64)),
                ("roas", ratio(a.revenue, a.spend)),
            ];
            for (name, v) in floats {
                if let Some(v) = v {
                    fields.push((name.to_string(), FieldValue::Float(v)));
                }
            }
            out.push(Point::new(
                MEASUREMENT,
                set.tier,
                time,
                vec![
                    ("campaign_id".to_string(), campaign.clone()),
                    (
                        "country".to_string(),
                        Country(*country).as_str().to_string(),
                    ),
                    ("device".to_string(), device.as_str().to_string()),
                ],
                fields,
            ));
        }
    }
}

impl Pipeline for AdsPipeline {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn on_event(&mut self, ev: &Event, _out: &mut Vec<Point>) {
        let kind = match ev.event_type {
            EventType::AdImpression => {
                self.on_impression(ev);
                return;
            }
            EventType::AdClick => Kind::Click,
            EventType::AdConversion => Kind::Conversion,
            _ => return,
        };
        let ts = ev.timestamp.0;
        let p = Pending {
            impression_id: ev.impression_id.clone(),
            campaign: ev.campaign_id.clone(),
            device: device_index(ev.device),
            country: ev.country.0,
            revenue: finite_or_zero(ev.revenue),
        };
        let wm = self.last_wm.0;
        if ts <= wm {
            // Late: nothing at or before its time is still to come.
            self.decide(wm, ts, kind, p);
        } else {
            self.pending.insert((ts, kind, self.seq), p);
            self.seq = self.seq.wrapping_add(1);
        }
    }

    fn on_watermark(&mut self, wm: Watermark, out: &mut Vec<Point>) {
        let prev = self.last_wm.0;
        let wm = self.last_wm.max(wm).0;
        // Decided against the previous watermark: their windows were still
        // open then, even if this watermark jumps past their end.
        while let Some(entry) = self.pending.first_entry() {
            if entry.key().0 > wm {
                break;
            }
            let ((ts, kind, _), p) = entry.remove_entry();
            self.decide(prev, ts, kind, p);
        }
        self.last_wm = EventTime(wm);
        let lateness = self.lateness_ms;
        for set in &mut self.sets {
            for (&start, w) in &set.windows {
                if start.saturating_add(set.size_ms) > wm {
                    break;
                }
                if !w.fired || w.dirty {
                    Self::emit(set, start, w, out);
                }
            }
            let size = set.size_ms;
            set.windows.retain(|&start, w| {
                let end = start.saturating_add(size);
                if end <= wm {
                    w.fired = true;
                    w.dirty = false;
                }
                end.saturating_add(lateness) > wm
            });
        }
        self.evict(wm);
    }

    fn early(&self, out: &mut Vec<Point>) {
        let set = &self.sets[0];
        for (&start, w) in &set.windows {
            if !w.fired {
                Self::emit(set, start, w, out);
            }
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut impressions: Vec<(String, Impression)> = self
            .impressions
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        impressions.sort_by(|a, b| a.0.cmp(&b.0));
        let mut clicks: Vec<(String, Clicks)> = self
            .clicks
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        clicks.sort_by(|a, b| a.0.cmp(&b.0));
        let state = AdsState {
            windows: self
                .sets
                .iter()
                .enumerate()
                .flat_map(|(i, s)| {
                    s.windows
                        .iter()
                        .map(move |(&start, w)| (i as u8, start, w.clone()))
                })
                .collect(),
            impressions,
            clicks,
            pending: self.pending.iter().map(|(k, v)| (*k, v.clone())).collect(),
            seq: self.seq,
            last_wm: self.last_wm,
        };
        // Serialising plain data into a Vec cannot fail.
        bincode::serialize(&state).unwrap_or_default()
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ProcessorError> {
        let corrupt =
            |what: String| ProcessorError::CorruptCheckpoint(format!("ads state: {what}"));
        let state: AdsState = bincode::deserialize(state).map_err(|e| corrupt(e.to_string()))?;
        let mut fresh = AdsPipeline::new(self.config());
        for (i, start, w) in state.windows {
            let set = fresh
                .sets
                .get_mut(i as usize)
                .ok_or_else(|| corrupt(format!("window set {i}")))?;
            set.windows.insert(start, w);
        }
        for (id, imp) in state.impressions {
            fresh.impression_index.insert((imp.time, id.clone()));
            fresh.impressions.insert(id, imp);
        }
        for (id, c) in state.clicks {
            if c.times.is_empty() {
                continue;
            }
            fresh.click_index.insert((c.latest(), id.clone()));
            fresh.clicks.insert(id, c);
        }
        fresh.pending = state.pending.into_iter().collect();
        fresh.seq = state.seq;
        fresh.last_wm = state.last_wm;
        *self = fresh;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;
    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 86_400_000;

    fn ad(t: EventType, imp: &str, campaign: &str, ts: i64) -> Event {
        Event {
            event_id: format!("{t}-{imp}-{ts}"),
            event_type: t,
            user_id: "u1".into(),
            timestamp: EventTime(ts),
            campaign_id: Some(campaign.into()),
            impression_id: Some(imp.into()),
            device: Device::Ios,
            country: Country(*b"DE"),
            ..Event::default()
        }
    }

    fn impression(imp: &str, ts: i64, cost: f64) -> Event {
        Event {
            cost: Some(cost),
            ..ad(EventType::AdImpression, imp, "c1", ts)
        }
    }

    fn click(imp: &str, ts: i64) -> Event {
        ad(EventType::AdClick, imp, "c1", ts)
    }

    fn conversion(imp: &str, ts: i64, revenue: f64) -> Event {
        Event {
            revenue: Some(revenue),
            ..ad(EventType::AdConversion, imp, "c1", ts)
        }
    }

    /// The last point of campaign `c1` (DE, ios) for this tier and time.
    fn point(points: &[Point], tier: Tier, time: i64) -> Option<&Point> {
        points.iter().rev().find(|p| {
            p.measurement == "ads"
                && p.tier == tier
                && p.time == EventTime(time)
                && p.tag("campaign_id") == Some("c1")
                && p.tag("country") == Some("DE")
                && p.tag("device") == Some("ios")
        })
    }

    fn int(points: &[Point], tier: Tier, time: i64, field: &str) -> Option<i64> {
        match point(points, tier, time)?.field(field)? {
            FieldValue::Int(n) => Some(n),
            FieldValue::Float(_) => None,
        }
    }

    fn float(points: &[Point], tier: Tier, time: i64, field: &str) -> Option<f64> {
        match point(points, tier, time)?.field(field)? {
            FieldValue::Float(f) => Some(f),
            FieldValue::Int(_) => None,
        }
    }

    fn feed(p: &mut AdsPipeline, events: &[Event], out: &mut Vec<Point>) {
        for e in events {
            p.on_event(e, out);
        }
    }

    #[test]
    fn clicks_are_attributed_within_the_attribution_window_only() {
        let mut p = AdsPipeline::default();
        let mut out = Vec::new();
        feed(
            &mut p,
            &[
                impression("i1", 0, 0.5),
                impression("i2", 1_000, 0.25),
                // Within 30 min of i1.
                click("i1", 30 * MIN),
                // 30 min + 1 ms after i2.
                click("i2", 1_000 + 30 * MIN + 1),
                // Never seen.
                click("nope", 30 * MIN),
            ],
            &mut out,
        );
        p.on_watermark(EventTime(HOUR), &mut out);
        assert_eq!(int(&out, Tier::Rt, 0, "impressions"), Some(2));
        assert_eq!(float(&out, Tier::Rt, 0, "spend"), Some(0.75));
        assert_eq!(int(&out, Tier::Rt, 30 * MIN, "clicks"), Some(1));
        assert_eq!(
            int(&out, Tier::Rt, 30 * MIN, "clicks_unattributed"),
            Some(2)
        );
        assert_eq!(int(&out, Tier::Hourly, 0, "impressions"), Some(2));
        assert_eq!(int(&out, Tier::Hourly, 0, "clicks"), Some(1));
        assert_eq!(int(&out, Tier::Hourly, 0, "clicks_unattributed"), Some(2));
        assert_eq!(float(&out, Tier::Hourly, 0, "ctr"), Some(0.5));
        // A click before its impression's time is not attributed either.
        let mut p = AdsPipeline::default();
        let mut out = Vec::new();
        feed(
            &mut p,
            &[impression("i1", 10_000, 1.0), click("i1", 5_000)],
            &mut out,
        );
        p.on_watermark(EventTime(MIN), &mut out);
        assert_eq!(int(&out, Tier::Rt, 0, "clicks"), Some(0));
        assert_eq!(int(&out, Tier::Rt, 0, "clicks_unattributed"), Some(1));
    }

    #[test]
    fn conversions_are_attributed_within_a_day_of_the_click() {
        let mut p = AdsPipeline::default();
        let mut out = Vec::new();
        feed(
            &mut p,
            &[
                impression("i1", 0, 2.0),
                impression("i2", 0, 2.0),
                click("i1", MIN),
                click("i2", MIN),
                // Exactly 24 h after the click: attributed.
                conversion("i1", MIN + DAY, 10.0),
                // 24 h + 1 ms after: not attributed.
                conversion("i2", MIN + DAY + 1, 99.0),
                // No click on that impression.
                conversion("zzz", MIN + DAY, 99.0),
            ],
            &mut out,
        );
        // Watermarks advance gradually, as the driver does.
        for h in 1..=48 {
            p.on_watermark(EventTime(h * HOUR), &mut out);
        }
        assert_eq!(int(&out, Tier::Rt, MIN + DAY, "conversions"), Some(1));
        assert_eq!(float(&out, Tier::Rt, MIN + DAY, "revenue"), Some(10.0));
        assert_eq!(int(&out, Tier::Daily, DAY, "conversions"), Some(1));
        assert_eq!(float(&out, Tier::Daily, DAY, "revenue"), Some(10.0));
        // No clicks that day: no cvr; no impressions: no ctr; no spend: no roas.
        let day1 = point(&out, Tier::Daily, DAY).unwrap();
        assert_eq!(day1.field("cvr"), None);
        assert_eq!(day1.field("roas"), None);
        assert_eq!(day1.field("ctr"), None);
        assert_eq!(day1.field("cpa"), Some(FieldValue::Float(0.0)));
        // Day 0: 2 impressions, 2 clicks, no conversions.
        let day0 = point(&out, Tier::Daily, 0).unwrap();
        assert_eq!(day0.field("clicks"), Some(FieldValue::Int(2)));
        assert_eq!(day0.field("spend"), Some(FieldValue::Float(4.0)));
        assert_eq!(day0.field("ctr"), Some(FieldValue::Float(1.0)));
        assert_eq!(day0.field("cvr"), Some(FieldValue::Float(0.0)));
        assert_eq!(day0.field("cpa"), None);
        assert_eq!(day0.field("roas"), Some(FieldValue::Float(0.0)));
    }

    #[test]
    fn ratios_in_one_window() {
        let mut p = AdsPipeline::default();
        let mut out = Vec::new();
        feed(
            &mut p,
            &[
                impression("i1", 0, 1.0),
                impression("i2", 0, 3.0),
                impression("i3", 0, 0.0),
                impression("i4", 0, 0.0),
                click("i1", 1_000),
                click("i2", 2_000),
                conversion("i1", 3_000, 12.0),
            ],
            &mut out,
        );
        p.on_watermark(EventTime(MIN), &mut out);
        let pt = point(&out, Tier::Rt, 0).unwrap();
        let names: Vec<&str> = pt.fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "clicks",
                "clicks_unattributed",
                "conversions",
                "cpa",
                "ctr",
                "cvr",
                "impressions",
                "revenue",
                "roas",
                "spend"
            ]
        );
        assert_eq!(pt.field("ctr"), Some(FieldValue::Float(0.5)));
        assert_eq!(pt.field("cvr"), Some(FieldValue::Float(0.5)));
        assert_eq!(pt.field("cpa"), Some(FieldValue::Float(4.0)));
        assert_eq!(pt.field("roas"), Some(FieldValue::Float(3.0)));
        assert_eq!(pt.field("revenue"), Some(FieldValue::Float(12.0)));
        let tags: Vec<&str> = pt.tags.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(tags, ["campaign_id", "country", "device"]);
        for p in &out {
            for (_, v) in &p.fields {
                assert!(v.as_f64().is_finite());
            }
        }
    }

    #[test]
    fn non_finite_inputs_never_reach_the_output() {
        let mut p = AdsPipeline::default();
        let mut out = Vec::new();
        feed(
            &mut p,
            &[
                impression("i1", 0, f64::NAN),
                impression("i2", 0, f64::MAX),
                impression("i3", 0, f64::MAX),
                click("i1", 1),
                conversion("i1", 2, f64::INFINITY),
            ],
            &mut out,
        );
        p.on_watermark(EventTime::MAX, &mut out);
        assert!(!out.is_empty());
        for p in &out {
            for (_, v) in &p.fields {
                assert!(v.as_f64().is_finite());
            }
        }
    }

    #[test]
    fn click_before_its_impression_within_out_of_orderness_is_attributed() {
        let mut p = AdsPipeline::default();
        let mut out = Vec::new();
        // Arrival order: conversion, click, impression; event times in order.
        feed(
            &mut p,
            &[
                conversion("i1", 20_000, 5.0),
                click("i1", 10_000),
                impression("i1", 5_000, 1.0),
            ],
            &mut out,
        );
        p.on_watermark(EventTime(MIN), &mut out);
        assert_eq!(int(&out, Tier::Rt, 0, "clicks"), Some(1));
        assert_eq!(int(&out, Tier::Rt, 0, "clicks_unattributed"), Some(0));
        assert_eq!(int(&out, Tier::Rt, 0, "conversions"), Some(1));
        assert_eq!(float(&out, Tier::Rt, 0, "roas"), Some(5.0));
    }

    #[test]
    fn all_tiers_are_emitted_and_early_reports_open_rt_windows() {
        let mut p = AdsPipeline::default();
        let mut out = Vec::new();
        feed(
            &mut p,
            &[impression("i1", 1_000, 1.0), impression("i2", 61_000, 1.0)],
            &mut out,
        );
        p.on_watermark(EventTime(MIN), &mut out);
        assert_eq!(int(&out, Tier::Rt, 0, "impressions"), Some(1));
        assert_eq!(out.len(), 1);
        out.clear();
        p.early(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(int(&out, Tier::Rt, MIN, "impressions"), Some(1));
        out.clear();
        p.on_watermark(EventTime(DAY), &mut out);
        assert_eq!(int(&out, Tier::Rt, MIN, "impressions"), Some(1));
        assert_eq!(int(&out, Tier::Hourly, 0, "impressions"), Some(2));
        assert_eq!(int(&out, Tier::Daily, 0, "impressions"), Some(2));
        out.clear();
        p.on_watermark(EventTime(DAY + 1), &mut out);
        assert!(out.is_empty(), "fired windows are not emitted again");
    }

    #[test]
    fn late_events_re_emit_corrected_windows_until_lateness_passes() {
        let mut p = AdsPipeline::default();
        let mut out = Vec::new();
        feed(&mut p, &[impression("i1", 1_000, 1.0)], &mut out);
        p.on_watermark(EventTime(MIN), &mut out);
        assert_eq!(int(&out, Tier::Rt, 0, "clicks"), Some(0));
        out.clear();
        // A late click, decided on arrival.
        p.on_event(&click("i1", 2_000), &mut out);
        p.on_watermark(EventTime(MIN + 1_000), &mut out);
        assert_eq!(int(&out, Tier::Rt, 0, "clicks"), Some(1));
        assert_eq!(float(&out, Tier::Rt, 0, "ctr"), Some(1.0));
        out.clear();
        p.on_watermark(EventTime(2 * MIN), &mut out);
        assert!(out.is_empty());
        // Past the lateness the rt window is gone; a stray event is ignored there.
        p.on_event(&click("i1", 3_000), &mut out);
        p.on_watermark(EventTime(2 * MIN + 1), &mut out);
        assert!(out.is_empty());
        p.on_watermark(EventTime(DAY), &mut out);
        assert_eq!(int(&out, Tier::Hourly, 0, "clicks"), Some(2));
        assert_eq!(int(&out, Tier::Daily, 0, "clicks"), Some(2));
    }

    #[test]
    fn a_watermark_jump_still_counts_pending_clicks() {
        let mut p = AdsPipeline::default();
        let mut out = Vec::new();
        feed(
            &mut p,
            &[impression("i1", 1_000, 1.0), click("i1", 2_000)],
            &mut out,
        );
        p.on_watermark(EventTime(10 * DAY), &mut out);
        assert_eq!(int(&out, Tier::Rt, 0, "clicks"), Some(1));
        assert_eq!(int(&out, Tier::Daily, 0, "clicks"), Some(1));
        assert_eq!(p.join_state_len(), 0);
        assert_eq!(p.open_windows(), 0);
    }

    fn stream() -> Vec<(Event, Option<i64>)> {
        let mut s = Vec::new();
        for i in 0..40i64 {
            let t = i * 7 * MIN;
            let id = format!("i{i}");
            s.push((impression(&id, t, 0.5 + i as f64), None));
            if i % 2 == 0 {
                s.push((click(&id, t + 5 * MIN), None));
            }
            if i % 4 == 0 {
                s.push((conversion(&id, t + 3 * HOUR, 7.0), None));
            }
            s.push((click("unknown", t + MIN), Some(t)));
        }
        s.sort_by_key(|(e, _)| e.timestamp.0);
        s
    }

    fn run(p: &mut AdsPipeline, s: &[(Event, Option<i64>)], out: &mut Vec<Point>) {
        for (e, wm) in s {
            p.on_event(e, out);
            if let Some(wm) = wm {
                p.on_watermark(EventTime(*wm), out);
            }
        }
    }

    #[test]
    fn restore_mid_stream_equals_uninterrupted() {
        let s = stream();
        let mut whole = AdsPipeline::default();
        let mut a = Vec::new();
        run(&mut whole, &s, &mut a);
        whole.on_watermark(EventTime(3 * DAY), &mut a);

        let (head, tail) = s.split_at(s.len() / 2);
        let mut first = AdsPipeline::default();
        let mut b = Vec::new();
        run(&mut first, head, &mut b);
        let snap = first.snapshot();
        let mut second = AdsPipeline::default();
        second.restore(&snap).unwrap();
        assert_eq!(second.snapshot(), snap);
        run(&mut second, tail, &mut b);
        second.on_watermark(EventTime(3 * DAY), &mut b);
        assert_eq!(a, b);
        assert!(int(&a, Tier::Daily, 0, "conversions").unwrap() > 0);
        assert!(second.restore(b"garbage").is_err());
    }

    #[test]
    fn eviction_bounds_the_join_state() {
        let mut p = AdsPipeline::default();
        let mut out = Vec::new();
        for i in 0..10_000i64 {
            let id = format!("i{i}");
            p.on_event(&impression(&id, i * 100, 1.0), &mut out);
            if i % 10 == 0 {
                p.on_event(&click(&id, i * 100 + 50), &mut out);
            }
            if i % 100 == 0 {
                p.on_watermark(EventTime(i * 100), &mut out);
            }
        }
        assert!(p.join_state_len() > 1_000);
        // Two days later: every impression and click is past its horizon.
        p.on_watermark(EventTime(2 * DAY), &mut out);
        assert_eq!(p.join_state_len(), 0);
        assert!(p.impression_index.is_empty() && p.click_index.is_empty());
        // Impressions already past the horizon are counted but not kept.
        out.clear();
        p.on_event(&impression("old", 2 * DAY - HOUR, 1.0), &mut out);
        assert_eq!(p.join_state_len(), 0);
        // Live state only holds the last ~31 minutes of impressions.
        let mut p = AdsPipeline::default();
        for i in 0..5_000i64 {
            let t = i * MIN;
            p.on_event(&impression(&format!("j{i}"), t, 1.0), &mut out);
            p.on_watermark(EventTime(t), &mut out);
        }
        assert!(p.join_state_len() <= 32, "{}", p.join_state_len());
        assert!(p.open_windows() <= 2 + 2 + 2);
    }

    #[test]
    fn other_events_and_extreme_times_do_not_panic() {
        let mut p = AdsPipeline::default();
        let mut out = Vec::new();
        p.on_event(&Event::default(), &mut out);
        for ts in [i64::MIN, i64::MIN + 1, -1, i64::MAX] {
            feed(
                &mut p,
                &[
                    impression("x", ts, 1.0),
                    click("x", ts),
                    conversion("x", ts, 1.0),
                ],
                &mut out,
            );
        }
        let bare = Event {
            event_type: EventType::AdClick,
            ..Event::default()
        };
        p.on_event(&bare, &mut out);
        p.on_watermark(EventTime::MAX, &mut out);
        assert!(out
            .iter()
            .any(|p| p.tag("campaign_id") == Some(UNKNOWN_CAMPAIGN)));
    }
}
