//! The `patterns` pipeline: complex event patterns per user (CEP), decided
//! in event time and written as `detections` per minute.
//!
//! A [`Pattern`] is one step repeated: events of one type by one user
//! (optionally per value of a field, e.g. per campaign), of which `at_least`
//! fall within `within`; or, with `distinct`, `at_least` distinct values of
//! a field among them. An optional absence step (`unless`) leaves out every
//! event that has an event of another type with the same field value by the
//! same user within `within` before it (a click whose impression was seen).
//!
//! **What a match is.** Take one user's qualifying events of one group in
//! order of (event time, event id hash). The condition holds at an event
//! `e` when the events up to `e` in the `within` before it (both ends
//! included) reach the count. `e` is a match when the condition holds at
//! `e` and did not hold at the previous event, or that one is more than
//! `within` earlier: one match per burst, however long the burst lasts.
//! Whether `e` matches depends only on the events of the `2 × within`
//! before it, so a replay that starts that far earlier finds the same
//! matches (the pipeline's [`StateReach`]).
//!
//! **When it is decided.** An event is decided once the watermark has
//! passed its time by more than the allowed lateness: every event it depends
//! on is then in, and any event accepted later is newer (the worker drops
//! the older ones as too late). The outcome is thus the same whatever the
//! arrival order within the lateness, the batch sizes or the number of
//! workers. A minute's detections are final, and emitted once, when every
//! event of the minute is decided.
//!
//! **Output.** Measurement `detections`, real-time tier: tags `pattern` and
//! the pattern's `tag` field (`campaign_id`, `country`) of the matching
//! event, fields `matches` and `users` (distinct users with a match).
//!
//! **State** per user and pattern: the events of the last `within` plus the
//! lateness, and for an absence step the other type's events of as long.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use tidemark_model::{Event, EventTime, EventType, FieldValue, Point, Tier, Watermark};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::ProcessorError;
use crate::intern::Names;
use crate::partial::{Partial, RowKey, Values, WindowId};
use crate::pipeline::{Finisher, Measurement, Pipeline, PipelineSpec, StateReach};

const MINUTE_MS: i64 = 60_000;
/// Most distinct group and tag values kept apart (campaigns, countries);
/// the rest share [`OTHER`].
const VALUE_LIMIT: usize = 100_000;
const OTHER: &str = "other";

/// A field of an event a pattern groups by, counts distinct values of,
/// joins its absence step on, or tags its detections with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PatternField {
    CampaignId,
    Country,
    ImpressionId,
    Device,
}

impl PatternField {
    /// The field's name, which is also the detections' tag name.
    pub fn name(self) -> &'static str {
        match self {
            PatternField::CampaignId => "campaign_id",
            PatternField::Country => "country",
            PatternField::ImpressionId => "impression_id",
            PatternField::Device => "device",
        }
    }

    fn of(self, ev: &Event) -> Option<&str> {
        match self {
            PatternField::CampaignId => ev.campaign_id.as_deref(),
            PatternField::Country => Some(ev.country.as_str()),
            PatternField::ImpressionId => ev.impression_id.as_deref(),
            PatternField::Device => Some(ev.device.as_str()),
        }
    }
}

/// The absence step of a pattern: no event of `event_type` with the same
/// `same` value by the same user within the pattern's `within` before.
#[derive(Debug, Clone, PartialEq)]
pub struct Absence {
    pub event_type: EventType,
    pub same: PatternField,
}

/// One pattern; see the module documentation.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    /// The `pattern` tag of its detections.
    pub name: String,
    pub event_type: EventType,
    pub within: Duration,
    /// Events (or distinct values of `distinct`) a match needs.
    pub at_least: u32,
    /// Counted apart per value of this field; events without it never count.
    pub per: Option<PatternField>,
    /// Counts distinct values of this field instead of events.
    pub distinct: Option<PatternField>,
    pub unless: Option<Absence>,
    /// The tag its detections carry besides `pattern`: the field's value in
    /// the matching event.
    pub tag: Option<PatternField>,
}

