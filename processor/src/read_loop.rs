//! The one read loop of stage-1 workers. Bounded runs ([`crate::runner`]),
//! the live driver ([`crate::driver`]) and sharded processes
//! ([`crate::shards`]) all read a worker's partitions through [`run`], a
//! round at a time, on the worker's own thread; what happens between rounds
//! (progress reports, commands, checkpoints, pauses) is the caller's
//! [`Rounds`].

use std::time::Instant;

use tidemark_log::{Log, LogError, StoredRecord};
use tidemark_model::wire::WireError;
use tidemark_model::Event;

use crate::error::ProcessorError;
use crate::worker::{Counts, Outcome, Worker};

/// Reads records of one partition; what a worker's read loop pulls from.
pub trait RecordSource: Send {
    /// Up to `max` records of `topic`/`partition` from `offset`; empty at the end.
    fn read(
        &mut self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<StoredRecord>, LogError>;

    /// Hands up to `max` records' offsets and values to `visit`, in offset
    /// order; returns how many (0 at the end). Sources that can lend their
    /// buffers override this to spare [`RecordSource::read`]'s owned records.
    fn visit(
        &mut self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
        visit: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<usize, LogError> {
        let records = self.read(topic, partition, offset, max)?;
        for r in &records {
            visit(r.offset, &r.value);
        }
        Ok(records.len())
    }
}

impl<F> RecordSource for F
where
    F: FnMut(&str, u32, u64, usize) -> Result<Vec<StoredRecord>, LogError> + Send,
{
    fn read(
        &mut self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        self(topic, partition, offset, max)
    }
}

/// A [`Log`] as a worker's source: read on the worker's thread where the log
/// can ([`Log::read_now`], the embedded log), through the runtime otherwise.
pub(crate) struct LogSource {
    pub(crate) log: std::sync::Arc<dyn Log>,
    pub(crate) runtime: tokio::runtime::Handle,
}

impl RecordSource for LogSource {
    fn read(
        &mut self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        match self.log.read_now(topic, partition, offset, max) {
            Some(read) => read,
            None => self
                .runtime
                .block_on(self.log.read(topic, partition, offset, max)),
        }
    }
}

/// A partition a worker reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part {
    pub(crate) topic: String,
    pub(crate) partition: u32,
    pub(crate) slot: usize,
    /// The next offset to read.
    pub(crate) offset: u64,
    /// Read no record at or past this offset: the end of a bounded range, or
    /// (live) what was already reported before a restart (see
    /// [`crate::shards`]).
    pub(crate) stop_at: Option<u64>,
}

impl Part {
    /// Whether the partition has been read up to [`Part::stop_at`].
    pub(crate) fn at_stop(&self) -> bool {
        self.stop_at.is_some_and(|to| self.offset >= to)
    }
}

/// How a read loop treats its partitions' ends and read errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A bounded run: a partition is done at its end or its `stop_at`, and
    /// any read error ends the run.
    Bounded,
    /// A live run: partitions are read forever, idle at their end; an offset
    /// no longer retained is skipped, a retryable error waits a round.
    Live,
}

/// What one round over a worker's partitions did.
#[derive(Debug, Default)]
pub(crate) struct Round {
    /// Some partition advanced.
    pub(crate) advanced: bool,
    /// A read failed with a retryable error; the round stopped there.
    pub(crate) retry: bool,
    pub(crate) counts: Counts,
    pub(crate) decode_errors: u64,
}

/// What a read loop's caller does between rounds.
pub(crate) trait Rounds {
    /// Before each round; `Ok(false)` stops the loop.
    fn before(&mut self, worker: &mut Worker, parts: &[Part]) -> Result<bool, ProcessorError>;

    /// After each round, with the events it found too late; `Ok(false)`
    /// stops the loop.
    fn after(
        &mut self,
        worker: &mut Worker,
        parts: &mut [Part],
        round: Round,
        too_late: &mut Vec<Event>,
    ) -> Result<bool, ProcessorError>;
}

