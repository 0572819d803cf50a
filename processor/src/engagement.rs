//! The engagement pipeline: user sessions (session windows) joined with the
//! latest user profile, summarised per minute and per hour.
//!
//! A user's session is a maximal run of their events whose gaps are shorter
//! than the session gap; it closes once the watermark reaches its last event
//! plus the gap. `profile_update` events never start sessions: they fill the
//! per-user profile table (the latest by event time wins) that tags sessions.
//!
//! Every session adds its contribution to the tumbling windows it touches:
//! `sessions_started` in the window of its first event, `active_sessions` in
//! each window holding one of its events, the weighted action score per
//! window, and, once closed, `sessions_ended` with the duration and event
//! count in the window of its last event. A late event may extend or merge
//! sessions and a profile update may retag them, so a changed session first
//! withdraws its whole contribution and then adds the new one; the window
//! totals therefore always equal what a single ordered pass would give.
//!
//! A session closes a whole gap after its last event, so for minute windows
//! (and often hour windows) its end corrects a point already emitted when the
//! window fired with the watermark passing its end. Fired windows are kept
//! until the watermark reaches their end plus the session gap plus the
//! allowed lateness, and changed ones are emitted again on the next
//! watermark. Closed sessions are kept for the allowed lateness (a late event
//! may still reopen them) and then forgotten; profiles are kept for good.
//!
//! Tags use the profile known when a session last changed: a profile update
//! arriving later retags the user's sessions that are still held, but not
//! results for windows already dropped.

use std::collections::BTreeMap;
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use tidemark_model::{Country, Event, EventTime, EventType, FieldValue, Point, Tier, Watermark};

use crate::traffic::DEFAULT_ALLOWED_LATENESS;
use crate::{Pipeline, ProcessorError};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const TIERS: [(Tier, i64); 2] = [(Tier::Rt, MINUTE_MS), (Tier::Hourly, HOUR_MS)];
const UNKNOWN: &str = "unknown";

/// The score each action adds to its window; other event types add nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionWeights {
    pub view: i64,
    pub like: i64,
    pub comment: i64,
    pub share: i64,
    pub post_created: i64,
}

impl Default for ActionWeights {
    fn default() -> Self {
        ActionWeights {
            view: 1,
            like: 2,
            comment: 4,
            share: 6,
            post_created: 8,
        }
    }
}

impl ActionWeights {
    fn weight(&self, t: &EventType) -> i64 {
        match t {
            EventType::View => self.view,
            EventType::Like => self.like,
            EventType::Comment => self.comment,
            EventType::Share => self.share,
            EventType::PostCreated => self.post_created,
            _ => 0,
        }
    }
}

/// Settings of [`EngagementPipeline`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngagementConfig {
    /// A gap this long or longer between two events of a user splits sessions.
    pub session_gap: Duration,
    /// Must match the driver's allowed lateness.
    pub allowed_lateness: Duration,
    pub weights: ActionWeights,
}