impl Pattern {
    /// The built-in patterns: `click_fraud`, `account_takeover` and
    /// `bot_browsing`.
    pub fn builtin() -> Vec<Pattern> {
        vec![
            // 5 or more clicks on one campaign within 10 s, none of them on
            // an impression the user was shown.
            Pattern {
                name: "click_fraud".into(),
                event_type: EventType::AdClick,
                within: Duration::from_secs(10),
                at_least: 5,
                per: Some(PatternField::CampaignId),
                distinct: None,
                unless: Some(Absence {
                    event_type: EventType::AdImpression,
                    same: PatternField::ImpressionId,
                }),
                tag: Some(PatternField::CampaignId),
            },
            // Logins from 3 or more countries within 10 minutes.
            Pattern {
                name: "account_takeover".into(),
                event_type: EventType::Login,
                within: Duration::from_secs(600),
                at_least: 3,
                per: None,
                distinct: Some(PatternField::Country),
                unless: None,
                tag: Some(PatternField::Country),
            },
            // More than 100 views within a minute.
            Pattern {
                name: "bot_browsing".into(),
                event_type: EventType::View,
                within: Duration::from_secs(60),
                at_least: 101,
                per: None,
                distinct: None,
                unless: None,
                tag: Some(PatternField::Country),
            },
        ]
    }

    fn within_ms(&self) -> i64 {
        self.within.as_millis().min(i64::MAX as u128) as i64
    }
}

/// Settings of the patterns pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct PatternsConfig {
    pub patterns: Vec<Pattern>,
}

impl Default for PatternsConfig {
    fn default() -> Self {
        PatternsConfig {
            patterns: Pattern::builtin(),
        }
    }
}

impl PatternsConfig {
    fn longest_within(&self) -> Duration {
        (self.patterns.iter().map(|p| p.within))
            .max()
            .unwrap_or_default()
    }
}

/// One qualifying event kept by a chain.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Seen {
    time: i64,
    /// The event id's hash: orders events of the same time.
    order: u64,
    /// The hash of the `distinct` field's value.
    value: u64,
    /// The hash of the absence step's field value.
    joined: u64,
    /// The interned value of the `tag` field.
    tag: u32,
}

/// One user's qualifying events of one pattern and group, oldest first:
/// `[..decided]` are decided and kept only as the window of the next ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Chain {
    seen: VecDeque<Seen>,
    decided: usize,
    /// The newest decided event's time, and whether the condition held there.
    last: Option<(i64, bool)>,
    /// The time it is listed under in `due`. A chain with fewer events than
    /// its pattern needs is not listed: none of its events can match, so
    /// their (empty) decisions wait for the minute's prune or for the chain
    /// to grow, which saves most chains (one event each) a lookup.
    #[serde(skip)]
    due_at: Option<i64>,
}

impl Chain {
    /// Whether no event decided from now on (every one at or after
    /// `before`) can reach back to this chain: nothing undecided is left,
    /// and the newest decided event is more than `within` before.
    fn out_of_reach(&self, before: i64, within: i64) -> bool {
        self.decided == self.seen.len()
            && (self.last).is_none_or(|(t, _)| t < before.saturating_sub(within))
    }
}

/// Which chain: user hash, pattern index, interned group value (0 = none).
type ChainKey = (u64, u8, u32);

/// Per minute, per (pattern, interned tag): matches and the users matched.
type MinuteRows = FxHashMap<(u8, u32), (i64, FxHashSet<u64>)>;

/// Stage 1 of the patterns pipeline.
#[derive(Debug, Clone)]
pub struct PatternsPipeline {
    config: PatternsConfig,
    lateness_ms: i64,
    chains: FxHashMap<ChainKey, Chain>,
    /// Chains with undecided events, by their oldest undecided event's time.
    due: BTreeSet<(i64, ChainKey)>,
    /// Absence events: (user, pattern, joined value hash) -> times, ascending.
    absences: FxHashMap<(u64, u8, u64), Vec<i64>>,
    /// Detections of minutes not complete yet, by minute start.
    minutes: BTreeMap<i64, MinuteRows>,
    /// Group and tag values.
    values: Names,
    /// Events older than this are decided (the watermark minus the lateness).
    decided_before: i64,
    /// When absences were last pruned.
    pruned_at: i64,
}

/// One minute's detections in a snapshot: (pattern, tag), matches, and the
/// users matched, sorted.
type StoredRows = Vec<((u8, u32), i64, Vec<u64>)>;

#[derive(Serialize, Deserialize)]
struct PatternsState {
    /// Pattern names, in the order of the indices below: a restart with a
    /// changed list keeps the state of the patterns still there.
    patterns: Vec<String>,
    values: Vec<String>,
    chains: Vec<(ChainKey, Chain)>,
    absences: Vec<((u64, u8, u64), Vec<i64>)>,
    minutes: Vec<(i64, StoredRows)>,
    decided_before: i64,
}

