//! The ads pipeline: impression → click → conversion joined by `impression_id`,
//! and per-campaign delivery and performance per 1 m, 1 h and 1 d.
//!
//! Attribution is decided in event time, not at arrival: a click (or
//! conversion) waits until the watermark reaches its own time and is then
//! matched against the impressions (or clicks) known at that moment. Any event
//! at or before its time that has not arrived by then would be late, so the
//! outcome does not depend on arrival order, batch sizes or how the watermark
//! advances (one step or many). A click or conversion that itself arrives late
//! (at or behind the watermark) is decided on arrival. An impression that
//! arrives late, after a click on it has been decided, does not revise that
//! click, and likewise a late click does not revise a conversion already
//! decided.
//!
//! A click is attributed when an impression with its id happened at most
//! `attribution_window` before it (at the same time or earlier); a conversion
//! when a remembered click on that impression id happened at most
//! `conversion_window` before it. Without a campaign of its own, a click takes
//! the campaign of the latest such impression and a conversion that of the
//! latest such click. Every impression (and attributed click) of an id is
//! remembered, not only the first, so whether an older one with the same id
//! was already evicted cannot change an outcome; only the newest
//! `MAX_IMPRESSIONS_PER_ID` (16) impressions and `MAX_CLICKS_PER_IMPRESSION`
//! (16) clicks of one id are kept, and a repeat at a time already held is ignored.
//!
//! A click or conversion waits until its partition's watermark passes its
//! time, decided right after the event that moved it there: what it joins
//! depends on that partition's order alone, never on how far the worker's
//! other partitions had been read, which differs between live, a restart
//! and a replay. (The worker's combined watermark decides what is left, for
//! an idle partition.)
//!
//! Join keys: impression ids are held as their 128-bit XXH3 hash, not as
//! strings (no allocation per event). With n ids held, a click or conversion
//! on an unknown id matches one of them with probability n/2¹²⁸ (about 3·10⁻³⁰
//! for a billion), and two held ids collide with probability n²/2¹²⁹ (about
//! 10⁻²¹): even over years of lookups a wrong join does not happen in practice,
//! so joins are exact. (XXH3 is not keyed; someone able to craft colliding ids
//! could equally send the real id.) Campaign ids are interned to `u32`
//! numbers; the names only reappear in partials and checkpoints.
//!
//! Memory: impressions are kept for `attribution_window + allowed_lateness`
//! past their time, attributed clicks for `conversion_window +
//! allowed_lateness` past their time (eviction runs per second of event
//! time, so up to a second longer), pending clicks and conversions only until
//! the watermark passes them (the out-of-orderness), and windows until their
//! end plus the lateness. So the join state is bounded by the impression rate
//! times about 31 minutes plus the attributed click rate times about 24 hours,
//! and the aggregates by the campaigns × devices × countries active in the
//! open windows. The campaign name table only grows with distinct campaigns
//! (it is rebuilt with the live ones on restore).
//!
//! With a spill directory ([`Pipeline::spill_to`], which the live driver
//! sets beside its checkpoint), the join state older than the watermark
//! minus the lateness and a minute moves to run files on disk (see
//! [`spill`]): memory then holds only the last few minutes of it, and the
//! outcomes are the same.

mod join;
mod spill;

use std::collections::hash_map::Entry;
use std::collections::BTreeMap;
use std::ops::Bound::{Excluded, Unbounded};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use smallvec::smallvec;
use tidemark_model::{
    Country, Device, Event, EventTime, EventType, FieldValue, KeyRing, Point, Tier, Watermark,
};

use crate::error::ProcessorError;
use crate::partial::{from_micros, row_key, to_micros, Partial, WindowId};
use crate::pipeline::{Finisher, Pipeline};
use crate::pipeline::{Measurement, PipelineSpec, StateReach};
use crate::window::{millis, Slot, Tumbling};
use join::{imp_key, Campaigns, ImpKey, Touch, Touches, UNKNOWN_CAMPAIGN_ID};
use spill::{Side, Spill, SpillState};

/// The tiers of the window sets, by [`WindowId::kind`].
const TIERS: [Tier; 3] = [Tier::Rt, Tier::Hourly, Tier::Daily];

/// Click times remembered per impression id; repeated clicks beyond this keep
/// the newest, so one impression id cannot grow the state without bound.
const MAX_CLICKS_PER_IMPRESSION: usize = 16;
/// Impression times remembered per impression id (ids should be unique; a
/// repeated one keeps its newest impressions).
const MAX_IMPRESSIONS_PER_ID: usize = 16;
const MEASUREMENT: &str = "ads";
/// Granularity of the eviction indexes, in milliseconds of event time.
const INDEX_BUCKET_MS: i64 = 1_000;
/// Version of the [`AdsState`] encoding: followed by a [`SpillState`].
const STATE_VERSION: u32 = 4;
/// The encoding before join state could be spilled.
const STATE_VERSION_UNSPILLED: u32 = 3;
/// The encoding before pending events were kept per partition.
const STATE_VERSION_UNSLOTTED: u32 = 2;
/// The partition slot of events offered without one ([`Pipeline::on_event`]):
/// decided by the combined watermark alone.
const NO_SLOT: u32 = u32::MAX;
/// How often cold join state is spilled, in milliseconds of event time.
const SPILL_EVERY_MS: i64 = 60_000;
/// How far behind the lateness horizon join state is still kept in memory:
/// most clicks and conversions come within it.
const SPILL_AFTER_MS: i64 = 60_000;

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

/// (campaign number, device index, country) of the counted event, packed as
/// `campaign << 24 | device << 16 | country`.
type AggKey = u64;

fn agg_key(campaign: u32, device: u8, country: [u8; 2]) -> AggKey {
    (u64::from(campaign) << 24)
        | (u64::from(device) << 16)
        | (u64::from(country[0]) << 8)
        | u64::from(country[1])
}

