//! The trending pipeline: hashtags over hopping windows (1, 5 and 15 minutes,
//! sliding by 1 minute), ranked by velocity of distinct users.
//!
//! Every event carrying `hashtags` contributes once to each distinct tag it
//! carries. A user counts once per tag per window, so one account repeating a
//! tag cannot make it trend.
//!
//! State is kept per slice (one slide, 1 minute by default): per tag, the set
//! of user hashes (xxh3 of `user_id`) and the event count. A window of `N`
//! slides ending at a slice boundary is the union of its last `N` slices, so
//! distinct users are exact. A window `[start, end)` fires when the watermark
//! reaches `end`.
//!
//! # Score
//!
//! ```text
//! score    = (users − baseline) / sqrt(baseline + 1)
//! baseline ← decay · baseline + (1 − decay) · users     after each fired window
//! ```
//!
//! `baseline` is kept per (window size, tag): an exponentially decayed average
//! of the tag's distinct users in the earlier fired windows of that size. A
//! tag absent from a fired window has `users = 0` there, so its baseline decays
//! towards 0; baselines below 0.01 are dropped. A rising tag scores high, a tag
//! that is merely big but flat scores near 0.
//!
//! The top `top_k` tags per window by score are emitted (ties: more users
//! first, then tag name) as measurement `trending`, tier `rt`, tags `tag` and
//! `window` (`1m`, `5m`, `15m`), fields `rank` (1-based), `users`, `events` and
//! `score`, at the window start.
//!
//! # Late events
//!
//! An event whose 1-slide window is still within the allowed lateness updates
//! its slice, and every fired window containing that slice is re-emitted at
//! the next watermark. A re-emitted window is scored against the baseline as
//! it was when the window first fired, and corrections never change the
//! baselines, so results do not depend on when the late event arrived
//! relative to later windows. A tag that falls out of the top-K through a
//! correction keeps its earlier point in the store.
//!
//! # Bounded memory
//!
//! Slices are dropped once the largest window containing them is past the
//! allowed lateness. At most `max_tags_per_window` distinct tags are held per
//! slice; events for further new tags in a full slice are counted only in
//! [`TrendingPipeline::dropped_tag_events`] and take part in no window.

use std::collections::BTreeMap;
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use tidemark_model::{Event, EventTime, FieldValue, Point, Tier, Watermark};

use crate::{Pipeline, ProcessorError};

/// Baselines below this are forgotten, bounding the baseline maps.
const MIN_BASELINE: f64 = 0.01;

/// Configuration of [`TrendingPipeline`].
#[derive(Debug, Clone, PartialEq)]
pub struct TrendingConfig {
    /// Window sizes; rounded up to a whole number of slides.
    pub sizes: Vec<Duration>,
    /// How far consecutive windows are apart; also the slice length.
    pub slide: Duration,
    /// Tags emitted per window.
    pub top_k: usize,
    /// How long a fired window still accepts late events; must match the
    /// driver's allowed lateness.
    pub allowed_lateness: Duration,
    /// Weight of the old baseline when a window fires (0..=1).
    pub baseline_decay: f64,
    /// Most distinct tags held per slice.
    pub max_tags_per_window: usize,
}

