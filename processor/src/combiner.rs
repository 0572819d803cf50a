//! Stage 2: merges the workers' partials and closes windows.
//!
//! The [`Combiner`] keeps, per window, the newest partial of every worker. A
//! window fires once every worker's watermark has passed its end: the
//! partials are merged ([`Partial::merge`]) and the pipeline's [`Finisher`]
//! turns the merge into points (top-K, ratios...). A partial arriving for a
//! fired window (a late event within the allowed lateness) fires it again
//! with the corrected merge. Once the watermark passes end plus the allowed
//! lateness the window is closed: [`Finisher::on_closed`] sees its final
//! merge and the window is forgotten.
//!
//! Like stage 1 it is synchronous and clock-free.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemark_model::{EventTime, Point, Watermark};

use crate::alerts::{AlertEngine, AlertRules};
use crate::error::ProcessorError;
use crate::partial::{Partial, WindowId};
use crate::pipeline::Finisher;
use crate::window::millis;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Slot {
    /// Newest final partial per worker.
    parts: Vec<Option<Partial>>,
    /// Newest early partial per worker (open windows only).
    #[serde(skip)]
    early: Vec<Option<Partial>>,
    fired: bool,
    /// A partial changed after the window fired.
    dirty: bool,
    /// Past its horizon: kept a little longer only so that a partial from a
    /// worker that was idle, racing the close, still corrects the window.
    closed: bool,
}

impl Slot {
    fn new(workers: usize) -> Self {
        Slot {
            parts: vec![None; workers],
            early: vec![None; workers],
            fired: false,
            dirty: false,
            closed: false,
        }
    }

    fn merged(&self, id: WindowId) -> Partial {
        Partial::merge(id, self.parts.iter().flatten())
    }
}

/// One advance of the combined watermark, applied to each pipeline's windows.
#[derive(Debug, Clone, Copy)]
struct Step {
    from: Watermark,
    to: Watermark,
    grace_ms: i64,
}

impl Step {
    /// Re-finishes corrected windows, then fires and closes what the step
    /// passed, in time order, and forgets windows closed a grace ago.
    fn run(
        self,
        f: &mut dyn Finisher,
        windows: &mut BTreeMap<WindowId, Slot>,
        horizon_ms: i64,
        out: &mut Vec<Point>,
        mut closed: Option<&mut Vec<Vec<Point>>>,
    ) {
        // Corrections of fired windows first: what closes below must see them.
        for (id, slot) in windows.iter_mut() {
            if slot.fired && slot.dirty {
                slot.dirty = false;
                f.finish(&slot.merged(*id), out);
            }
        }
        let wm = self.to;
        if wm <= self.from {
            return;
        }
        // Fires at `end`, closes at `end + horizon`; a close comes before a
        // fire at the same time, so state derived from closed windows does
        // not depend on how far one step advances.
        const CLOSE: u8 = 0;
        const FIRE: u8 = 1;
        let close_at = |id: &WindowId| id.end.saturating_add(horizon_ms);
        let mut actions: Vec<(i64, u8, WindowId)> = Vec::new();
        for (id, slot) in windows.iter() {
            if id.end > wm.0 {
                break;
            }
            if slot.closed {
                continue;
            }
            if !slot.fired {
                actions.push((id.end, FIRE, *id));
            }
            if close_at(id) <= wm.0 {
                actions.push((close_at(id), CLOSE, *id));
            }
        }
        actions.sort_unstable();
        // A window firing and closing in this one step is merged once: no
        // partial arrives in between.
        let mut merged_to_close: BTreeMap<WindowId, Partial> = BTreeMap::new();
        for (_, action, id) in actions {
            let Some(slot) = windows.get_mut(&id) else {
                continue;
            };
            let merged = merged_to_close
                .remove(&id)
                .unwrap_or_else(|| slot.merged(id));
            if !slot.fired {
                slot.fired = true;
                f.finish(&merged, out);
            }
            if action == CLOSE {
                f.on_closed(&merged);
                slot.closed = true;
                if let Some(closed) = closed.as_deref_mut() {
                    let mut points = Vec::new();
                    f.finish(&merged, &mut points);
                    closed.push(points);
                }
            } else if close_at(&id) <= wm.0 {
                merged_to_close.insert(id, merged);
            }
        }
        windows
            .retain(|id, slot| !slot.closed || close_at(id).saturating_add(self.grace_ms) > wm.0);
    }
}

