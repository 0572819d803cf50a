//! The engagement pipeline: user sessions (session windows) joined with the
//! latest user profile, summarised per minute and per hour.
//!
//! A user's session is a maximal run of their events whose gaps are shorter
//! than the session gap; it closes once the watermark reaches its last event
//! plus the gap. `profile_update` events never start sessions: they fill the
//! per-user profile history that tags sessions.
//!
//! Every session adds its contribution to the tumbling windows it touches:
//! `sessions_started` in the window of its first event, `active_sessions` in
//! each window holding one of its events, the weighted action score per
//! window, and, once closed, `sessions_ended` with the duration and event
//! count in the window of its last event. A late event may extend or merge
//! sessions and a profile update may retag them, so a changed session first
//! withdraws its whole contribution and then adds the new one; the window
//! totals therefore always equal what a single ordered pass would give. The
//! common case, an event joining one open session without moving its start,
//! only adds its own delta (the tags and the start stay).
//!
//! A session closes a whole gap after its last event, so for minute windows
//! (and often hour windows) its end corrects a point already emitted when the
//! window fired with the watermark passing its end. Fired windows are kept
//! until the watermark reaches their end plus the session gap plus the
//! allowed lateness, and changed ones are emitted again on the next
//! watermark. Closed sessions are kept for the allowed lateness (a late event
//! may still reopen them) and then forgotten; profiles are kept for good.
//!
//! A session is tagged with the profile in effect at its first event: the
//! newest update at or before it in event time (ties broken by event id).
//! That makes tags independent of the order updates and actions arrive in.
//! An accepted update is at most the allowed lateness behind the watermark,
//! so the sessions it retags (those starting at or after it) still have all
//! their windows held and are corrected exactly. Per user the history keeps
//! the updates newer than the watermark minus the allowed lateness plus the
//! newest one before: every session still to come starts after that.
//!
//! The state is laid out for the hot path, `on_event`: users are looked up by
//! their id's bytes (copied, inline when short, only for a new user); a
//! user's usual single session and a session's usual single minute live
//! inline; segments are interned so tags are `Copy`; an event joining an open
//! session touches one window per tier. A watermark visits only the users
//! with a session due, from a queue ordered by due time.

use std::borrow::Borrow;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use smallvec::{smallvec, SmallVec};
use tidemark_model::{Country, Event, EventTime, EventType, FieldValue, Point, Tier, Watermark};

use crate::error::ProcessorError;
use crate::intern::Names;
use crate::partial::{row_key, Partial, WindowId};
use crate::pipeline::{Finisher, Pipeline};
use crate::pipeline::{Measurement, PipelineSpec, StateReach};
use crate::traffic::DEFAULT_ALLOWED_LATENESS;
use crate::window::{millis, Slot, Tumbling};

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const TIERS: [(Tier, i64); 2] = [(Tier::Rt, MINUTE_MS), (Tier::Hourly, HOUR_MS)];

fn new_windows() -> [Tumbling<Aggs>; 2] {
    std::array::from_fn(|kind| Tumbling::new(kind, TIERS[kind].0))
}
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

fn floor(ts: i64, size: i64) -> i64 {
    ts.saturating_sub(ts.rem_euclid(size))
}

/// Strings this long or shorter are stored inline in a [`CompactStr`].
const KEY_INLINE: usize = 22;

/// An immutable string (a user id as a map key, an event id) stored inline
/// when short, as ids usually are: no allocation, and a map lookup by its
/// bytes reads no memory outside the table.
#[derive(Clone)]
enum CompactStr {
    Inline(u8, [u8; KEY_INLINE]),
    Heap(Box<[u8]>),
}

impl CompactStr {
    fn new(text: &str) -> Self {
        let b = text.as_bytes();
        match u8::try_from(b.len()) {
            Ok(n) if b.len() <= KEY_INLINE => {
                let mut a = [0; KEY_INLINE];
                a[..b.len()].copy_from_slice(b);
                CompactStr::Inline(n, a)
            }
            _ => CompactStr::Heap(b.into()),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            CompactStr::Inline(n, a) => &a[..usize::from(*n).min(KEY_INLINE)],
            CompactStr::Heap(b) => b,
        }
    }

    fn to_text(&self) -> String {
        // Made from a `&str`, so valid UTF-8 and lossless.
        String::from_utf8_lossy(self.as_bytes()).into_owned()
    }
}

impl Serialize for CompactStr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&String::from_utf8_lossy(self.as_bytes()))
    }
}

impl<'de> Deserialize<'de> for CompactStr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(CompactStr::new(&String::deserialize(deserializer)?))
    }
}

impl Borrow<[u8]> for CompactStr {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq for CompactStr {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for CompactStr {}

impl PartialOrd for CompactStr {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for CompactStr {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl Hash for CompactStr {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes, which `Borrow` requires.
        self.as_bytes().hash(state);
    }
}

impl std::fmt::Debug for CompactStr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.to_text(), f)
    }
}

/// An interned segment name: an index into [`Segments`].
type SegmentId = u32;

/// The segment of users without one (and of profiles naming `unknown`).
const UNKNOWN_SEGMENT: SegmentId = 0;

/// Segment names, interned so tags are small and `Copy`. Only grows; the
/// names are those of the profiles kept, which are kept for good.
#[derive(Debug, Clone)]
struct Segments(Names);

impl Default for Segments {
    fn default() -> Self {
        Segments(Names::with_unknown(UNKNOWN))
    }
}

impl Segments {
    /// Rebuilds the table from its names in id order (as in a snapshot).
    fn from_names(names: Vec<Box<str>>) -> Result<Self, String> {
        if names.first().map(|n| &**n) != Some(UNKNOWN) {
            return Err(format!("segment {UNKNOWN_SEGMENT} is not `{UNKNOWN}`"));
        }
        let template = Segments::default();
        Names::from_names(names, &template.0)
            .map(Segments)
            .map_err(|e| format!("segment {e}"))
    }

