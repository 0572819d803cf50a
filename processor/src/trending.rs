//! The trending pipeline: hashtags over hopping windows (1, 5 and 15 minutes,
//! sliding by 1 minute), ranked by velocity of distinct users.
//!
//! Every event carrying `hashtags` contributes once to each distinct,
//! non-empty tag it carries. A user counts once per tag per window, so one
//! account repeating a tag cannot make it trend.
//!
//! # Stage 1: [`TrendingPipeline`]
//!
//! Event time is cut into slices of one slide (1 minute by default); a window
//! of `N` slides ends at a slice boundary and holds its last `N` slices.
//! Users are xxh3 hashes of `user_id`, tags are interned to dense ids. Per
//! (user, tag) pair the worker keeps the newest slice the pair was seen in
//! and a bitmask of the slices before it that it was seen in. When a pair
//! shows up in a slice for the first time, every window containing that
//! slice but no other slice of the pair gains one distinct user for the tag:
//! distinct users are counted incrementally, exactly, as events arrive.
//! Counters per tag id sit in flat rings indexed by slice: events per slice,
//! and distinct users per window size and window. When the watermark reaches
//! a window's end the worker emits one [`Partial`] for it (`WindowId::kind`
//! is the index of the window size), one row per tag with events in the
//! window, keyed `[tag]` with the values `[distinct users, events]`; a window
//! without tags emits nothing. A worker sees every event of the users it
//! owns, so its distinct-user counts add up exactly across workers.
//!
//! Pair lookups are batched (up to 1024 events, always applied before
//! anything is emitted or snapshotted) so that their cache misses overlap.
//! Slices further ahead of the watermark than the rings reach (16 slides by
//! default) and pairs seen more than 63 slides apart spill into hash maps:
//! still exact, only slower.
//!
//! # Stage 2: [`TrendingFinisher`]
//!
//! ```text
//! score = (users − baseline) / sqrt(baseline + 1)
//! ```
//!
//! `users` is the tag's distinct users in the merged window. `baseline` is
//! kept per (window size, tag): an exponentially decayed average of the tag's
//! distinct users in the earlier windows of that size. With `s` the slide and
//! `d` the decay (`baseline_decay`), the baseline after the window ending at
//! `e` is
//!
//! ```text
//! B(e) = d · B(e − s) + (1 − d) · users(e)
//! ```
//!
//! one step per slide, where `users(e) = 0` when the tag (or any data) is
//! absent from that window, and a `B(e)` below 0.01 is forgotten (taken as 0).
//! Windows are folded into the baselines only once CLOSED, with their final
//! merged values ([`Finisher::on_closed`], at end plus the allowed lateness),
//! never when they fire or are corrected.
//!
//! The window ending at `E` is scored against `B(E − s)` as far as it is
//! known from closed windows ending at or before `E − allowed_lateness`: with
//! `e` the newest such window that had data, the baseline is `B(e)` decayed
//! by `d` once per slide in `(e, E − s]` (those windows count as `users = 0`:
//! either they had no data or they were not closed yet), and 0 if it decayed
//! below 0.01. With an allowed lateness of at most one slide (the default
//! is one) this is exactly the baseline from every earlier window. A window
//! ending at `E` fires only after every window ending at or before
//! `E − allowed_lateness` closed, and its corrections look the baseline up
//! as of that same cutoff (later entries are ignored, older ones are kept
//! long enough), so final scores depend only on the accepted events: not on
//! batch sizes, worker count or when a late event arrived. Early results of
//! open windows use the baselines closed so far.
//!
//! The top `top_k` tags per window by score are emitted (ties: more users
//! first, then tag name) as measurement `trending`, tier `rt`, tags `tag` and
//! `window` (`1m`, `5m`, `15m`), fields `rank` (1-based), `users`, `events` and
//! `score`, at the window start.
//!
//! # Late events
//!
//! An event whose 1-slide window is still within the allowed lateness updates
//! its slice, and every emitted window containing that slice is emitted again
//! at the next watermark; the combiner then re-finishes it with the same
//! baseline. A tag that falls out of the top-K through a correction keeps its
//! earlier point in the store.
//!
//! # Bounded memory
//!
//! Slices and their counters are dropped once the largest window containing
//! them is past the allowed lateness; the pairs seen only in dropped slices
//! are swept out every 4 slides, and the ids of tags not seen since are
//! freed and reused. At most `max_tags_per_window` distinct tags are counted
//! per slice; events for further new tags in a full slice are counted only
//! in [`TrendingPipeline::dropped_tag_events`] and take part in no window.
//! Each tag id takes `4 · ring · (1 + window sizes)` bytes of counters, the
//! ring being the largest window plus the lateness plus 10 slides rounded up
//! to a power of two, at most 64 (32 by default: 512 bytes per tag id). The
//! finisher keeps, per window size, the baselines after each closed window
//! with data from the newest one at or before the newest closed end minus the
//! allowed lateness on; baselines below 0.01 are dropped.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use tidemark_model::{Event, EventTime, FieldValue, Point, Tier, Watermark};

use smallvec::smallvec;

use crate::error::ProcessorError;
use crate::partial::{row_key, Partial, RowKey, Values, WindowId};
use crate::pipeline::{Finisher, Pipeline};
use crate::pipeline::{Measurement, PipelineSpec, StateReach};
use crate::window::millis;

/// Baselines below this are forgotten, bounding the baseline maps.
const MIN_BASELINE: f64 = 0.01;

/// Configuration of [`TrendingPipeline`] and [`TrendingFinisher`].
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
    /// Weight of the old baseline at each slide (0..=1).
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

/// One window size, by [`WindowId::kind`].
#[derive(Debug, Clone)]
struct SizeSpec {
    /// Length in milliseconds: a whole number of slides.
    span: i64,
    label: String,
}

/// The slide (at least 1 ms) and the window sizes of a configuration.
fn size_specs(config: &TrendingConfig) -> (i64, Vec<SizeSpec>) {
    let slide_ms = millis(config.slide).max(1);
    let sizes = config
        .sizes
        .iter()
        .map(|&d| {
            let ms = millis(d);
            let slides = (ms / slide_ms + i64::from(ms % slide_ms != 0)).max(1);
            let span = slides.saturating_mul(slide_ms);
            SizeSpec {
                span,
                label: label(span),
            }
        })
        .collect();
    (slide_ms, sizes)
}

/// Bits of a pair's slice mask ([`Seen::mask`]).
const MASK_BITS: i64 = 64;

/// Longest ring of counters per tag, in slices; counters of slices or
/// windows past the ring are kept in hash maps instead.
const MAX_RING: i64 = 64;

/// Slices a ring of counters reaches ahead of the watermark beyond what the
/// windows and the lateness need, before spilling into the hash maps.
const RING_HEADROOM: i64 = 8;

/// How often, in slices, pairs seen only in forgotten slices are swept out.
const SWEEP_SLICES: i64 = 4;

/// No other slice within reach (see [`Pairs::mark`]).
const NONE: i64 = i64::MAX;

/// Stage 1's geometry: slide, window sizes and lateness, in slices.
#[derive(Debug, Clone)]
struct Geometry {
    slide_ms: i64,
    sizes: Vec<SizeSpec>,
    /// Window sizes in slides, by [`WindowId::kind`].
    slides: Vec<i64>,
    /// The largest window in slides, less one: how far apart two slices of
    /// one window can be.
    reach: i64,
    lateness_ms: i64,
    /// The newest slice that ends a window (its end saturates at
    /// `i64::MAX`); later windows are not tracked.
    last_slice: i64,
    /// Length of the counter rings: a power of two.
    ring: i64,
}

impl Geometry {
    fn new(config: &TrendingConfig, ring: Option<i64>) -> Self {
        let (slide_ms, sizes) = size_specs(config);
        let slides: Vec<i64> = sizes.iter().map(|s| s.span / slide_ms).collect();
        let reach = slides.iter().copied().max().unwrap_or(1).max(1) - 1;
        let lateness_ms = millis(config.allowed_lateness);
        let lateness_slides = lateness_ms / slide_ms + i64::from(lateness_ms % slide_ms != 0);
        let wanted = reach
            .saturating_add(lateness_slides)
            .saturating_add(3 + RING_HEADROOM)
            .min(MAX_RING);
        let ring = ring.unwrap_or(wanted).clamp(1, MAX_RING);
        Geometry {
            slide_ms,
            sizes,
            slides,
            reach,
            lateness_ms,
            last_slice: i64::MAX.div_euclid(slide_ms),
            ring: (ring as u64).next_power_of_two() as i64,
        }
    }

    /// Start of slice `x` (saturating), as the slice keys of snapshots.
    fn start(&self, x: i64) -> i64 {
        x.saturating_mul(self.slide_ms)
    }