#[derive(Serialize, Deserialize)]
struct CombinerState {
    workers: usize,
    worker_wm: Vec<Watermark>,
    last_wm: Watermark,
    windows: Vec<(WindowId, Slot)>,
    finishers: Vec<Vec<u8>>,
    late_partials: u64,
}

/// The stage-2 core; see the module documentation.
pub struct Combiner {
    finishers: Vec<Box<dyn Finisher>>,
    workers: usize,
    /// Per pipeline: how long after its end a window may still change.
    horizons_ms: Vec<i64>,
    /// The allowed lateness: how long closed windows are kept for stragglers.
    grace_ms: i64,
    worker_wm: Vec<Watermark>,
    /// Workers whose partitions are all idle do not hold the watermark back.
    worker_idle: Vec<bool>,
    last_wm: Watermark,
    /// Per pipeline (the index is `WindowId::pipeline`): its windows.
    windows: Vec<BTreeMap<WindowId, Slot>>,
    late_partials: u64,
    /// The pipelines' names, by index: a checkpoint is restored by name,
    /// so pipelines can be added (empty: by position, counts equal).
    names: Vec<&'static str>,
    /// The alert rules over closed windows, and which pipelines they read.
    alerts: Option<(AlertEngine, Vec<bool>)>,
    /// What each pipeline writes, to tell which ones new rules read.
    measurements: Vec<Vec<&'static str>>,
}

/// What [`Combiner::snapshot`] writes since pipelines are named: the magic,
/// then bincode of [`NamedState`]. An older snapshot is a bare
/// [`CombinerState`], whose first bytes (the worker count) never spell it.
const NAMED_MAGIC: &[u8; 4] = b"TCB2";

#[derive(Serialize, Deserialize)]
struct NamedState {
    names: Vec<String>,
    state: CombinerState,
    alerts: Option<Vec<u8>>,
}

/// The pipelines of the default set before `patterns` joined it: an unnamed
/// checkpoint of four pipelines is theirs.
const FIRST_BUILTINS: [&str; 4] = ["traffic", "engagement", "trending", "ads"];

impl std::fmt::Debug for Combiner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Combiner")
            .field("workers", &self.workers)
            .field("last_wm", &self.last_wm)
            .field("windows", &self.held_windows())
            .finish()
    }
}

impl Combiner {
    /// A combiner for `workers` stage-1 workers; `finishers` in pipeline order.
    pub fn new(finishers: Vec<Box<dyn Finisher>>, workers: usize, lateness: Duration) -> Self {
        let workers = workers.max(1);
        let horizons_ms = finishers
            .iter()
            .map(|f| millis(f.horizon().unwrap_or(lateness).max(lateness)))
            .collect();
        Combiner {
            windows: finishers.iter().map(|_| BTreeMap::new()).collect(),
            finishers,
            workers,
            horizons_ms,
            grace_ms: millis(lateness),
            worker_wm: vec![EventTime::MIN; workers],
            worker_idle: vec![false; workers],
            last_wm: EventTime::MIN,
            late_partials: 0,
            names: Vec::new(),
            alerts: None,
            measurements: Vec::new(),
        }
    }

    /// Tells the combiner what each pipeline writes, so that
    /// [`Combiner::set_alert_rules`] can tell which ones a rule reads.
    pub fn measuring(mut self, measurements: Vec<Vec<&'static str>>) -> Self {
        self.measurements = measurements;
        self
    }