/// Reads `parts` from `source` into `worker`, up to `max_batch` records of
/// each partition a round, until `rounds` stops it or (bounded) every
/// partition is done.
pub(crate) fn run<S, D, R>(
    worker: &mut Worker,
    parts: &mut [Part],
    source: &mut S,
    (mode, max_batch): (Mode, usize),
    decode: &D,
    rounds: &mut R,
) -> Result<(), ProcessorError>
where
    S: RecordSource + ?Sized,
    D: Fn(&[u8], &mut Event) -> Result<(), WireError>,
    R: Rounds,
{
    let mut done = vec![false; parts.len()];
    // Events are decoded into a reused run (their strings keep their
    // buffers) and offered a run at a time.
    let (mut run, mut too_late) = (EventRun::default(), Vec::new());
    loop {
        if !rounds.before(worker, parts)? {
            return Ok(());
        }
        let mut round = Round::default();
        for (p, done) in parts.iter_mut().zip(&mut done) {
            if *done {
                continue;
            }
            if p.at_stop() {
                match mode {
                    Mode::Bounded => {
                        *done = true;
                        worker.set_progress(p.slot, true, Instant::now());
                    }
                    // Caught up with what was reported: wait for the others
                    // without marking the partition idle, as before the restart.
                    Mode::Live => {}
                }
                continue;
            }
            let max = match p.stop_at {
                Some(to) => ((to - p.offset) as usize).min(max_batch),
                None => max_batch,
            };
            let (topic, partition, stop_at, slot) =
                (p.topic.as_str(), p.partition, p.stop_at, p.slot);
            let mut next = None;
            let mut offer = |run: &mut EventRun, worker: &mut Worker, round: &mut Round| {
                run.offer(worker, slot, &mut round.counts, &mut too_late);
            };
            let visited = source.visit(topic, partition, p.offset, max, &mut |offset, value| {
                // Compacted partitions have gaps: never read past `stop_at`.
                if stop_at.is_some_and(|to| offset >= to) {
                    return;
                }
                next = Some(offset + 1);
                match run.decode_next(value, decode) {
                    Ok(true) => offer(&mut run, worker, &mut round),
                    Ok(false) => {}
                    Err(e) => {
                        round.decode_errors += 1;
                        // Bounded runs count them in their summary.
                        if mode == Mode::Live {
                            tracing::warn!(error = %e, topic, partition, offset,
                                "Skipping undecodable record");
                        }
                    }
                }
            });
            offer(&mut run, worker, &mut round);
            let visited = match (visited, mode) {
                (Ok(visited), _) => visited,
                (Err(e), Mode::Bounded) => return Err(e.into()),
                (Err(LogError::OffsetOutOfRange { earliest, .. }), Mode::Live) => {
                    tracing::warn!(topic = %p.topic, partition = p.partition, from = p.offset, to = earliest,
                        "Offset no longer retained; skipping ahead");
                    p.offset = earliest;
                    continue;
                }
                (Err(e), Mode::Live) if e.is_retryable() => {
                    tracing::warn!(error = %e, topic = %p.topic, partition = p.partition, "Log read failed; retrying");
                    round.retry = true;
                    break;
                }
                (Err(e), Mode::Live) => return Err(e.into()),
            };
            let now = Instant::now();
            match next {
                Some(next) => {
                    round.advanced = true;
                    p.offset = next;
                    worker.set_progress(p.slot, false, now);
                }
                // Only records past `stop_at`: it is reached.
                None if visited > 0 => p.offset = stop_at.unwrap_or(p.offset),
                None => match mode {
                    Mode::Bounded => {
                        *done = true;
                        worker.set_progress(p.slot, true, now);
                    }
                    Mode::Live if p.stop_at.is_some() => {}
                    Mode::Live => worker.set_progress(p.slot, true, now),
                },
            }
        }
        if !rounds.after(worker, parts, round, &mut too_late)? {
            return Ok(());
        }
    }
}

/// Events decoded into reused buffers, offered to a worker a run at a time.
#[derive(Default)]
struct EventRun {
    events: Vec<Event>,
    len: usize,
    outcomes: Vec<Outcome>,
}