    /// End of slice `x`: also the end of the windows whose newest slice it is.
    fn end(&self, x: i64) -> i64 {
        self.start(x).saturating_add(self.slide_ms)
    }

    /// The oldest slice still in a window that can change once the watermark
    /// is `wm`: windows ending at or before `wm − lateness` are final.
    fn base(&self, wm: i64) -> i64 {
        wm.saturating_sub(self.lateness_ms)
            .div_euclid(self.slide_ms)
            .saturating_sub(self.reach)
    }
}

/// One held slice.
#[derive(Debug, Clone, Copy, Default)]
struct SliceMeta {
    /// Distinct tags counted in the slice.
    tags: usize,
    /// Changed after a window containing it was emitted.
    dirty: bool,
}

/// One (user, tag) pair: the slices it was seen in.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// The newest slice it was seen in.
    newest: i64,
    /// Bit `j`: seen in slice `newest − j` (bit 0 is always set).
    mask: u64,
}

/// Which slices every (user, tag) pair was seen in. Pairs not seen since
/// before the base are swept out every [`SWEEP_SLICES`] slices; until then
/// they are harmless (their bits are all older than any live window).
#[derive(Debug)]
struct Pairs {
    map: FxHashMap<(u64, u32), Seen>,
    /// (user, tag, slice) of live slices more than [`MASK_BITS`] − 1 slices
    /// older than the pair's newest: only after events far apart in time.
    far: FxHashSet<(u64, u32, i64)>,
    /// The base of the last sweep of `map`.
    swept: i64,
}

impl Default for Pairs {
    fn default() -> Self {
        Pairs {
            map: FxHashMap::default(),
            far: FxHashSet::default(),
            swept: i64::MIN,
        }
    }
}

impl Pairs {
    /// Whether the pair `(user, tag)` with entry `seen` was seen in `slice`.
    fn has(far: &FxHashSet<(u64, u32, i64)>, key: (u64, u32), seen: &Seen, slice: i64) -> bool {
        if slice > seen.newest {
            return false;
        }
        match seen.newest.checked_sub(slice) {
            Some(k) if k < MASK_BITS => seen.mask >> k & 1 == 1,
            _ => far.contains(&(key.0, key.1, slice)),
        }
    }

    /// The distance from `x` to the nearest slice `x ± j` (`1 ≤ j ≤ reach`)
    /// the pair was seen in, below (`up == false`) or above `x`.
    fn nearest(&self, key: (u64, u32), seen: &Seen, x: i64, reach: i64, up: bool) -> i64 {
        (1..=reach)
            .find(|&j| {
                let s = if up {
                    x.checked_add(j)
                } else {
                    x.checked_sub(j)
                };
                s.is_some_and(|s| Self::has(&self.far, key, seen, s))
            })
            .unwrap_or(NONE)
    }

    /// Records that `user` used `tag` in slice `x`. `None` if it had been
    /// recorded already; else the distances from `x` to the nearest other
    /// slices within `reach` the pair was seen in, below and above ([`NONE`]
    /// if there is none). Slices older than `base` are ignored.
    fn mark(&mut self, user: u64, tag: u32, x: i64, base: i64, reach: i64) -> Option<(i64, i64)> {
        let key = (user, tag);
        let seen = match self.map.entry(key) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Seen { newest: x, mask: 1 });
                return Some((NONE, NONE));
            }
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        };
        let n = seen.newest;
        if x > n {
            // The new newest slice; the old newest is the nearest below.
            let d = x.saturating_sub(n);
            if x.saturating_sub(base) >= MASK_BITS {
                // Bits shifted out that a live window may still need.
                let mut lost = if d >= MASK_BITS {
                    seen.mask
                } else {
                    seen.mask & !(u64::MAX >> d)
                };
                while lost != 0 {
                    let j = i64::from(lost.trailing_zeros());
                    lost &= lost - 1;
                    let s = n - j;
                    if s >= base {
                        self.far.insert((user, tag, s));
                    }
                }
            }
            seen.mask = if d >= MASK_BITS {
                1
            } else {
                (seen.mask << d) | 1
            };
            seen.newest = x;
            return Some((d, NONE));
        }
        let k = n.saturating_sub(x);
        if k < MASK_BITS {
            let bit = 1u64 << k;
            if seen.mask & bit != 0 {
                return None;
            }
            let older = if k + 1 < MASK_BITS {
                seen.mask >> (k + 1)
            } else {
                0
            };
            let mut below = if older != 0 {
                i64::from(older.trailing_zeros()) + 1
            } else {
                NONE
            };
            let newer = seen.mask & (bit - 1);
            let above = if newer != 0 {
                k - (63 - i64::from(newer.leading_zeros()))
            } else {
                NONE
            };
            seen.mask |= bit;
            if below == NONE && !self.far.is_empty() && k + reach >= MASK_BITS {
                // Slices below the mask, in the far set.
                let seen = *seen;
                below = self.nearest(key, &seen, x, reach, false);
            }
            return Some((below, above));
        }
        // Far below the newest slice: tracked in the far set only.
        let seen = *seen;
        if !self.far.insert((user, tag, x)) {
            return None;
        }
        Some((
            self.nearest(key, &seen, x, reach, false),
            self.nearest(key, &seen, x, reach, true),
        ))
    }

    /// Forgets slices older than `base`.
    fn evict(&mut self, base: i64) {
        if base.saturating_sub(self.swept) >= SWEEP_SLICES {
            self.map.retain(|_, s| s.newest >= base);
            self.swept = base;
        }
        if !self.far.is_empty() {
            self.far.retain(|&(_, _, s)| s >= base);
        }
    }
}

/// Tags interned to dense ids; ids of tags absent from every held slice are
/// freed and reused.
#[derive(Debug, Default)]
struct TagTable {
    ids: FxHashMap<Box<str>, u32>,
    /// Name by id; empty when the id is free.
    names: Vec<Box<str>>,
    /// Newest slice with an event of the tag, by id; `i64::MIN` when free.
    newest: Vec<i64>,
    /// The name's first 8 bytes (big-endian, zero-padded), by id: orders
    /// like the names up to ties.
    prefix: Vec<u64>,
    free: Vec<u32>,
}

impl TagTable {
    fn get(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    /// The id of a new tag.
    fn intern(&mut self, name: &str) -> u32 {
        let mut head = [0u8; 8];
        let n = name.len().min(8);
        head[..n].copy_from_slice(&name.as_bytes()[..n]);
        let prefix = u64::from_be_bytes(head);
        let id = match self.free.pop() {
            Some(id) => {
                self.names[id as usize] = name.into();
                self.prefix[id as usize] = prefix;
                id
            }
            None => {
                self.names.push(name.into());
                self.newest.push(i64::MIN);
                self.prefix.push(prefix);
                (self.names.len() - 1) as u32
            }
        };
        self.ids.insert(name.into(), id);
        id
    }

    fn touch(&mut self, id: u32, x: i64) {
        let n = &mut self.newest[id as usize];
        *n = (*n).max(x);
    }

    /// Frees the tags not seen since before slice `base`.
    fn release(&mut self, base: i64) {
        for (id, newest) in self.newest.iter_mut().enumerate() {
            if *newest != i64::MIN && *newest < base {
                *newest = i64::MIN;
                let name = std::mem::take(&mut self.names[id]);
                self.ids.remove(&name);
                self.free.push(id as u32);
            }
        }
    }
}

/// Counters per tag id: events per slice, and distinct users per window
/// size and window (by its newest slice). Held in rings of
/// [`Geometry::ring`] cells per tag (per tag and size for users) indexed by
/// slice modulo the ring length: slices from `ebase` and windows from
/// `ubase` on, for one ring length. Counters past the rings go to hash maps
/// and move into the rings once these reach them.
#[derive(Debug, Default)]
struct Counts {
    ring: i64,
    kinds: usize,
    ebase: i64,
    ubase: i64,
    /// `[tag · ring + slice mod ring]`.
    events: Vec<u32>,
    /// `[(tag · kinds + kind) · ring + window mod ring]`.
    users: Vec<u32>,
    /// Events of slices past the ring, by (tag, slice).
    far_events: FxHashMap<(u32, i64), u32>,
    /// Users of windows past the ring, by (tag, kind, window).
    far_users: FxHashMap<(u32, u32, i64), u32>,
}

/// Whether `x` is in the ring `[base, base + ring)`.
fn in_ring(x: i64, base: i64, ring: i64) -> bool {
    x >= base && (x.wrapping_sub(base) as u64) < ring as u64
}

impl Counts {
    fn new(geo: &Geometry, base: i64) -> Self {
        Counts {
            ring: geo.ring,
            kinds: geo.slides.len(),
            ebase: base,
            ubase: base.saturating_add(geo.reach),
            ..Counts::default()
        }
    }