    fn id(&mut self, name: Option<&str>) -> SegmentId {
        self.0.intern(name.unwrap_or(UNKNOWN))
    }

    fn name(&self, id: SegmentId) -> &str {
        self.0.name(id)
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Profile {
    ts: i64,
    event_id: String,
    country: [u8; 2],
    segment: SegmentId,
}

impl Profile {
    /// The order updates take effect in.
    fn order(&self) -> (i64, &str) {
        (self.ts, &self.event_id)
    }
}

/// A user's profile updates, oldest first by [`Profile::order`].
type ProfileHistory = Few<Profile>;

/// The profile in effect at `t`: the newest update at or before it.
fn profile_at(history: Option<&ProfileHistory>, t: i64) -> Option<&Profile> {
    let list = history?;
    let i = list.partition_point(|p| p.ts <= t);
    i.checked_sub(1).and_then(|i| list.get(i))
}

/// (country code, segment): the tags of a session.
type TagKey = ([u8; 2], SegmentId);

/// The tags of a session of a user whose first event came from `first_country`.
fn tags_for(profile: Option<&Profile>, first_country: [u8; 2]) -> TagKey {
    let country = if first_country != Country::UNKNOWN.0 {
        first_country
    } else {
        profile.map_or(Country::UNKNOWN.0, |p| p.country)
    };
    (country, profile.map_or(UNKNOWN_SEGMENT, |p| p.segment))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Session {
    first: i64,
    /// Breaks ties between events at the same first instant.
    first_id: CompactStr,
    first_country: [u8; 2],
    last: i64,
    events: i64,
    /// (minute start, score of this session in that minute), sorted by
    /// minute: one entry per minute holding one of its events.
    minutes: Few<(i64, i64)>,
    /// Set once the watermark passed `last + gap`.
    closed: bool,
    /// The tags its contribution was added under.
    tags: TagKey,
}

/// A list that usually holds one item, kept inline then (no allocation, no
/// pointer to follow): a user's sessions, a session's minutes, a user's
/// profile updates.
type Few<T> = SmallVec<[T; 1]>;

/// Drops a list's heap buffer once one item is left, as the list of nearly
/// every user is.
fn shrink<T>(list: &mut Few<T>) {
    if list.spilled() && list.len() <= 1 {
        list.shrink_to_fit();
    }
}

/// A user's sessions, and when the sweep next looks at them.
#[derive(Debug, Clone)]
struct Sessions {
    /// Sorted by first event and never overlapping.
    list: Few<Session>,
    /// The time of the user's entry in the due queue that counts: at or
    /// before every session's [`due`] time.
    scheduled: i64,
}

/// Adds `score` to the minute starting at `minute`, inserting it if new.
fn add_minute(minutes: &mut Few<(i64, i64)>, minute: i64, score: i64) {
    // In-order events land in the newest minute.
    if let Some(last) = minutes.last_mut() {
        if last.0 == minute {
            last.1 = last.1.saturating_add(score);
            return;
        }
        if last.0 < minute {
            minutes.insert(minutes.len(), (minute, score));
            return;
        }
    }
    let i = minutes.partition_point(|&(m, _)| m < minute);
    match minutes.get_mut(i) {
        Some(e) if e.0 == minute => e.1 = e.1.saturating_add(score),
        _ => minutes.insert(i, (minute, score)),
    }
}

/// Totals of one tag set in one window, or a change to them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Agg {
    started: i64,
    ended: i64,
    active: i64,
    ended_duration_ms: i64,
    ended_events: i64,
    score: i64,
}

impl Agg {
    /// Adds `sign` (1 or -1) times `d`.
    fn add(&mut self, d: &Agg, sign: i64) {
        let add = |v: &mut i64, x: i64| *v = v.saturating_add(sign.saturating_mul(x));
        add(&mut self.started, d.started);
        add(&mut self.ended, d.ended);
        add(&mut self.active, d.active);
        add(&mut self.ended_duration_ms, d.ended_duration_ms);
        add(&mut self.ended_events, d.ended_events);
        add(&mut self.score, d.score);
    }

    /// The close of `s`, counted in the window of its last event.
    fn ended(s: &Session) -> Agg {
        Agg {
            ended: 1,
            ended_duration_ms: s.last.saturating_sub(s.first),
            ended_events: s.events,
            ..Agg::default()
        }
    }
}

/// One window's totals per tag set.
type Aggs = BTreeMap<TagKey, Agg>;

/// The windows of both tiers and what decides which may still change.
#[derive(Debug, Clone)]
struct Totals {
    /// One per entry of [`TIERS`].
    windows: [Tumbling<Aggs>; 2],
    gap_ms: i64,
    lateness_ms: i64,
    last_wm: i64,
}

impl Totals {
    /// Whether the window may still receive changes.
    fn kept(&self, tier: usize, start: i64) -> bool {
        // Held windows count even past the horizon: a watermark jump closes
        // sessions just before their windows fire and are dropped.
        start
            .saturating_add(TIERS[tier].1)
            .saturating_add(self.gap_ms)
            .saturating_add(self.lateness_ms)
            > self.last_wm
            || self.windows[tier].contains(start)
    }

    /// Adds `sign` times `delta` to the totals of `tags` in the window of
    /// `tier` starting at `start`, if that window is kept.
    fn touch(&mut self, tier: usize, start: i64, tags: TagKey, delta: &Agg, sign: i64) {
        let w = match self.windows[tier].get_mut(start) {
            Some(w) => w,
            None => {
                if !self.kept(tier, start) {
                    return;
                }
                self.windows[tier].entry(start)
            }
        };
        let fired = w.fired;
        let aggs = w.change();
        let agg = aggs.entry(tags).or_default();
        agg.add(delta, sign);
        // A tag set that lost all its sessions before firing was never seen.
        if !fired && *agg == Agg::default() {
            aggs.remove(&tags);
        }
    }

    /// Adds (`sign` 1) or withdraws (`sign` -1) a session's whole
    /// contribution, one touch per window.
    fn apply(&mut self, s: &Session, sign: i64) {
        for (tier, &(_, size)) in TIERS.iter().enumerate() {
            let mut pending = (
                floor(s.first, size),
                Agg {
                    started: 1,
                    ..Agg::default()
                },
            );
            for &(minute, score) in s.minutes.iter() {
                let start = floor(minute, size);
                if start != pending.0 {
                    self.touch(tier, pending.0, s.tags, &pending.1, sign);
                    pending = (start, Agg::default());
                }
                pending.1.active = 1;
                pending.1.score = pending.1.score.saturating_add(score);
            }
            if s.closed {
                let start = floor(s.last, size);
                if start != pending.0 {
                    self.touch(tier, pending.0, s.tags, &pending.1, sign);
                    pending = (start, Agg::default());
                }
                pending.1.add(&Agg::ended(s), 1);
            }
            self.touch(tier, pending.0, s.tags, &pending.1, sign);
        }
    }

    /// Drops the minutes whose hour is gone: they can never be withdrawn or
    /// re-added.
    fn prune(&self, s: &mut Session) {
        let Some(&(first, _)) = s.minutes.first() else {
            return;
        };
        if self.kept(1, floor(first, HOUR_MS)) {
            return;
        }
        let first_kept = s
            .minutes
            .iter()
            .position(|&(m, _)| self.kept(1, floor(m, HOUR_MS)));
        if let Some(k) = first_kept {
            s.minutes.drain(..k);
            shrink(&mut s.minutes);
        }
    }

    /// Adds an event to an open session without moving its start: the tags
    /// and the start stay, so only the event's windows change.
    fn extend(&mut self, s: &mut Session, ts: i64, score: i64) {
        let minute = floor(ts, MINUTE_MS);
        // The minutes nearest the event's: the session is active in a window
        // already if and only if one of them lies in it.
        let i = s.minutes.partition_point(|&(m, _)| m < minute);
        let before = i.checked_sub(1).and_then(|j| s.minutes.get(j));
        let near = [before, s.minutes.get(i)];
        for (tier, &(_, size)) in TIERS.iter().enumerate() {
            let start = floor(ts, size);
            let end = start.saturating_add(size);
            let active = near.iter().flatten().any(|&&(m, _)| start <= m && m < end);
            let delta = Agg {
                active: i64::from(!active),
                score,
                ..Agg::default()
            };
            if delta != Agg::default() {
                self.touch(tier, start, s.tags, &delta, 1);
            }
        }
        add_minute(&mut s.minutes, minute, score);
        s.events = s.events.saturating_add(1);
        // Still open: it was, and its last event can only move later.
        s.last = s.last.max(ts);
        self.prune(s);
    }
}

/// Session windows per user, enriched from `profile_update` events.
///
/// Points: `engagement` in tiers `rt` (1 minute) and `hourly` (1 hour), tags
/// `country` and `segment`, fields `sessions_started`, `sessions_ended`,
/// `active_sessions`, `engagement_score` (integers) and, when sessions ended
/// in the window, `avg_session_seconds` and `events_per_session` (floats).
#[derive(Debug, Clone)]
pub struct EngagementPipeline {
    weights: ActionWeights,
    profiles: FxHashMap<CompactStr, ProfileHistory>,
    sessions: FxHashMap<CompactStr, Sessions>,
    /// Users whose sessions need attention, by when: a user's entry at
    /// [`Sessions::scheduled`] counts, others are stale and skipped.
    due: DueQueue,
    segments: Segments,
    totals: Totals,
}

/// Width of a [`DueQueue`] bucket.
const DUE_BUCKET_MS: i64 = 1_000;

/// Users with a session due, bucketed by the second it is due: pushing is
/// a bucket look-up and an append, and a watermark takes whole buckets, which
/// keeps closing millions of sessions cache-friendly (a binary heap of
/// strings was the hottest spot of a run).
#[derive(Debug, Clone, Default)]
struct DueQueue {
    buckets: BTreeMap<i64, Vec<(i64, CompactStr)>>,
}

impl DueQueue {
    fn push(&mut self, at: i64, user: CompactStr) {
        self.buckets
            .entry(at.div_euclid(DUE_BUCKET_MS))
            .or_default()
            .push((at, user));
    }

    /// Removes and returns every entry due at or before `wm`, in no order.
    fn take_due(&mut self, wm: i64) -> Vec<(i64, CompactStr)> {
        let mut out = Vec::new();
        while let Some(mut bucket) = self.buckets.first_entry() {
            let from = bucket.key().saturating_mul(DUE_BUCKET_MS);
            if from > wm {
                break;
            }
            if from.saturating_add(DUE_BUCKET_MS - 1) <= wm {
                out.append(&mut bucket.remove());
                continue;
            }
            let (due, keep): (Vec<_>, Vec<_>) =
                bucket.get_mut().drain(..).partition(|(at, _)| *at <= wm);
            out.extend(due);
            if keep.is_empty() {
                bucket.remove();
            } else {
                *bucket.get_mut() = keep;
            }
            break;
        }
        out
    }

    fn clear(&mut self) {
        self.buckets.clear();
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
    /// Interned segment names, in id order.
    segments: Vec<Box<str>>,
    profiles: Vec<(String, Vec<Profile>)>,
    sessions: Vec<(String, Vec<Session>)>,
    windows: Vec<(u8, i64, Slot<Aggs>)>,
    last_wm: Watermark,
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
            weights: config.weights,
            profiles: FxHashMap::default(),
            sessions: FxHashMap::default(),
            due: DueQueue::default(),
            segments: Segments::default(),
            totals: Totals {
                windows: new_windows(),
                // A zero gap would make every event its own never-joining session.
                gap_ms: millis(config.session_gap).max(1),
                lateness_ms: millis(config.allowed_lateness),
                last_wm: EventTime::MIN.0,
            },
        }
    }

    /// Sessions held (open, or closed but still within the lateness).
    pub fn held_sessions(&self) -> usize {
        self.sessions.values().map(|held| held.list.len()).sum()
    }

    /// Windows held (open, or fired but still correctable).
    pub fn held_windows(&self) -> usize {
        self.totals.windows.iter().map(Tumbling::len).sum()
    }

    fn on_profile(&mut self, ev: &Event) {
        let (ts, user) = (ev.timestamp.0, ev.user_id.as_bytes());
        let profile = Profile {
            ts,
            event_id: ev.event_id.clone(),
            country: ev.country.0,
            segment: self.segments.id(ev.segment.as_deref()),
        };
        // Updates older than this one are no longer needed once a newer
        // one is in effect at every time a session can still start.
        let horizon = self.totals.last_wm.saturating_sub(self.totals.lateness_ms);
        match self.profiles.get_mut(user) {
            Some(history) => {
                let i = history.partition_point(|p| p.order() < profile.order());
                if history.get(i).is_some_and(|p| p.order() == profile.order()) {
                    return;
                }
                history.insert(i, profile);
                let in_effect = history.partition_point(|p| p.ts <= horizon);
                if in_effect > 1 {
                    history.drain(..in_effect - 1);
                    shrink(history);
                }
            }
            None => {
                self.profiles
                    .insert(CompactStr::new(&ev.user_id), smallvec![profile]);
            }
        }
        let Some(held) = self.sessions.get_mut(user) else {
            return;
        };
        let history = self.profiles.get(user);
        // Only sessions starting at or after the update can change; older
        // ones may predate what the history still holds.
        for s in held.list.iter_mut().filter(|s| s.first >= ts) {
            let tags = tags_for(profile_at(history, s.first), s.first_country);
            if tags != s.tags {
                self.totals.apply(s, -1);
                s.tags = tags;
                self.totals.apply(s, 1);
            }
        }
    }

    fn on_action(&mut self, ev: &Event) {
        let (ts, user) = (ev.timestamp.0, ev.user_id.as_bytes());
        let totals = &mut self.totals;
        // The driver drops these; a stray one must not resurrect dropped state.
        if ts < totals.last_wm.saturating_sub(totals.lateness_ms) {
            return;
        }
        let gap = totals.gap_ms;
        let score = self.weights.weight(&ev.event_type);
        let mut held = self.sessions.get_mut(user);
        // Sessions within the gap of the event are contiguous in `list`.
        let (lo, hi) = match held.as_deref_mut() {
            Some(Sessions { list, .. }) => {
                let lo = list.partition_point(|s| s.last.saturating_add(gap) <= ts);
                let hi = list.partition_point(|s| s.first.saturating_sub(gap) < ts);
                if hi == lo + 1 {
                    if let Some(s) = list.get_mut(lo) {
                        if !s.closed && ts > s.first {
                            totals.extend(s, ts, score);
                            return;
                        }
                    }
                }
                (lo, hi.max(lo))
            }
            None => (0, 0),
        };
        let mut merged: Option<Session> = None;
        if let Some(Sessions { list, .. }) = held.as_deref_mut() {
            list.drain(lo..hi).for_each(|s| {
                totals.apply(&s, -1);
                match &mut merged {
                    None => merged = Some(s),
                    Some(m) => {
                        if (s.first, s.first_id.as_bytes()) < (m.first, m.first_id.as_bytes()) {
                            m.first = s.first;
                            m.first_id = s.first_id;
                            m.first_country = s.first_country;
                        }
                        m.last = m.last.max(s.last);
                        m.events = m.events.saturating_add(s.events);
                        for &(minute, sc) in s.minutes.iter() {
                            add_minute(&mut m.minutes, minute, sc);
                        }
                    }
                }
            });
        }
        let minute = floor(ts, MINUTE_MS);
        let mut merged = match merged {
            Some(mut m) => {
                if (ts, ev.event_id.as_bytes()) <= (m.first, m.first_id.as_bytes()) {
                    m.first = ts;
                    m.first_id = CompactStr::new(&ev.event_id);
                    m.first_country = ev.country.0;
                }
                m.last = m.last.max(ts);
                m.events = m.events.saturating_add(1);
                add_minute(&mut m.minutes, minute, score);
                m
            }
            None => Session {
                first: ts,
                first_id: CompactStr::new(&ev.event_id),
                first_country: ev.country.0,
                last: ts,
                events: 1,
                minutes: smallvec![(minute, score)],
                closed: false,
                tags: (Country::UNKNOWN.0, UNKNOWN_SEGMENT),
            },
        };
        totals.prune(&mut merged);
        merged.closed = merged.last.saturating_add(gap) <= totals.last_wm;
        merged.tags = tags_for(
            profile_at(self.profiles.get(user), merged.first),
            merged.first_country,
        );
        totals.apply(&merged, 1);
        let at = due(&merged, gap, totals.lateness_ms);
        match held {
            Some(held) => {
                held.list.insert(lo, merged);
                if at < held.scheduled {
                    held.scheduled = at;
                    self.due.push(at, CompactStr::new(&ev.user_id));
                }
            }
            None => {
                let user = CompactStr::new(&ev.user_id);
                self.due.push(at, user.clone());
                let list = smallvec![merged];
                let held = Sessions {
                    list,
                    scheduled: at,
                };
                self.sessions.insert(user, held);
            }
        }
    }

    /// Closes sessions the watermark has passed and forgets expired ones,
    /// visiting only the users with a session due.
    fn sweep(&mut self) {
        let wm = self.totals.last_wm;
        let (gap, lateness) = (self.totals.gap_ms, self.totals.lateness_ms);
        if wm == i64::MAX {
            // The end of the input closes and forgets every session: walk the
            // map in memory order instead of looking each user up.
            self.due.clear();
            for (_, held) in self.sessions.drain() {
                for s in held.list.iter() {
                    if !s.closed {
                        let delta = Agg::ended(s);
                        for (tier, &(_, size)) in TIERS.iter().enumerate() {
                            self.totals
                                .touch(tier, floor(s.last, size), s.tags, &delta, 1);
                        }
                    }
                }
            }
            return;
        }
        for (at, user) in self.due.take_due(wm) {
            let Some(held) = self.sessions.get_mut(user.as_bytes()) else {
                continue;
            };
            if held.scheduled != at {
                // Stale: an earlier entry covered this user already.
                continue;
            }
            // Only sums change, so the order users are visited in does not matter.
            for s in held.list.iter_mut() {
                if !s.closed && s.last.saturating_add(gap) <= wm {
                    s.closed = true;
                    let delta = Agg::ended(s);
                    for (tier, &(_, size)) in TIERS.iter().enumerate() {
                        self.totals
                            .touch(tier, floor(s.last, size), s.tags, &delta, 1);
                    }
                }
            }
            held.list
                .retain(|s| !s.closed || due(s, gap, lateness) > wm);
            shrink(&mut held.list);
            // Later than `wm`: what is left is open or within its lateness.
            match held.list.iter().map(|s| due(s, gap, lateness)).min() {
                Some(next) => {
                    held.scheduled = next;
                    self.due.push(next, user);
                }
                None => {
                    self.sessions.remove(user.as_bytes());
                }
            }
        }
    }

    fn partial(segments: &Segments, window: WindowId, aggs: &Aggs) -> Partial {
        let rows = aggs
            .iter()
            .map(|(&(country, segment), a)| {
                (
                    row_key([Country(country).as_str(), segments.name(segment)]),
                    smallvec![
                        a.started,
                        a.ended,
                        a.active,
                        a.ended_duration_ms,
                        a.ended_events,
                        a.score,
                    ],
                )
            })
            .collect();
        Partial::new(window, rows, None)
    }
}
/// Stage 2 of engagement: sums the workers' per-(country, segment) totals
/// and derives the averages.
#[derive(Debug, Clone)]
pub struct EngagementFinisher {
    horizon: Duration,
}

impl EngagementFinisher {
    pub fn new(config: EngagementConfig) -> Self {
        EngagementFinisher {
            horizon: config.session_gap.saturating_add(config.allowed_lateness),
        }
    }
}

impl Finisher for EngagementFinisher {
    fn finish(&self, merged: &Partial, out: &mut Vec<Point>) {
        let Some(&(tier, _)) = TIERS.get(merged.window.kind as usize) else {
            return;
        };
        for (key, v) in &merged.rows {
            let ([country, segment], [started, ended, active, duration_ms, events, score]) =
                (&key[..], &v[..])
            else {
                continue;
            };
            let mut fields = vec![
                ("active_sessions".to_string(), FieldValue::Int(*active)),
                ("engagement_score".to_string(), FieldValue::Int(*score)),
                ("sessions_ended".to_string(), FieldValue::Int(*ended)),
                ("sessions_started".to_string(), FieldValue::Int(*started)),
            ];
            if *ended > 0 {
                let n = *ended as f64;
                fields.push((
                    "avg_session_seconds".to_string(),
                    FieldValue::Float(*duration_ms as f64 / 1000.0 / n),
                ));
                fields.push((
                    "events_per_session".to_string(),
                    FieldValue::Float(*events as f64 / n),
                ));
            }
            out.push(Point::new(
                "engagement",
                tier,
                EventTime(merged.window.start),
                vec![
                    ("country".to_string(), country.to_string()),
                    ("segment".to_string(), segment.to_string()),
                ],
                fields,
            ));
        }
    }