impl PatternsPipeline {
    pub const NAME: &'static str = "patterns";

    pub fn new(config: PatternsConfig, allowed_lateness: Duration) -> Self {
        let mut values = Names::new(VALUE_LIMIT, OTHER);
        // Id 0: no group, no tag.
        values.intern("");
        PatternsPipeline {
            config,
            lateness_ms: allowed_lateness.as_millis().min(i64::MAX as u128) as i64,
            chains: FxHashMap::default(),
            due: BTreeSet::new(),
            absences: FxHashMap::default(),
            minutes: BTreeMap::new(),
            values,
            decided_before: i64::MIN,
            pruned_at: i64::MIN,
        }
    }

    fn offer(&mut self, ev: &Event) {
        let user = xxh3_64(ev.user_id.as_bytes());
        let time = ev.timestamp.millis();
        for (i, pattern) in self.config.patterns.iter().enumerate() {
            let index = i as u8;
            if let Some(absence) = &pattern.unless {
                if ev.event_type == absence.event_type {
                    if let Some(v) = absence.same.of(ev) {
                        let times = self
                            .absences
                            .entry((user, index, xxh3_64(v.as_bytes())))
                            .or_default();
                        let at = times.partition_point(|&t| t <= time);
                        times.insert(at, time);
                    }
                }
            }
            if ev.event_type != pattern.event_type {
                continue;
            }
            let group = match pattern.per {
                Some(field) => match field.of(ev) {
                    Some(v) => self.values.intern(v),
                    None => continue,
                },
                None => 0,
            };
            let value = match pattern.distinct {
                Some(field) => match field.of(ev) {
                    Some(v) => xxh3_64(v.as_bytes()),
                    None => continue,
                },
                None => 0,
            };
            let joined = (pattern.unless.as_ref())
                .and_then(|a| a.same.of(ev))
                .map_or(0, |v| xxh3_64(v.as_bytes()));
            let tag = (pattern.tag.and_then(|f| f.of(ev))).map_or(0, |v| self.values.intern(v));
            let seen = Seen {
                time,
                order: xxh3_64(ev.event_id.as_bytes()),
                value,
                joined,
                tag,
            };
            let key = (user, index, group);
            let chain = self.chains.entry(key).or_default();
            // Never among the decided ones: an accepted event is newer.
            let at = (chain.seen)
                .partition_point(|s| (s.time, s.order) <= (time, seen.order))
                .max(chain.decided);
            chain.seen.insert(at, seen);
            list_if_due(&mut self.due, chain, key, pattern.at_least);
        }
    }

    /// Decides every event older than `before`, chain by chain.
    fn decide(&mut self, before: i64) {
        if before <= self.decided_before {
            return;
        }
        self.decided_before = before;
        while let Some(&(time, key)) = self.due.first() {
            if time >= before {
                break;
            }
            self.due.pop_first();
            let Some(chain) = self.chains.get_mut(&key) else {
                continue;
            };
            chain.due_at = None;
            let pattern = &self.config.patterns[key.1 as usize];
            decide_chain(
                chain,
                key,
                pattern,
                before,
                &self.absences,
                &mut self.minutes,
            );
            if chain.out_of_reach(before, pattern.within_ms()) {
                self.chains.remove(&key);
            } else {
                list_if_due(&mut self.due, chain, key, pattern.at_least);
            }
        }
        self.prune(before);
    }

    /// Once a minute of event time: forgets absence events and chains the
    /// decisions still to come cannot reach (every event decided later is at
    /// or after `before`).
    fn prune(&mut self, before: i64) {
        if before < self.pruned_at.saturating_add(MINUTE_MS) {
            return;
        }
        self.pruned_at = before;
        let patterns = &self.config.patterns;
        self.absences.retain(|&(_, index, _), times| {
            let within = patterns.get(index as usize).map_or(0, Pattern::within_ms);
            let keep_from = times.partition_point(|&t| t < before.saturating_sub(within));
            times.drain(..keep_from);
            !times.is_empty()
        });
        let (absences, minutes) = (&self.absences, &mut self.minutes);
        self.chains.retain(|&key, c| {
            let Some(pattern) = patterns.get(key.1 as usize) else {
                return false;
            };
            if c.due_at.is_none() {
                decide_chain(c, key, pattern, before, absences, minutes);
            }
            !c.out_of_reach(before, pattern.within_ms())
        });
    }