    fn pos(&self, x: i64) -> usize {
        (x & (self.ring - 1)) as usize
    }

    /// Makes room for tag `id`.
    fn grow(&mut self, id: u32) {
        let tags = id as usize + 1;
        let ring = self.ring as usize;
        if self.events.len() < tags * ring {
            self.events.resize(tags * ring, 0);
            self.users.resize(tags * ring * self.kinds, 0);
        }
    }

    fn events_at(&self, id: u32, x: i64) -> u32 {
        if in_ring(x, self.ebase, self.ring) {
            self.events[id as usize * self.ring as usize + self.pos(x)]
        } else if self.far_events.is_empty() {
            0
        } else {
            self.far_events.get(&(id, x)).copied().unwrap_or(0)
        }
    }

    fn add_events(&mut self, id: u32, x: i64, n: u32) {
        let cell = if in_ring(x, self.ebase, self.ring) {
            let i = id as usize * self.ring as usize + self.pos(x);
            &mut self.events[i]
        } else {
            self.far_events.entry((id, x)).or_default()
        };
        *cell = cell.saturating_add(n);
    }

    fn users_at(&self, id: u32, kind: usize, y: i64) -> u32 {
        if in_ring(y, self.ubase, self.ring) {
            self.users[(id as usize * self.kinds + kind) * self.ring as usize + self.pos(y)]
        } else if self.far_users.is_empty() {
            0
        } else {
            let key = (id, kind as u32, y);
            self.far_users.get(&key).copied().unwrap_or(0)
        }
    }

    /// Counts one more user in the windows of size `kind` whose newest slice
    /// is in `from..=to`.
    fn add_users(&mut self, id: u32, kind: usize, from: i64, to: i64) {
        if from > to {
            return;
        }
        let ring = self.ring as usize;
        if in_ring(from, self.ubase, self.ring) && in_ring(to, self.ubase, self.ring) {
            let row = (id as usize * self.kinds + kind) * ring;
            let cells = &mut self.users[row..row + ring];
            let mask = ring - 1;
            let first = from as usize & mask;
            for k in 0..=(to - from) as usize {
                let c = &mut cells[(first + k) & mask];
                *c = c.wrapping_add(1);
            }
            return;
        }
        for y in from..=to {
            let c = if in_ring(y, self.ubase, self.ring) {
                let i = (id as usize * self.kinds + kind) * ring + self.pos(y);
                &mut self.users[i]
            } else {
                self.far_users.entry((id, kind as u32, y)).or_default()
            };
            *c = c.wrapping_add(1);
        }
    }

    /// Moves the rings to start at slice `base`: clears the cells of the
    /// slices and windows left behind, moves counters the rings now cover
    /// out of the hash maps and drops those behind.
    fn advance(&mut self, base: i64, reach: i64) {
        let ubase = base.saturating_add(reach);
        let ring = self.ring as usize;
        let tags = self.events.len() / ring.max(1);
        clear(&mut self.events, ring, self.ebase, base);
        clear(&mut self.users, ring, self.ubase, ubase);
        self.ebase = base;
        self.ubase = ubase;
        let (r, kinds) = (self.ring, self.kinds);
        if !self.far_events.is_empty() {
            let events = &mut self.events;
            self.far_events.retain(|&(id, x), n| {
                if x < base {
                    false
                } else if in_ring(x, base, r) && (id as usize) < tags {
                    let cell = &mut events[id as usize * ring + (x & (r - 1)) as usize];
                    *cell = cell.saturating_add(*n);
                    false
                } else {
                    true
                }
            });
        }
        if !self.far_users.is_empty() {
            let users = &mut self.users;
            self.far_users.retain(|&(id, kind, y), n| {
                if y < ubase {
                    false
                } else if in_ring(y, ubase, r) && (id as usize) < tags {
                    let row = (id as usize * kinds + kind as usize) * ring;
                    let cell = &mut users[row + (y & (r - 1)) as usize];
                    *cell = cell.wrapping_add(*n);
                    false
                } else {
                    true
                }
            });
        }
    }
}

/// Zeroes, in every row of `ring` cells of `cells`, the cells of the slices
/// from `old` up to `new`.
fn clear(cells: &mut [u32], ring: usize, old: i64, new: i64) {
    if new <= old {
        return;
    }
    if new.saturating_sub(old) >= ring as i64 {
        cells.fill(0);
        return;
    }
    let mask = ring - 1;
    let (first, n) = (old as usize & mask, (new - old) as usize);
    for row in cells.chunks_exact_mut(ring) {
        for k in 0..n {
            row[(first + k) & mask] = 0;
        }
    }
}

/// The pairs and counters, and the marks not applied to them yet.
#[derive(Debug)]
struct Counting {
    pairs: Pairs,
    counts: Counts,
    /// (user, tag id, slice) marks not applied yet, in arrival order:
    /// applied in batches, whose hash-table lookups then overlap, before
    /// anything reads the counts.
    pending: Vec<(u64, u32, i64)>,
}

/// Most marks held back before they are applied.
const PENDING_MARKS: usize = 1024;

/// Marks whose table entries are looked up together.
const PREFETCH_MARKS: usize = 16;

impl Counting {
    /// Applies the pending marks.
    fn flush(&mut self, geo: &Geometry, base: i64) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);
        for group in pending.chunks(PREFETCH_MARKS) {
            // Look the entries up first, so their cache misses overlap.
            let mut touched = 0u64;
            for &(user, id, _) in group {
                if let Some(seen) = self.pairs.map.get(&(user, id)) {
                    touched ^= seen.mask;
                }
            }
            std::hint::black_box(touched);
            for &(user, id, x) in group {
                self.mark(geo, base, id, user, x);
            }
        }
        self.pending = pending;
        self.pending.clear();
    }

    /// Records that `user` used tag `id` in slice `x`, counting the user in
    /// every window it is new to.
    fn mark(&mut self, geo: &Geometry, base: i64, id: u32, user: u64, x: i64) {
        let Some((below, above)) = self.pairs.mark(user, id, x, base, geo.reach) else {
            return;
        };
        // The user is new to the windows holding `x` and no other slice it
        // was seen in: with newest slice from `x − below + n` (or `x`) up to
        // before `x + above`.
        for (kind, &n) in geo.slides.iter().enumerate() {
            let from = if below < n {
                x.saturating_add(n - below)
            } else {
                x
            };
            let to = x.saturating_add(n.min(above) - 1).min(geo.last_slice);
            self.counts.add_users(id, kind, from, to);
        }
    }
}

/// Stage 1 of trending: distinct users and events per tag and window,
/// counted incrementally; see the module documentation.
#[derive(Debug)]
pub struct TrendingPipeline {
    geo: Geometry,
    max_tags: usize,
    /// The oldest slice held: [`Geometry::base`] of `last_wm`.
    base: i64,
    slices: BTreeMap<i64, SliceMeta>,
    tags: TagTable,
    /// Behind a cell so that [`Pipeline::early`] and [`Pipeline::snapshot`]
    /// (`&self`) can apply the pending marks first.
    counting: RefCell<Counting>,
    last_wm: Watermark,
    dropped: u64,
}

/// A slice as stored in a snapshot.
#[derive(Serialize, Deserialize)]
struct SliceState {
    dirty: bool,
    /// Per tag: name, events and user hashes (sorted).
    tags: Vec<(String, i64, Vec<u64>)>,
}

#[derive(Serialize, Deserialize)]
struct TrendingState {
    /// By slice start, ascending.
    slices: Vec<(i64, SliceState)>,
    last_wm: Watermark,
    dropped: u64,
}

impl Default for TrendingPipeline {
    fn default() -> Self {
        TrendingPipeline::new(TrendingConfig::default())
    }
}

impl TrendingPipeline {
    pub const NAME: &'static str = "trending";

    pub fn new(config: TrendingConfig) -> Self {
        Self::with_geometry(Geometry::new(&config, None), config.max_tags_per_window)
    }