impl Default for TrendingConfig {
    fn default() -> Self {
        TrendingConfig {
            sizes: vec![
                Duration::from_secs(60),
                Duration::from_secs(300),
                Duration::from_secs(900),
            ],
            slide: Duration::from_secs(60),
            top_k: 50,
            allowed_lateness: crate::traffic::DEFAULT_ALLOWED_LATENESS,
            baseline_decay: 0.5,
            max_tags_per_window: 100_000,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TagSlice {
    users: FxHashSet<u64>,
    events: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Slice {
    tags: FxHashMap<String, TagSlice>,
    /// Changed after a window containing it fired.
    dirty: bool,
}

/// Per window size: baselines after each window that fired with data.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SizeState {
    /// Window end -> baselines right after that window fired. The baseline
    /// before any window is the latest entry before it, decayed once per
    /// window (all empty) in between; this keeps the baselines a window was
    /// scored against available for corrections without copying them for
    /// every window.
    history: BTreeMap<i64, FxHashMap<String, f64>>,
}

#[derive(Debug)]
struct SizeSpec {
    slides: i64,
    label: String,
}

/// Hashtag trends over hopping windows; see the module documentation.
#[derive(Debug)]
pub struct TrendingPipeline {
    slide_ms: i64,
    sizes: Vec<SizeSpec>,
    top_k: usize,
    lateness_ms: i64,
    decay: f64,
    max_tags: usize,
    slices: BTreeMap<i64, Slice>,
    states: Vec<SizeState>,
    last_wm: Watermark,
    dropped: u64,
}

#[derive(Serialize, Deserialize)]
struct TrendingState {
    slices: Vec<(i64, Slice)>,
    states: Vec<SizeState>,
    last_wm: Watermark,
    dropped: u64,
}

impl Default for TrendingPipeline {
    fn default() -> Self {
        TrendingPipeline::new(TrendingConfig::default())
    }
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn label(ms: i64) -> String {
    if ms % 3_600_000 == 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms % 60_000 == 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1_000 == 0 {
        format!("{}s", ms / 1_000)
    } else {
        format!("{ms}ms")
    }
}

/// One tag's totals in a window.
struct Row<'a> {
    tag: &'a str,
    users: i64,
    events: i64,
    score: f64,
}

impl TrendingPipeline {
    pub const NAME: &'static str = "trending";

    pub fn new(config: TrendingConfig) -> Self {
        let slide_ms = millis(config.slide).max(1);
        let sizes: Vec<SizeSpec> = config
            .sizes
            .iter()
            .map(|&d| {
                let ms = millis(d);
                let slides = (ms / slide_ms + i64::from(ms % slide_ms != 0)).max(1);
                SizeSpec {
                    slides,
                    label: label(slides.saturating_mul(slide_ms)),
                }
            })
            .collect();
        let decay = if config.baseline_decay.is_finite() {
            config.baseline_decay.clamp(0.0, 1.0)
        } else {
            0.5
        };
        TrendingPipeline {
            slide_ms,
            states: sizes.iter().map(|_| SizeState::default()).collect(),
            sizes,
            top_k: config.top_k,
            lateness_ms: millis(config.allowed_lateness),
            decay,
            max_tags: config.max_tags_per_window,
            slices: BTreeMap::new(),
            last_wm: EventTime::MIN,
            dropped: 0,
        }
    }

    /// Events for a tag that found its slice full and were not counted.
    pub fn dropped_tag_events(&self) -> u64 {
        self.dropped
    }

    /// Number of slices held.
    pub fn slices(&self) -> usize {
        self.slices.len()
    }

    fn max_slides(&self) -> i64 {
        self.sizes.iter().map(|s| s.slides).max().unwrap_or(1)
    }

    /// The baseline of every tag just before the window of size `i` ending at `end`.
    fn baseline_before(&self, i: usize, end: i64) -> (Option<&FxHashMap<String, f64>>, f64) {
        match self.states[i].history.range(..end).next_back() {
            Some((&prev, map)) => {
                let empty = (end.saturating_sub(prev) / self.slide_ms).saturating_sub(1);
                let factor = self.decay.powi(empty.clamp(0, i32::MAX as i64) as i32);
                (Some(map), factor)
            }
            None => (None, 1.0),
        }
    }

    /// Distinct users and events per tag in the window of size `i` ending at `end`.
    fn window_totals(&self, i: usize, end: i64) -> Vec<(&str, i64, i64)> {
        let span = self.sizes[i].slides.saturating_mul(self.slide_ms);
        let start = end.saturating_sub(span);
        let mut acc: FxHashMap<&str, (FxHashSet<u64>, i64)> = FxHashMap::default();
        for (_, slice) in self.slices.range(start..end) {
            for (tag, ts) in &slice.tags {
                let e = acc.entry(tag.as_str()).or_default();
                e.0.extend(ts.users.iter().copied());
                e.1 += ts.events;
            }
        }
        acc.into_iter()
            .map(|(tag, (users, events))| (tag, users.len() as i64, events))
            .collect()
    }

    /// Scores and emits the window of size `i` ending at `end`; returns its totals.
    fn emit_window(&self, i: usize, end: i64, out: &mut Vec<Point>) -> Vec<(String, i64)> {
        let totals = self.window_totals(i, end);
        let (base, factor) = self.baseline_before(i, end);
        let mut rows: Vec<Row> = totals
            .iter()
            .map(|&(tag, users, events)| {
                let b = base.and_then(|m| m.get(tag)).map_or(0.0, |b| b * factor);
                Row {
                    tag,
                    users,
                    events,
                    score: (users as f64 - b) / (b + 1.0).sqrt(),
                }
            })
            .collect();
        rows.sort_unstable_by(|a, b| {
            b.score
                .total_cmp(&a.score)
                .then(b.users.cmp(&a.users))
                .then(a.tag.cmp(b.tag))
        });
        let spec = &self.sizes[i];
        let time = EventTime(end.saturating_sub(spec.slides.saturating_mul(self.slide_ms)));
        for (rank, row) in rows.iter().take(self.top_k).enumerate() {
            out.push(Point {
                measurement: "trending".to_string(),
                tier: Tier::Rt,
                tags: vec![
                    ("tag".to_string(), row.tag.to_string()),
                    ("window".to_string(), spec.label.clone()),
                ],
                fields: vec![
                    ("events".to_string(), FieldValue::Int(row.events)),
                    ("rank".to_string(), FieldValue::Int(rank as i64 + 1)),
                    ("score".to_string(), FieldValue::Float(row.score)),
                    ("users".to_string(), FieldValue::Int(row.users)),
                ],
                time,
            });
        }
        totals
            .into_iter()
            .map(|(t, u, _)| (t.to_string(), u))
            .collect()
    }

    /// Fires the window of size `i` ending at `end` for the first time and
    /// advances the baselines.
    fn fire(&mut self, i: usize, end: i64, out: &mut Vec<Point>) {
        let totals = self.emit_window(i, end, out);
        let d = self.decay;
        let (base, factor) = self.baseline_before(i, end);
        let mut next: FxHashMap<String, f64> = base
            .map(|m| m.iter().map(|(t, b)| (t.clone(), b * factor * d)).collect())
            .unwrap_or_default();
        for (tag, users) in totals {
            *next.entry(tag).or_insert(0.0) += (1.0 - d) * users as f64;
        }
        next.retain(|_, b| *b >= MIN_BASELINE);
        self.states[i].history.insert(end, next);
    }

    /// Ends of windows of size `i` that contain at least one held slice, in
    /// `(lo, hi]`, ascending.
    fn window_ends(&self, i: usize, lo: i64, hi: i64) -> Vec<i64> {
        let slide = self.slide_ms;
        let span = self.sizes[i].slides.saturating_mul(slide);
        let above_lo = lo
            .saturating_sub(lo.rem_euclid(slide))
            .saturating_add(slide);
        let mut ends = Vec::new();
        for &s in self.slices.keys() {
            push_ends(
                &mut ends,
                s.saturating_add(slide).max(above_lo),
                s.saturating_add(span).min(hi),
                slide,
            );
        }
        ends.sort_unstable();
        ends.dedup();
        ends
    }
}

/// Pushes `from, from + step, ...` up to `to`, without overflowing.
fn push_ends(ends: &mut Vec<i64>, from: i64, to: i64, step: i64) {
    let mut e = from;
    while e <= to {
        ends.push(e);
        match e.checked_add(step) {
            Some(n) => e = n,
            None => break,
        }
    }
}

impl Pipeline for TrendingPipeline {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn on_event(&mut self, ev: &Event, _out: &mut Vec<Point>) {
        if ev.hashtags.is_empty() {
            return;
        }
        let ts = ev.timestamp.0;
        let start = ts.saturating_sub(ts.rem_euclid(self.slide_ms));
        let end = start.saturating_add(self.slide_ms);
        // Past the lateness of its smallest window: the driver filters such
        // events; this keeps a stray one from changing complete results.
        if end.saturating_add(self.lateness_ms) <= self.last_wm.0 {
            return;
        }
        let user = xxhash_rust::xxh3::xxh3_64(ev.user_id.as_bytes());
        let fired = end <= self.last_wm.0;
        let slice = self.slices.entry(start).or_default();
        let mut seen: Vec<&str> = Vec::with_capacity(ev.hashtags.len());
        for tag in &ev.hashtags {
            // An empty tag cannot be stored as a tag value.
            if tag.is_empty() || seen.contains(&tag.as_str()) {
                continue;
            }
            seen.push(tag);
            if !slice.tags.contains_key(tag.as_str()) && slice.tags.len() >= self.max_tags {
                self.dropped += 1;
                continue;
            }
            let entry = slice.tags.entry(tag.clone()).or_default();
            entry.users.insert(user);
            entry.events += 1;
            slice.dirty |= fired;
        }
    }

    fn on_watermark(&mut self, wm: Watermark, out: &mut Vec<Point>) {
        let prev = self.last_wm.0;
        let wm = prev.max(wm.0);
        let slide = self.slide_ms;
        // Corrections first, while everything they need is still held.
        let dirty: Vec<i64> = self
            .slices
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&k, _)| k)
            .collect();
        if !dirty.is_empty() {
            for i in 0..self.sizes.len() {
                let span = self.sizes[i].slides.saturating_mul(slide);
                let mut ends: Vec<i64> = Vec::new();
                for &s in &dirty {
                    push_ends(
                        &mut ends,
                        s.saturating_add(slide),
                        s.saturating_add(span).min(prev),
                        slide,
                    );
                }
                ends.sort_unstable();
                ends.dedup();
                for end in ends {
                    self.emit_window(i, end, out);
                }
            }
            for s in &dirty {
                if let Some(slice) = self.slices.get_mut(s) {
                    slice.dirty = false;
                }
            }
        }
        if wm > prev {
            for i in 0..self.sizes.len() {
                for end in self.window_ends(i, prev, wm) {
                    self.fire(i, end, out);
                }
            }
        }
        self.last_wm = EventTime(wm);
        // Forget what no correction can reach any more.
        let horizon = wm.saturating_sub(self.lateness_ms);
        let keep_span = self.max_slides().saturating_mul(slide);
        self.slices
            .retain(|&s, _| s.saturating_add(keep_span) > horizon);
        for st in &mut self.states {
            // The newest entry at or before the horizon is still the base for
            // later windows.
            let keep_from = st.history.range(..=horizon).next_back().map(|(&k, _)| k);
            if let Some(k) = keep_from {
                st.history = st.history.split_off(&k);
            }
        }
    }

    fn early(&self, out: &mut Vec<Point>) {
        let Some((&newest, _)) = self.slices.iter().next_back() else {
            return;
        };
        let end = newest.saturating_add(self.slide_ms);
        if end <= self.last_wm.0 {
            return;
        }
        for i in 0..self.sizes.len() {
            self.emit_window(i, end, out);
        }
    }

    fn snapshot(&self) -> Vec<u8> {
        let state = TrendingState {
            slices: self.slices.iter().map(|(&k, s)| (k, s.clone())).collect(),
            states: self.states.clone(),
            last_wm: self.last_wm,
            dropped: self.dropped,
        };
        // Serialising plain data into a Vec cannot fail.
        bincode::serialize(&state).unwrap_or_default()
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ProcessorError> {
        let state: TrendingState = bincode::deserialize(state)
            .map_err(|e| ProcessorError::CorruptCheckpoint(format!("trending state: {e}")))?;
        if state.states.len() != self.sizes.len() {
            return Err(ProcessorError::CorruptCheckpoint(format!(
                "trending state: {} window sizes, expected {}",
                state.states.len(),
                self.sizes.len()
            )));
        }
        self.slices = state.slices.into_iter().collect();
        self.states = state.states;
        self.last_wm = state.last_wm;
        self.dropped = state.dropped;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_model::EventType;

    const MIN: i64 = 60_000;

    fn ev(user: &str, tags: &[&str], ts: i64) -> Event {
        Event {
            event_id: format!("{user}-{ts}"),
            event_type: EventType::View,
            user_id: user.into(),
            timestamp: EventTime(ts),
            hashtags: tags.iter().map(|t| t.to_string()).collect(),
            ..Event::default()
        }
    }

    fn int(p: &Point, f: &str) -> i64 {
        match p.field(f) {
            Some(FieldValue::Int(n)) => n,
            other => panic!("field {f}: {other:?}"),
        }
    }

    fn score(p: &Point) -> f64 {
        match p.field("score") {
            Some(FieldValue::Float(f)) => f,
            other => panic!("score: {other:?}"),
        }
    }

    fn find<'a>(out: &'a [Point], window: &str, tag: &str, time: i64) -> Option<&'a Point> {
        out.iter().rev().find(|p| {
            p.tag("window") == Some(window)
                && p.tag("tag") == Some(tag)
                && p.time == EventTime(time)
        })
    }

    fn run(events: &[Event], wm: i64) -> Vec<Point> {
        let mut p = TrendingPipeline::default();
        let mut out = Vec::new();
        for e in events {
            p.on_event(e, &mut out);
        }
        p.on_watermark(EventTime(wm), &mut out);
        out
    }

    #[test]
    fn one_user_repeating_a_tag_counts_once() {
        let events: Vec<Event> = (0..100).map(|i| ev("u1", &["spam"], i * 100)).collect();
        let out = run(&events, MIN);
        let p = find(&out, "1m", "spam", 0).unwrap();
        assert_eq!(int(p, "users"), 1);
        assert_eq!(int(p, "events"), 100);
        assert_eq!(int(p, "rank"), 1);
        assert_eq!(p.measurement, "trending");
        assert_eq!(p.tier, Tier::Rt);
        let keys: Vec<&str> = p.tags.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["tag", "window"]);
        let fields: Vec<&str> = p.fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(fields, ["events", "rank", "score", "users"]);
        // A tag repeated within one event counts once.
        let out = run(&[ev("u1", &["a", "a"], 0)], MIN);
        assert_eq!(int(find(&out, "1m", "a", 0).unwrap(), "events"), 1);
    }