    fn partial(&self, minute: i64, rows: &MinuteRows) -> Partial {
        let rows = rows
            .iter()
            .filter_map(|(&(index, tag), (matches, users))| {
                let pattern = self.config.patterns.get(index as usize)?;
                let (tag_name, tag_value) = match pattern.tag {
                    Some(field) if tag != 0 => (field.name(), self.values.name(tag)),
                    _ => ("", ""),
                };
                let key: RowKey = [pattern.name.as_str(), tag_name, tag_value]
                    .iter()
                    .map(|v| std::sync::Arc::<str>::from(*v))
                    .collect();
                let values: Values = [*matches, users.len() as i64].into_iter().collect();
                Some((key, values))
            })
            .collect();
        Partial::new(
            WindowId {
                end: minute + MINUTE_MS,
                pipeline: 0,
                kind: 0,
                start: minute,
            },
            rows,
            None,
        )
    }
}

/// Lists `chain` in `due` under its oldest undecided event, once it holds
/// as many events as a match needs.
fn list_if_due(
    due: &mut BTreeSet<(i64, ChainKey)>,
    chain: &mut Chain,
    key: ChainKey,
    at_least: u32,
) {
    let oldest = chain.seen.get(chain.decided).map(|s| s.time);
    let wanted = oldest.filter(|_| chain.seen.len() >= at_least as usize);
    if wanted == chain.due_at {
        return;
    }
    if let Some(t) = chain.due_at {
        due.remove(&(t, key));
    }
    if let Some(t) = wanted {
        due.insert((t, key));
    }
    chain.due_at = wanted;
}

/// Decides the chain's events older than `before`, in order, counting its
/// matches into `minutes`.
fn decide_chain(
    chain: &mut Chain,
    key: ChainKey,
    pattern: &Pattern,
    before: i64,
    absences: &FxHashMap<(u64, u8, u64), Vec<i64>>,
    minutes: &mut BTreeMap<i64, MinuteRows>,
) {
    let within = pattern.within_ms();
    let (user, index, _) = key;
    while let Some(&e) = chain.seen.get(chain.decided) {
        if e.time >= before {
            break;
        }
        let from = e.time.saturating_sub(within);
        let excluded = pattern.unless.is_some()
            && (absences.get(&(user, index, e.joined)))
                .is_some_and(|times| has_time_in(times, from, e.time));
        if excluded {
            chain.seen.remove(chain.decided);
            continue;
        }
        chain.decided += 1;
        // What this and the next events' windows no longer reach: the
        // decided events left are then exactly this one's window.
        while chain.seen[0].time < from {
            chain.seen.pop_front();
            chain.decided -= 1;
        }
        let reached = match pattern.distinct {
            Some(_) => {
                let mut values: Vec<u64> = (chain.seen.range(..chain.decided))
                    .map(|s| s.value)
                    .collect();
                values.sort_unstable();
                values.dedup();
                values.len()
            }
            None => chain.decided,
        } >= pattern.at_least as usize;
        let held_before = chain.last.is_some_and(|(t, held)| held && t >= from);
        if reached && !held_before {
            let minute = e.time.div_euclid(MINUTE_MS) * MINUTE_MS;
            let row = (minutes.entry(minute).or_default())
                .entry((index, e.tag))
                .or_default();
            row.0 += 1;
            row.1.insert(user);
        }
        chain.last = Some((e.time, reached));
    }
}

/// Whether sorted `times` holds one in `[from, to]`.
fn has_time_in(times: &[i64], from: i64, to: i64) -> bool {
    let i = times.partition_point(|&t| t < from);
    times.get(i).is_some_and(|&t| t <= to)
}

impl Pipeline for PatternsPipeline {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn on_event(&mut self, ev: &Event) {
        self.offer(ev);
    }

    fn on_events(&mut self, events: &[&Event]) {
        // Touch the chains first: independent look-ups whose cache misses
        // overlap, where the offers below would take them one by one.
        let mut found = 0;
        for ev in events {
            for (i, pattern) in self.config.patterns.iter().enumerate() {
                if ev.event_type == pattern.event_type && pattern.per.is_none() {
                    let key = (xxh3_64(ev.user_id.as_bytes()), i as u8, 0);
                    found += usize::from(self.chains.contains_key(&key));
                }
            }
        }
        std::hint::black_box(found);
        for ev in events {
            self.offer(ev);
        }
    }