    fn with_geometry(geo: Geometry, max_tags: usize) -> Self {
        let base = geo.base(EventTime::MIN.0);
        TrendingPipeline {
            counting: RefCell::new(Counting {
                pairs: Pairs::default(),
                counts: Counts::new(&geo, base),
                pending: Vec::new(),
            }),
            geo,
            // Tag ids are u32.
            max_tags: max_tags.min(u32::MAX as usize),
            base,
            slices: BTreeMap::new(),
            tags: TagTable::default(),
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

    /// Adds the windows (newest slice -> sizes) containing one of `slices`
    /// whose end is in `(lo, hi]`.
    fn add_windows(
        &self,
        slices: impl IntoIterator<Item = i64>,
        lo: i64,
        hi: i64,
        windows: &mut BTreeMap<i64, Vec<usize>>,
    ) {
        let geo = &self.geo;
        for x in slices {
            for (kind, &n) in geo.slides.iter().enumerate() {
                let to = x.saturating_add(n - 1).min(geo.last_slice);
                for y in x..=to {
                    let end = geo.end(y);
                    if end <= lo {
                        continue;
                    }
                    if end > hi {
                        break;
                    }
                    let kinds = windows.entry(y).or_default();
                    if !kinds.contains(&kind) {
                        kinds.push(kind);
                    }
                }
            }
        }
    }

    /// Emits the partials of `windows`: per tag with events in the window,
    /// its distinct users and events; a window holding no tag gives none.
    fn emit(&self, windows: &BTreeMap<i64, Vec<usize>>, out: &mut Vec<Partial>) {
        if windows.is_empty() {
            return;
        }
        let geo = &self.geo;
        let counting = self.counting.borrow();
        let counts = &counting.counts;
        // The tags with events in any of the windows, by name, so rows come
        // out sorted: by the first 8 bytes, then by the whole name.
        let names = &self.tags.names;
        let oldest = windows
            .keys()
            .next()
            .map_or(i64::MAX, |&y| y.saturating_sub(geo.reach));
        let mut ids: Vec<(u64, u32)> = (self.tags.newest.iter().zip(&self.tags.prefix))
            .enumerate()
            .filter(|(_, (&newest, _))| newest >= oldest)
            .map(|(id, (_, &prefix))| (prefix, id as u32))
            .collect();
        ids.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| names[a.1 as usize].cmp(&names[b.1 as usize]))
        });
        // (start, kind, slides) in emission order, by increasing size.
        let mut order: Vec<(i64, usize, i64)> = Vec::new();
        let mut rows: Vec<Vec<(RowKey, Values)>> = Vec::new();
        let mut by_size: Vec<usize> = Vec::new();
        let mut vals: Vec<(i64, i64)> = Vec::new();
        // Each tag's key, made once for all its rows.
        let mut keys: Vec<Option<RowKey>> = vec![None; names.len()];
        for (&y, kinds) in windows {
            let end = geo.end(y);
            order.clear();
            order.extend(kinds.iter().filter_map(|&i| {
                let start = end.saturating_sub(geo.sizes.get(i)?.span);
                Some((start, i, geo.slides[i]))
            }));
            // The smallest window (newest start) first.
            order.sort_unstable_by_key(|o| std::cmp::Reverse((o.0, o.1)));
            // Sizes ascending, to sum each tag's events once for all of them.
            by_size.clear();
            by_size.extend(0..order.len());
            by_size.sort_by_key(|&k| order[k].2);
            let Some(&widest) = by_size.last() else {
                continue;
            };
            let oldest = y.saturating_sub(order[widest].2 - 1);
            // Per tag and size, (users, events): read in id order, which is
            // the counters' memory order.
            let k_n = order.len();
            vals.clear();
            vals.resize(self.tags.newest.len() * k_n, (0, 0));
            for (id, &newest) in self.tags.newest.iter().enumerate() {
                if newest < oldest {
                    continue;
                }
                let id32 = id as u32;
                // Events of the slices from `y` back.
                let (mut events, mut x, mut done) = (0i64, y, 0i64);
                for &k in &by_size {
                    while done < order[k].2 {
                        events += i64::from(counts.events_at(id32, x));
                        x = x.saturating_sub(1);
                        done += 1;
                    }
                    if events > 0 {
                        let users = i64::from(counts.users_at(id32, order[k].1, y));
                        vals[id * k_n + k] = (users, events);
                    }
                }
            }
            rows.clear();
            rows.resize_with(k_n, Vec::new);
            for &(_, id) in &ids {
                let id = id as usize;
                for (k, rows) in rows.iter_mut().enumerate() {
                    let (users, events) = vals[id * k_n + k];
                    if events > 0 {
                        let key = keys[id].get_or_insert_with(|| row_key([&*names[id]]));
                        rows.push((key.clone(), smallvec![users, events]));
                    }
                }
            }
            for (&(start, kind, _), rows) in order.iter().zip(&mut rows) {
                if rows.is_empty() {
                    continue;
                }
                let window = WindowId {
                    end,
                    pipeline: 0,
                    kind: kind as u8,
                    start,
                };
                out.push(Partial::new(window, std::mem::take(rows), None));
            }
        }
    }

    /// Forgets the slices before `base` and what only they needed.
    fn advance(&mut self, base: i64) {
        if base <= self.base {
            return;
        }
        self.base = base;
        self.slices = self.slices.split_off(&base);
        let counting = self.counting.get_mut();
        counting.counts.advance(base, self.geo.reach);
        counting.pairs.evict(base);
        self.tags.release(base);
    }
}

impl Pipeline for TrendingPipeline {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn on_event(&mut self, ev: &Event) {
        if ev.hashtags.is_empty() {
            return;
        }
        let ts = ev.timestamp.0;
        let x = ts.div_euclid(self.geo.slide_ms);
        let end = self.geo.end(x);
        // Past the lateness of its smallest window: the worker filters such
        // events; this keeps a stray one from changing complete results.
        if end.saturating_add(self.geo.lateness_ms) <= self.last_wm.0 {
            return;
        }
        let user = xxhash_rust::xxh3::xxh3_64(ev.user_id.as_bytes());
        let fired = end <= self.last_wm.0;
        let meta = self.slices.entry(x).or_default();
        let counting = self.counting.get_mut();
        for (n, tag) in ev.hashtags.iter().enumerate() {
            // An empty tag cannot be stored as a tag value; a repeated one
            // counts once (events carry a handful of tags).
            if tag.is_empty() || ev.hashtags[..n].contains(tag) {
                continue;
            }
            let id = self.tags.get(tag);
            if id.is_none_or(|id| counting.counts.events_at(id, x) == 0) {
                if meta.tags >= self.max_tags {
                    self.dropped += 1;
                    continue;
                }
                meta.tags += 1;
            }
            let id = id.unwrap_or_else(|| {
                let id = self.tags.intern(tag);
                counting.counts.grow(id);
                id
            });
            counting.counts.add_events(id, x, 1);
            self.tags.touch(id, x);
            counting.pending.push((user, id, x));
            meta.dirty |= fired;
        }
        if counting.pending.len() >= PENDING_MARKS {
            counting.flush(&self.geo, self.base);
        }
    }

    fn on_watermark(&mut self, wm: Watermark, out: &mut Vec<Partial>) {
        self.counting.get_mut().flush(&self.geo, self.base);
        let prev = self.last_wm.0;
        let wm = prev.max(wm.0);
        let mut windows = BTreeMap::new();
        // Corrections of emitted windows.
        if self.slices.values().any(|s| s.dirty) {
            let dirty: Vec<i64> = self
                .slices
                .iter()
                .filter(|(_, s)| s.dirty)
                .map(|(&x, _)| x)
                .collect();
            self.add_windows(dirty, i64::MIN, prev, &mut windows);
            for slice in self.slices.values_mut() {
                slice.dirty = false;
            }
        }
        // Windows the watermark passed for the first time.
        if wm > prev {
            self.add_windows(self.slices.keys().copied(), prev, wm, &mut windows);
        }
        self.emit(&windows, out);
        self.last_wm = EventTime(wm);
        // Forget what no event or correction can reach any more.
        self.advance(self.geo.base(wm));
    }

    fn early(&self, out: &mut Vec<Partial>) {
        let Some((&newest, _)) = self.slices.last_key_value() else {
            return;
        };
        self.counting.borrow_mut().flush(&self.geo, self.base);
        // The open windows up to the newest slice's end.
        let mut windows = BTreeMap::new();
        self.add_windows(
            self.slices.keys().copied(),
            self.last_wm.0,
            self.geo.end(newest),
            &mut windows,
        );
        self.emit(&windows, out);
    }