    /// Replaces the alert rules: a rule defined as before keeps its state,
    /// a new or changed one starts from the next closed window.
    pub fn set_alert_rules(&mut self, rules: Arc<AlertRules>) {
        if rules.is_empty() {
            self.alerts = None;
            return;
        }
        let mut engine = AlertEngine::new(rules);
        if let Some((old, _)) = &self.alerts {
            let kept = old.snapshot().and_then(|state| engine.restore(&state));
            if let Err(e) = kept {
                tracing::warn!(error = %e, "Alert rules start over");
            }
        }
        let reads = (self.measurements.iter())
            .map(|written| written.iter().any(|m| engine.reads(m)))
            .collect();
        self.alerts = Some((engine, reads));
    }

    /// Names the pipelines (in the finishers' order), so that a checkpoint
    /// taken with another set of pipelines restores those they share.
    pub fn named(mut self, names: Vec<&'static str>) -> Self {
        self.names = names;
        self
    }

    /// Evaluates `engine`'s rules over the closed windows of the pipelines
    /// marked in `reads` (by index).
    pub fn with_alerts(mut self, engine: AlertEngine, reads: Vec<bool>) -> Self {
        self.alerts = Some((engine, reads));
        self
    }

    /// Series firing now per alert rule (empty without rules).
    pub fn alerts_firing(&self) -> BTreeMap<&str, usize> {
        self.alerts
            .as_ref()
            .map(|(engine, _)| engine.firing())
            .unwrap_or_default()
    }

    /// The number of workers it merges.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The watermark up to which windows have fired.
    pub fn watermark(&self) -> Watermark {
        self.last_wm
    }

    /// Windows held (open, or fired and still accepting corrections).
    pub fn held_windows(&self) -> usize {
        self.windows.iter().map(BTreeMap::len).sum()
    }

    /// Partials that arrived for windows already closed (dropped).
    pub fn late_partials(&self) -> u64 {
        self.late_partials
    }

    /// When a window can no longer change.
    fn close_at(&self, id: &WindowId) -> i64 {
        let horizon = self
            .horizons_ms
            .get(id.pipeline as usize)
            .copied()
            .unwrap_or(0);
        id.end.saturating_add(horizon)
    }

    /// Takes a worker's partial of a window it fired (or corrected).
    pub fn on_partial(&mut self, worker: usize, partial: Partial) -> Result<(), ProcessorError> {
        let id = partial.window;
        self.check_source(worker, id.pipeline)?;
        let closed_long_ago = self.close_at(&id).saturating_add(self.grace_ms) <= self.last_wm.0;
        let windows = &mut self.windows[usize::from(id.pipeline)];
        if closed_long_ago && !windows.contains_key(&id) {
            self.late_partials += 1;
            tracing::warn!(
                end = id.end,
                pipeline = id.pipeline,
                "Dropping a partial for a window already closed"
            );
            return Ok(());
        }
        let workers = self.workers;
        let slot = windows.entry(id).or_insert_with(|| Slot::new(workers));
        slot.parts[worker] = Some(partial);
        slot.early[worker] = None;
        if slot.fired {
            slot.dirty = true;
        }
        Ok(())
    }

    /// A partial of a worker or pipeline this combiner does not have would
    /// be merged into nothing: the deployment disagrees on its shape.
    fn check_source(&self, worker: usize, pipeline: u8) -> Result<(), ProcessorError> {
        if worker < self.workers && usize::from(pipeline) < self.windows.len() {
            return Ok(());
        }
        Err(ProcessorError::StrayPartial {
            worker,
            pipeline,
            workers: self.workers,
            pipelines: self.windows.len(),
        })
    }

    /// Replaces a worker's early partials (its open windows).
    pub fn on_early(
        &mut self,
        worker: usize,
        partials: Vec<Partial>,
    ) -> Result<(), ProcessorError> {
        for p in &partials {
            self.check_source(worker, p.window.pipeline)?;
        }
        if worker >= self.workers {
            return Ok(());
        }
        for slot in self.windows.iter_mut().flat_map(BTreeMap::values_mut) {
            slot.early[worker] = None;
        }
        let (workers, horizon) = (self.workers, self.last_wm.0);
        for p in partials {
            if p.window.end <= horizon {
                continue;
            }
            let slot = self.windows[usize::from(p.window.pipeline)]
                .entry(p.window)
                .or_insert_with(|| Slot::new(workers));
            slot.early[worker] = Some(p);
        }
        Ok(())
    }