    fn on_watermark(&mut self, wm: Watermark, out: &mut Vec<Partial>) {
        let before = wm.millis().saturating_sub(self.lateness_ms);
        self.decide(before);
        // A minute is complete once every event in it is decided.
        while let Some(entry) = self.minutes.first_entry() {
            if entry.key() + MINUTE_MS > self.decided_before {
                break;
            }
            let (minute, rows) = entry.remove_entry();
            out.push(self.partial(minute, &rows));
        }
    }

    /// Detections are only ever final.
    fn early(&self, _out: &mut Vec<Partial>) {}

    fn snapshot(&self) -> Result<Vec<u8>, ProcessorError> {
        let mut chains: Vec<(ChainKey, Chain)> =
            self.chains.iter().map(|(k, c)| (*k, c.clone())).collect();
        chains.sort_unstable_by_key(|(k, _)| *k);
        let mut absences: Vec<_> = (self.absences.iter())
            .map(|(k, t)| (*k, t.clone()))
            .collect();
        absences.sort_unstable_by_key(|(k, _)| *k);
        let minutes = (self.minutes.iter())
            .map(|(minute, rows)| {
                let mut rows: Vec<_> = (rows.iter())
                    .map(|(k, (matches, users))| {
                        let mut users: Vec<u64> = users.iter().copied().collect();
                        users.sort_unstable();
                        (*k, *matches, users)
                    })
                    .collect();
                rows.sort_unstable_by_key(|r| r.0);
                (*minute, rows)
            })
            .collect();
        let state = PatternsState {
            patterns: self
                .config
                .patterns
                .iter()
                .map(|p| p.name.clone())
                .collect(),
            values: self.values.names().iter().map(|v| v.to_string()).collect(),
            chains,
            absences,
            minutes,
            decided_before: self.decided_before,
        };
        bincode::serialize(&state)
            .map_err(|e| ProcessorError::Snapshot(format!("patterns state: {e}")))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ProcessorError> {
        let corrupt = |what: String| ProcessorError::CorruptCheckpoint(format!("patterns {what}"));
        let state: PatternsState =
            bincode::deserialize(state).map_err(|e| corrupt(format!("state: {e}")))?;
        let lateness = Duration::from_millis(self.lateness_ms as u64);
        let mut fresh = PatternsPipeline::new(self.config.clone(), lateness);
        fresh.values = Names::from_names(state.values, &fresh.values)
            .map_err(|e| corrupt(format!("values: {e}")))?;
        // Old index -> index in the running list, by name.
        let now: Vec<Option<u8>> = (state.patterns.iter())
            .map(|name| {
                (fresh.config.patterns.iter())
                    .position(|p| &p.name == name)
                    .map(|i| i as u8)
            })
            .collect();
        let remap = |index: u8| now.get(index as usize).copied().flatten();
        for ((user, index, group), chain) in state.chains {
            let Some(index) = remap(index) else { continue };
            if chain.decided > chain.seen.len() {
                return Err(corrupt("chain".into()));
            }
            let key = (user, index, group);
            let mut chain = chain;
            chain.due_at = None;
            let at_least = fresh.config.patterns[index as usize].at_least;
            list_if_due(&mut fresh.due, &mut chain, key, at_least);
            fresh.chains.insert(key, chain);
        }
        for ((user, index, value), times) in state.absences {
            if let Some(index) = remap(index) {
                fresh.absences.insert((user, index, value), times);
            }
        }
        for (minute, rows) in state.minutes {
            let kept = fresh.minutes.entry(minute).or_default();
            for ((index, tag), matches, users) in rows {
                if let Some(index) = remap(index) {
                    kept.insert((index, tag), (matches, users.into_iter().collect()));
                }
            }
        }
        fresh.decided_before = state.decided_before;
        *self = fresh;
        Ok(())
    }
}

/// Stage 2: one point per (pattern, tag) and minute.
#[derive(Debug, Clone)]
pub struct PatternsFinisher {
    horizon: Duration,
}

impl Finisher for PatternsFinisher {
    fn finish(&self, merged: &Partial, out: &mut Vec<Point>) {
        for (key, values) in &merged.rows {
            let [pattern, tag_name, tag_value] = &key[..] else {
                continue;
            };
            let mut tags = vec![("pattern".to_string(), pattern.to_string())];
            if !tag_name.is_empty() {
                tags.push((tag_name.to_string(), tag_value.to_string()));
            }
            tags.sort();
            out.push(Point {
                measurement: "detections".to_string(),
                tier: Tier::Rt,
                tags,
                fields: vec![
                    (
                        "matches".to_string(),
                        FieldValue::Int(values.first().copied().unwrap_or(0)),
                    ),
                    (
                        "users".to_string(),
                        FieldValue::Int(values.get(1).copied().unwrap_or(0)),
                    ),
                ],
                time: EventTime(merged.window.start),
            });
        }
    }