/// Events offered to a worker at once: long enough for the pipelines'
/// look-ups to overlap, short enough to stay in cache.
const RUN_LEN: usize = 64;

impl EventRun {
    /// Decodes one record into the run; `Ok(true)` when the run is full.
    fn decode_next<D>(&mut self, value: &[u8], decode: &D) -> Result<bool, WireError>
    where
        D: Fn(&[u8], &mut Event) -> Result<(), WireError>,
    {
        if self.events.len() <= self.len {
            self.events.push(Event::default());
        }
        decode(value, &mut self.events[self.len])?;
        self.len += 1;
        Ok(self.len >= RUN_LEN)
    }

    /// Offers the decoded events (if any) to `worker`, counting outcomes and
    /// keeping the too-late events.
    fn offer(
        &mut self,
        worker: &mut Worker,
        slot: usize,
        counts: &mut Counts,
        too_late: &mut Vec<Event>,
    ) {
        if self.len == 0 {
            return;
        }
        let events = &self.events[..self.len];
        self.outcomes.clear();
        worker
            .process_batch(slot, events, &mut self.outcomes)
            .expect("read loops offer the slots their worker registered");
        for (ev, &o) in events.iter().zip(&self.outcomes) {
            if o == Outcome::TooLate {
                too_late.push(ev.clone());
            }
            counts.add(o);
        }
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use bytes::Bytes;
    use tidemark_model::{wire, EventTime, EventType};

    use super::*;
    use crate::registry::PipelineSet;
    use crate::worker::WorkerConfig;

    /// A partition's records at the given offsets (gaps as compaction
    /// leaves them), and scripted read failures served first.
    struct Scripted {
        offsets: Vec<u64>,
        failures: VecDeque<LogError>,
        reads: Vec<(u64, usize)>,
    }

    impl RecordSource for Scripted {
        fn read(
            &mut self,
            _topic: &str,
            _partition: u32,
            offset: u64,
            max: usize,
        ) -> Result<Vec<StoredRecord>, LogError> {
            self.reads.push((offset, max));
            if let Some(e) = self.failures.pop_front() {
                return Err(e);
            }
            Ok((self.offsets.iter().filter(|&&o| o >= offset).take(max))
                .map(|&o| {
                    let ev = Event {
                        event_id: format!("e{o}"),
                        event_type: EventType::PageView,
                        user_id: "u1".into(),
                        timestamp: EventTime(1_000 + o as i64),
                        ..Event::default()
                    };
                    let mut value = Vec::new();
                    wire::encode(&ev, &mut value);
                    StoredRecord {
                        offset: o,
                        key: Bytes::new(),
                        value: Bytes::from(value),
                        timestamp: ev.timestamp,
                    }
                })
                .collect())
        }
    }

    /// Records every round; stops after `max_rounds`, or (bounded) when
    /// the loop ends.
    #[derive(Default)]
    struct Recorded {
        rounds: Vec<(bool, bool, u64, Vec<u64>)>,
        max_rounds: usize,
    }

    impl Rounds for Recorded {
        fn before(&mut self, _: &mut Worker, _: &[Part]) -> Result<bool, ProcessorError> {
            Ok(self.rounds.len() < self.max_rounds)
        }

        fn after(
            &mut self,
            _: &mut Worker,
            parts: &mut [Part],
            round: Round,
            _: &mut Vec<Event>,
        ) -> Result<bool, ProcessorError> {
            let offsets = parts.iter().map(|p| p.offset).collect();
            self.rounds
                .push((round.advanced, round.retry, round.counts.accepted, offsets));
            Ok(self.rounds.len() < self.max_rounds)
        }
    }

    fn one_part(source: &Scripted, stop_at: Option<u64>) -> (Worker, Vec<Part>) {
        let config = WorkerConfig::default();
        let mut worker = Worker::new(&config, PipelineSet::all(config.allowed_lateness).stage1());
        let slot = worker.register("user-events", 0);
        let offset = source.offsets.first().copied().unwrap_or(0);
        let part = Part {
            topic: "user-events".into(),
            partition: 0,
            slot,
            offset,
            stop_at,
        };
        (worker, vec![part])
    }

    fn scripted(offsets: Vec<u64>, failures: Vec<LogError>) -> Scripted {
        Scripted {
            offsets,
            failures: failures.into(),
            reads: Vec::new(),
        }
    }

    fn run_loop(source: &mut Scripted, stop_at: Option<u64>, mode: Mode) -> Recorded {
        let (mut worker, mut parts) = one_part(source, stop_at);
        let mut rounds = Recorded {
            max_rounds: 4,
            ..Recorded::default()
        };
        run(
            &mut worker,
            &mut parts,
            source,
            (mode, 2),
            &wire::decode_into,
            &mut rounds,
        )
        .unwrap();
        rounds
    }

    #[test]
    fn a_bounded_part_reads_nothing_at_or_past_its_stop_even_across_a_gap() {
        // Offsets 3 and 4 were compacted away; the range ends at 4.
        let mut source = scripted(vec![0, 1, 2, 5, 6], vec![]);
        let rounds = run_loop(&mut source, Some(4), Mode::Bounded);
        let accepted: u64 = rounds.rounds.iter().map(|r| r.2).sum();
        assert_eq!(accepted, 3, "{:?}", rounds.rounds);
        // Two records; then offset 2 and 5, which lies past the stop; then
        // only 5: the part moves to its stop and is done without reading again.
        assert_eq!(source.reads, [(0, 2), (2, 2), (3, 1)]);
        assert_eq!(rounds.rounds.last().unwrap().3, [4]);
    }

    #[test]
    fn a_bounded_run_stops_at_the_first_read_error() {
        let mut source = scripted(vec![0, 1], vec![LogError::Unavailable("down".into())]);
        let (mut worker, mut parts) = one_part(&source, None);
        let mut rounds = Recorded {
            max_rounds: 10,
            ..Recorded::default()
        };
        let err = run(
            &mut worker,
            &mut parts,
            &mut source,
            (Mode::Bounded, 2),
            &wire::decode_into,
            &mut rounds,
        )
        .unwrap_err();
        assert!(
            matches!(err, ProcessorError::Log(LogError::Unavailable(_))),
            "{err}"
        );
        assert!(rounds.rounds.is_empty());
    }

    #[test]
    fn a_live_part_retries_a_failed_read_and_skips_what_is_no_longer_retained() {
        let gone = LogError::OffsetOutOfRange {
            topic: "user-events".into(),
            partition: 0,
            offset: 0,
            earliest: 1,
        };
        let mut source = scripted(
            vec![0, 1, 2],
            vec![LogError::Unavailable("down".into()), gone],
        );
        let rounds = run_loop(&mut source, None, Mode::Live);
        let summary: Vec<(bool, bool, u64)> =
            rounds.rounds.iter().map(|r| (r.0, r.1, r.2)).collect();
        // A retry round, a round that skipped to offset 1, the two records
        // left, then an idle round.
        assert_eq!(
            summary,
            [
                (false, true, 0),
                (false, false, 0),
                (true, false, 2),
                (false, false, 0)
            ]
        );
        assert_eq!(rounds.rounds[1].3, [1]);
        assert_eq!(rounds.rounds.last().unwrap().3, [3]);
    }

    #[test]
    fn a_live_part_catching_up_waits_at_its_stop_without_going_idle() {
        let mut source = scripted(vec![0, 1, 2, 3], vec![]);
        let (mut worker, mut parts) = one_part(&source, Some(2));
        let mut rounds = Recorded {
            max_rounds: 3,
            ..Recorded::default()
        };
        run(
            &mut worker,
            &mut parts,
            &mut source,
            (Mode::Live, 8),
            &wire::decode_into,
            &mut rounds,
        )
        .unwrap();
        // It reads up to the stop, then reads no more while stopped.
        assert_eq!(source.reads, [(0, 2)]);
        assert_eq!(rounds.rounds[0].2, 2);
        assert!(parts[0].at_stop());
    }
}