    fn horizon(&self) -> Option<Duration> {
        // A session closes a whole gap after its last event, correcting
        // windows that long after they fired.
        Some(self.horizon)
    }
}

impl Pipeline for EngagementPipeline {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn on_event(&mut self, ev: &Event) {
        if matches!(ev.event_type, EventType::ProfileUpdate) {
            self.on_profile(ev);
        } else {
            self.on_action(ev);
        }
    }

    fn on_events(&mut self, events: &[&Event]) {
        // Touch every user's entry first: independent look-ups whose cache
        // misses overlap, where the updates below would take them one by one.
        let found = events
            .iter()
            .filter(|ev| self.sessions.contains_key(ev.user_id.as_bytes()))
            .count();
        std::hint::black_box(found);
        for ev in events {
            self.on_event(ev);
        }
    }

    fn on_watermark(&mut self, wm: Watermark, out: &mut Vec<Partial>) {
        self.totals.last_wm = self.totals.last_wm.max(wm.0);
        self.sweep();
        let wm = self.totals.last_wm;
        let keep = self.totals.gap_ms.saturating_add(self.totals.lateness_ms);
        let segments = &self.segments;
        for set in &mut self.totals.windows {
            set.fire(wm, keep, |id, aggs| {
                out.push(Self::partial(segments, id, aggs))
            });
        }
    }