    fn snapshot(&self) -> Result<Vec<u8>, ProcessorError> {
        self.counting.borrow_mut().flush(&self.geo, self.base);
        let counting = self.counting.borrow();
        // Users per (slice, tag id), from the pairs' masks.
        let mut users: FxHashMap<(i64, u32), Vec<u64>> = FxHashMap::default();
        for (&(user, id), seen) in &counting.pairs.map {
            let mut mask = seen.mask;
            while mask != 0 {
                let j = i64::from(mask.trailing_zeros());
                mask &= mask - 1;
                let x = seen.newest - j;
                if x >= self.base {
                    users.entry((x, id)).or_default().push(user);
                }
            }
        }
        for &(user, id, x) in &counting.pairs.far {
            users.entry((x, id)).or_default().push(user);
        }
        let slices = self
            .slices
            .iter()
            .map(|(&x, meta)| {
                let mut tags: Vec<(String, i64, Vec<u64>)> = Vec::new();
                for (id, &newest) in self.tags.newest.iter().enumerate() {
                    let id = id as u32;
                    let events = if newest >= x {
                        counting.counts.events_at(id, x)
                    } else {
                        0
                    };
                    if events == 0 {
                        continue;
                    }
                    let mut u = users.remove(&(x, id)).unwrap_or_default();
                    u.sort_unstable();
                    tags.push((
                        self.tags.names[id as usize].to_string(),
                        i64::from(events),
                        u,
                    ));
                }
                tags.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                let slice = SliceState {
                    dirty: meta.dirty,
                    tags,
                };
                (self.geo.start(x), slice)
            })
            .collect();
        let state = TrendingState {
            slices,
            last_wm: self.last_wm,
            dropped: self.dropped,
        };
        bincode::serialize(&state)
            .map_err(|e| ProcessorError::Snapshot(format!("trending state: {e}")))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ProcessorError> {
        let state: TrendingState = bincode::deserialize(state)
            .map_err(|e| ProcessorError::CorruptCheckpoint(format!("trending state: {e}")))?;
        let mut p = Self::with_geometry(self.geo.clone(), self.max_tags);
        p.last_wm = state.last_wm;
        p.dropped = state.dropped;
        p.base = p.geo.base(state.last_wm.0);
        p.counting.get_mut().counts = Counts::new(&p.geo, p.base);
        // Replayed oldest first; the counts do not depend on the order.
        let mut slices = state.slices;
        slices.sort_by_key(|(start, _)| *start);
        for (start, slice) in slices {
            let x = start.div_euclid(p.geo.slide_ms);
            let mut meta = p.slices.get(&x).copied().unwrap_or_default();
            meta.dirty |= slice.dirty;
            let counting = p.counting.get_mut();
            for (name, events, users) in slice.tags {
                if name.is_empty() || events <= 0 {
                    continue;
                }
                let id = match p.tags.get(&name) {
                    Some(id) => id,
                    None => {
                        let id = p.tags.intern(&name);
                        counting.counts.grow(id);
                        id
                    }
                };
                if counting.counts.events_at(id, x) == 0 {
                    meta.tags += 1;
                }
                counting
                    .counts
                    .add_events(id, x, events.min(i64::from(u32::MAX)) as u32);
                p.tags.touch(id, x);
                for user in users {
                    counting.mark(&p.geo, p.base, id, user, x);
                }
            }
            p.slices.insert(x, meta);
        }
        *self = p;
        Ok(())
    }
}

/// Baselines of one window size: (tag, baseline), sorted by tag like the
/// rows of a merged partial, so both are walked together in one pass.
type Baselines = Vec<(Arc<str>, f64)>;

/// A baseline, or 0 once it decayed below [`MIN_BASELINE`].
fn kept(b: f64) -> f64 {
    if b >= MIN_BASELINE {
        b
    } else {
        0.0
    }
}

/// One tag's totals in a window.
struct Row<'a> {
    tag: &'a str,
    users: i64,
    events: i64,
    score: f64,
}

/// Stage 2 of trending: scores the merged windows against baselines folded
/// from closed windows, and emits the top K; see the module documentation.
#[derive(Debug, Clone)]
pub struct TrendingFinisher {
    slide_ms: i64,
    sizes: Vec<SizeSpec>,
    top_k: usize,
    lateness_ms: i64,
    decay: f64,
    /// Per window size: window end -> the baselines `B(end)` right after
    /// that closed window (with data) was folded in.
    history: Vec<BTreeMap<i64, Baselines>>,
}

/// One window size's history in a snapshot: (window end, baselines sorted
/// by tag), ascending.
type StoredHistory = Vec<(i64, Vec<(String, f64)>)>;

#[derive(Serialize, Deserialize)]
struct FinisherState {
    /// Per window size.
    history: Vec<StoredHistory>,
}

impl Default for TrendingFinisher {
    fn default() -> Self {
        TrendingFinisher::new(TrendingConfig::default())
    }
}

impl TrendingFinisher {
    pub fn new(config: TrendingConfig) -> Self {
        let (slide_ms, sizes) = size_specs(&config);
        let decay = if config.baseline_decay.is_finite() {
            config.baseline_decay.clamp(0.0, 1.0)
        } else {
            0.5
        };
        TrendingFinisher {
            slide_ms,
            history: sizes.iter().map(|_| BTreeMap::new()).collect(),
            sizes,
            top_k: config.top_k,
            lateness_ms: millis(config.allowed_lateness),
            decay,
        }
    }

    /// The newest baselines of size `i` folded from windows ending at or
    /// before `cutoff`, and the factor that decays them to `B(end − slide)`.
    fn prior(&self, i: usize, end: i64, cutoff: i64) -> (Option<&Baselines>, f64) {
        let Some(history) = self.history.get(i) else {
            return (None, 1.0);
        };
        match history.range(..=cutoff).next_back() {
            Some((&prev, map)) => {
                let steps = (end.saturating_sub(prev) / self.slide_ms).saturating_sub(1);
                let factor = self.decay.powi(steps.clamp(0, i32::MAX as i64) as i32);
                (Some(map), factor)
            }
            None => (None, 1.0),
        }
    }
}