    #[test]
    fn an_event_is_in_one_five_and_fifteen_windows() {
        let ts = 100 * MIN + 30_000;
        let out = run(&[ev("u1", &["rust"], ts)], 200 * MIN);
        for (window, n) in [("1m", 1), ("5m", 5), ("15m", 15)] {
            let mut times: Vec<i64> = out
                .iter()
                .filter(|p| p.tag("window") == Some(window))
                .map(|p| p.time.0)
                .collect();
            times.sort_unstable();
            let expect: Vec<i64> = (0..n).map(|k| (100 - n + 1 + k) * MIN).collect();
            assert_eq!(times, expect, "{window}");
        }
        let mut p = TrendingPipeline::default();
        let mut o = Vec::new();
        p.on_event(&ev("u1", &["rust"], ts), &mut o);
        p.on_watermark(EventTime(101 * MIN - 1), &mut o);
        assert!(o.is_empty(), "nothing fires before the first window ends");
        p.on_watermark(EventTime(101 * MIN), &mut o);
        assert_eq!(o.len(), 3, "1m, 5m and 15m windows ending at 101 m");
    }

    #[test]
    fn top_k_is_bounded_and_ordered() {
        let mut events = Vec::new();
        for t in 0..80 {
            for u in 0..(t % 7 + 1) {
                events.push(ev(&format!("u{u}"), &[&format!("t{t:02}")], 1_000));
            }
        }
        let out = run(&events, MIN);
        let rows: Vec<&Point> = out
            .iter()
            .filter(|p| p.tag("window") == Some("1m"))
            .collect();
        assert_eq!(rows.len(), 50);
        for (i, p) in rows.iter().enumerate() {
            assert_eq!(int(p, "rank"), i as i64 + 1);
        }
        for w in rows.windows(2) {
            let (a, b) = (w[0], w[1]);
            let ord = score(b)
                .total_cmp(&score(a))
                .then(int(b, "users").cmp(&int(a, "users")))
                .then(a.tag("tag").cmp(&b.tag("tag")));
            assert_eq!(ord, std::cmp::Ordering::Less);
        }
        // No baseline yet: the score is the user count, ties by tag name.
        assert_eq!(rows[0].tag("tag"), Some("t06"));
        assert_eq!(rows[1].tag("tag"), Some("t13"));
        assert_eq!(int(rows[0], "users"), 7);
        assert_eq!(score(rows[0]), 7.0);
    }