    /// Marks whether every partition of a worker is idle (processing time
    /// passed without records); see [`Combiner::target`].
    pub fn set_idle(&mut self, worker: usize, idle: bool) {
        if let Some(i) = self.worker_idle.get_mut(worker) {
            *i = idle;
        }
    }

    /// The watermark workers should at least assume: the minimum over workers
    /// that are not idle (the largest when all are). An idle worker adopts it
    /// (firing its windows up to it and judging lateness by it) and reports
    /// it back; windows fire only at the minimum over every worker's report,
    /// so no worker can still add to a window the combiner has closed.
    pub fn target(&self) -> Watermark {
        let active = self
            .worker_wm
            .iter()
            .zip(&self.worker_idle)
            .filter(|(_, idle)| !**idle)
            .map(|(wm, _)| *wm)
            .min();
        active
            .or_else(|| self.worker_wm.iter().copied().max())
            .unwrap_or(EventTime::MIN)
            .max(self.last_wm)
    }

    /// Records a worker's watermark and fires what every worker passed.
    pub fn on_watermark(&mut self, worker: usize, wm: Watermark, out: &mut Vec<Point>) {
        if let Some(w) = self.worker_wm.get_mut(worker) {
            *w = (*w).max(wm);
        }
        let combined = self
            .worker_wm
            .iter()
            .copied()
            .min()
            .unwrap_or(EventTime::MIN);
        self.advance(combined, out);
    }

    /// Fires and closes everything: the end of a bounded input.
    pub fn finish(&mut self, out: &mut Vec<Point>) {
        self.worker_wm.iter_mut().for_each(|w| *w = EventTime::MAX);
        self.advance(EventTime::MAX, out);
    }

    fn advance(&mut self, wm: Watermark, out: &mut Vec<Point>) {
        let step = Step {
            from: self.last_wm,
            to: wm.max(self.last_wm),
            grace_ms: self.grace_ms,
        };
        let reads: Vec<bool> = match &self.alerts {
            Some((_, reads)) => (0..self.finishers.len())
                .map(|i| reads.get(i).copied().unwrap_or(false))
                .collect(),
            None => vec![false; self.finishers.len()],
        };
        // Per pipeline, the points of each window it closed, for the rules.
        let mut closed: Vec<Vec<Vec<Point>>> = vec![Vec::new(); self.finishers.len()];
        // The end of a bounded input closes everything at once: the
        // pipelines are independent, so each closes on its own thread.
        let at_once = step.to == EventTime::MAX && self.finishers.len() > 1;
        let pipelines = self
            .finishers
            .iter_mut()
            .zip(self.windows.iter_mut())
            .zip(&self.horizons_ms)
            .zip(closed.iter_mut().zip(&reads));
        if at_once {
            let mut outs: Vec<Vec<Point>> = Vec::new();
            let mut left: Vec<usize> = Vec::new();
            std::thread::scope(|scope| {
                let handles: Vec<_> = pipelines
                    .enumerate()
                    .map(|(i, (((f, windows), &horizon_ms), (closed, &reads)))| {
                        let spawned = std::thread::Builder::new()
                            .name(format!("tidemark-close-{i}"))
                            .spawn_scoped(scope, move || {
                                let mut out = Vec::new();
                                let closed = reads.then_some(closed);
                                step.run(f.as_mut(), windows, horizon_ms, &mut out, closed);
                                out
                            });
                        (i, spawned)
                    })
                    .collect();
                for (i, handle) in handles {
                    match handle.map(|h| h.join()) {
                        Ok(Ok(points)) => outs.push(points),
                        // Could not start a thread: closed inline below.
                        Err(_) => left.push(i),
                        Ok(Err(panic)) => std::panic::resume_unwind(panic),
                    }
                }
            });
            for points in outs {
                out.extend(points);
            }
            for i in left {
                step.run(
                    self.finishers[i].as_mut(),
                    &mut self.windows[i],
                    self.horizons_ms[i],
                    out,
                    reads[i].then_some(&mut closed[i]),
                );
            }
        } else {
            for (((f, windows), &horizon_ms), (closed, &reads)) in pipelines {
                step.run(
                    f.as_mut(),
                    windows,
                    horizon_ms,
                    out,
                    reads.then_some(closed),
                );
            }
        }
        self.last_wm = step.to;
        if let Some((engine, _)) = &mut self.alerts {
            // Each rule reads one pipeline, whose windows closed in order:
            // the verdicts do not depend on how far one step advanced.
            for window in closed.iter().flatten() {
                engine.on_closed(window, out);
            }
        }
    }