    fn early(&self, out: &mut Vec<Partial>) {
        for set in &self.totals.windows {
            set.early(|id, aggs| out.push(Self::partial(&self.segments, id, aggs)));
        }
    }

    fn snapshot(&self) -> Result<Vec<u8>, ProcessorError> {
        let mut profiles: Vec<(String, Vec<Profile>)> = self
            .profiles
            .iter()
            .map(|(k, v)| (k.to_text(), v.to_vec()))
            .collect();
        profiles.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut sessions: Vec<(String, Vec<Session>)> = self
            .sessions
            .iter()
            .map(|(k, v)| (k.to_text(), v.list.to_vec()))
            .collect();
        sessions.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let state = EngagementState {
            segments: self.segments.0.names().to_vec(),
            profiles,
            sessions,
            windows: self
                .totals
                .windows
                .iter()
                .enumerate()
                .flat_map(|(i, ws)| ws.iter().map(move |(start, w)| (i as u8, start, w.clone())))
                .collect(),
            last_wm: EventTime(self.totals.last_wm),
        };
        bincode::serialize(&state)
            .map_err(|e| ProcessorError::Snapshot(format!("engagement state: {e}")))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ProcessorError> {
        let corrupt =
            |what: String| ProcessorError::CorruptCheckpoint(format!("engagement state: {what}"));
        let state: EngagementState =
            bincode::deserialize(state).map_err(|e| corrupt(e.to_string()))?;
        let segments = Segments::from_names(state.segments).map_err(corrupt)?;
        let known = |id: SegmentId| (id as usize) < segments.len();
        let mut windows = new_windows();
        for (i, start, w) in state.windows {
            let set = windows
                .get_mut(i as usize)
                .ok_or_else(|| corrupt(format!("window set {i}")))?;
            if !w.state.keys().all(|&(_, seg)| known(seg)) {
                return Err(corrupt(format!("unknown segment in window {start}")));
            }
            set.insert(start, w);
        }
        let sessions_known = state
            .sessions
            .iter()
            .all(|(_, list)| list.iter().all(|s| known(s.tags.1)));
        let profiles_known =
            (state.profiles.iter()).all(|(_, list)| list.iter().all(|p| known(p.segment)));
        if !sessions_known || !profiles_known {
            return Err(corrupt("unknown segment in a session or profile".into()));
        }
        self.segments = segments;
        self.profiles = (state.profiles.into_iter())
            .filter(|(_, list)| !list.is_empty())
            .map(|(k, mut list)| {
                list.sort_unstable_by(|a, b| a.order().cmp(&b.order()));
                (CompactStr::new(&k), list.into_iter().collect())
            })
            .collect();
        let (gap, lateness) = (self.totals.gap_ms, self.totals.lateness_ms);
        self.sessions.clear();
        self.due.clear();
        for (user, list) in state.sessions {
            let Some(at) = list.iter().map(|s| due(s, gap, lateness)).min() else {
                continue;
            };
            let user = CompactStr::new(&user);
            self.due.push(at, user.clone());
            let list = list.into_iter().collect();
            self.sessions.insert(
                user,
                Sessions {
                    list,
                    scheduled: at,
                },
            );
        }
        self.totals.windows = windows;
        self.totals.last_wm = state.last_wm.0;
        Ok(())
    }
}

/// The engagement pipeline in the [registry](crate::registry), with its settings.
#[derive(Debug, Clone, Default)]
pub struct EngagementSpec(pub EngagementConfig);

impl EngagementSpec {
    fn config(&self, allowed_lateness: Duration) -> EngagementConfig {
        EngagementConfig {
            allowed_lateness,
            ..self.0.clone()
        }
    }
}

impl PipelineSpec for EngagementSpec {
    fn name(&self) -> &'static str {
        EngagementPipeline::NAME
    }