    #[test]
    fn rising_tag_beats_flat_tag() {
        let mut p = TrendingPipeline::default();
        let mut out = Vec::new();
        // "flat" has 10 users every minute; "rising" 1, 2, 4, 8, 16.
        for m in 0..5i64 {
            for u in 0..10 {
                p.on_event(&ev(&format!("f{u}"), &["flat"], m * MIN), &mut out);
            }
            for u in 0..(1 << m) {
                p.on_event(&ev(&format!("r{u}"), &["rising"], m * MIN), &mut out);
            }
        }
        p.on_watermark(EventTime(5 * MIN), &mut out);
        // Baselines of the 1m windows, by hand (decay 0.5).
        let mut flat_b = 0.0f64;
        let mut rising_b = 0.0f64;
        for m in 0..5i64 {
            let rising_users = (1i64 << m) as f64;
            let f = find(&out, "1m", "flat", m * MIN).unwrap();
            let r = find(&out, "1m", "rising", m * MIN).unwrap();
            assert_eq!(score(f), (10.0 - flat_b) / (flat_b + 1.0).sqrt());
            assert_eq!(
                score(r),
                (rising_users - rising_b) / (rising_b + 1.0).sqrt()
            );
            flat_b = 0.5 * flat_b + 0.5 * 10.0;
            rising_b = 0.5 * rising_b + 0.5 * rising_users;
        }
        let f = find(&out, "1m", "flat", 4 * MIN).unwrap();
        let r = find(&out, "1m", "rising", 4 * MIN).unwrap();
        assert!(score(r) > score(f), "{} vs {}", score(r), score(f));
        assert_eq!(int(r, "rank"), 1);
        assert!(score(f) < 1.0, "flat tag scores near 0");
    }