    /// A minute's partial leaves a worker once its watermark has passed the
    /// minute's end by the lateness; the combiner waits a minute more.
    fn horizon(&self) -> Option<Duration> {
        Some(self.horizon)
    }
}

/// The patterns pipeline, as the registry sees it.
#[derive(Debug, Clone, Default)]
pub struct PatternsSpec(pub PatternsConfig);

impl PipelineSpec for PatternsSpec {
    fn name(&self) -> &'static str {
        PatternsPipeline::NAME
    }

    fn measurements(&self) -> &'static [Measurement] {
        &[Measurement {
            name: "detections",
            tiers: &[Tier::Rt],
        }]
    }

    fn reach(&self) -> StateReach {
        StateReach {
            back: self.0.longest_within() * 2,
            ahead: Duration::ZERO,
        }
    }

    fn stage1(&self, allowed_lateness: Duration) -> Box<dyn Pipeline> {
        Box::new(PatternsPipeline::new(self.0.clone(), allowed_lateness))
    }

    fn stage2(&self, allowed_lateness: Duration) -> Box<dyn Finisher> {
        Box::new(PatternsFinisher {
            horizon: allowed_lateness + Duration::from_secs(60),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::solo::Solo;
    use proptest::prelude::*;
    use tidemark_model::Country;

    const LATENESS: Duration = Duration::from_secs(5);
    const T0: i64 = 1_796_256_000_000;

    fn ev(id: usize, user: &str, t: EventType, at: i64) -> Event {
        Event {
            event_id: format!("e{id}"),
            event_type: t,
            user_id: user.into(),
            timestamp: EventTime(T0 + at),
            ..Event::default()
        }
    }

    fn solo(config: &PatternsConfig) -> Solo<PatternsPipeline> {
        Solo::new(
            PatternsPipeline::new(config.clone(), LATENESS),
            PatternsFinisher {
                horizon: LATENESS + Duration::from_secs(60),
            },
            LATENESS,
        )
    }

    /// Detections as (minute, pattern, tag) -> (matches, users), the newest
    /// point of each.
    type Detections = BTreeMap<(i64, String, String), (i64, i64)>;

    fn detections(points: &[Point]) -> Detections {
        let mut out = Detections::new();
        for p in points.iter().filter(|p| p.measurement == "detections") {
            let tag = (p.tags.iter())
                .find(|(k, _)| k != "pattern")
                .map(|(k, v)| format!("{k}={v}"))
                .unwrap_or_default();
            let int = |name: &str| match p.field(name) {
                Some(FieldValue::Int(n)) => n,
                _ => -1,
            };
            out.insert(
                (
                    p.time.millis() - T0,
                    p.tag("pattern").unwrap_or_default().to_string(),
                    tag,
                ),
                (int("matches"), int("users")),
            );
        }
        out
    }

    /// The definition in the module docs, computed from the whole set.
    fn brute_force(config: &PatternsConfig, events: &[Event]) -> Detections {
        let mut found: BTreeMap<(i64, String, String), (i64, BTreeSet<String>)> = BTreeMap::new();
        for pattern in &config.patterns {
            let within = pattern.within_ms();
            let mut chains: BTreeMap<(String, String), Vec<&Event>> = BTreeMap::new();
            for e in events.iter().filter(|e| e.event_type == pattern.event_type) {
                let group = match pattern.per {
                    Some(f) => match f.of(e) {
                        Some(v) => v.to_string(),
                        None => continue,
                    },
                    None => String::new(),
                };
                if pattern.distinct.is_some_and(|f| f.of(e).is_none()) {
                    continue;
                }
                let excluded = pattern.unless.as_ref().is_some_and(|a| {
                    events.iter().any(|x| {
                        x.event_type == a.event_type
                            && x.user_id == e.user_id
                            && a.same.of(x).is_some()
                            && a.same.of(x) == a.same.of(e)
                            && x.timestamp.millis() >= e.timestamp.millis() - within
                            && x.timestamp.millis() <= e.timestamp.millis()
                    })
                });
                if !excluded {
                    chains
                        .entry((e.user_id.clone(), group))
                        .or_default()
                        .push(e);
                }
            }
            for chain in chains.values_mut() {
                chain.sort_by_key(|e| (e.timestamp.millis(), xxh3_64(e.event_id.as_bytes())));
                let holds = |i: usize| {
                    let t = chain[i].timestamp.millis();
                    let window: Vec<&&Event> = chain[..=i]
                        .iter()
                        .filter(|x| x.timestamp.millis() >= t - within)
                        .collect();
                    let n = match pattern.distinct {
                        Some(f) => window
                            .iter()
                            .filter_map(|x| f.of(x))
                            .collect::<BTreeSet<_>>()
                            .len(),
                        None => window.len(),
                    };
                    n >= pattern.at_least as usize
                };
                for i in 0..chain.len() {
                    let t = chain[i].timestamp.millis();
                    let before =
                        i > 0 && chain[i - 1].timestamp.millis() >= t - within && holds(i - 1);
                    if holds(i) && !before {
                        let e = chain[i];
                        let tag = (pattern.tag.and_then(|f| Some((f, f.of(e)?))))
                            .map(|(f, v)| format!("{}={v}", f.name()))
                            .unwrap_or_default();
                        let minute = (e.timestamp.millis() - T0).div_euclid(MINUTE_MS) * MINUTE_MS;
                        let row = found
                            .entry((minute, pattern.name.clone(), tag))
                            .or_default();
                        row.0 += 1;
                        row.1.insert(e.user_id.clone());
                    }
                }
            }
        }
        found
            .into_iter()
            .map(|(k, (matches, users))| (k, (matches, users.len() as i64)))
            .collect()
    }

    /// Feeds `events` in the given arrival order, the watermark following
    /// the newest event time seen (every event within the lateness), with a
    /// snapshot and restore after `restore_at` events; then a watermark past
    /// everything.
    fn run(config: &PatternsConfig, arrival: &[Event], restore_at: Option<usize>) -> Detections {
        let mut s = solo(config);
        let mut points = Vec::new();
        let mut newest = i64::MIN;
        for (i, e) in arrival.iter().enumerate() {
            if Some(i) == restore_at {
                let state = s.snapshot();
                s = solo(config);
                s.restore(&state).expect("restore");
            }
            s.on_event(e, &mut points);
            newest = newest.max(e.timestamp.millis());
            if i % 3 == 0 {
                s.on_watermark(EventTime(newest), &mut points);
            }
        }
        s.on_watermark(EventTime(newest + 3_600_000), &mut points);
        detections(&points)
    }

    fn small_config() -> PatternsConfig {
        let mut patterns = Pattern::builtin();
        // Scaled so that random sets of a few hundred events match often.
        patterns[0].at_least = 3;
        patterns[0].within = Duration::from_secs(4);
        patterns[1].within = Duration::from_secs(20);
        patterns[2].at_least = 4;
        patterns[2].within = Duration::from_secs(3);
        PatternsConfig { patterns }
    }

    fn arb_events() -> impl Strategy<Value = (Vec<Event>, Vec<i64>, usize)> {
        let one = (
            0usize..4,
            prop_oneof![
                Just(EventType::AdClick),
                Just(EventType::AdImpression),
                Just(EventType::Login),
                Just(EventType::View),
                Just(EventType::Like),
            ],
            0i64..120_000,
            0usize..3,
            0usize..6,
        );
        (
            proptest::collection::vec(one, 0..300),
            proptest::collection::vec(0i64..5_000, 300),
            0usize..300,
        )
            .prop_map(|(raw, jitter, restore_at)| {
                let countries = ["DE", "US", "FR"];
                let events = raw
                    .into_iter()
                    .enumerate()
                    .map(|(i, (user, t, at, country, n))| {
                        let mut e = ev(i, &format!("u{user}"), t.clone(), at);
                        e.country = Country::parse(countries[country]).unwrap_or(Country::UNKNOWN);
                        if matches!(t, EventType::AdClick | EventType::AdImpression) {
                            e.campaign_id = Some(format!("c{}", n % 2));
                            e.impression_id = Some(format!("i{n}"));
                        }
                        e
                    })
                    .collect();
                (events, jitter, restore_at)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn matches_are_those_of_the_definition_in_any_arrival_order(
            (events, jitter, restore_at) in arb_events()
        ) {
            let config = small_config();
            let want = brute_force(&config, &events);
            // Arrival by time plus a delay within the lateness.
            let mut arrival: Vec<(i64, usize)> = (events.iter().enumerate())
                .map(|(i, e)| (e.timestamp.millis() + jitter[i % jitter.len()], i))
                .collect();
            arrival.sort_unstable();
            let arrival: Vec<Event> = arrival.iter().map(|&(_, i)| events[i].clone()).collect();
            prop_assert_eq!(&run(&config, &arrival, None), &want);
            prop_assert_eq!(&run(&config, &arrival, Some(restore_at)), &want);
        }
    }

    #[test]
    fn the_builtin_patterns_match_and_their_near_misses_do_not() {
        let config = PatternsConfig::default();
        let mut events = Vec::new();
        let mut id = 0;
        let mut add = |user: &str, t: EventType, at: i64, f: &dyn Fn(&mut Event)| {
            let mut e = ev(id, user, t, at);
            f(&mut e);
            id += 1;
            events.push(e);
        };
        let click = |campaign: &'static str, imp: &'static str| {
            move |e: &mut Event| {
                e.campaign_id = Some(campaign.into());
                e.impression_id = Some(imp.into());
                e.country = Country::parse("DE").unwrap_or(Country::UNKNOWN);
            }
        };
        // Fraud: 5 clicks on c1 in 8 s, no impressions.
        for k in 0..5 {
            add(
                "fraud",
                EventType::AdClick,
                1_000 + k * 2_000,
                &click("c1", "x"),
            );
        }
        // Near miss: 5 clicks in 8 s, but one was on a shown impression.
        add(
            "honest",
            EventType::AdImpression,
            60_500,
            &click("c1", "shown"),
        );
        for k in 0..4 {
            add(
                "honest",
                EventType::AdClick,
                61_000 + k * 2_000,
                &click("c1", "y"),
            );
        }
        add("honest", EventType::AdClick, 68_000, &click("c1", "shown"));
        // Near miss: 5 clicks spread over 12 s.
        for k in 0..5 {
            add(
                "slow",
                EventType::AdClick,
                61_000 + k * 3_000,
                &click("c1", "z"),
            );
        }
        // Takeover: logins from 3 countries in 9 minutes; a near miss with 2.
        for (k, c) in ["DE", "US", "FR"].iter().enumerate() {
            add(
                "victim",
                EventType::Login,
                120_000 + k as i64 * 270_000,
                &|e: &mut Event| e.country = Country::parse(c).unwrap_or(Country::UNKNOWN),
            );
        }
        for (k, c) in ["DE", "US", "DE"].iter().enumerate() {
            add(
                "traveller",
                EventType::Login,
                120_000 + k as i64 * 60_000,
                &|e: &mut Event| e.country = Country::parse(c).unwrap_or(Country::UNKNOWN),
            );
        }
        // Bot: 101 views within 50 s is one match, however long it goes on;
        // a near miss with exactly 100.
        let us = |e: &mut Event| e.country = Country::parse("US").unwrap_or(Country::UNKNOWN);
        for k in 0..150 {
            add("bot", EventType::View, 200_000 + k * 500, &us);
        }
        for k in 0..100 {
            add("reader", EventType::View, 200_000 + k * 500, &us);
        }
        events.sort_by_key(|e| e.timestamp);
        let got = run(&config, &events, None);
        assert_eq!(got, brute_force(&config, &events));
        let expect: Detections = [
            (
                (0, "click_fraud".to_string(), "campaign_id=c1".to_string()),
                (1, 1),
            ),
            (
                (
                    240_000,
                    "bot_browsing".to_string(),
                    "country=US".to_string(),
                ),
                (1, 1),
            ),
            (
                (
                    660_000,
                    "account_takeover".to_string(),
                    "country=FR".to_string(),
                ),
                (1, 1),
            ),
        ]
        .into_iter()
        .collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn state_shrinks_back_once_the_users_are_quiet() {
        let config = PatternsConfig::default();
        let mut p = PatternsPipeline::new(config, LATENESS);
        for k in 0..1_000 {
            p.on_event(&ev(
                k,
                &format!("u{}", k % 50),
                EventType::View,
                k as i64 * 100,
            ));
        }
        let mut out = Vec::new();
        p.on_watermark(EventTime(T0 + 100_000), &mut out);
        assert!(!p.chains.is_empty());
        p.on_watermark(EventTime(T0 + 3_600_000), &mut out);
        assert!(p.chains.is_empty(), "{} chains left", p.chains.len());
        assert!(p.due.is_empty() && p.minutes.is_empty());
    }
}