    fn measurements(&self) -> &'static [Measurement] {
        &[Measurement {
            name: "engagement",
            tiers: &[Tier::Rt, Tier::Hourly],
        }]
    }

    /// A session may have started a gap before a window, and its end lands
    /// a gap after its last event.
    fn reach(&self) -> StateReach {
        StateReach {
            back: self.0.session_gap,
            ahead: self.0.session_gap,
        }
    }

    fn stage1(&self, allowed_lateness: Duration) -> Box<dyn Pipeline> {
        Box::new(EngagementPipeline::new(self.config(allowed_lateness)))
    }

    fn stage2(&self, allowed_lateness: Duration) -> Box<dyn Finisher> {
        Box::new(EngagementFinisher::new(self.config(allowed_lateness)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::combiner::Combiner;
    use crate::solo::Solo;

    const GAP: i64 = 30 * 60_000;

    #[test]
    fn session_arithmetic_uses_the_window_sizes_of_the_tiers() {
        for (kind, (tier, size)) in TIERS.into_iter().enumerate() {
            assert_eq!(new_windows()[kind].size_ms(), size, "{tier:?}");
        }
    }

    fn solo(cfg: EngagementConfig) -> Solo<EngagementPipeline> {
        Solo::new(
            EngagementPipeline::new(cfg.clone()),
            EngagementFinisher::new(cfg.clone()),
            cfg.allowed_lateness,
        )
    }

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
        let mut p = solo(EngagementConfig::default());
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
        assert_eq!(p.pipeline.held_sessions(), 1, "kept for the lateness");
        out.clear();
        p.on_watermark(EventTime(HOUR_MS), &mut out);
        let h = |n| field(&out, Tier::Hourly, 0, "DE", "unknown", n);
        assert_eq!(h("sessions_started"), int(1));
        assert_eq!(h("sessions_ended"), int(1));
        assert_eq!(h("active_sessions"), int(1));
        assert_eq!(h("engagement_score"), int(3));
        assert_eq!(p.pipeline.held_sessions(), 0);
        p.on_watermark(EventTime(HOUR_MS + GAP + 60_000), &mut out);
        assert_eq!(p.pipeline.held_windows(), 0);
    }

    #[test]
    fn gap_splits_sessions() {
        let mut p = solo(EngagementConfig::default());
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
        let mut p = solo(EngagementConfig::default());
        let mut out = Vec::new();
        p.on_event(&ev("1", "u1", EventType::View, 0, "fr"), &mut out);
        p.on_event(
            &ev("2", "u1", EventType::View, GAP + 60_000, "fr"),
            &mut out,
        );
        p.on_watermark(EventTime(GAP + 30_000), &mut out);
        assert_eq!(p.pipeline.held_sessions(), 2);
        // Joins the closed first session and the open second one.
        p.on_event(&ev("3", "u1", EventType::View, GAP - 1_000, "fr"), &mut out);
        assert_eq!(p.pipeline.held_sessions(), 1);
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
        let mut p = solo(EngagementConfig::default());
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
        // A profile arriving later but in effect at a held session's start
        // retags it.
        out.clear();
        p.on_event(&profile("q", "u3", 2_500, "us", "casual"), &mut out);
        p.on_watermark(EventTime(61_000), &mut out);
        assert_eq!(started(&out, "US", "unknown"), int(0));
        assert_eq!(started(&out, "US", "casual"), int(1));
        // An older profile does not replace a newer one, and one after the
        // session's start does not apply to it.
        p.on_event(&profile("r", "u3", 100, "us", "old"), &mut out);
        p.on_event(&profile("s", "u3", 3_500, "us", "new"), &mut out);
        out.clear();
        p.on_watermark(EventTime(62_000), &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn score_uses_action_weights() {
        let mut p = solo(EngagementConfig::default());
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
        let mut p = solo(EngagementConfig::default());
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
        let mut p = solo(EngagementConfig::default());
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

    /// Events over ten minutes for four users, with short gaps so sessions
    /// split and merge, sorted by time.
    fn stream() -> Vec<Event> {
        stream_of(4)
    }

    /// Like [`stream`] for up to six users; u2 and u5 share their tags, and
    /// so do u3 and u6.
    fn stream_of(users: u64) -> Vec<Event> {
        let mut evs = vec![profile("p1", "u1", 0, "de", "creator")];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..400 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let user = ["u1", "u2", "u3", "u4", "u5", "u6"][(x % users) as usize];
            let country =
                ["", "de", "us", "", "fr", "us", ""][(user.as_bytes()[1] - b'0') as usize];
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
    /// each.
    fn run(
        p: &mut Solo<EngagementPipeline>,
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

    /// The last value per point identity.
    fn finals(points: &[Point]) -> BTreeMap<String, Vec<(String, FieldValue)>> {
        let mut m = BTreeMap::new();
        for p in points {
            let key = format!(
                "{}|{}|{}|{}",
                p.measurement,
                p.tier.name(),
                p.series_key(),
                p.time.0
            );
            m.insert(key, p.fields.clone());
        }
        m
    }

    /// Reverses blocks of events spanning well under the out-of-orderness.
    fn shuffle(ordered: &[Event]) -> Vec<Event> {
        let mut shuffled = ordered.to_vec();
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
        shuffled
    }

    #[test]
    fn out_of_order_input_gives_the_same_final_points() {
        let ordered = stream();
        let shuffled = shuffle(&ordered);
        assert_ne!(ordered, shuffled);
        let mut results = Vec::new();
        for evs in [&ordered, &shuffled] {
            let mut p = solo(config());
            let (mut out, mut max_seen) = (Vec::new(), i64::MIN);
            run(&mut p, evs, 5_000, &mut max_seen, &mut out);
            p.on_watermark(EventTime(10 * HOUR_MS), &mut out);
            assert_eq!(p.pipeline.held_sessions(), 0);
            assert_eq!(p.pipeline.held_windows(), 0);
            results.push(finals(&out));
        }
        assert!(results[0].len() > 20);
        assert_eq!(results[0], results[1]);
    }

    #[test]
    fn users_split_across_two_workers_give_the_same_final_points() {
        let mut evs = stream_of(6);
        // Retags u6's held sessions mid-stream.
        evs.push(profile("p6", "u6", 300_000, "", "casual"));
        evs.sort_by_key(|e| e.timestamp);
        let evs = shuffle(&evs);
        let mut one = solo(config());
        let (mut single, mut max_seen) = (Vec::new(), i64::MIN);
        run(&mut one, &evs, 5_000, &mut max_seen, &mut single);
        one.on_watermark(EventTime(10 * HOUR_MS), &mut single);

        // Odd users on worker 0, even ones on worker 1; each worker's
        // watermark follows its own events, as a real worker's does.
        let mut workers = [
            EngagementPipeline::new(config()),
            EngagementPipeline::new(config()),
        ];
        let mut combiner = Combiner::new(
            vec![Box::new(EngagementFinisher::new(config()))],
            2,
            config().allowed_lateness,
        );
        let (mut merged, mut partials) = (Vec::new(), Vec::new());
        let mut max_seen = [i64::MIN; 2];
        let mut step = |w: usize, wm: i64, p: &mut EngagementPipeline, out: &mut Vec<Point>| {
            p.on_watermark(EventTime(wm), &mut partials);
            for mut part in partials.drain(..) {
                part.window.pipeline = 0;
                combiner.on_partial(w, part).unwrap();
            }
            combiner.on_watermark(w, EventTime(wm), out);
        };
        for e in &evs {
            let w = usize::from(e.user_id.as_bytes()[1] % 2 == 0);
            workers[w].on_event(e);
            max_seen[w] = max_seen[w].max(e.timestamp.0);
            step(w, max_seen[w] - 5_000, &mut workers[w], &mut merged);
        }
        for (w, p) in workers.iter_mut().enumerate() {
            step(w, 10 * HOUR_MS, p, &mut merged);
        }
        for p in &workers {
            assert_eq!((p.held_sessions(), p.held_windows()), (0, 0));
        }
        assert_eq!(combiner.late_partials(), 0);
        assert_eq!(combiner.held_windows(), 0);
        let (single, merged) = (finals(&single), finals(&merged));
        assert!(single.len() > 20);
        assert_eq!(single, merged);
    }

    #[test]
    fn restore_mid_stream_equals_uninterrupted() {
        let evs = stream();
        let (a, b) = evs.split_at(evs.len() / 2);
        let mut p = solo(config());
        let (mut whole, mut max_seen) = (Vec::new(), i64::MIN);
        run(&mut p, &evs, 5_000, &mut max_seen, &mut whole);
        p.on_watermark(EventTime(10 * HOUR_MS), &mut whole);

        let mut q = solo(config());
        let (mut split, mut max_seen) = (Vec::new(), i64::MIN);
        run(&mut q, a, 5_000, &mut max_seen, &mut split);
        let snap = q.snapshot();
        let mut r = solo(config());
        r.restore(&snap).unwrap();
        run(&mut r, b, 5_000, &mut max_seen, &mut split);
        r.on_watermark(EventTime(10 * HOUR_MS), &mut split);
        assert_eq!(whole, split);
        assert!(r.pipeline.restore(b"garbage").is_err());
    }

    #[test]
    fn extreme_timestamps_do_not_panic() {
        let mut p = solo(EngagementConfig {
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
        let mut q = solo(EngagementConfig::default());
        for ts in [i64::MIN, i64::MAX, 0] {
            q.on_event(&ev("x", "v", EventType::View, ts, ""), &mut out);
            q.on_watermark(EventTime(ts), &mut out);
        }
        q.on_watermark(EventTime::MAX, &mut out);
    }

    /// Zipf-distributed users (as `tidemark bench`'s generator), 5 % of
    /// events up to 4 s late, `per_ms` events per millisecond of event time.
    struct Workload {
        cumulative: Vec<f64>,
        x: u64,
        next_id: i64,
        per_ms: i64,
    }

    impl Workload {
        fn new(users: usize, per_ms: i64) -> Self {
            let mut acc = 0.0;
            let cumulative = (1..=users)
                .map(|i| {
                    acc += 1.0 / (i as f64).powf(0.9);
                    acc
                })
                .collect();
            Workload {
                cumulative,
                x: 0x9e37_79b9_7f4a_7c15,
                next_id: 0,
                per_ms,
            }
        }

        fn rand(&mut self) -> u64 {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            self.x
        }

        /// The next `n` events; made per batch so they are fresh in the
        /// cache, as decoded events are.
        fn batch(&mut self, n: usize, out: &mut Vec<Event>) {
            const MIX: [(EventType, u64); 10] = [
                (EventType::View, 40),
                (EventType::Like, 16),
                (EventType::Comment, 5),
                (EventType::Share, 3),
                (EventType::PostCreated, 3),
                (EventType::PageView, 14),
                (EventType::Login, 1),
                (EventType::AdImpression, 15),
                (EventType::AdClick, 2),
                (EventType::AdConversion, 1),
            ];
            const COUNTRIES: [&str; 10] =
                ["us", "br", "in", "de", "jp", "kz", "gb", "fr", "mx", "id"];
            out.clear();
            for _ in 0..n {
                let total = self.cumulative.last().copied().unwrap_or(1.0);
                let r = (self.rand() >> 11) as f64 / (1u64 << 53) as f64 * total;
                let user = self.cumulative.partition_point(|&c| c < r);
                let mut pick = self.rand() % 100;
                let t = MIX
                    .iter()
                    .find(|(_, w)| {
                        let hit = pick < *w;
                        pick = pick.saturating_sub(*w);
                        hit
                    })
                    .map_or(EventType::View, |(t, _)| t.clone());
                let late = if self.rand() % 100 < 5 {
                    (self.rand() % 4_000) as i64
                } else {
                    0
                };
                let id = self.next_id;
                self.next_id += 1;
                let ts = 1_790_000_000_000 + id / self.per_ms - late;
                let country = COUNTRIES[user % COUNTRIES.len()];
                out.push(ev(&format!("g1-{id}"), &format!("u{user}"), t, ts, country));
            }
        }
    }

    /// Stage-1 throughput, in release:
    /// `cargo test --release -p tidemark-processor --lib engagement -- --ignored --nocapture`.
    /// `tidemark bench pipeline`'s workload (1M zipf users, 5,000 events per
    /// second of event time: no session closes), then 50 minutes of event
    /// time for 100k users (sessions close and expire), with a watermark
    /// every 2,000 events.
    #[test]
    #[ignore]
    fn bench_stage1() {
        for (users, per_ms, n) in [(1_000_000, 5, 1_000_000), (100_000, 1, 3_000_000)] {
            let mut p = EngagementPipeline::default();
            let mut load = Workload::new(users, per_ms);
            let (mut evs, mut partials, mut max_seen) = (Vec::new(), Vec::new(), i64::MIN);
            let (mut in_events, mut in_watermarks) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..n / 2_000 {
                load.batch(2_000, &mut evs);
                let t0 = std::time::Instant::now();
                for e in &evs {
                    p.on_event(e);
                    max_seen = max_seen.max(e.timestamp.0);
                }
                let t1 = std::time::Instant::now();
                p.on_watermark(EventTime(max_seen - 5_000), &mut partials);
                (in_events, in_watermarks) = (in_events + (t1 - t0), in_watermarks + t1.elapsed());
                partials.clear();
            }
            let rate = |d: Duration| n as f64 / d.as_secs_f64() / 1e6;
            println!(
                "engagement stage 1, {users} users, {} min of event time: on_event {:.2} M events/s, \
                 with watermarks {:.2} M events/s; {} sessions held",
                n as i64 / per_ms / 60_000,
                rate(in_events),
                rate(in_events + in_watermarks),
                p.held_sessions()
            );
        }
    }
}