    #[test]
    fn absent_tags_decay_and_are_forgotten() {
        let mut p = TrendingPipeline::default();
        let mut out = Vec::new();
        p.on_event(&ev("u", &["a"], 0), &mut out);
        p.on_watermark(EventTime(MIN), &mut out);
        // Three empty 1m windows later the baseline is 0.5 * 0.5^3.
        p.on_event(&ev("u", &["a"], 4 * MIN), &mut out);
        p.on_watermark(EventTime(5 * MIN), &mut out);
        let b: f64 = 0.5 * 0.125;
        let a = find(&out, "1m", "a", 4 * MIN).unwrap();
        assert_eq!(score(a), (1.0 - b) / (b + 1.0).sqrt());
        p.on_watermark(EventTime(1_000 * MIN), &mut out);
        assert!(p.states.iter().all(|s| s.history.len() == 1));
        assert_eq!(p.slices(), 0);
        out.clear();
        p.on_event(&ev("u", &["a"], 2_000 * MIN), &mut out);
        p.on_watermark(EventTime(2_001 * MIN), &mut out);
        // Long decayed: scored against a zero baseline.
        assert_eq!(score(find(&out, "1m", "a", 2_000 * MIN).unwrap()), 1.0);
    }

    #[test]
    fn late_event_re_emits_corrected_windows() {
        let mut p = TrendingPipeline::default();
        let mut out = Vec::new();
        p.on_event(&ev("u1", &["x"], 10 * MIN + 1_000), &mut out);
        p.on_watermark(EventTime(11 * MIN), &mut out);
        assert_eq!(int(find(&out, "1m", "x", 10 * MIN).unwrap(), "users"), 1);
        let first_score = score(find(&out, "1m", "x", 10 * MIN).unwrap());
        out.clear();
        p.on_event(&ev("u2", &["x"], 10 * MIN + 2_000), &mut out);
        p.on_watermark(EventTime(11 * MIN + 30_000), &mut out);
        let r = find(&out, "1m", "x", 10 * MIN).unwrap();
        assert_eq!(int(r, "users"), 2);
        assert_eq!(int(r, "events"), 2);
        // Scored against the same (empty) baseline as at first firing.
        assert_eq!(score(r), 2.0);
        assert_eq!(first_score, 1.0);
        assert_eq!(int(find(&out, "5m", "x", 6 * MIN).unwrap(), "users"), 2);
        assert_eq!(int(find(&out, "15m", "x", -4 * MIN).unwrap(), "users"), 2);
        out.clear();
        p.on_watermark(EventTime(11 * MIN + 40_000), &mut out);
        assert!(out.is_empty(), "a correction is emitted once");
        // Past the lateness the event is ignored.
        p.on_watermark(EventTime(12 * MIN), &mut out);
        out.clear();
        p.on_event(&ev("u3", &["x"], 10 * MIN + 3_000), &mut out);
        p.on_watermark(EventTime(12 * MIN + 1), &mut out);
        assert!(out
            .iter()
            .all(|p| p.time != EventTime(10 * MIN) || p.tag("window") != Some("1m")));
    }