impl Finisher for TrendingFinisher {
    fn finish(&self, merged: &Partial, out: &mut Vec<Point>) {
        let i = merged.window.kind as usize;
        let Some(spec) = self.sizes.get(i) else {
            return;
        };
        let end = merged.window.end;
        // Only windows closed when this one fired; never the window itself.
        let cutoff = end
            .saturating_sub(self.lateness_ms)
            .min(end.saturating_sub(1));
        let (base, factor) = self.prior(i, end, cutoff);
        let mut base = base.map_or(&[][..], |b| &b[..]).iter().peekable();
        let mut rows: Vec<Row> = merged
            .rows
            .iter()
            .filter_map(|(key, values)| {
                let [tag] = &key[..] else {
                    return None;
                };
                let users = values.first().copied().unwrap_or(0);
                let events = values.get(1).copied().unwrap_or(0);
                while base.next_if(|(t, _)| **t < **tag).is_some() {}
                let b = base
                    .next_if(|(t, _)| **t == **tag)
                    .map_or(0.0, |(_, b)| kept(b * factor));
                Some(Row {
                    tag,
                    users,
                    events,
                    score: (users as f64 - b) / (b + 1.0).sqrt(),
                })
            })
            .collect();
        let ranking = |a: &Row, b: &Row| {
            b.score
                .total_cmp(&a.score)
                .then(b.users.cmp(&a.users))
                .then(a.tag.cmp(b.tag))
        };
        // A total order (tags are unique), so partitioning off the top K
        // before sorting them gives the same ranks as sorting everything.
        if rows.len() > self.top_k {
            if let Some(last) = self.top_k.checked_sub(1) {
                rows.select_nth_unstable_by(last, ranking);
            }
            rows.truncate(self.top_k);
        }
        rows.sort_unstable_by(ranking);
        let time = EventTime(merged.window.start);
        for (rank, row) in rows.iter().take(self.top_k).enumerate() {
            out.push(Point {
                measurement: "trending".to_string(),
                tier: Tier::Rt,
                // Already in key order.
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
    }

    fn on_closed(&mut self, merged: &Partial) {
        let i = merged.window.kind as usize;
        if i >= self.history.len() {
            return;
        }
        let end = merged.window.end;
        let d = self.decay;
        let (base, factor) = self.prior(i, end, end.saturating_sub(1));
        let prior = base.map_or(&[][..], |b| &b[..]);
        let mut next: Baselines = Vec::with_capacity(prior.len() + merged.rows.len());
        let mut prior = prior
            .iter()
            .filter_map(|(t, b)| {
                let b = kept(b * factor);
                (b > 0.0).then_some((t, b * d))
            })
            .peekable();
        for (key, values) in &merged.rows {
            let [tag] = &key[..] else {
                continue;
            };
            while let Some((t, b)) = prior.next_if(|(t, _)| ***t < **tag) {
                next.push((t.clone(), b));
            }
            let added = (1.0 - d) * values.first().copied().unwrap_or(0) as f64;
            let b = match prior.next_if(|(t, _)| ***t == **tag) {
                Some((_, b)) => b + added,
                None => added,
            };
            next.push((tag.clone(), b));
        }
        next.extend(prior.map(|(t, b)| (t.clone(), b)));
        next.retain(|(_, b)| *b >= MIN_BASELINE);
        let history = &mut self.history[i];
        history.insert(end, next);
        // No later finish looks further back than the newest closed end
        // minus the lateness; the newest entry at or before that stays.
        let newest = history.keys().next_back().copied().unwrap_or(end);
        let horizon = newest.saturating_sub(self.lateness_ms);
        if let Some(keep) = history.range(..=horizon).next_back().map(|(&k, _)| k) {
            *history = history.split_off(&keep);
        }
    }

    fn snapshot(&self) -> Result<Vec<u8>, ProcessorError> {
        let state = FinisherState {
            history: self
                .history
                .iter()
                .map(|h| {
                    h.iter()
                        .map(|(&end, map)| {
                            let v: Vec<(String, f64)> =
                                map.iter().map(|(t, b)| (t.to_string(), *b)).collect();
                            (end, v)
                        })
                        .collect()
                })
                .collect(),
        };
        bincode::serialize(&state)
            .map_err(|e| ProcessorError::Snapshot(format!("trending finisher state: {e}")))
    }

    fn restore(&mut self, state: &[u8]) -> Result<(), ProcessorError> {
        let state: FinisherState = bincode::deserialize(state).map_err(|e| {
            ProcessorError::CorruptCheckpoint(format!("trending finisher state: {e}"))
        })?;
        if state.history.len() != self.sizes.len() {
            return Err(ProcessorError::CorruptCheckpoint(format!(
                "trending finisher state: {} window sizes, expected {}",
                state.history.len(),
                self.sizes.len()
            )));
        }
        self.history = state
            .history
            .into_iter()
            .map(|h| {
                h.into_iter()
                    .map(|(end, v)| {
                        let mut map: Baselines =
                            v.into_iter().map(|(t, b)| (Arc::from(t), b)).collect();
                        map.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                        map.dedup_by(|a, b| a.0 == b.0);
                        (end, map)
                    })
                    .collect()
            })
            .collect();
        Ok(())
    }
}

/// Baselines decay by half per slide; after this many slides a baseline
/// started from nothing equals one built from the whole history to the last
/// bit of an `f64`.
const BASELINE_WARM_UP_SLIDES: u32 = 60;

/// The trending pipeline in the [registry](crate::registry), with its settings.
#[derive(Debug, Clone, Default)]
pub struct TrendingSpec(pub TrendingConfig);

impl TrendingSpec {
    fn config(&self, allowed_lateness: Duration) -> TrendingConfig {
        TrendingConfig {
            allowed_lateness,
            ..self.0.clone()
        }
    }
}

impl PipelineSpec for TrendingSpec {
    fn name(&self) -> &'static str {
        TrendingPipeline::NAME
    }

    fn measurements(&self) -> &'static [Measurement] {
        &[Measurement {
            name: "trending",
            tiers: &[Tier::Rt],
        }]
    }

    /// The longest window, and the slides its baseline needs to warm up.
    fn reach(&self) -> StateReach {
        let longest = self.0.sizes.iter().max().copied().unwrap_or_default();
        StateReach {
            back: longest + self.0.slide * BASELINE_WARM_UP_SLIDES,
            ahead: Duration::ZERO,
        }
    }

    fn stage1(&self, allowed_lateness: Duration) -> Box<dyn Pipeline> {
        Box::new(TrendingPipeline::new(self.config(allowed_lateness)))
    }

    fn stage2(&self, allowed_lateness: Duration) -> Box<dyn Finisher> {
        Box::new(TrendingFinisher::new(self.config(allowed_lateness)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    use crate::combiner::Combiner;
    use crate::solo::Solo;
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

    fn solo_with(config: TrendingConfig) -> Solo<TrendingPipeline> {
        let lateness = config.allowed_lateness;
        Solo::new(
            TrendingPipeline::new(config.clone()),
            TrendingFinisher::new(config),
            lateness,
        )
    }

    fn solo() -> Solo<TrendingPipeline> {
        solo_with(TrendingConfig::default())
    }

    fn run(events: &[Event], wm: i64) -> Vec<Point> {
        let mut p = solo();
        let mut out = Vec::new();
        for e in events {
            p.on_event(e, &mut out);
        }
        p.on_watermark(EventTime(wm), &mut out);
        out
    }

    /// The identity of a point (measurement, tier, tags, time).
    type Identity = (String, Tier, Vec<(String, String)>, i64);

    /// The last emitted fields of every point identity.
    fn finals(points: &[Point]) -> BTreeMap<Identity, Vec<(String, FieldValue)>> {
        points
            .iter()
            .map(|p| {
                (
                    (p.measurement.clone(), p.tier, p.tags.clone(), p.time.0),
                    p.fields.clone(),
                )
            })
            .collect()
    }

    fn window(kind: u8, end: i64, span: i64) -> WindowId {
        WindowId {
            end,
            pipeline: 0,
            kind,
            start: end - span,
        }
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
    fn stage_one_emits_distinct_users_and_events_per_tag() {
        let mut p = TrendingPipeline::default();
        p.on_event(&ev("u1", &["a", "b", "a"], 1_000));
        p.on_event(&ev("u1", &["a"], MIN + 1_000));
        p.on_event(&ev("u2", &["a"], MIN + 2_000));
        // No tag at all: its window emits nothing.
        p.on_event(&ev("u3", &[""], 10 * MIN));
        let mut parts = Vec::new();
        p.on_watermark(EventTime(2 * MIN), &mut parts);
        let one = parts
            .iter()
            .find(|q| q.window == window(0, 2 * MIN, MIN))
            .unwrap();
        assert_eq!(one.rows, vec![(row_key(["a"]), smallvec![2, 2])]);
        assert_eq!(one.users, None);
        // The 5m window ending at 2 m spans both slices: u1 counts once for `a`.
        let five = parts
            .iter()
            .find(|q| q.window == window(1, 2 * MIN, 5 * MIN))
            .unwrap();
        assert_eq!(
            five.rows,
            vec![
                (row_key(["a"]), smallvec![2, 3]),
                (row_key(["b"]), smallvec![1, 1])
            ]
        );
        // Emitted once.
        let n = parts.len();
        p.on_watermark(EventTime(2 * MIN + 1), &mut parts);
        assert_eq!(parts.len(), n);
        parts.clear();
        p.on_watermark(EventTime(30 * MIN), &mut parts);
        assert!(parts.iter().all(|q| q.window.end <= 16 * MIN));
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
        let mut p = solo();
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
        let mut p = solo();
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
        // Baselines of the 1m windows, by hand (decay 0.5). With the default
        // lateness of one slide every earlier window is closed in time.
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
    fn baselines_come_only_from_windows_closed_before_the_window_fired() {
        // Lateness of 3 slides: the window ending at E is scored against the
        // windows ending at or before E − 3 m, decayed for the two in between.
        let mut p = solo_with(TrendingConfig {
            allowed_lateness: Duration::from_secs(180),
            ..TrendingConfig::default()
        });
        let mut out = Vec::new();
        for m in 0..6i64 {
            for u in 0..4 {
                p.on_event(&ev(&format!("u{u}"), &["a"], m * MIN), &mut out);
            }
        }
        p.on_watermark(EventTime(6 * MIN), &mut out);
        // Windows ending at 1..=3 m: nothing closed yet.
        for m in 0..3 {
            assert_eq!(score(find(&out, "1m", "a", m * MIN).unwrap()), 4.0);
        }
        // Ending at 4 m: B(1 m) = 2, decayed for the windows ending at 2 and 3 m.
        let b: f64 = 2.0 * 0.25;
        assert_eq!(
            score(find(&out, "1m", "a", 3 * MIN).unwrap()),
            (4.0 - b) / (b + 1.0).sqrt()
        );
        // Ending at 6 m: B(3 m) = 3.5 (from 2, 3), decayed twice.
        let b: f64 = 3.5 * 0.25;
        assert_eq!(
            score(find(&out, "1m", "a", 5 * MIN).unwrap()),
            (4.0 - b) / (b + 1.0).sqrt()
        );
    }

    #[test]
    fn absent_tags_decay_and_are_forgotten() {
        let mut p = solo();
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
        assert_eq!(p.pipeline.slices(), 0);
        out.clear();
        p.on_event(&ev("u", &["a"], 2_000 * MIN), &mut out);
        p.on_watermark(EventTime(2_001 * MIN), &mut out);
        // Long decayed: scored against a zero baseline.
        assert_eq!(score(find(&out, "1m", "a", 2_000 * MIN).unwrap()), 1.0);
    }

    #[test]
    fn finisher_history_is_bounded_and_lookups_are_as_of_the_cutoff() {
        let mut f = TrendingFinisher::new(TrendingConfig {
            allowed_lateness: Duration::from_secs(180),
            ..TrendingConfig::default()
        });
        let closed = |end: i64, tag: &str, users: i64| {
            Partial::new(
                window(0, end, MIN),
                vec![(row_key([tag]), smallvec![users, users])],
                None,
            )
        };
        for m in 1..=10 {
            f.on_closed(&closed(m * MIN, "a", 2));
        }
        // Newest closed 10 m, lateness 3 m: entries from 7 m on.
        assert_eq!(
            f.history[0].keys().copied().collect::<Vec<_>>(),
            [7 * MIN, 8 * MIN, 9 * MIN, 10 * MIN]
        );
        // A window ending at 12 m is scored against B(9 m), whatever closes later.
        let target = Partial::new(
            window(0, 12 * MIN, MIN),
            vec![(row_key(["a"]), smallvec![5, 5])],
            None,
        );
        let mut before = Vec::new();
        f.finish(&target, &mut before);
        f.on_closed(&closed(11 * MIN, "a", 100));
        let mut after = Vec::new();
        f.finish(&target, &mut after);
        assert_eq!(before, after);
        let mut b = 0.0f64;
        for _ in 1..=9 {
            b = b * 0.5 + 0.5 * 2.0;
        }
        // B(9 m), decayed for the windows ending at 10 and 11 m.
        let b = b * 0.25;
        assert_eq!(score(&after[0]), (5.0 - b) / (b + 1.0).sqrt());
        // Absent for long: forgotten.
        f.on_closed(&closed(100 * MIN, "b", 1));
        assert_eq!(
            f.history[0].keys().copied().collect::<Vec<_>>(),
            [11 * MIN, 100 * MIN]
        );
        let newest = &f.history[0][&(100 * MIN)];
        assert_eq!(newest.len(), 1);
        assert_eq!(newest[..], [(Arc::from("b"), 0.5)]);
        // Round trip.
        let mut g = TrendingFinisher::new(TrendingConfig {
            allowed_lateness: Duration::from_secs(180),
            ..TrendingConfig::default()
        });
        g.restore(&f.snapshot().unwrap()).unwrap();
        assert_eq!(g.snapshot().unwrap(), f.snapshot().unwrap());
        assert!(g.restore(b"garbage").is_err());
        // An unknown window size is ignored.
        let mut out = Vec::new();
        g.finish(
            &Partial::new(
                window(9, MIN, MIN),
                vec![(row_key(["a"]), smallvec![1, 1])],
                None,
            ),
            &mut out,
        );
        assert!(out.is_empty());
    }

    #[test]
    fn late_event_re_emits_corrected_windows() {
        let mut p = solo();
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

    /// [`stream`] with a late event for the previous minute after each
    /// minute's last event (within the lateness of [`drive`]'s watermark).
    fn stream_with_late() -> Vec<Event> {
        let mut events = Vec::new();
        for e in stream() {
            let ts = e.timestamp.0;
            let last = ts % MIN == (ts / MIN % 9) * 3_001;
            events.push(e);
            if last && ts >= MIN {
                let m = ts / MIN;
                events.push(ev(&format!("late{m}"), &["a", "e"], (m - 1) * MIN + 30_000));
            }
        }
        events
    }

    /// Feeds events, the watermark 5 s behind the newest event time.
    fn drive(p: &mut Solo<TrendingPipeline>, events: &[Event], out: &mut Vec<Point>) {
        let mut max = i64::MIN;
        for e in events {
            p.on_event(e, out);
            max = max.max(e.timestamp.0);
            p.on_watermark(EventTime(max - 5_000), out);
        }
    }

    #[test]
    fn restore_mid_stream_equals_uninterrupted() {
        let events = stream_with_late();
        let (a, b) = events.split_at(events.len() / 2);
        let mut p = solo();
        let mut full = Vec::new();
        drive(&mut p, &events, &mut full);
        p.on_watermark(EventTime::MAX, &mut full);

        let mut q = solo();
        let mut resumed = Vec::new();
        drive(&mut q, a, &mut resumed);
        let snap = q.snapshot();
        let mut r = solo();
        r.restore(&snap).unwrap();
        drive(&mut r, b, &mut resumed);
        r.on_watermark(EventTime::MAX, &mut resumed);
        assert_eq!(full, resumed);
        assert!(r.pipeline.restore(b"garbage").is_err());
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
            let mut p = solo();
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
    fn late_event_gives_the_same_final_points_before_or_after_its_window_fires() {
        // Lateness of 3 slides, so windows close between the first firing of
        // the late event's windows and their corrections.
        let config = TrendingConfig {
            allowed_lateness: Duration::from_secs(180),
            ..TrendingConfig::default()
        };
        let late = ev("late", &["a", "new"], 20 * MIN + 10_000);
        let base = stream();
        let mut finals_by_position = Vec::new();
        // Insert the late event once the watermark (5 s behind) reached `at`.
        for at in [i64::MIN, 20 * MIN, 21 * MIN, 22 * MIN, 23 * MIN] {
            let mut events = Vec::new();
            let mut inserted = false;
            for e in &base {
                if !inserted && e.timestamp.0 - 5_000 > at && at > i64::MIN {
                    events.push(late.clone());
                    inserted = true;
                }
                events.push(e.clone());
            }
            if !inserted {
                let pos = events
                    .iter()
                    .position(|e| e.timestamp > late.timestamp)
                    .unwrap_or(events.len());
                events.insert(pos, late.clone());
            }
            let mut p = solo_with(config.clone());
            let mut out = Vec::new();
            drive(&mut p, &events, &mut out);
            p.on_watermark(EventTime::MAX, &mut out);
            let a = find(&out, "1m", "a", 20 * MIN).unwrap();
            // u0 and u2 (minute 20 has users u0..u2), and the late one.
            assert_eq!(int(a, "users"), 3, "late event counted (at {at})");
            assert!(find(&out, "15m", "new", 20 * MIN).is_some());
            finals_by_position.push((at, finals(&out)));
        }
        let (_, first) = &finals_by_position[0];
        for (at, f) in &finals_by_position[1..] {
            assert!(f == first, "late event inserted at watermark {at}");
        }
    }

    #[test]
    fn two_workers_over_disjoint_users_equal_one_pipeline() {
        let events = stream_with_late();
        let config = TrendingConfig::default();
        let lateness = config.allowed_lateness;

        let mut one = solo();
        let mut single = Vec::new();
        drive(&mut one, &events, &mut single);
        one.on_watermark(EventTime::MAX, &mut single);

        let mut workers = [
            TrendingPipeline::new(config.clone()),
            TrendingPipeline::new(config.clone()),
        ];
        let mut combiner =
            Combiner::new(vec![Box::new(TrendingFinisher::new(config))], 2, lateness);
        let owner = |e: &Event| (xxhash_rust::xxh3::xxh3_64(e.user_id.as_bytes()) % 2) as usize;
        let mut merged = Vec::new();
        let mut parts = Vec::new();
        let mut max = i64::MIN;
        let mut step =
            |workers: &mut [TrendingPipeline; 2], wm: EventTime, out: &mut Vec<Point>| {
                for (w, p) in workers.iter_mut().enumerate() {
                    p.on_watermark(wm, &mut parts);
                    for part in parts.drain(..) {
                        combiner.on_partial(w, part).unwrap();
                    }
                    combiner.on_watermark(w, wm, out);
                }
            };
        for e in &events {
            workers[owner(e)].on_event(e);
            max = max.max(e.timestamp.0);
            step(&mut workers, EventTime(max - 5_000), &mut merged);
        }
        step(&mut workers, EventTime::MAX, &mut merged);
        assert!(events.iter().any(|e| owner(e) == 0) && events.iter().any(|e| owner(e) == 1));
        assert!(!single.is_empty());
        assert!(finals(&merged) == finals(&single));
    }

    /// A xorshift generator, so the randomized tests need no dependency.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// A random stream with its processing-time clock: users and tags from
    /// small pools (tags repeated, rare or empty at times), times jittered by up to
    /// 20 s, some events minutes late (within the lateness or not) and some
    /// far ahead of the clock.
    fn random_stream(rng: &mut Rng, n: usize) -> Vec<(i64, Event)> {
        const TAGS: [&str; 10] = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"];
        let mut clock = 1_000 * MIN;
        (0..n)
            .map(|_| {
                clock += rng.below(6_000) as i64;
                let mut ts = clock - rng.below(20_000) as i64;
                match rng.below(40) {
                    0 => ts -= (1 + rng.below(20) as i64) * MIN,
                    1 => ts += (1 + rng.below(100) as i64) * MIN,
                    _ => {}
                }
                let user = format!("u{}", rng.below(30));
                // Common tags, rare ones (whose ids are freed and reused)
                // and empty ones.
                let tags: Vec<String> = (0..rng.below(4))
                    .map(|_| match rng.below(20) {
                        0 => String::new(),
                        1..=3 => format!("r{}", rng.below(200)),
                        _ => TAGS[rng.below(TAGS.len() as u64) as usize].to_string(),
                    })
                    .collect();
                let tags: Vec<&str> = tags.iter().map(String::as_str).collect();
                (clock, ev(&user, &tags, ts))
            })
            .collect()
    }

    /// The pipeline's input as the brute-force reference sees it: accepted
    /// (slice, tag, user hash) uses, the slices held and the events dropped
    /// for full slices, updated event by event.
    struct Reference {
        config: TrendingConfig,
        last_wm: i64,
        uses: Vec<(i64, String, u64)>,
        tags: BTreeMap<i64, Vec<String>>,
        held: BTreeSet<i64>,
        dropped: u64,
    }

    impl Reference {
        fn new(config: TrendingConfig) -> Self {
            Reference {
                config,
                last_wm: i64::MIN,
                uses: Vec::new(),
                tags: BTreeMap::new(),
                held: BTreeSet::new(),
                dropped: 0,
            }
        }

        fn slide(&self) -> i64 {
            millis(self.config.slide)
        }

        fn on_event(&mut self, e: &Event) {
            let slide = self.slide();
            let x = e.timestamp.0.div_euclid(slide);
            let lateness = millis(self.config.allowed_lateness);
            if e.hashtags.is_empty() || (x + 1) * slide + lateness <= self.last_wm {
                return;
            }
            self.held.insert(x);
            let user = xxhash_rust::xxh3::xxh3_64(e.user_id.as_bytes());
            let mut seen: Vec<&String> = Vec::new();
            for tag in &e.hashtags {
                if tag.is_empty() || seen.contains(&tag) {
                    continue;
                }
                seen.push(tag);
                let tags = self.tags.entry(x).or_default();
                if !tags.contains(tag) {
                    if tags.len() >= self.config.max_tags_per_window {
                        self.dropped += 1;
                        continue;
                    }
                    tags.push(tag.clone());
                }
                self.uses.push((x, tag.clone(), user));
            }
        }

        fn on_watermark(&mut self, wm: i64) {
            self.last_wm = self.last_wm.max(wm);
            let slide = self.slide();
            let reach = self
                .config
                .sizes
                .iter()
                .map(|s| millis(*s) / slide)
                .max()
                .unwrap_or(1)
                - 1;
            let lateness = millis(self.config.allowed_lateness);
            let base = self.last_wm.saturating_sub(lateness).div_euclid(slide) - reach;
            self.held.retain(|&x| x >= base);
        }

        /// Every window with data: distinct users and events per tag, by a
        /// union over the raw uses.
        fn windows(&self) -> BTreeMap<WindowId, Vec<(RowKey, Values)>> {
            let slide = self.slide();
            let mut acc: BTreeMap<(WindowId, String), (BTreeSet<u64>, i64)> = BTreeMap::new();
            for (kind, size) in self.config.sizes.iter().enumerate() {
                let n = millis(*size) / slide;
                for (x, tag, user) in &self.uses {
                    for y in *x..*x + n {
                        let end = (y + 1) * slide;
                        let id = WindowId {
                            end,
                            pipeline: 0,
                            kind: kind as u8,
                            start: end - n * slide,
                        };
                        let e = acc.entry((id, tag.clone())).or_default();
                        e.0.insert(*user);
                        e.1 += 1;
                    }
                }
            }
            let mut out: BTreeMap<WindowId, Vec<(RowKey, Values)>> = BTreeMap::new();
            for ((id, tag), (users, events)) in acc {
                out.entry(id)
                    .or_default()
                    .push((row_key([&tag]), smallvec![users.len() as i64, events]));
            }
            out
        }
    }

    /// Runs a randomized stream through stage 1 and checks every window's
    /// last partial, and every early partial, against a brute-force union
    /// over the raw events; also that restoring from snapshots taken along
    /// the way changes nothing.
    fn check_against_brute_force(config: TrendingConfig, ring: Option<i64>, seed: u64) {
        let make = || {
            TrendingPipeline::with_geometry(
                Geometry::new(&config, ring),
                config.max_tags_per_window,
            )
        };
        let mut rng = Rng(seed);
        let stream = random_stream(&mut rng, 2_000);
        let mut p = make();
        let mut restored = make();
        let mut reference = Reference::new(config.clone());
        let (mut out, mut out_restored) = (Vec::new(), Vec::new());
        let mut early_checked = 0;
        for (i, (clock, e)) in stream.iter().enumerate() {
            p.on_event(e);
            restored.on_event(e);
            reference.on_event(e);
            if rng.below(5) == 0 {
                let wm = EventTime(clock - rng.below(4 * MIN as u64) as i64);
                p.on_watermark(wm, &mut out);
                restored.on_watermark(wm, &mut out_restored);
                reference.on_watermark(wm.0);
            }
            if rng.below(50) == 0 {
                let snapshot = restored.snapshot().unwrap();
                restored = make();
                restored.restore(&snapshot).unwrap();
            }
            if i % 400 == 0 {
                // Early partials: the open windows up to the newest slice.
                let mut early = Vec::new();
                p.early(&mut early);
                let windows = reference.windows();
                let newest = reference.held.last().copied();
                let hi = newest.map_or(i64::MIN, |x| (x + 1) * reference.slide());
                let want: Vec<&WindowId> = windows
                    .keys()
                    .filter(|w| w.end > reference.last_wm && w.end <= hi)
                    .collect();
                let got: Vec<&WindowId> = early.iter().map(|q| &q.window).collect();
                let mut got_sorted = got.clone();
                got_sorted.sort();
                assert_eq!(got_sorted, want, "early windows after event {i}");
                for q in &early {
                    assert_eq!(q.rows, windows[&q.window], "early {:?}", q.window);
                }
                early_checked += early.len();
            }
        }
        p.on_watermark(EventTime::MAX, &mut out);
        restored.on_watermark(EventTime::MAX, &mut out_restored);
        assert!(out == out_restored, "restored mid-stream");
        let mut last: BTreeMap<WindowId, &Partial> = BTreeMap::new();
        for q in &out {
            last.insert(q.window, q);
        }
        let want = reference.windows();
        assert_eq!(
            last.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (id, rows) in &want {
            assert_eq!(&last[id].rows, rows, "{id:?}");
        }
        assert_eq!(p.dropped_tag_events(), reference.dropped);
        assert!(early_checked > 0 && want.len() > 100);
        // Corrections happened: some window was emitted more than once.
        assert!(out.len() > want.len());
    }

    #[test]
    fn incremental_counts_equal_a_brute_force_union() {
        for seed in 1..=4 {
            check_against_brute_force(TrendingConfig::default(), None, seed);
        }
        // Lateness of 3 slides and few tags per slice.
        let tight = TrendingConfig {
            allowed_lateness: Duration::from_secs(180),
            max_tags_per_window: 3,
            ..TrendingConfig::default()
        };
        check_against_brute_force(tight.clone(), None, 5);
        // Rings of one and four cells: counters mostly in the hash maps.
        check_against_brute_force(TrendingConfig::default(), Some(1), 6);
        check_against_brute_force(tight, Some(4), 7);
        // A window wider than a pair's mask: slices in the far set.
        let wide = TrendingConfig {
            sizes: vec![
                Duration::from_secs(60),
                Duration::from_secs(7 * 60),
                Duration::from_secs(70 * 60),
            ],
            allowed_lateness: Duration::from_secs(300),
            ..TrendingConfig::default()
        };
        check_against_brute_force(wide, None, 8);
    }

    #[test]
    fn tags_per_slice_are_bounded_and_extremes_do_not_panic() {
        let mut p = solo_with(TrendingConfig {
            max_tags_per_window: 3,
            ..TrendingConfig::default()
        });
        let mut out = Vec::new();
        p.on_event(&ev("u", &["a", "b", "c", "d", "e"], 0), &mut out);
        p.on_event(&ev("v", &["a", ""], 0), &mut out);
        assert_eq!(p.pipeline.dropped_tag_events(), 2);
        for ts in [i64::MIN, i64::MIN + 1, -1, i64::MAX] {
            p.on_event(&ev("u", &["z"], ts), &mut out);
        }
        p.early(&mut out);
        p.on_watermark(EventTime(0), &mut out);
        p.on_watermark(EventTime::MAX, &mut out);
        assert!(find(&out, "1m", "a", 0).is_some());
        assert!(find(&out, "1m", "d", 0).is_none());
        assert!(find(&out, "1m", "z", -MIN).is_some());
    }

    #[test]
    fn early_reports_the_newest_open_windows() {
        let mut p = solo();
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