    /// Early points of windows that have not fired: every worker's newest
    /// partial, final or early, merged.
    pub fn early(&self, out: &mut Vec<Point>) {
        for (id, slot) in self.windows.iter().flatten() {
            if slot.fired {
                continue;
            }
            let parts = slot
                .parts
                .iter()
                .zip(&slot.early)
                .filter_map(|(f, e)| f.as_ref().or(e.as_ref()));
            let merged = Partial::merge(*id, parts);
            if let Some(f) = self.finishers.get(id.pipeline as usize) {
                f.finish(&merged, out);
            }
        }
    }

    /// The stage-2 state, for a checkpoint.
    pub fn snapshot(&self) -> Result<Vec<u8>, ProcessorError> {
        let state = CombinerState {
            workers: self.workers,
            worker_wm: self.worker_wm.clone(),
            last_wm: self.last_wm,
            windows: self
                .windows
                .iter()
                .flatten()
                .filter(|(_, s)| s.parts.iter().any(Option::is_some))
                .map(|(id, s)| (*id, s.clone()))
                .collect(),
            finishers: (self.finishers.iter().map(|f| f.snapshot())).collect::<Result<_, _>>()?,
            late_partials: self.late_partials,
        };
        let encode_error = |e| ProcessorError::Snapshot(format!("combiner state: {e}"));
        if self.names.is_empty() && self.alerts.is_none() {
            return bincode::serialize(&state).map_err(encode_error);
        }
        let named = NamedState {
            names: self.names.iter().map(|n| n.to_string()).collect(),
            state,
            alerts: match &self.alerts {
                Some((engine, _)) => Some(engine.snapshot()?),
                None => None,
            },
        };
        let mut out = NAMED_MAGIC.to_vec();
        bincode::serialize_into(&mut out, &named).map_err(encode_error)?;
        Ok(out)
    }