    fn stream() -> Vec<Event> {
        let mut events = Vec::new();
        for m in 0..40i64 {
            for u in 0..(m % 9 + 1) {
                let tags: &[&str] = match u % 3 {
                    0 => &["a", "b"],
                    1 => &["b"],
                    _ => &["c", "a", "d"],
                };
                events.push(ev(&format!("u{u}"), tags, m * MIN + u * 3_001));
            }
        }
        events
    }

    fn drive(p: &mut TrendingPipeline, events: &[Event], out: &mut Vec<Point>) {
        let mut max = i64::MIN;
        for e in events {
            p.on_event(e, out);
            max = max.max(e.timestamp.0);
            p.on_watermark(EventTime(max - 5_000), out);
        }
    }

    #[test]
    fn restore_mid_stream_equals_uninterrupted() {
        let events = stream();
        let (a, b) = events.split_at(events.len() / 2);
        let mut p = TrendingPipeline::default();
        let mut full = Vec::new();
        drive(&mut p, &events, &mut full);
        p.on_watermark(EventTime::MAX, &mut full);

        let mut q = TrendingPipeline::default();
        let mut resumed = Vec::new();
        drive(&mut q, a, &mut resumed);
        let snap = q.snapshot();
        let mut r = TrendingPipeline::default();
        r.restore(&snap).unwrap();
        drive(&mut r, b, &mut resumed);
        r.on_watermark(EventTime::MAX, &mut resumed);
        assert_eq!(full, resumed);
        assert!(r.restore(b"garbage").is_err());
    }