impl Default for EngagementConfig {
    fn default() -> Self {
        EngagementConfig {
            session_gap: Duration::from_secs(30 * 60),
            allowed_lateness: DEFAULT_ALLOWED_LATENESS,
            weights: ActionWeights::default(),
        }
    }
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn floor(ts: i64, size: i64) -> i64 {
    ts.saturating_sub(ts.rem_euclid(size))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Profile {
    ts: i64,
    event_id: String,
    country: [u8; 2],
    segment: Option<String>,
}

/// (country code, segment): the tags of a session.
type TagKey = ([u8; 2], String);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Session {
    first: i64,
    /// Breaks ties between events at the same first instant.
    first_id: String,
    first_country: [u8; 2],
    last: i64,
    events: i64,
    /// Minute start -> (events, score) of this session in that minute.
    minutes: BTreeMap<i64, (i64, i64)>,
    /// Set once the watermark passed `last + gap`.
    closed: bool,
    /// The tags its contribution was added under.
    tags: TagKey,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Agg {
    started: i64,
    ended: i64,
    active: i64,
    ended_duration_ms: i64,
    ended_events: i64,
    score: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Window {
    aggs: BTreeMap<TagKey, Agg>,
    fired: bool,
    /// Changed since it last fired.
    dirty: bool,
}

#[derive(Debug, Clone, Copy)]
enum Part {
    Started,
    Active,
    Score(i64),
    Ended { duration_ms: i64, events: i64 },
}

/// Session windows per user, enriched from `profile_update` events.
///
/// Points: `engagement` in tiers `rt` (1 minute) and `hourly` (1 hour), tags
/// `country` and `segment`, fields `sessions_started`, `sessions_ended`,
/// `active_sessions`, `engagement_score` (integers) and, when sessions ended
/// in the window, `avg_session_seconds` and `events_per_session` (floats).
#[derive(Debug, Clone)]
pub struct EngagementPipeline {
    gap_ms: i64,
    lateness_ms: i64,
    weights: ActionWeights,
    profiles: FxHashMap<String, Profile>,
    /// Per user, sorted by first event and never overlapping.
    sessions: FxHashMap<String, Vec<Session>>,
    /// One map per entry of [`TIERS`]: window start -> window.
    windows: [BTreeMap<i64, Window>; 2],
    last_wm: Watermark,
    /// No session closes or expires before this watermark.
    next_due: i64,
}

fn ended_part(s: &Session) -> Part {
    Part::Ended {
        duration_ms: s.last.saturating_sub(s.first),
        events: s.events,
    }
}

/// The watermark at which a session next needs attention: its close, then
/// the end of its lateness.
fn due(s: &Session, gap_ms: i64, lateness_ms: i64) -> i64 {
    let close = s.last.saturating_add(gap_ms);
    if s.closed {
        close.saturating_add(lateness_ms)
    } else {
        close
    }
}

#[derive(Serialize, Deserialize)]
struct EngagementState {
    profiles: Vec<(String, Profile)>,
    sessions: Vec<(String, Vec<Session>)>,
    windows: Vec<(u8, i64, Window)>,
    last_wm: Watermark,
    next_due: i64,
}

impl Default for EngagementPipeline {
    fn default() -> Self {
        EngagementPipeline::new(EngagementConfig::default())
    }
}

impl EngagementPipeline {
    pub const NAME: &'static str = "engagement";

    pub fn new(config: EngagementConfig) -> Self {
        EngagementPipeline {
            // A zero gap would make every event its own never-joining session.
            gap_ms: millis(config.session_gap).max(1),
            lateness_ms: millis(config.allowed_lateness),
            weights: config.weights,
            profiles: FxHashMap::default(),
            sessions: FxHashMap::default(),
            windows: [BTreeMap::new(), BTreeMap::new()],
            last_wm: EventTime::MIN,
            next_due: i64::MAX,
        }
    }

    /// Sessions held (open, or closed but still within the lateness).
    pub fn held_sessions(&self) -> usize {
        self.sessions.values().map(Vec::len).sum()
    }

    /// Windows held (open, or fired but still correctable).
    pub fn held_windows(&self) -> usize {
        self.windows.iter().map(BTreeMap::len).sum()
    }

    fn window_kept(&self, tier: usize, start: i64) -> bool {
        let size = TIERS[tier].1;
        // Held windows count even past the horizon: a watermark jump closes
        // sessions just before their windows fire and are dropped.
        self.windows[tier].contains_key(&start)
            || start
                .saturating_add(size)
                .saturating_add(self.gap_ms)
                .saturating_add(self.lateness_ms)
                > self.last_wm.0
    }

    fn tags_for(&self, user: &str, first_country: [u8; 2]) -> TagKey {
        let profile = self.profiles.get(user);
        let country = if first_country != Country::UNKNOWN.0 {
            first_country
        } else {
            profile.map_or(Country::UNKNOWN.0, |p| p.country)
        };
        let segment = profile
            .and_then(|p| p.segment.clone())
            .unwrap_or_else(|| UNKNOWN.to_string());
        (country, segment)
    }

    fn touch(&mut self, tier: usize, ts: i64, tags: &TagKey, part: Part, sign: i64) {
        let start = floor(ts, TIERS[tier].1);
        if !self.window_kept(tier, start) {
            return;
        }
        let w = self.windows[tier].entry(start).or_default();
        if w.fired {
            w.dirty = true;
        }
        let agg = match w.aggs.get_mut(tags) {
            Some(a) => a,
            None => w.aggs.entry(tags.clone()).or_default(),
        };
        match part {
            Part::Started => agg.started = agg.started.saturating_add(sign),
            Part::Active => agg.active = agg.active.saturating_add(sign),
            Part::Score(s) => agg.score = agg.score.saturating_add(sign.saturating_mul(s)),
            Part::Ended {
                duration_ms,
                events,
            } => {
                agg.ended = agg.ended.saturating_add(sign);
                agg.ended_duration_ms = agg
                    .ended_duration_ms
                    .saturating_add(sign.saturating_mul(duration_ms));
                agg.ended_events = agg.ended_events.saturating_add(sign.saturating_mul(events));
            }
        }
        // A tag set that lost all its sessions before firing was never seen.
        if !w.fired && *agg == Agg::default() {
            w.aggs.remove(tags);
        }
    }

    fn apply_ended(&mut self, s: &Session, sign: i64) {
        let part = ended_part(s);
        for tier in 0..TIERS.len() {
            self.touch(tier, s.last, &s.tags, part, sign);
        }
    }

    /// Adds (`sign` 1) or withdraws (`sign` -1) a session's whole contribution.
    fn apply(&mut self, s: &Session, sign: i64) {
        for (tier, &(_, size)) in TIERS.iter().enumerate() {
            self.touch(tier, s.first, &s.tags, Part::Started, sign);
            let mut current: Option<(i64, i64)> = None;
            for (&minute, &(_, score)) in &s.minutes {
                let start = floor(minute, size);
                match current {
                    Some((st, ref mut sc)) if st == start => *sc = sc.saturating_add(score),
                    _ => {
                        if let Some((st, sc)) = current {
                            self.touch(tier, st, &s.tags, Part::Active, sign);
                            self.touch(tier, st, &s.tags, Part::Score(sc), sign);
                        }
                        current = Some((start, score));
                    }
                }
            }
            if let Some((st, sc)) = current {
                self.touch(tier, st, &s.tags, Part::Active, sign);
                self.touch(tier, st, &s.tags, Part::Score(sc), sign);
            }
        }
        if s.closed {
            self.apply_ended(s, sign);
        }
    }

    fn on_profile(&mut self, ev: &Event) {
        let profile = Profile {
            ts: ev.timestamp.0,
            event_id: ev.event_id.clone(),
            country: ev.country.0,
            segment: ev.segment.clone(),
        };
        let newer = self
            .profiles
            .get(&ev.user_id)
            .is_none_or(|p| (p.ts, &p.event_id) <= (profile.ts, &profile.event_id));
        if !newer {
            return;
        }
        self.profiles.insert(ev.user_id.clone(), profile);
        let Some(mut sessions) = self.sessions.remove(&ev.user_id) else {
            return;
        };
        for s in &mut sessions {
            let tags = self.tags_for(&ev.user_id, s.first_country);
            if tags != s.tags {
                self.apply(s, -1);
                s.tags = tags;
                self.apply(s, 1);
            }
        }
        self.sessions.insert(ev.user_id.clone(), sessions);
    }

    fn on_action(&mut self, ev: &Event) {
        let ts = ev.timestamp.0;
        // The driver drops these; a stray one must not resurrect dropped state.
        if ts < self.last_wm.0.saturating_sub(self.lateness_ms) {
            return;
        }
        let gap = self.gap_ms;
        let mut list = self.sessions.remove(&ev.user_id).unwrap_or_default();
        // Sessions within the gap of the event are contiguous in `list`.
        let lo = list.partition_point(|s| s.last.saturating_add(gap) <= ts);
        let hi = list.partition_point(|s| s.first.saturating_sub(gap) < ts);
        let hi = hi.max(lo);
        if hi == lo + 1 {
            if let Some(s) = list.get_mut(lo) {
                if !s.closed && ts > s.first {
                    self.extend(s, ts, self.weights.weight(&ev.event_type));
                    self.sessions.insert(ev.user_id.clone(), list);
                    return;
                }
            }
        }
        let joined: Vec<Session> = list.drain(lo..hi).collect();
        for s in &joined {
            self.apply(s, -1);
        }
        let mut merged = Session {
            first: ts,
            first_id: ev.event_id.clone(),
            first_country: ev.country.0,
            last: ts,
            events: 0,
            minutes: BTreeMap::new(),
            closed: false,
            tags: (Country::UNKNOWN.0, String::new()),
        };
        for s in joined {
            if (s.first, &s.first_id) < (merged.first, &merged.first_id) {
                merged.first = s.first;
                merged.first_id = s.first_id;
                merged.first_country = s.first_country;
            }
            merged.last = merged.last.max(s.last);
            merged.events = merged.events.saturating_add(s.events);
            for (m, (n, sc)) in s.minutes {
                let e = merged.minutes.entry(m).or_insert((0, 0));
                e.0 = e.0.saturating_add(n);
                e.1 = e.1.saturating_add(sc);
            }
        }
        merged.events = merged.events.saturating_add(1);
        let e = merged.minutes.entry(floor(ts, MINUTE_MS)).or_insert((0, 0));
        e.0 = e.0.saturating_add(1);
        e.1 = e.1.saturating_add(self.weights.weight(&ev.event_type));
        self.prune(&mut merged);
        merged.closed = merged.last.saturating_add(gap) <= self.last_wm.0;
        merged.tags = self.tags_for(&ev.user_id, merged.first_country);
        self.apply(&merged, 1);
        self.next_due = self
            .next_due
            .min(due(&merged, self.gap_ms, self.lateness_ms));
        list.insert(lo, merged);
        self.sessions.insert(ev.user_id.clone(), list);
    }

    /// Minutes whose hour is gone can never be withdrawn or re-added.
    fn prune(&self, s: &mut Session) {
        let first_kept = s
            .minutes
            .keys()
            .copied()
            .find(|&m| self.window_kept(1, floor(m, HOUR_MS)));
        if let Some(k) = first_kept {
            if s.minutes.keys().next() != Some(&k) {
                s.minutes = s.minutes.split_off(&k);
            }
        }
    }

    /// Adds an event to an open session without moving its start: the tags
    /// and the start stay, so only the event's windows change.
    fn extend(&mut self, s: &mut Session, ts: i64, score: i64) {
        for (tier, &(_, size)) in TIERS.iter().enumerate() {
            let start = floor(ts, size);
            let end = start.saturating_add(size);
            if s.minutes.range(start..end).next().is_none() {
                self.touch(tier, start, &s.tags, Part::Active, 1);
            }
            if score != 0 {
                self.touch(tier, start, &s.tags, Part::Score(score), 1);
            }
        }
        let e = s.minutes.entry(floor(ts, MINUTE_MS)).or_insert((0, 0));
        e.0 = e.0.saturating_add(1);
        e.1 = e.1.saturating_add(score);
        s.events = s.events.saturating_add(1);
        // Still open: it was, and its last event can only move later.
        s.last = s.last.max(ts);
        self.prune(s);
    }

    /// Closes sessions the watermark has passed and forgets expired ones.
    fn sweep(&mut self) {
        let wm = self.last_wm.0;
        if wm < self.next_due {
            return;
        }
        let (gap, lateness) = (self.gap_ms, self.lateness_ms);
        let mut next_due = i64::MAX;
        let mut ended: Vec<(i64, Part, TagKey)> = Vec::new();
        // Only sums change, so the visiting order does not matter.
        self.sessions.retain(|_, list| {
            for s in list.iter_mut() {
                if !s.closed && s.last.saturating_add(gap) <= wm {
                    s.closed = true;
                    ended.push((s.last, ended_part(s), s.tags.clone()));
                }
            }
            list.retain(|s| !s.closed || due(s, gap, lateness) > wm);
            for s in list.iter() {
                next_due = next_due.min(due(s, gap, lateness));
            }
            !list.is_empty()
        });
        for (last, part, tags) in ended {
            for tier in 0..TIERS.len() {
                self.touch(tier, last, &tags, part, 1);
            }
        }
        self.next_due = next_due;
    }

    fn emit(tier: Tier, start: i64, w: &Window, out: &mut Vec<Point>) {
        for ((country, segment), a) in &w.aggs {
            let mut fields = vec![
                ("active_sessions".to_string(), FieldValue::Int(a.active)),
                ("engagement_score".to_string(), FieldValue::Int(a.score)),
                ("sessions_ended".to_string(), FieldValue::Int(a.ended)),
                ("sessions_started".to_string(), FieldValue::Int(a.started)),
            ];
            if a.ended > 0 {
                let n = a.ended as f64;
                fields.push((
                    "avg_session_seconds".to_string(),
                    FieldValue::Float(a.ended_duration_ms as f64 / 1000.0 / n),
                ));
                fields.push((
                    "events_per_session".to_string(),
                    FieldValue::Float(a.ended_events as f64 / n),
                ));
            }
            out.push(Point::new(
                "engagement",
                tier,
                EventTime(start),
                vec![
                    (
                        "country".to_string(),
                        Country(*country).as_str().to_string(),
                    ),
                    ("segment".to_string(), segment.clone()),
                ],
                fields,
            ));
        }
    }
}

impl Pipeline for EngagementPipeline {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn on_event(&mut self, ev: &Event, _out: &mut Vec<Point>) {
        if ev.event_type == EventType::ProfileUpdate {
            self.on_profile(ev);
        } else {
            self.on_action(ev);
        }
    }

    fn on_watermark(&mut self, wm: Watermark, out: &mut Vec<Point>) {
        self.last_wm = self.last_wm.max(wm);
        self.sweep();
        let wm = self.last_wm.0;
        let keep = self.gap_ms.saturating_add(self.lateness_ms);
        for (i, &(tier, size)) in TIERS.iter().enumerate() {
            for (&start, w) in &self.windows[i] {
                if start.saturating_add(size) > wm {
                    break;
                }
                if !w.fired || w.dirty {
                    Self::emit(tier, start, w, out);
                }
            }
            self.windows[i].retain(|&start, w| {
                let end = start.saturating_add(size);
                if end <= wm {
                    w.fired = true;
                    w.dirty = false;
                }
                end.saturating_add(keep) > wm
            });
        }
    }

    fn early(&self, out: &mut Vec<Point>) {
        for (i, &(tier, _)) in TIERS.iter().enumerate() {
            for (&start, w) in &self.windows[i] {
                if !w.fired {
                    Self::emit(tier, start, w, out);
                }
            }
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        let mut profiles: Vec<(String, Profile)> = self
            .profiles
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        profiles.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut sessions: Vec<(String, Vec<Session>)> = self
            .sessions
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        sessions.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let state = EngagementState {
            profiles,
            sessions,
            windows: self
                .windows
                .iter()
                .enumerate()
                .flat_map(|(i, ws)| {
                    ws.iter()
                        .map(move |(&start, w)| (i as u8, start, w.clone()))
                })
                .collect(),
            last_wm: self.last_wm,
            next_due: self.next_due,
        };
        // Serialising plain data into a Vec cannot fail.
        bincode::serialize(&state).unwrap_or_default()
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ProcessorError> {
        let state: EngagementState = bincode::deserialize(state)
            .map_err(|e| ProcessorError::CorruptCheckpoint(format!("engagement state: {e}")))?;
        let mut windows: [BTreeMap<i64, Window>; 2] = [BTreeMap::new(), BTreeMap::new()];
        for (i, start, w) in state.windows {
            let set = windows.get_mut(i as usize).ok_or_else(|| {
                ProcessorError::CorruptCheckpoint(format!("engagement state: window set {i}"))
            })?;
            set.insert(start, w);
        }
        self.profiles = state.profiles.into_iter().collect();
        self.sessions = state.sessions.into_iter().collect();
        self.windows = windows;
        self.last_wm = state.last_wm;
        self.next_due = state.next_due;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GAP: i64 = 30 * 60_000;

    fn ev(id: &str, user: &str, t: EventType, ts: i64, country: &str) -> Event {
        Event {
            event_id: id.into(),
            event_type: t,
            user_id: user.into(),
            timestamp: EventTime(ts),
            country: Country::parse(country).unwrap_or(Country::UNKNOWN),
            ..Event::default()
        }
    }

    fn profile(id: &str, user: &str, ts: i64, country: &str, segment: &str) -> Event {
        Event {
            segment: Some(segment.into()),
            age_band: Some("25-34".into()),
            ..ev(id, user, EventType::ProfileUpdate, ts, country)
        }
    }

    /// The last emitted value of a field, per point identity.
    fn field(
        points: &[Point],
        tier: Tier,
        time: i64,
        country: &str,
        segment: &str,
        name: &str,
    ) -> Option<FieldValue> {
        points
            .iter()
            .rev()
            .find(|p| {
                p.measurement == "engagement"
                    && p.tier == tier
                    && p.time == EventTime(time)
                    && p.tag("country") == Some(country)
                    && p.tag("segment") == Some(segment)
            })
            .and_then(|p| p.field(name))
    }

    fn int(v: i64) -> Option<FieldValue> {
        Some(FieldValue::Int(v))
    }

    fn float(v: f64) -> Option<FieldValue> {
        Some(FieldValue::Float(v))
    }

    #[test]
    fn session_spanning_two_minutes() {
        let mut p = EngagementPipeline::default();
        let mut out = Vec::new();
        p.on_event(&ev("1", "u1", EventType::View, 10_000, "de"), &mut out);
        p.on_event(&ev("2", "u1", EventType::Like, 70_000, "de"), &mut out);
        p.on_watermark(EventTime(120_000), &mut out);
        let f = |out: &[Point], t, n| field(out, Tier::Rt, t, "DE", "unknown", n);
        assert_eq!(f(&out, 0, "sessions_started"), int(1));
        assert_eq!(f(&out, 0, "active_sessions"), int(1));
        assert_eq!(f(&out, 0, "engagement_score"), int(1));
        assert_eq!(f(&out, 0, "sessions_ended"), int(0));
        assert_eq!(f(&out, 0, "avg_session_seconds"), None);
        assert_eq!(f(&out, 60_000, "sessions_started"), int(0));
        assert_eq!(f(&out, 60_000, "active_sessions"), int(1));
        assert_eq!(f(&out, 60_000, "engagement_score"), int(2));
        assert_eq!(out.len(), 2);
        out.clear();
        p.on_watermark(EventTime(70_000 + GAP - 1), &mut out);
        assert!(out.is_empty(), "still open");
        p.on_watermark(EventTime(70_000 + GAP), &mut out);
        assert_eq!(out.len(), 1, "only the window of the last event changes");
        assert_eq!(f(&out, 60_000, "sessions_ended"), int(1));
        assert_eq!(f(&out, 60_000, "avg_session_seconds"), float(60.0));
        assert_eq!(f(&out, 60_000, "events_per_session"), float(2.0));
        assert_eq!(p.held_sessions(), 1, "kept for the lateness");
        out.clear();
        p.on_watermark(EventTime(HOUR_MS), &mut out);
        let h = |n| field(&out, Tier::Hourly, 0, "DE", "unknown", n);
        assert_eq!(h("sessions_started"), int(1));
        assert_eq!(h("sessions_ended"), int(1));
        assert_eq!(h("active_sessions"), int(1));
        assert_eq!(h("engagement_score"), int(3));
        assert_eq!(p.held_sessions(), 0);
        p.on_watermark(EventTime(HOUR_MS + GAP + 60_000), &mut out);
        assert_eq!(p.held_windows(), 0);
    }

    #[test]
    fn gap_splits_sessions() {
        let mut p = EngagementPipeline::default();
        let mut out = Vec::new();
        p.on_event(&ev("1", "u1", EventType::View, 0, "fr"), &mut out);
        p.on_event(&ev("2", "u1", EventType::View, 5_000, "fr"), &mut out);
        // Exactly the gap apart: a new session.
        p.on_event(&ev("3", "u1", EventType::View, 5_000 + GAP, "fr"), &mut out);
        p.on_watermark(EventTime(2 * HOUR_MS), &mut out);
        let h = |n| field(&out, Tier::Hourly, 0, "FR", "unknown", n);
        assert_eq!(h("sessions_started"), int(2));
        assert_eq!(h("sessions_ended"), int(2));
        assert_eq!(h("active_sessions"), int(2));
        assert_eq!(h("avg_session_seconds"), float(2.5));
        assert_eq!(h("events_per_session"), float(1.5));
        assert_eq!(
            field(&out, Tier::Rt, 0, "FR", "unknown", "sessions_ended"),
            int(1)
        );
    }

    #[test]
    fn late_event_merges_two_sessions() {
        let mut p = EngagementPipeline::default();
        let mut out = Vec::new();
        p.on_event(&ev("1", "u1", EventType::View, 0, "fr"), &mut out);
        p.on_event(
            &ev("2", "u1", EventType::View, GAP + 60_000, "fr"),
            &mut out,
        );
        p.on_watermark(EventTime(GAP + 30_000), &mut out);
        assert_eq!(p.held_sessions(), 2);
        // Joins the closed first session and the open second one.
        p.on_event(&ev("3", "u1", EventType::View, GAP - 1_000, "fr"), &mut out);
        assert_eq!(p.held_sessions(), 1);
        p.on_watermark(EventTime(2 * HOUR_MS), &mut out);
        let h = |n| field(&out, Tier::Hourly, 0, "FR", "unknown", n);
        assert_eq!(h("sessions_started"), int(1));
        assert_eq!(h("sessions_ended"), int(1));
        assert_eq!(h("events_per_session"), float(3.0));
        let rt = |t, n| field(&out, Tier::Rt, t, "FR", "unknown", n);
        assert_eq!(rt(GAP + 60_000, "sessions_started"), int(0));
        assert_eq!(rt(GAP + 60_000, "sessions_ended"), int(1));
        // The first session's close, already emitted, is withdrawn.
        assert_eq!(rt(0, "sessions_ended"), int(0));
        assert_eq!(rt(0, "sessions_started"), int(1));
    }

    #[test]
    fn profile_enriches_sessions() {
        let mut p = EngagementPipeline::default();
        let mut out = Vec::new();
        p.on_event(&profile("p", "u1", 0, "de", "creator"), &mut out);
        p.on_event(&ev("1", "u1", EventType::View, 1_000, ""), &mut out);
        p.on_event(&ev("2", "u2", EventType::View, 2_000, ""), &mut out);
        p.on_event(&ev("3", "u3", EventType::View, 3_000, "us"), &mut out);
        p.on_watermark(EventTime(60_000), &mut out);
        let started = |out: &[Point], c, s| field(out, Tier::Rt, 0, c, s, "sessions_started");
        assert_eq!(started(&out, "DE", "creator"), int(1));
        assert_eq!(started(&out, "unknown", "unknown"), int(1));
        assert_eq!(started(&out, "US", "unknown"), int(1));
        assert_eq!(out.len(), 3, "a profile update starts no session");
        // A later profile retags the user's held sessions.
        out.clear();
        p.on_event(&profile("q", "u3", 4_000, "us", "casual"), &mut out);
        p.on_watermark(EventTime(61_000), &mut out);
        assert_eq!(started(&out, "US", "unknown"), int(0));
        assert_eq!(started(&out, "US", "casual"), int(1));
        // An older profile does not replace a newer one.
        p.on_event(&profile("r", "u3", 100, "us", "old"), &mut out);
        out.clear();
        p.on_watermark(EventTime(62_000), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn score_uses_action_weights() {
        let mut p = EngagementPipeline::default();
        let mut out = Vec::new();
        let types = [
            EventType::View,
            EventType::Like,
            EventType::Comment,
            EventType::Share,
            EventType::PostCreated,
            EventType::Login,
            EventType::Custom("custom.x".into()),
        ];
        for (i, t) in types.into_iter().enumerate() {
            p.on_event(&ev(&i.to_string(), "u1", t, i as i64, "de"), &mut out);
        }
        p.on_watermark(EventTime(60_000), &mut out);
        let f = |n| field(&out, Tier::Rt, 0, "DE", "unknown", n);
        assert_eq!(f("engagement_score"), int(21));
        assert_eq!(f("active_sessions"), int(1));
    }

    #[test]
    fn late_event_within_lateness_re_emits() {
        let mut p = EngagementPipeline::default();
        let mut out = Vec::new();
        p.on_event(&ev("1", "u1", EventType::View, 10_000, "fr"), &mut out);
        p.on_watermark(EventTime(60_000), &mut out);
        assert_eq!(
            field(&out, Tier::Rt, 0, "FR", "unknown", "active_sessions"),
            int(1)
        );
        out.clear();
        p.on_event(&ev("2", "u2", EventType::Share, 20_000, "fr"), &mut out);
        p.on_watermark(EventTime(61_000), &mut out);
        let f = |n| field(&out, Tier::Rt, 0, "FR", "unknown", n);
        assert_eq!(f("active_sessions"), int(2));
        assert_eq!(f("engagement_score"), int(7));
        // Too late: ignored.
        out.clear();
        p.on_watermark(EventTime(200_000), &mut out);
        p.on_event(&ev("3", "u3", EventType::View, 20_000, "fr"), &mut out);
        p.on_watermark(EventTime(201_000), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn early_reports_unfired_windows() {
        let mut p = EngagementPipeline::default();
        let mut out = Vec::new();
        p.on_event(&ev("1", "u1", EventType::View, 1_000, "gb"), &mut out);
        p.on_event(&ev("2", "u1", EventType::View, 61_000, "gb"), &mut out);
        p.on_watermark(EventTime(60_000), &mut out);
        out.clear();
        p.early(&mut out);
        assert_eq!(
            field(&out, Tier::Rt, 0, "GB", "unknown", "active_sessions"),
            None
        );
        assert_eq!(
            field(&out, Tier::Rt, 60_000, "GB", "unknown", "active_sessions"),
            int(1)
        );
        assert_eq!(
            field(&out, Tier::Hourly, 0, "GB", "unknown", "engagement_score"),
            int(2)
        );
    }

    /// Events over ten minutes for a few users, with short gaps so sessions
    /// split and merge, sorted by time.
    fn stream() -> Vec<Event> {
        let mut evs = vec![profile("p1", "u1", 0, "de", "creator")];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..400 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let user = ["u1", "u2", "u3", "u4"][(x % 4) as usize];
            let country = ["", "de", "us", "", "fr"][(user.as_bytes()[1] - b'0') as usize];
            let t = EventType::BUILT_IN[((x >> 8) % 9) as usize].clone();
            let ts = 1_000 + ((x >> 16) % 600_000) as i64;
            evs.push(ev(&format!("e{i}"), user, t, ts, country));
        }
        evs.sort_by_key(|e| e.timestamp);
        evs
    }

    fn config() -> EngagementConfig {
        EngagementConfig {
            session_gap: Duration::from_secs(10),
            ..EngagementConfig::default()
        }
    }

    /// Runs events with a watermark of the newest time minus `disorder` after
    /// each, then flushes; returns the last value per point identity.
    fn run(
        p: &mut EngagementPipeline,
        evs: &[Event],
        disorder: i64,
        max_seen: &mut i64,
        out: &mut Vec<Point>,
    ) {
        for e in evs {
            p.on_event(e, out);
            *max_seen = (*max_seen).max(e.timestamp.0);
            p.on_watermark(EventTime(*max_seen - disorder), out);
        }
    }

    fn finals(points: &[Point]) -> BTreeMap<String, Vec<(String, FieldValue)>> {
        let mut m = BTreeMap::new();
        for p in points {
            let key = format!("{}|{}|{}", p.tier.name(), p.series_key(), p.time.0);
            m.insert(key, p.fields.clone());
        }
        m
    }

    #[test]
    fn out_of_order_input_gives_the_same_final_points() {
        let ordered = stream();
        let mut shuffled = ordered.clone();
        // Reverse blocks spanning well under the out-of-orderness.
        let mut start = 1;
        while start < shuffled.len() {
            let mut end = start;
            while end < shuffled.len()
                && shuffled[end].timestamp.0 - shuffled[start].timestamp.0 < 4_000
            {
                end += 1;
            }
            shuffled[start..end].reverse();
            start = end.max(start + 1);
        }
        assert_ne!(ordered, shuffled);
        let mut results = Vec::new();
        for evs in [&ordered, &shuffled] {
            let mut p = EngagementPipeline::new(config());
            let (mut out, mut max_seen) = (Vec::new(), i64::MIN);
            run(&mut p, evs, 5_000, &mut max_seen, &mut out);
            p.on_watermark(EventTime(10 * HOUR_MS), &mut out);
            assert_eq!(p.held_sessions(), 0);
            assert_eq!(p.held_windows(), 0);
            results.push(finals(&out));
        }
        assert!(results[0].len() > 20);
        assert_eq!(results[0], results[1]);
    }

    #[test]
    fn restore_mid_stream_equals_uninterrupted() {
        let evs = stream();
        let (a, b) = evs.split_at(evs.len() / 2);
        let mut p = EngagementPipeline::new(config());
        let (mut whole, mut max_seen) = (Vec::new(), i64::MIN);
        run(&mut p, &evs, 5_000, &mut max_seen, &mut whole);
        p.on_watermark(EventTime(10 * HOUR_MS), &mut whole);

        let mut q = EngagementPipeline::new(config());
        let (mut split, mut max_seen) = (Vec::new(), i64::MIN);
        run(&mut q, a, 5_000, &mut max_seen, &mut split);
        let snap = q.snapshot();
        let mut r = EngagementPipeline::new(config());
        r.restore(&snap).unwrap();
        run(&mut r, b, 5_000, &mut max_seen, &mut split);
        r.on_watermark(EventTime(10 * HOUR_MS), &mut split);
        assert_eq!(whole, split);
        assert!(r.restore(b"garbage").is_err());
    }

    #[test]
    fn extreme_timestamps_do_not_panic() {
        let mut p = EngagementPipeline::new(EngagementConfig {
            session_gap: Duration::MAX,
            allowed_lateness: Duration::MAX,
            ..EngagementConfig::default()
        });
        let mut out = Vec::new();
        for (i, ts) in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX]
            .into_iter()
            .enumerate()
        {
            p.on_event(
                &ev(&i.to_string(), "u", EventType::Like, ts, "de"),
                &mut out,
            );
            p.on_event(&profile(&i.to_string(), "u", ts, "", "s"), &mut out);
        }
        p.on_watermark(EventTime::MAX, &mut out);
        p.early(&mut out);
        let mut q = EngagementPipeline::default();
        for ts in [i64::MIN, i64::MAX, 0] {
            q.on_event(&ev("x", "v", EventType::View, ts, ""), &mut out);
            q.on_watermark(EventTime(ts), &mut out);
        }
        q.on_watermark(EventTime::MAX, &mut out);
    }
}