fn split_agg_key(key: AggKey) -> (u32, u8, [u8; 2]) {
    (
        (key >> 24) as u32,
        (key >> 16) as u8,
        [(key >> 8) as u8, key as u8],
    )
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Agg {
    impressions: i64,
    clicks: i64,
    clicks_unattributed: i64,
    conversions: i64,
    /// Micro-units (exact, so merges do not depend on order).
    spend_micros: i64,
    revenue_micros: i64,
}

/// One window's aggregates.
type Aggs = FxHashMap<AggKey, Agg>;

/// Impression ids by second of a touch's time, for eviction in time order.
type EvictionIndex = BTreeMap<i64, Vec<ImpKey>>;

fn index_bucket(time: i64) -> i64 {
    time.div_euclid(INDEX_BUCKET_MS)
}

/// The latest time a bucket can hold (or later, at the extremes).
fn bucket_last(bucket: i64) -> i64 {
    bucket
        .saturating_mul(INDEX_BUCKET_MS)
        .saturating_add(INDEX_BUCKET_MS - 1)
}

/// Forgets the touches `expired` by time, bucket by bucket, and the ids left
/// without any.
fn evict_index(
    index: &mut EvictionIndex,
    map: &mut FxHashMap<ImpKey, Touches>,
    expired: impl Fn(i64) -> bool,
) {
    while let Some(bucket) = index.first_entry() {
        if !expired(bucket_last(*bucket.key())) {
            break;
        }
        for key in bucket.remove() {
            if let Entry::Occupied(mut e) = map.entry(key) {
                if e.get_mut().evict(&expired) {
                    e.remove();
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum Kind {
    // Clicks sort first so a conversion in the same millisecond sees its click.
    Click,
    Conversion,
}

/// A click or conversion waiting for the watermark to reach its time.
#[derive(Debug, Clone, Copy)]
struct Pending {
    impression: Option<ImpKey>,
    campaign: Option<u32>,
    device: u8,
    country: [u8; 2],
    revenue_micros: i64,
}

/// Pending order: event time, kind, arrival sequence.
type PendingKey = (i64, Kind, u64);
/// Pending events per partition slot of the worker, each in pending order.
type PendingBySlot = BTreeMap<u32, BTreeMap<PendingKey, Pending>>;

/// Per-campaign ad windows (`rt`, `hourly`, `daily`) with the click and
/// conversion attribution joins (stage 1; [`AdsFinisher`] makes the points).
///
/// Points: `ads` with tags `campaign_id`, `country`, `device` (of the counted
/// event) and fields `impressions`, `clicks`, `clicks_unattributed`,
/// `conversions` (Int), `spend`, `revenue` (Float) and, when their divisor is
/// not zero, `ctr`, `cvr`, `cpa`, `roas` (Float), at the window start.
#[derive(Debug, Clone)]
pub struct AdsPipeline {
    sets: [Tumbling<Aggs>; 3],
    attribution_ms: i64,
    conversion_ms: i64,
    lateness_ms: i64,
    campaigns: Campaigns,
    impressions: FxHashMap<ImpKey, Touches>,
    impression_index: EvictionIndex,
    /// Attributed clicks per impression id.
    clicks: FxHashMap<ImpKey, Touches>,
    click_index: EvictionIndex,
    pending: PendingBySlot,
    seq: u64,
    last_wm: Watermark,
    /// Cold join state on disk, when a spill directory is set.
    spill: Option<Spill>,
}

/// A checkpoint of [`AdsPipeline`]. Campaigns are numbers into `campaigns`,
/// which holds the live names sorted, and every list is sorted, so the bytes
/// depend only on the logical state (not on the order names were interned).
/// `P` is a pending entry: (slot, key, state), or (key, state) in the
/// unslotted encoding of version 2.
#[derive(Serialize, Deserialize)]
struct AdsState<P = (u32, PendingKey, PendingState)> {
    version: u32,
    campaigns: Vec<String>,
    windows: Vec<WindowState>,
    impressions: Vec<TouchesState>,
    clicks: Vec<TouchesState>,
    pending: Vec<P>,
    seq: u64,
    last_wm: Watermark,
}

impl AdsState<(PendingKey, PendingState)> {
    /// Version 2's pending events had no slot: they wait for the combined
    /// watermark, as they did then.
    fn slotted(self) -> AdsState {
        AdsState {
            version: STATE_VERSION,
            campaigns: self.campaigns,
            windows: self.windows,
            impressions: self.impressions,
            clicks: self.clicks,
            pending: (self.pending.into_iter())
                .map(|(key, state)| (NO_SLOT, key, state))
                .collect(),
            seq: self.seq,
            last_wm: self.last_wm,
        }
    }
}

/// (window set, start, fired, dirty, rows of (campaign, device, country, aggregates)).
type WindowState = (u8, i64, bool, bool, Vec<(u32, u8, [u8; 2], Agg)>);
/// (id hash, [(time, campaign)]).
type TouchesState = (ImpKey, Vec<(i64, u32)>);
/// (id hash, campaign, device, country, revenue micros).
type PendingState = (Option<ImpKey>, Option<u32>, u8, [u8; 2], i64);

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
        AdsPipeline {
            sets: std::array::from_fn(|kind| Tumbling::new(kind, TIERS[kind])),
            attribution_ms: millis(config.attribution_window),
            conversion_ms: millis(config.conversion_window),
            lateness_ms: millis(config.allowed_lateness),
            campaigns: Campaigns::default(),
            impressions: FxHashMap::default(),
            impression_index: BTreeMap::new(),
            clicks: FxHashMap::default(),
            click_index: BTreeMap::new(),
            pending: BTreeMap::new(),
            seq: 0,
            last_wm: EventTime::MIN,
            spill: None,
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

    /// Touches held in spill run files (dead ones included until their run
    /// expires).
    pub fn spilled_records(&self) -> u64 {
        self.spill.as_ref().map_or(0, Spill::records)
    }

    /// Entries held by the joins: impression ids with impressions, impression
    /// ids with attributed clicks, and clicks and conversions awaiting the
    /// watermark.
    pub fn join_state_len(&self) -> usize {
        self.impressions.len()
            + self.clicks.len()
            + self.pending.values().map(BTreeMap::len).sum::<usize>()
    }

    /// Number of windows held (open or fired but still accepting late events).
    pub fn open_windows(&self) -> usize {
        self.sets.iter().map(Tumbling::len).sum()
    }

    /// Adds to the aggregates of every tier's window holding `ts`, unless that
    /// window was already dropped as of watermark `wm`.
    #[inline]
    fn count(&mut self, wm: i64, ts: i64, key: AggKey, f: impl Fn(&mut Agg)) {
        let horizon = wm.saturating_sub(self.lateness_ms);
        for set in &mut self.sets {
            if let Some(aggs) = set.change_at(ts, horizon) {
                f(aggs.entry(key).or_default());
            }
        }
    }

    /// Takes one accepted event of the partition in `slot`.
    #[inline]
    fn offer(&mut self, slot: u32, ev: &Event) {
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
            impression: ev.impression_id.as_deref().map(imp_key),
            campaign: ev.campaign_id.as_deref().map(|c| self.campaigns.intern(c)),
            device: ev.device.code(),
            country: ev.country.0,
            revenue_micros: to_micros(finite_or_zero(ev.revenue)),
        };
        let wm = self.last_wm.0;
        if ts <= wm {
            // Late: nothing at or before its time is still to come.
            self.decide(wm, ts, kind, p);
        } else {
            self.pending
                .entry(slot)
                .or_default()
                .insert((ts, kind, self.seq), p);
            self.seq = self.seq.wrapping_add(1);
        }
    }

    /// Decides, in pending order, the events of `slot` at or before `upto`,
    /// against `prev`, the watermark that decides which windows are dropped.
    fn decide_pending(&mut self, slot: u32, upto: i64, prev: i64) {
        while let Some(waiting) = self.pending.get_mut(&slot) {
            let Some(entry) = waiting.first_entry() else {
                self.pending.remove(&slot);
                break;
            };
            if entry.key().0 > upto {
                break;
            }
            let ((ts, kind, _), p) = entry.remove_entry();
            self.decide(prev, ts, kind, p);
        }
    }

    fn on_impression(&mut self, ev: &Event) {
        let ts = ev.timestamp.0;
        let wm = self.last_wm.0;
        let campaign = self.campaigns.intern_opt(ev.campaign_id.as_deref());
        let cost = to_micros(finite_or_zero(ev.cost));
        let key = agg_key(campaign, ev.device.code(), ev.country.0);
        self.count(wm, ts, key, |a| {
            a.impressions += 1;
            a.spend_micros = a.spend_micros.saturating_add(cost);
        });
        let Some(id) = ev.impression_id.as_deref() else {
            return;
        };
        // An impression already past its attribution horizon could never be
        // matched before eviction; keeping it would only leak.
        if self.impression_expired(ts, wm) {
            return;
        }
        let id = imp_key(id);
        self.unspill(Side::Impressions, id);
        let touch = Touch { time: ts, campaign };
        let added = match self.impressions.entry(id) {
            Entry::Occupied(mut e) => e.get_mut().add(touch, MAX_IMPRESSIONS_PER_ID),
            Entry::Vacant(e) => {
                e.insert(Touches::one(touch));
                true
            }
        };
        if added {
            self.impression_index
                .entry(index_bucket(ts))
                .or_default()
                .push(id);
        }
    }

    fn impression_expired(&self, time: i64, wm: i64) -> bool {
        wm > time
            .saturating_add(self.attribution_ms)
            .saturating_add(self.lateness_ms)
    }

    fn click_expired(&self, time: i64, wm: i64) -> bool {
        wm > time
            .saturating_add(self.conversion_ms)
            .saturating_add(self.lateness_ms)
    }

    /// Attributes a click or conversion and counts it; `wm` is the watermark
    /// that decides which windows are already dropped.
    fn decide(&mut self, wm: i64, ts: i64, kind: Kind, p: Pending) {
        match kind {
            Kind::Click => {
                let imp = p.impression.and_then(|id| {
                    self.latest(
                        Side::Impressions,
                        id,
                        ts.saturating_sub(self.attribution_ms),
                        ts,
                    )
                });
                let campaign = p
                    .campaign
                    .or(imp.map(|i| i.campaign))
                    .unwrap_or(UNKNOWN_CAMPAIGN_ID);
                let key = agg_key(campaign, p.device, p.country);
                match (imp, p.impression) {
                    (Some(_), Some(id)) => {
                        self.count(wm, ts, key, |a| a.clicks += 1);
                        self.remember_click(id, campaign, ts, wm);
                    }
                    _ => self.count(wm, ts, key, |a| a.clicks_unattributed += 1),
                }
            }
            Kind::Conversion => {
                let click = p.impression.and_then(|id| {
                    self.latest(Side::Clicks, id, ts.saturating_sub(self.conversion_ms), ts)
                });
                // Unattributed conversions are not reported.
                let Some(click) = click else {
                    return;
                };
                let campaign = p.campaign.unwrap_or(click.campaign);
                let key = agg_key(campaign, p.device, p.country);
                let revenue = p.revenue_micros;
                self.count(wm, ts, key, |a| {
                    a.conversions += 1;
                    a.revenue_micros = a.revenue_micros.saturating_add(revenue);
                });
            }
        }
    }

    fn remember_click(&mut self, id: ImpKey, campaign: u32, ts: i64, wm: i64) {
        let expired = self.click_expired(ts, wm);
        self.unspill(Side::Clicks, id);
        let touch = Touch { time: ts, campaign };
        let added = match self.clicks.entry(id) {
            Entry::Occupied(mut e) => e.get_mut().add(touch, MAX_CLICKS_PER_IMPRESSION),
            Entry::Vacant(_) if expired => false,
            Entry::Vacant(e) => {
                e.insert(Touches::one(touch));
                true
            }
        };
        if added {
            self.click_index
                .entry(index_bucket(ts))
                .or_default()
                .push(id);
        }
    }

    fn evict(&mut self, wm: i64) {
        let (attribution, conversion, lateness) =
            (self.attribution_ms, self.conversion_ms, self.lateness_ms);
        evict_index(&mut self.impression_index, &mut self.impressions, |t| {
            wm > t.saturating_add(attribution).saturating_add(lateness)
        });
        evict_index(&mut self.click_index, &mut self.clicks, |t| {
            wm > t.saturating_add(conversion).saturating_add(lateness)
        });
        self.spill_cold(wm);
    }

    /// How long a touch of `side` is kept past its time.
    fn horizon(&self, side: Side) -> i64 {
        let window = match side {
            Side::Impressions => self.attribution_ms,
            Side::Clicks => self.conversion_ms,
        };
        window.saturating_add(self.lateness_ms)
    }

    /// Whether a touch at `time` of `side` is still held at watermark `wm`:
    /// the rule of [`evict_index`], which drops whole seconds.
    fn held(horizon: i64, wm: i64) -> impl Fn(i64) -> bool {
        move |time| wm <= bucket_last(index_bucket(time)).saturating_add(horizon)
    }

    fn join(&self, side: Side) -> &FxHashMap<ImpKey, Touches> {
        match side {
            Side::Impressions => &self.impressions,
            Side::Clicks => &self.clicks,
        }
    }

    /// The latest touch of `id` on `side` at a time in `lo..=hi`, in memory
    /// or spilled.
    fn latest(&mut self, side: Side, id: ImpKey, lo: i64, hi: i64) -> Option<Touch> {
        if let Some(t) = self.join(side).get(&id) {
            return t.latest_in(lo, hi);
        }
        let held = Self::held(self.horizon(side), self.last_wm.0);
        let spill = self.spill.as_mut()?;
        spill
            .get(side, id, held, &mut self.campaigns)?
            .latest_in(lo, hi)
    }

    /// Takes a spilled `id` back into memory before a touch is added to it,
    /// so that an id lives in one place.
    fn unspill(&mut self, side: Side, id: ImpKey) {
        if self.spill.is_none() || self.join(side).contains_key(&id) {
            return;
        }
        let held = Self::held(self.horizon(side), self.last_wm.0);
        let Some(spill) = self.spill.as_mut() else {
            return;
        };
        let Some(touches) = spill.take(side, id, held, &mut self.campaigns) else {
            return;
        };
        let (map, index) = match side {
            Side::Impressions => (&mut self.impressions, &mut self.impression_index),
            Side::Clicks => (&mut self.clicks, &mut self.click_index),
        };
        for t in touches.as_slice() {
            index.entry(index_bucket(t.time)).or_default().push(id);
        }
        map.insert(id, touches);
    }

    /// Every [`SPILL_EVERY_MS`] of event time: drops the runs the watermark
    /// has expired, and moves the ids whose newest touch is older than the
    /// lateness horizon by [`SPILL_AFTER_MS`] into a run per side.
    fn spill_cold(&mut self, wm: i64) {
        let horizons = [Side::Impressions, Side::Clicks].map(|side| (side, self.horizon(side)));
        let Some(spill) = self.spill.as_mut() else {
            return;
        };
        if wm == i64::MAX || wm < spill.last_spill.saturating_add(SPILL_EVERY_MS) {
            return;
        }
        spill.last_spill = wm;
        let threshold = wm.saturating_sub(self.lateness_ms.saturating_add(SPILL_AFTER_MS));
        // The buckets whose every time is at or before the threshold.
        let drain_upto = threshold
            .saturating_sub(INDEX_BUCKET_MS - 1)
            .div_euclid(INDEX_BUCKET_MS);
        for (side, horizon) in horizons {
            let (map, index) = match side {
                Side::Impressions => (&mut self.impressions, &mut self.impression_index),
                Side::Clicks => (&mut self.clicks, &mut self.click_index),
            };
            let held = Self::held(horizon, wm);
            spill.expire(side, |newest| !held(newest));
            let mut cold: Vec<ImpKey> = (index.range(..=drain_upto))
                .flat_map(|(_, ids)| ids.iter().copied())
                .filter(|id| {
                    map.get(id)
                        .and_then(|t| t.as_slice().last())
                        .is_some_and(|newest| newest.time <= threshold)
                })
                .collect();
            cold.sort_unstable();
            cold.dedup();
            let entries: Vec<(ImpKey, &[Touch])> = (cold.iter())
                .filter_map(|id| Some((*id, map.get(id)?.as_slice())))
                .collect();
            if let Err(e) = spill.write(side, &entries, &self.campaigns) {
                // Kept in memory; tried again at the next spill.
                tracing::warn!(error = %e, "Spilling cold ads join state failed");
                continue;
            }
            for id in &cold {
                map.remove(id);
            }
            // Every id left in these buckets has a newer touch, indexed later.
            while index
                .first_key_value()
                .is_some_and(|(&b, _)| b <= drain_upto)
            {
                index.pop_first();
            }
        }
    }

    fn partial(campaigns: &Campaigns, window: WindowId, aggs: &Aggs) -> Partial {
        let rows = aggs
            .iter()
            .map(|(&key, a)| {
                let (campaign, device, country) = split_agg_key(key);
                let device = Device::from_code(device).unwrap_or(Device::Unknown);
                (
                    row_key([
                        campaigns.name(campaign),
                        Country(country).as_str(),
                        device.as_str(),
                    ]),
                    smallvec![
                        a.impressions,
                        a.clicks,
                        a.clicks_unattributed,
                        a.conversions,
                        a.spend_micros,
                        a.revenue_micros,
                    ],
                )
            })
            .collect();
        Partial::new(window, rows, None)
    }
}
/// Stage 2 of ads: sums the workers' per-(campaign, country, device) totals
/// and derives the ratios (absent when their divisor is 0).
#[derive(Debug, Clone, Default)]
pub struct AdsFinisher;

impl AdsFinisher {
    pub fn new(_config: AdsConfig) -> Self {
        AdsFinisher
    }
}

impl Finisher for AdsFinisher {
    fn finish(&self, merged: &Partial, out: &mut Vec<Point>) {
        let Some(&tier) = TIERS.get(merged.window.kind as usize) else {
            return;
        };
        let time = EventTime(merged.window.start);
        for (key, v) in &merged.rows {
            let (
                [campaign, country, device],
                [impressions, clicks, clicks_unattributed, conversions, spend, revenue],
            ) = (&key[..], &v[..])
            else {
                continue;
            };
            let (spend, revenue) = (from_micros(*spend), from_micros(*revenue));
            let mut fields = vec![
                ("impressions".to_string(), FieldValue::Int(*impressions)),
                ("clicks".to_string(), FieldValue::Int(*clicks)),
                (
                    "clicks_unattributed".to_string(),
                    FieldValue::Int(*clicks_unattributed),
                ),
                ("conversions".to_string(), FieldValue::Int(*conversions)),
                ("spend".to_string(), FieldValue::Float(spend)),
                ("revenue".to_string(), FieldValue::Float(revenue)),
            ];
            let ratios = [
                ("ctr", ratio(*clicks as f64, *impressions as f64)),
                ("cvr", ratio(*conversions as f64, *clicks as f64)),
                ("cpa", ratio(spend, *conversions as f64)),
                ("roas", ratio(revenue, spend)),
            ];
            for (name, v) in ratios {
                if let Some(v) = v {
                    fields.push((name.to_string(), FieldValue::Float(v)));
                }
            }
            out.push(Point::new(
                MEASUREMENT,
                tier,
                time,
                vec![
                    ("campaign_id".to_string(), campaign.to_string()),
                    ("country".to_string(), country.to_string()),
                    ("device".to_string(), device.to_string()),
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

    #[inline]
    fn on_event(&mut self, ev: &Event) {
        self.offer(NO_SLOT, ev);
    }

    fn on_partition_events(&mut self, slot: usize, events: &[&Event], watermarks: &[Watermark]) {
        let slot = u32::try_from(slot).unwrap_or(NO_SLOT);
        for (ev, wm) in events.iter().zip(watermarks) {
            self.offer(slot, ev);
            // Right after each event, as its partition's watermark moves:
            // what waits is decided by the partition's own order alone, not
            // by how far the other partitions happen to have been read.
            let decided_before = self.last_wm.0;
            self.decide_pending(slot, wm.0, decided_before);
        }
    }

    fn on_watermark(&mut self, wm: Watermark, out: &mut Vec<Partial>) {
        let prev = self.last_wm.0;
        let wm = self.last_wm.max(wm).0;
        // Decided in event-time order against the previous watermark: every
        // pending event is later than it, so its windows were still open then
        // (even if this watermark jumps past their end), and the outcome is the
        // same as with any number of smaller steps (see the module docs).
        let mut next = self.pending.keys().next().copied();
        while let Some(slot) = next {
            self.decide_pending(slot, wm, prev);
            next = (self.pending.range((Excluded(slot), Unbounded)).next()).map(|(&s, _)| s);
        }
        self.last_wm = EventTime(wm);
        let lateness = self.lateness_ms;
        let campaigns = &self.campaigns;
        for set in &mut self.sets {
            set.fire(wm, lateness, |id, aggs| {
                out.push(Self::partial(campaigns, id, aggs))
            });
        }
        self.evict(wm);
    }

    fn early(&self, out: &mut Vec<Partial>) {
        // Early results are per minute only: the dashboard's live funnel.
        self.sets[0].early(|id, aggs| out.push(Self::partial(&self.campaigns, id, aggs)));
    }

    fn snapshot(&self) -> Result<Vec<u8>, ProcessorError> {
        // Number the campaigns still referenced in name order.
        let mut used = vec![false; self.campaigns.len()];
        let mut mark = |c: u32| {
            if let Some(u) = used.get_mut(c as usize) {
                *u = true;
            }
        };
        for set in &self.sets {
            for (_, w) in set.iter() {
                w.state.keys().for_each(|&k| mark(split_agg_key(k).0));
            }
        }
        for touches in self.impressions.values().chain(self.clicks.values()) {
            touches.as_slice().iter().for_each(|t| mark(t.campaign));
        }
        for p in self.pending.values().flat_map(BTreeMap::values) {
            p.campaign.into_iter().for_each(&mut mark);
        }
        let mut live: Vec<u32> = (0..self.campaigns.len() as u32)
            .filter(|&c| used[c as usize])
            .collect();
        live.sort_unstable_by(|&a, &b| self.campaigns.name(a).cmp(self.campaigns.name(b)));
        let mut number = vec![0u32; self.campaigns.len()];
        for (n, &c) in live.iter().enumerate() {
            number[c as usize] = n as u32;
        }
        let num = |c: u32| number.get(c as usize).copied().unwrap_or(0);
        let touches = |map: &FxHashMap<ImpKey, Touches>| {
            let mut v: Vec<TouchesState> = map
                .iter()
                .map(|(&id, t)| {
                    let list = t.as_slice().iter().map(|t| (t.time, num(t.campaign)));
                    (id, list.collect())
                })
                .collect();
            v.sort_unstable_by_key(|e| e.0);
            v
        };
        let mut windows = Vec::new();
        for (i, set) in self.sets.iter().enumerate() {
            for (start, w) in set.iter() {
                let mut rows: Vec<(u32, u8, [u8; 2], Agg)> = w
                    .state
                    .iter()
                    .map(|(&k, a)| {
                        let (c, device, country) = split_agg_key(k);
                        (num(c), device, country, a.clone())
                    })
                    .collect();
                rows.sort_unstable_by_key(|r| (r.0, r.1, r.2));
                windows.push((i as u8, start, w.fired, w.dirty, rows));
            }
        }
        let state = AdsState {
            version: STATE_VERSION,
            campaigns: live
                .iter()
                .map(|&c| self.campaigns.name(c).to_string())
                .collect(),
            windows,
            impressions: touches(&self.impressions),
            clicks: touches(&self.clicks),
            pending: (self.pending.iter())
                .flat_map(|(&slot, waiting)| waiting.iter().map(move |(k, p)| (slot, k, p)))
                .map(|(slot, k, p)| {
                    let state = (
                        p.impression,
                        p.campaign.map(num),
                        p.device,
                        p.country,
                        p.revenue_micros,
                    );
                    (slot, *k, state)
                })
                .collect(),
            seq: self.seq,
            last_wm: self.last_wm,
        };
        let spilled = match &self.spill {
            Some(spill) => spill.state()?,
            None => SpillState::default(),
        };
        bincode::serialize(&(state, spilled))
            .map_err(|e| ProcessorError::Snapshot(format!("ads state: {e}")))
    }

    fn spill_to(&mut self, dir: &Path, keys: Option<Arc<KeyRing>>) -> Result<(), ProcessorError> {
        self.spill = Some(Spill::new(dir, keys)?);
        Ok(())
    }

    fn checkpoint_saved(&mut self) {
        if let Some(spill) = &mut self.spill {
            spill.checkpoint_saved();
        }
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ProcessorError> {
        let corrupt =
            |what: String| ProcessorError::CorruptCheckpoint(format!("ads state: {what}"));
        let version: u32 = bincode::deserialize(state).map_err(|e| corrupt(e.to_string()))?;
        let (state, spilled): (AdsState, SpillState) = match version {
            STATE_VERSION => bincode::deserialize(state).map_err(|e| corrupt(e.to_string()))?,
            STATE_VERSION_UNSPILLED => (
                bincode::deserialize(state).map_err(|e| corrupt(e.to_string()))?,
                SpillState::default(),
            ),
            STATE_VERSION_UNSLOTTED => (
                bincode::deserialize::<AdsState<(PendingKey, PendingState)>>(state)
                    .map_err(|e| corrupt(e.to_string()))?
                    .slotted(),
                SpillState::default(),
            ),
            other => {
                return Err(corrupt(format!(
                    "encoding version {other} (this build reads {STATE_VERSION_UNSLOTTED} to {STATE_VERSION})"
                )))
            }
        };
        let mut fresh = AdsPipeline::new(self.config());
        fresh.spill = self.spill.as_ref().map(Spill::empty_like).transpose()?;
        match &mut fresh.spill {
            Some(spill) => spill.restore(spilled)?,
            None if spilled != SpillState::default() => {
                return Err(ProcessorError::Setup(
                    "the checkpoint's ads state is partly spilled to disk, and this processor \
                     has no spill directory (it is kept beside the checkpoint of `tidemark run`)"
                        .into(),
                ))
            }
            None => {}
        }
        let ids: Vec<u32> = state
            .campaigns
            .iter()
            .map(|name| fresh.campaigns.intern(name))
            .collect();
        let id = |n: u32| {
            ids.get(n as usize)
                .copied()
                .ok_or_else(|| corrupt(format!("campaign number {n}")))
        };
        for (i, start, fired, dirty, rows) in state.windows {
            let mut aggs = FxHashMap::default();
            for (c, device, country, agg) in rows {
                aggs.insert(agg_key(id(c)?, device, country), agg);
            }
            let set = fresh
                .sets
                .get_mut(i as usize)
                .ok_or_else(|| corrupt(format!("window set {i}")))?;
            set.insert(
                start,
                Slot {
                    state: aggs,
                    fired,
                    dirty,
                },
            );
        }
        let joins = [
            (
                state.impressions,
                &mut fresh.impressions,
                &mut fresh.impression_index,
            ),
            (state.clicks, &mut fresh.clicks, &mut fresh.click_index),
        ];
        for (entries, map, index) in joins {
            for (key, list) in entries {
                let mut touches: Option<Touches> = None;
                for (time, c) in list {
                    let touch = Touch {
                        time,
                        campaign: id(c)?,
                    };
                    let added = match &mut touches {
                        Some(t) => t.add(touch, usize::MAX),
                        None => {
                            touches = Some(Touches::one(touch));
                            true
                        }
                    };
                    if added {
                        index.entry(index_bucket(time)).or_default().push(key);
                    }
                }
                if let Some(t) = touches {
                    map.insert(key, t);
                }
            }
        }
        for (slot, key, (impression, campaign, device, country, revenue_micros)) in state.pending {
            let campaign = campaign.map(id).transpose()?;
            fresh.pending.entry(slot).or_default().insert(
                key,
                Pending {
                    impression,
                    campaign,
                    device,
                    country,
                    revenue_micros,
                },
            );
        }
        fresh.seq = state.seq;
        fresh.last_wm = state.last_wm;
        *self = fresh;
        Ok(())
    }
}
/// The ads pipeline in the [registry](crate::registry), with its settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct AdsSpec(pub AdsConfig);

impl PipelineSpec for AdsSpec {
    fn name(&self) -> &'static str {
        AdsPipeline::NAME
    }

    fn measurements(&self) -> &'static [Measurement] {
        &[Measurement {
            name: MEASUREMENT,
            tiers: &TIERS,
        }]
    }

    /// A conversion's click, and that click's impression.
    fn reach(&self) -> StateReach {
        StateReach {
            back: self.0.attribution_window + self.0.conversion_window,
            ahead: Duration::ZERO,
        }
    }

    fn stage1(&self, allowed_lateness: Duration) -> Box<dyn Pipeline> {
        Box::new(AdsPipeline::new(AdsConfig {
            allowed_lateness,
            ..self.0
        }))
    }

    fn stage2(&self, _allowed_lateness: Duration) -> Box<dyn Finisher> {
        Box::new(AdsFinisher)
    }
}

#[cfg(test)]
mod tests {
    use super::join::UNKNOWN_CAMPAIGN;
    use super::*;
    use crate::combiner::Combiner;
    use crate::solo::Solo;
    use crate::traffic::DEFAULT_ALLOWED_LATENESS;

    const MIN: i64 = 60_000;
    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 86_400_000;

    fn solo() -> Solo<AdsPipeline> {
        Solo::new(
            AdsPipeline::default(),
            AdsFinisher,
            DEFAULT_ALLOWED_LATENESS,
        )
    }

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
        campaign_point(points, "c1", tier, time)
    }

    fn campaign_point<'a>(
        points: &'a [Point],
        campaign: &str,
        tier: Tier,
        time: i64,
    ) -> Option<&'a Point> {
        points.iter().rev().find(|p| {
            p.measurement == "ads"
                && p.tier == tier
                && p.time == EventTime(time)
                && p.tag("campaign_id") == Some(campaign)
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

    fn feed(p: &mut Solo<AdsPipeline>, events: &[Event], out: &mut Vec<Point>) {
        for e in events {
            p.on_event(e, out);
        }
    }

    /// The last value of every point identity (what the store keeps).
    type Finals = BTreeMap<(Tier, EventTime, Vec<(String, String)>), Vec<(String, FieldValue)>>;

    fn finals(points: &[Point]) -> Finals {
        points
            .iter()
            .map(|p| ((p.tier, p.time, p.tags.clone()), p.fields.clone()))
            .collect()
    }

    #[test]
    fn clicks_are_attributed_within_the_attribution_window_only() {
        let mut p = solo();
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
        // No impressions in that minute: spend 0, no ctr.
        assert_eq!(float(&out, Tier::Rt, 30 * MIN, "spend"), Some(0.0));
        assert_eq!(float(&out, Tier::Rt, 30 * MIN, "ctr"), None);
        assert_eq!(int(&out, Tier::Hourly, 0, "impressions"), Some(2));
        assert_eq!(int(&out, Tier::Hourly, 0, "clicks"), Some(1));
        assert_eq!(int(&out, Tier::Hourly, 0, "clicks_unattributed"), Some(2));
        assert_eq!(float(&out, Tier::Hourly, 0, "ctr"), Some(0.5));
        // A click before its impression's time is not attributed either.
        let mut p = solo();
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
        let mut p = solo();
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
        // No clicks that day: no cvr; no impressions: no ctr; spend is 0
        // (always present): no roas.
        let day1 = point(&out, Tier::Daily, DAY).unwrap();
        assert_eq!(day1.field("spend"), Some(FieldValue::Float(0.0)));
        assert_eq!(day1.field("cvr"), None);
        assert_eq!(day1.field("roas"), None);
        assert_eq!(day1.field("ctr"), None);
        assert_eq!(day1.field("cpa"), Some(FieldValue::Float(0.0)));
        // Day 0: 2 impressions, 2 clicks, no conversions.
        let day0 = point(&out, Tier::Daily, 0).unwrap();
        assert_eq!(day0.field("clicks"), Some(FieldValue::Int(2)));
        assert_eq!(day0.field("spend"), Some(FieldValue::Float(4.0)));
        assert_eq!(day0.field("revenue"), Some(FieldValue::Float(0.0)));
        assert_eq!(day0.field("ctr"), Some(FieldValue::Float(1.0)));
        assert_eq!(day0.field("cvr"), Some(FieldValue::Float(0.0)));
        assert_eq!(day0.field("cpa"), None);
        assert_eq!(day0.field("roas"), Some(FieldValue::Float(0.0)));
    }

    #[test]
    fn ratios_in_one_window() {
        let mut p = solo();
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
        let mut p = solo();
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
        let mut p = solo();
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
    fn a_pending_click_is_decided_by_its_partition_not_by_the_others() {
        // Partition 0 in arrival order: a click, a later impression that
        // moves its watermark past the click, then the click's own
        // impression (late, within the lateness). Whether the worker's other
        // partition is ahead or behind must not change the outcome.
        let run = |other_partition_ahead: bool| {
            let mut p = AdsPipeline::default();
            let mut out = Vec::new();
            let (c, later, own) = (
                click("i1", 10_000),
                impression("i2", 20_000, 1.0),
                impression("i1", 9_000, 1.0),
            );
            p.on_partition_events(0, &[&c], &[EventTime(5_000)]);
            p.on_partition_events(0, &[&later], &[EventTime(15_000)]);
            let combined = if other_partition_ahead { 12_000 } else { 0 };
            p.on_watermark(EventTime(combined), &mut out);
            p.on_partition_events(0, &[&own], &[EventTime(15_000)]);
            p.on_watermark(EventTime(2 * MIN), &mut out);
            let mut points = Vec::new();
            for partial in &out {
                AdsFinisher.finish(partial, &mut points);
            }
            points
        };
        let (ahead, behind) = (run(true), run(false));
        assert_eq!(ahead, behind);
        assert_eq!(int(&ahead, Tier::Rt, 0, "clicks_unattributed"), Some(1));
        assert_eq!(int(&ahead, Tier::Rt, 0, "clicks"), Some(0));
    }

    #[test]
    fn all_tiers_are_emitted_and_early_reports_open_rt_windows() {
        let mut p = solo();
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
        let mut p = solo();
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
        let mut p = solo();
        let mut out = Vec::new();
        feed(
            &mut p,
            &[impression("i1", 1_000, 1.0), click("i1", 2_000)],
            &mut out,
        );
        p.on_watermark(EventTime(10 * DAY), &mut out);
        assert_eq!(int(&out, Tier::Rt, 0, "clicks"), Some(1));
        assert_eq!(int(&out, Tier::Daily, 0, "clicks"), Some(1));
        assert_eq!(p.pipeline.join_state_len(), 0);
        assert_eq!(p.pipeline.open_windows(), 0);
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

    fn run(p: &mut Solo<AdsPipeline>, s: &[(Event, Option<i64>)], out: &mut Vec<Point>) {
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
        let mut whole = solo();
        let mut a = Vec::new();
        run(&mut whole, &s, &mut a);
        whole.on_watermark(EventTime(3 * DAY), &mut a);

        let (head, tail) = s.split_at(s.len() / 2);
        let mut first = solo();
        let mut b = Vec::new();
        run(&mut first, head, &mut b);
        let snap = first.snapshot();
        let mut second = solo();
        second.restore(&snap).unwrap();
        assert_eq!(second.snapshot(), snap);
        run(&mut second, tail, &mut b);
        second.on_watermark(EventTime(3 * DAY), &mut b);
        assert_eq!(a, b);
        assert!(int(&a, Tier::Daily, 0, "conversions").unwrap() > 0);
        assert!(second.pipeline.restore(b"garbage").is_err());
    }

    #[test]
    fn snapshot_does_not_depend_on_campaign_interning_order() {
        // The same state reached with campaigns first seen in another order.
        let events = |order: [&str; 3]| -> Vec<Event> {
            let mut evs: Vec<Event> = order
                .iter()
                .map(|c| ad(EventType::AdImpression, &format!("x-{c}"), c, 5_000))
                .collect();
            evs.push(ad(EventType::AdClick, "x-b", "b", 6_000));
            evs
        };
        let mut snaps = Vec::new();
        for order in [["a", "b", "c"], ["c", "a", "b"]] {
            let mut p = AdsPipeline::default();
            for e in events(order) {
                p.on_event(&e);
            }
            snaps.push(p.snapshot().unwrap());
        }
        assert_eq!(snaps[0], snaps[1]);
        let mut restored = AdsPipeline::default();
        restored.restore(&snaps[0]).unwrap();
        assert_eq!(restored.snapshot().unwrap(), snaps[0]);
        assert_eq!(restored.join_state_len(), 4);
    }

    #[test]
    fn eviction_bounds_the_join_state() {
        let mut p = solo();
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
        assert!(p.pipeline.join_state_len() > 1_000);
        // Two days later: every impression and click is past its horizon.
        p.on_watermark(EventTime(2 * DAY), &mut out);
        assert_eq!(p.pipeline.join_state_len(), 0);
        assert!(p.pipeline.impression_index.is_empty() && p.pipeline.click_index.is_empty());
        // Impressions already past the horizon are counted but not kept.
        out.clear();
        p.on_event(&impression("old", 2 * DAY - HOUR, 1.0), &mut out);
        assert_eq!(p.pipeline.join_state_len(), 0);
        // Live state only holds the last ~31 minutes of impressions.
        let mut p = solo();
        for i in 0..5_000i64 {
            let t = i * MIN;
            p.on_event(&impression(&format!("j{i}"), t, 1.0), &mut out);
            p.on_watermark(EventTime(t), &mut out);
        }
        assert!(
            p.pipeline.join_state_len() <= 32,
            "{}",
            p.pipeline.join_state_len()
        );
        assert!(p.pipeline.open_windows() <= 2 + 2 + 2);
    }

    #[test]
    fn repeated_impression_ids_and_clicks_are_bounded() {
        let mut p = AdsPipeline::default();
        for i in 0..100 {
            p.on_event(&impression("same", 1_000 + i, 1.0));
            p.on_event(&click("same", 2_000 + i));
        }
        // A repeat at a time already held adds nothing.
        p.on_event(&impression("same", 1_099, 1.0));
        p.on_watermark(EventTime(3_000), &mut Vec::new());
        let held =
            |m: &FxHashMap<ImpKey, Touches>| m.values().map(|t| t.as_slice().len()).sum::<usize>();
        assert_eq!(held(&p.impressions), MAX_IMPRESSIONS_PER_ID);
        assert_eq!(held(&p.clicks), MAX_CLICKS_PER_IMPRESSION);
        let newest = p.impressions.values().next().unwrap().as_slice();
        assert_eq!(newest.first().map(|t| t.time), Some(1_084));
        // An older one than all those held is not added to a full set.
        p.on_event(&impression("same", 1_050, 1.0));
        assert_eq!(held(&p.impressions), MAX_IMPRESSIONS_PER_ID);
        p.on_watermark(EventTime(3 * DAY), &mut Vec::new());
        assert_eq!(p.join_state_len(), 0);
        assert!(p.impression_index.is_empty() && p.click_index.is_empty());
    }

    /// Impression `x` twice, 2 h apart, and a click 1 min after the second:
    /// whether the first was already evicted when the second arrived must not
    /// matter.
    #[test]
    fn a_reused_impression_id_attributes_by_time_not_by_eviction() {
        let first = Event {
            campaign_id: Some("old".into()),
            ..impression("x", 0, 1.0)
        };
        let second = impression("x", 2 * HOUR, 1.0);
        let clicked = Event {
            campaign_id: None,
            ..click("x", 2 * HOUR + MIN)
        };
        let mut results = Vec::new();
        for evict_between in [false, true] {
            let mut p = solo();
            let mut out = Vec::new();
            p.on_event(&first, &mut out);
            if evict_between {
                p.on_watermark(EventTime(HOUR), &mut out);
                assert_eq!(p.pipeline.join_state_len(), 0);
            }
            p.on_event(&second, &mut out);
            p.on_event(&clicked, &mut out);
            p.on_watermark(EventTime(DAY), &mut out);
            // Attributed to the second impression, with its campaign.
            assert_eq!(int(&out, Tier::Rt, 2 * HOUR + MIN, "clicks"), Some(1));
            results.push(finals(&out));
        }
        assert_eq!(results[0], results[1]);
    }

    /// Out-of-orderness of [`mixed_stream`].
    const OOO: i64 = 5_000;

    /// A deterministic stream over `users` users: impressions (every 5th
    /// reusing an earlier id at another time), clicks and conversions (some
    /// without a campaign), in arrival order. Times are out of order by less
    /// than [`OOO`], so a watermark of (newest time seen - OOO) never passes
    /// an event still to come, except for a few clicks arriving 50 s late
    /// (within the 60 s lateness) on impressions of their own.
    fn mixed_stream(users: u64, per_user: u64) -> Vec<Event> {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n) as i64
        };
        // (arrival key, event)
        let mut evs: Vec<(i64, Event)> = Vec::new();
        for u in 0..users {
            for j in 0..per_user {
                let t = rnd(3 * HOUR as u64);
                let id = if j % 5 == 4 {
                    format!("imp-{u}-{}", j - 4)
                } else {
                    format!("imp-{u}-{j}")
                };
                let campaign = format!("c{}", (u + j) % 4);
                let base = Event {
                    user_id: format!("user{u}"),
                    device: Device::ALL[(u % 3) as usize],
                    country: Country(if u % 2 == 0 { *b"DE" } else { *b"US" }),
                    ..ad(EventType::AdImpression, &id, &campaign, t)
                };
                let imp = Event {
                    cost: Some(0.01 * (1 + rnd(100)) as f64),
                    ..base.clone()
                };
                evs.push((t + rnd(OOO as u64), imp));
                if rnd(3) == 0 {
                    let tc = t + rnd(40 * MIN as u64);
                    let click = Event {
                        event_id: format!("k-{u}-{j}"),
                        event_type: EventType::AdClick,
                        timestamp: EventTime(tc),
                        campaign_id: (rnd(4) != 0).then(|| campaign.clone()),
                        ..base.clone()
                    };
                    evs.push((tc + rnd(OOO as u64), click));
                    if rnd(2) == 0 {
                        let tv = tc + rnd((DAY + HOUR) as u64);
                        let conversion = Event {
                            event_id: format!("v-{u}-{j}"),
                            event_type: EventType::AdConversion,
                            timestamp: EventTime(tv),
                            campaign_id: (rnd(3) != 0).then(|| campaign.clone()),
                            revenue: Some(0.5 * rnd(20) as f64),
                            ..base.clone()
                        };
                        evs.push((tv + rnd(OOO as u64), conversion));
                    }
                }
                if j % 7 == 3 {
                    // A late click on an impression of its own.
                    let id = format!("late-{u}-{j}");
                    let imp = Event {
                        impression_id: Some(id.clone()),
                        cost: Some(0.02),
                        ..base.clone()
                    };
                    evs.push((t + rnd(OOO as u64), imp));
                    let tc = t + 10_000;
                    let click = Event {
                        event_id: format!("lk-{u}-{j}"),
                        event_type: EventType::AdClick,
                        timestamp: EventTime(tc),
                        impression_id: Some(id),
                        ..base.clone()
                    };
                    evs.push((tc + 50_000 + rnd(OOO as u64), click));
                }
            }
        }
        evs.sort_by_key(|(k, _)| *k);
        evs.into_iter().map(|(_, e)| e).collect()
    }

    /// Feeds `events` to one pipeline, advancing the watermark to (newest
    /// time seen - OOO) after every `every` events, in `steps` equal steps;
    /// then jumps to the end. The final value of every point.
    fn drive(events: &[Event], every: usize, steps: i64) -> Finals {
        let mut p = solo();
        let mut out = Vec::new();
        let (mut newest, mut wm) = (i64::MIN, i64::MIN);
        for (n, e) in events.iter().enumerate() {
            p.on_event(e, &mut out);
            newest = newest.max(e.timestamp.0);
            let target = newest - OOO;
            if (n + 1) % every != 0 || target <= wm {
                continue;
            }
            let from = if wm == i64::MIN { target - HOUR } else { wm };
            for k in 1..=steps {
                p.on_watermark(EventTime(from + (target - from) * k / steps), &mut out);
            }
            wm = target;
        }
        p.on_watermark(EventTime(4 * DAY), &mut out);
        finals(&out)
    }

    #[test]
    fn final_values_do_not_depend_on_watermark_steps_or_batches() {
        let events = mixed_stream(40, 25);
        let reference = drive(&events, 1, 1);
        // The stream exercises every kind of outcome.
        let sum = |field: &str| -> i64 {
            reference
                .iter()
                .filter(|((tier, _, _), _)| *tier == Tier::Daily)
                .flat_map(|(_, fields)| fields.iter())
                .filter(|(k, _)| k == field)
                .map(|(_, v)| v.as_f64() as i64)
                .sum()
        };
        assert!(sum("impressions") > 1_000, "{}", sum("impressions"));
        assert!(sum("clicks") > 100 && sum("clicks_unattributed") > 10);
        assert!(sum("conversions") > 50, "{}", sum("conversions"));
        for (every, steps) in [(1, 7), (13, 1), (13, 50), (250, 3), (usize::MAX, 1)] {
            assert!(
                drive(&events, every, steps) == reference,
                "watermark every {every} events in {steps} steps"
            );
        }
    }

    fn advance(
        workers: &mut [AdsPipeline],
        combiner: &mut Combiner,
        wm: EventTime,
        out: &mut Vec<Point>,
    ) {
        let mut partials = Vec::new();
        for (w, p) in workers.iter_mut().enumerate() {
            p.on_watermark(wm, &mut partials);
            for mut partial in partials.drain(..) {
                partial.window.pipeline = 0;
                combiner.on_partial(w, partial).unwrap();
            }
            combiner.on_watermark(w, wm, out);
        }
    }

    #[test]
    fn two_workers_merged_equal_one_pipeline() {
        let events = mixed_stream(40, 25);
        let reference = drive(&events, 1, 1);
        let mut workers = [AdsPipeline::default(), AdsPipeline::default()];
        let mut combiner = Combiner::new(vec![Box::new(AdsFinisher)], 2, DEFAULT_ALLOWED_LATENESS);
        let mut out = Vec::new();
        let mut newest = i64::MIN;
        let mut split = [0; 2];
        for (n, e) in events.iter().enumerate() {
            // Users (and so their impression ids) split by parity.
            let w = usize::from(e.user_id.as_bytes().last().copied().unwrap_or(0) % 2);
            split[w] += 1;
            workers[w].on_event(e);
            newest = newest.max(e.timestamp.0);
            if n % 17 == 16 {
                advance(
                    &mut workers,
                    &mut combiner,
                    EventTime(newest - OOO),
                    &mut out,
                );
            }
        }
        advance(&mut workers, &mut combiner, EventTime(4 * DAY), &mut out);
        assert!(split[0] > 500 && split[1] > 500, "{split:?}");
        assert!(finals(&out) == reference);
    }

    #[test]
    fn other_events_and_extreme_times_do_not_panic() {
        let mut p = solo();
        let mut out = Vec::new();
        p.on_event(&Event::default(), &mut out);
        assert_eq!(p.pipeline.join_state_len() + p.pipeline.open_windows(), 0);
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

    /// Synthetic ad traffic: `n` events over one hour of event time, 500
    /// campaigns, UUID-sized impression ids, a click on every 10th impression
    /// (20 s later) and a conversion on every 4th click (5 min later).
    fn bench_events(n: usize) -> Vec<Event> {
        const COUNTRIES: [&[u8; 2]; 8] = [b"DE", b"US", b"FR", b"GB", b"BR", b"IN", b"JP", b"ES"];
        let step = HOUR / n as i64;
        let mut evs = Vec::with_capacity(n + n / 8);
        let mut i = 0usize;
        while evs.len() < n {
            let t = i as i64 * step;
            let imp = format!(
                "{:08x}-{:04x}-4{:03x}-a000-{:012x}",
                i,
                i % 65_536,
                i % 4096,
                i * 7_919
            );
            let base = Event {
                event_id: format!("e{i}"),
                event_type: EventType::AdImpression,
                user_id: format!("u{}", i % 100_000),
                timestamp: EventTime(t),
                campaign_id: Some(format!("campaign-{}", i % 500)),
                impression_id: Some(imp),
                device: Device::ALL[i % 4],
                country: Country(*COUNTRIES[i % 8]),
                cost: Some(0.0125),
                ..Event::default()
            };
            // A click on every 10th impression, a conversion on every 4th click.
            let (click, conversion) = match i % 40 {
                0 => (true, true),
                10 | 20 | 30 => (true, false),
                _ => (false, false),
            };
            if click {
                evs.push(Event {
                    event_id: format!("k{i}"),
                    event_type: EventType::AdClick,
                    timestamp: EventTime(t + 20_000),
                    cost: None,
                    ..base.clone()
                });
            }
            if conversion {
                evs.push(Event {
                    event_id: format!("c{i}"),
                    event_type: EventType::AdConversion,
                    timestamp: EventTime(t + 300_000),
                    cost: None,
                    revenue: Some(3.5),
                    ..base.clone()
                });
            }
            evs.push(base);
            i += 1;
        }
        evs.truncate(n);
        evs.sort_by_key(|e| e.timestamp);
        evs
    }

    /// `cargo test --release -p tidemark-processor --lib ads -- --ignored --nocapture`
    #[test]
    #[ignore = "micro-benchmark"]
    fn bench_on_event() {
        use std::time::Instant;
        let n = 1_000_000;
        let evs = bench_events(n);
        let mut best = f64::MAX;
        let mut partials = 0;
        for _ in 0..3 {
            let mut p = AdsPipeline::default();
            let mut out = Vec::new();
            let start = Instant::now();
            for (k, e) in evs.iter().enumerate() {
                p.on_event(e);
                if k % 1_000 == 999 {
                    p.on_watermark(EventTime(e.timestamp.0 - 2_000), &mut out);
                    partials += out.len();
                    out.clear();
                }
            }
            p.on_watermark(EventTime::MAX, &mut out);
            best = best.min(start.elapsed().as_secs_f64());
            partials += out.len();
        }
        let other: Vec<Event> = (0..n)
            .map(|i| Event {
                event_type: EventType::View,
                timestamp: EventTime(i as i64),
                ..Event::default()
            })
            .collect();
        let mut p = AdsPipeline::default();
        let start = Instant::now();
        for e in &other {
            p.on_event(std::hint::black_box(e));
        }
        let skip = start.elapsed().as_secs_f64();
        println!(
            "ads on_event: {:.2} M ad events/s ({:.0} ns/event, {partials} partials); \
             non-ad: {:.1} M events/s; join entry {} bytes",
            n as f64 / best / 1e6,
            best * 1e9 / n as f64,
            n as f64 / skip / 1e6,
            std::mem::size_of::<(ImpKey, Touches)>()
        );
    }

    /// A workload over three hours of event time whose clicks and
    /// conversions reach back past the spill horizon, onto repeated ids too.
    fn spill_workload() -> Vec<(Event, Option<i64>)> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let mut out = Vec::new();
        for step in 0..3 * 60 * 6i64 {
            let now = step * 10_000;
            for _ in 0..6 {
                let at = now + next(10_000) as i64;
                // A few ids repeat, hours apart.
                let id = format!("i{}", next(400 + step as u64 * 4));
                let back = |n: u64| at - n as i64;
                match next(10) {
                    0..=5 => out.push((impression(&id, at, 0.01), None)),
                    6..=7 => out.push((click(&id, back(next(40 * MIN as u64))), None)),
                    _ => out.push((conversion(&id, back(next(2 * HOUR as u64)), 2.0), None)),
                }
            }
            out.push((impression("tick", now, 0.0), Some(now)));
        }
        out
    }

    #[test]
    fn spilling_changes_no_outcome_across_a_restore() {
        let dir = tempfile::tempdir().unwrap();
        let workload = spill_workload();
        let mut plain = solo();
        let mut spilling = solo();
        spilling.pipeline.spill_to(dir.path(), None).unwrap();
        let (mut want, mut got) = (Vec::new(), Vec::new());
        let mut most_spilled = 0;
        for (i, (ev, wm)) in workload.iter().enumerate() {
            plain.on_event(ev, &mut want);
            spilling.on_event(ev, &mut got);
            if let Some(wm) = wm {
                plain.on_watermark(EventTime(*wm), &mut want);
                spilling.on_watermark(EventTime(*wm), &mut got);
                most_spilled = most_spilled.max(spilling.pipeline.spilled_records());
            }
            if i == workload.len() / 2 {
                // A checkpoint, a durable save, and a new process from it.
                let state = spilling.snapshot();
                spilling.pipeline.checkpoint_saved();
                let mut restored = solo();
                restored.pipeline.spill_to(dir.path(), None).unwrap();
                restored.restore(&state).unwrap();
                spilling = restored;
            }
        }
        plain.on_watermark(EventTime(4 * HOUR), &mut want);
        spilling.on_watermark(EventTime(4 * HOUR), &mut got);
        assert!(most_spilled > 500, "{most_spilled} records spilled");
        assert!(
            spilling.pipeline.impressions.len() * 4 < plain.pipeline.impressions.len()
                || plain.pipeline.impressions.is_empty()
        );
        let (want, got) = (finals(&want), finals(&got));
        assert!(want.values().any(|f| f
            .iter()
            .any(|(n, v)| n == "conversions" && *v != FieldValue::Int(0))));
        assert_eq!(got, want);
    }

    #[test]
    fn a_spilled_checkpoint_needs_its_spill_directory() {
        let dir = tempfile::tempdir().unwrap();
        let mut spilling = solo();
        spilling.pipeline.spill_to(dir.path(), None).unwrap();
        let mut out = Vec::new();
        for (ev, wm) in spill_workload().iter().take(2_000) {
            spilling.on_event(ev, &mut out);
            if let Some(wm) = wm {
                spilling.on_watermark(EventTime(*wm), &mut out);
            }
        }
        assert!(spilling.pipeline.spilled_records() > 0);
        let state = spilling.pipeline.snapshot().unwrap();
        let err = AdsPipeline::default()
            .restore(&state)
            .unwrap_err()
            .to_string();
        assert!(err.contains("spill directory"), "{err}");
    }
}