    #[test]
    fn deterministic_regardless_of_order_within_out_of_orderness() {
        let events = stream();
        let mut shuffled = events.clone();
        // Reverse runs of 4 events (all within a few seconds of each other).
        for chunk in shuffled.chunks_mut(4) {
            chunk.reverse();
        }
        let wm_drive = |evs: &[Event]| {
            let mut p = TrendingPipeline::default();
            let mut out = Vec::new();
            for (i, e) in evs.iter().enumerate() {
                p.on_event(e, &mut out);
                if i % 4 == 3 {
                    let max = evs[..=i].iter().map(|e| e.timestamp.0).max().unwrap_or(0);
                    p.on_watermark(EventTime(max - 20_000), &mut out);
                }
            }
            p.on_watermark(EventTime::MAX, &mut out);
            out
        };
        let a = wm_drive(&events);
        assert!(!a.is_empty());
        assert_eq!(a, wm_drive(&shuffled));
    }

    #[test]
    fn tags_per_slice_are_bounded_and_extremes_do_not_panic() {
        let mut p = TrendingPipeline::new(TrendingConfig {
            max_tags_per_window: 3,
            ..TrendingConfig::default()
        });
        let mut out = Vec::new();
        p.on_event(&ev("u", &["a", "b", "c", "d", "e"], 0), &mut out);
        p.on_event(&ev("v", &["a", ""], 0), &mut out);
        assert_eq!(p.dropped_tag_events(), 2);
        for ts in [i64::MIN, i64::MIN + 1, -1, i64::MAX] {
            p.on_event(&ev("u", &["z"], ts), &mut out);
        }
        p.early(&mut out);
        p.on_watermark(EventTime(0), &mut out);
        p.on_watermark(EventTime::MAX, &mut out);
        assert!(find(&out, "1m", "a", 0).is_some());
        assert!(find(&out, "1m", "z", -MIN).is_some());
    }

    #[test]
    fn early_reports_the_newest_open_windows() {
        let mut p = TrendingPipeline::default();
        let mut out = Vec::new();
        p.on_event(&ev("u", &["a"], 1_000), &mut out);
        p.on_event(&ev("u", &["b"], MIN + 1_000), &mut out);
        p.on_watermark(EventTime(MIN), &mut out);
        out.clear();
        p.early(&mut out);
        assert!(find(&out, "1m", "b", MIN).is_some());
        assert!(find(&out, "1m", "a", 0).is_none());
        let five = find(&out, "5m", "a", -3 * MIN).unwrap();
        assert_eq!(int(five, "users"), 1);
    }
}