    /// Restores a state taken by [`Combiner::snapshot`] with the same number
    /// of workers. Pipelines are matched by name: one the checkpoint does
    /// not hold starts empty, one it holds that no longer runs is dropped.
    pub fn restore(&mut self, state: &[u8]) -> Result<(), ProcessorError> {
        let decode_error = |e| ProcessorError::CorruptCheckpoint(format!("combiner state: {e}"));
        let (names, state, alerts) = match state.strip_prefix(NAMED_MAGIC) {
            Some(named) => {
                let named: NamedState = bincode::deserialize(named).map_err(decode_error)?;
                (Some(named.names), named.state, named.alerts)
            }
            None => (
                None,
                bincode::deserialize(state).map_err(decode_error)?,
                None,
            ),
        };
        crate::checkpoint::check_worker_count(state.workers, self.workers)?;
        let saved_names = match names {
            Some(names) if !names.is_empty() => names,
            _ if state.finishers.len() == self.finishers.len() => (self.names.iter())
                .map(|n| n.to_string())
                .chain((self.names.len()..self.finishers.len()).map(|i| format!("#{i}")))
                .collect(),
            _ if state.finishers.len() == FIRST_BUILTINS.len()
                && self.names.starts_with(&FIRST_BUILTINS) =>
            {
                FIRST_BUILTINS.map(String::from).to_vec()
            }
            _ => {
                return Err(ProcessorError::CorruptCheckpoint(format!(
                    "the checkpoint holds {} pipelines, this processor runs {}",
                    state.finishers.len(),
                    self.finishers.len()
                )))
            }
        };
        if saved_names.len() != state.finishers.len() {
            return Err(ProcessorError::CorruptCheckpoint(format!(
                "the checkpoint names {} pipelines and holds {}",
                saved_names.len(),
                state.finishers.len()
            )));
        }
        let names = (self.names.iter())
            .map(|n| n.to_string())
            .chain((self.names.len()..self.finishers.len()).map(|i| format!("#{i}")));
        // Saved index -> index now.
        let mut moved: Vec<Option<u8>> = vec![None; saved_names.len()];
        for (now, name) in names.enumerate() {
            match saved_names.iter().position(|n| *n == name) {
                Some(then) => {
                    self.finishers[now].restore(&state.finishers[then])?;
                    moved[then] = u8::try_from(now).ok();
                }
                None => tracing::warn!(
                    pipeline = name,
                    "Checkpoint has no stage-2 state for pipeline; starting empty"
                ),
            }
        }
        self.worker_wm = state.worker_wm;
        self.last_wm = state.last_wm;
        self.late_partials = state.late_partials;
        for windows in &mut self.windows {
            windows.clear();
        }
        for (mut id, mut slot) in state.windows {
            let Some(Some(now)) = moved.get(usize::from(id.pipeline)) else {
                continue;
            };
            id.pipeline = *now;
            slot.early = vec![None; self.workers];
            if let Some(windows) = self.windows.get_mut(usize::from(id.pipeline)) {
                windows.insert(id, slot);
            }
        }
        if let (Some((engine, _)), Some(saved)) = (&mut self.alerts, alerts) {
            engine.restore(&saved)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use smallvec::smallvec;
    use tidemark_model::{FieldValue, Tier};

    use super::*;
    use crate::partial::row_key;

    const MIN: i64 = 60_000;

    /// One point per window: the sum of its one row.
    struct Sum;

    impl Finisher for Sum {
        fn finish(&self, merged: &Partial, out: &mut Vec<Point>) {
            let total = merged.rows.iter().map(|(_, v)| v[0]).sum();
            out.push(Point::new(
                "sum",
                Tier::Rt,
                EventTime(merged.window.start),
                Vec::new(),
                vec![("n".to_string(), FieldValue::Int(total))],
            ));
        }
    }

    fn window(start: i64) -> WindowId {
        WindowId {
            end: start + MIN,
            pipeline: 0,
            kind: 0,
            start,
        }
    }

    fn partial(start: i64, n: i64) -> Partial {
        Partial::new(window(start), vec![(row_key(["all"]), smallvec![n])], None)
    }

    fn combiner(workers: usize) -> Combiner {
        Combiner::new(vec![Box::new(Sum)], workers, Duration::from_secs(60))
    }

    fn sums(points: &[Point]) -> Vec<(i64, i64)> {
        points
            .iter()
            .map(|p| match p.field("n") {
                Some(FieldValue::Int(n)) => (p.time.0, n),
                other => panic!("not a count: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_window_fires_once_every_worker_passed_its_end_with_the_merge_of_all() {
        let mut c = combiner(2);
        let mut out = Vec::new();
        c.on_partial(0, partial(0, 3)).unwrap();
        c.on_watermark(0, EventTime(MIN), &mut out);
        assert!(out.is_empty(), "worker 1 has not passed the end");
        c.on_partial(1, partial(0, 4)).unwrap();
        c.on_watermark(1, EventTime(MIN), &mut out);
        assert_eq!(sums(&out), [(0, 7)]);
        assert_eq!(c.watermark(), EventTime(MIN));
    }

    #[test]
    fn a_correction_within_the_lateness_fires_the_window_again_and_a_later_one_is_dropped() {
        let mut c = combiner(1);
        let mut out = Vec::new();
        c.on_partial(0, partial(0, 3)).unwrap();
        c.on_watermark(0, EventTime(MIN), &mut out);
        c.on_partial(0, partial(0, 5)).unwrap();
        c.on_watermark(0, EventTime(MIN + 1), &mut out);
        assert_eq!(sums(&out), [(0, 3), (0, 5)]);

        out.clear();
        c.on_watermark(0, EventTime(3 * MIN), &mut out);
        assert_eq!(c.held_windows(), 0, "closed after the lateness");
        c.on_partial(0, partial(0, 9)).unwrap();
        c.on_watermark(0, EventTime(3 * MIN + 1), &mut out);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(c.late_partials(), 1);
    }

    #[test]
    fn an_idle_worker_does_not_hold_the_target_back() {
        let mut c = combiner(2);
        let mut out = Vec::new();
        c.on_watermark(0, EventTime(5 * MIN), &mut out);
        assert_eq!(c.target(), EventTime::MIN, "worker 1 has said nothing");
        c.set_idle(1, true);
        assert_eq!(c.target(), EventTime(5 * MIN));
    }

    #[test]
    fn early_results_merge_final_and_early_partials_of_unfired_windows() {
        let mut c = combiner(2);
        let mut out = Vec::new();
        c.on_partial(0, partial(0, 2)).unwrap();
        c.on_early(1, vec![partial(0, 1), partial(MIN, 6)]).unwrap();
        c.early(&mut out);
        assert_eq!(sums(&out), [(0, 3), (MIN, 6)]);

        // A new early set replaces the worker's previous one.
        out.clear();
        c.on_early(1, vec![partial(MIN, 8)]).unwrap();
        c.early(&mut out);
        assert_eq!(sums(&out), [(0, 2), (MIN, 8)]);
    }

    #[test]
    fn a_partial_of_a_worker_or_pipeline_it_does_not_run_is_an_error() {
        let mut c = combiner(2);
        let stray = c.on_partial(2, partial(0, 1)).unwrap_err();
        assert!(matches!(
            stray,
            ProcessorError::StrayPartial {
                worker: 2,
                workers: 2,
                ..
            }
        ));
        let mut other = partial(0, 1);
        other.window.pipeline = 1;
        assert!(c.on_partial(0, other.clone()).is_err());
        assert!(c.on_early(0, vec![other]).is_err());
        assert!(!stray.is_retryable());
        assert_eq!(c.held_windows(), 0, "nothing was merged");
    }

    #[test]
    fn a_restored_combiner_fires_what_the_original_would() {
        let mut original = combiner(2);
        let mut out = Vec::new();
        original.on_partial(0, partial(0, 3)).unwrap();
        original.on_watermark(0, EventTime(MIN), &mut out);
        let mut restored = combiner(2);
        restored.restore(&original.snapshot().unwrap()).unwrap();

        let mut a = Vec::new();
        let mut b = Vec::new();
        for (c, out) in [(&mut original, &mut a), (&mut restored, &mut b)] {
            c.on_partial(1, partial(0, 4)).unwrap();
            c.on_watermark(1, EventTime(MIN), out);
        }
        assert_eq!(sums(&a), [(0, 7)]);
        assert_eq!(a, b);
        assert!(restored.restore(b"garbage").is_err());
    }

    fn in_pipeline(mut p: Partial, pipeline: u8) -> Partial {
        p.window.pipeline = pipeline;
        p
    }

    fn pair(names: Vec<&'static str>) -> Combiner {
        Combiner::new(
            vec![Box::new(Sum), Box::new(Sum)],
            1,
            Duration::from_secs(60),
        )
        .named(names)
    }

    #[test]
    fn a_checkpoint_restores_by_pipeline_name_into_another_set() {
        let mut original = pair(vec!["a", "b"]);
        original.on_partial(0, partial(0, 3)).unwrap();
        original
            .on_partial(0, in_pipeline(partial(0, 5), 1))
            .unwrap();
        let taken = original.snapshot().unwrap();

        // `b` moved first, `a` is gone, `c` is new.
        let mut moved = pair(vec!["b", "c"]);
        moved.restore(&taken).unwrap();
        let mut out = Vec::new();
        moved.on_watermark(0, EventTime(MIN), &mut out);
        assert_eq!(sums(&out), [(0, 5)], "b's window, now pipeline 0");

        // A checkpoint from before names: the four first built-ins.
        let mut four = Combiner::new(
            (0..4).map(|_| Box::new(Sum) as Box<dyn Finisher>).collect(),
            1,
            Duration::from_secs(60),
        );
        four.on_partial(0, in_pipeline(partial(0, 2), 3)).unwrap();
        let unnamed = four.snapshot().unwrap();
        let mut five = Combiner::new(
            (0..5).map(|_| Box::new(Sum) as Box<dyn Finisher>).collect(),
            1,
            Duration::from_secs(60),
        )
        .named(vec!["traffic", "engagement", "trending", "ads", "patterns"]);
        five.restore(&unnamed).unwrap();
        let mut out = Vec::new();
        five.on_watermark(0, EventTime(MIN), &mut out);
        assert_eq!(sums(&out), [(0, 2)]);
        // Any other count without names is still refused.
        assert!(pair(vec!["x", "y"]).restore(&unnamed).is_err());
    }

    #[test]
    fn alert_rules_see_each_window_once_it_closed_whatever_the_steps() {
        let rules = crate::alerts::AlertRules::from_toml(
            r#"
            [[rule]]
            name = "low"
            kind = "threshold"
            measurement = "sum"
            field = "n"
            op = "<"
            value = 10
            for = 2
            "#,
        )
        .unwrap();
        let engine = AlertEngine::new(std::sync::Arc::new(rules));
        let alerts = |out: &[Point]| -> Vec<(i64, Option<FieldValue>)> {
            out.iter()
                .filter(|p| p.measurement == "alerts")
                .map(|p| (p.time.0 / MIN, p.field("state")))
                .collect()
        };
        let counts = [20, 5, 4, 3, 30];
        let run = |steps: &[i64]| {
            let mut c = combiner(1).with_alerts(engine.clone(), vec![true]);
            for (i, n) in counts.iter().enumerate() {
                c.on_partial(0, partial(i as i64 * MIN, *n)).unwrap();
            }
            let mut out = Vec::new();
            for &to in steps {
                c.on_watermark(0, EventTime(to * MIN), &mut out);
            }
            (out, c.alerts_firing().get("low").copied())
        };
        // Windows fire at their end and close a lateness (1 min) later.
        let (one_by_one, _) = run(&[1, 2, 3, 4, 5, 6, 7]);
        let (at_once, firing) = run(&[7]);
        assert_eq!(
            alerts(&one_by_one),
            [
                (1, Some(FieldValue::Int(1))),
                (2, Some(FieldValue::Int(2))),
                (3, Some(FieldValue::Int(2))),
                (4, Some(FieldValue::Int(0)))
            ]
        );
        assert_eq!(alerts(&at_once), alerts(&one_by_one));
        assert_eq!(firing, Some(0));
        // A window closed at step 3 (end 2 min + 1) gives the first verdict then.
        let (early, firing) = run(&[3]);
        assert_eq!(alerts(&early), [(1, Some(FieldValue::Int(1)))]);
        assert_eq!(firing, Some(0));

        // The engine's state rides in the checkpoint.
        let mut c = combiner(1).with_alerts(engine.clone(), vec![true]);
        for (i, n) in counts.iter().enumerate().take(3) {
            c.on_partial(0, partial(i as i64 * MIN, *n)).unwrap();
        }
        let mut out = Vec::new();
        c.on_watermark(0, EventTime(3 * MIN), &mut out);
        let mut restored = combiner(1).with_alerts(engine, vec![true]);
        restored.restore(&c.snapshot().unwrap()).unwrap();
        let mut out = Vec::new();
        restored.on_watermark(0, EventTime(4 * MIN), &mut out);
        assert_eq!(alerts(&out), [(2, Some(FieldValue::Int(2)))]);
        assert_eq!(restored.alerts_firing()["low"], 1);
    }
}
