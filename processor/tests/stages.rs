//! Both stages over mixed traffic, engagement, trending and ads events:
//! exact counts, lateness, and determinism across batch sizes, worker counts
//! and checkpoint/restore points (property tests).

use std::collections::BTreeMap;
use std::time::Instant;

use proptest::prelude::*;
use tidemark_model::topic::{partition_for_key, topic_for};
use tidemark_model::{Country, Device, Event, EventTime, EventType, FieldValue, Point, Tier};
use tidemark_processor::runner::{ProcessorCheckpoint, Stages};
use tidemark_processor::{checkpoint, DriverConfig, Outcome, PipelineSet};

type Identity = (Tier, String, Vec<(String, String)>, EventTime);
type Results = BTreeMap<Identity, Vec<(String, FieldValue)>>;

const PARTITIONS: u32 = 4;

fn ev(id: &str, user: &str, ts: i64) -> Event {
    Event {
        event_id: id.into(),
        event_type: EventType::PageView,
        user_id: user.into(),
        timestamp: EventTime(ts),
        country: Country::parse("DE").unwrap_or(Country::UNKNOWN),
        device: Device::Web,
        ..Event::default()
    }
}

fn stages(workers: usize) -> Stages {
    let config = DriverConfig::default();
    let mut s = Stages::new(
        &config.worker(),
        &PipelineSet::all(config.allowed_lateness),
        workers,
    );
    for topic in &config.topics {
        for p in 0..PARTITIONS {
            s.register(topic, p);
        }
    }
    s
}

/// Where the log would put an event: its topic and its user's partition.
fn route(e: &Event) -> (&'static str, u32) {
    (
        topic_for(&e.event_type),
        partition_for_key(e.user_id.as_bytes(), PARTITIONS),
    )
}

/// Last value per point identity. A point whose fields are all zero is
/// absent: a group emptied by a correction (a session retagged by a later
/// profile) is written with zeros to overwrite its earlier value, while a run
/// that saw the correction before the window fired never wrote it.
fn last_values(points: &[Point]) -> Results {
    let mut m = BTreeMap::new();
    for p in points {
        m.insert(
            (p.tier, p.measurement.clone(), p.tags.clone(), p.time),
            p.fields.clone(),
        );
    }
    m.retain(|_, fields| fields.iter().any(|(_, v)| v.as_f64() != 0.0));
    m
}

/// What differs between two result sets, point by point.
fn diff(a: &Results, b: &Results) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("missing {k:?}: {v:?}")),
            Some(w) if w != v => out.push(format!("changed {k:?}: {v:?} -> {w:?}")),
            _ => {}
        }
    }
    for (k, v) in b {
        if !a.contains_key(k) {
            out.push(format!("extra {k:?}: {v:?}"));
        }
    }
    out
}

fn events_at(m: &Results, tier: Tier, start: i64) -> Option<FieldValue> {
    m.iter()
        .find(|((t, meas, _, time), _)| {
            *t == tier && meas == "traffic" && *time == EventTime(start)
        })
        .map(|(_, f)| f[0].1)
}

#[test]
fn exact_counts_with_out_of_order_duplicates_and_late_events() {
    let mut s = stages(1);
    let now = Instant::now();
    let mut out = Vec::new();
    let inputs = [
        (ev("a", "u1", 10_000), Outcome::Accepted),
        (ev("b", "u1", 6_000), Outcome::Accepted), // 4 s out of order
        (ev("a", "u1", 10_000), Outcome::Duplicate),
        (ev("c", "u1", 70_000), Outcome::Accepted),
        (ev("d", "u1", 30_000), Outcome::Accepted), // late but within 60 s of wm 65 s
        (ev("e", "u1", 200_000), Outcome::Accepted),
        (ev("f", "u1", 130_000), Outcome::TooLate), // wm 195 s - 60 s = 135 s
        (ev("g", "u1", 135_000), Outcome::Accepted),
    ];
    for (i, (event, expected)) in inputs.iter().enumerate() {
        assert_eq!(s.process("user-events", 0, event), *expected, "event {i}");
        s.advance(now, &mut out);
    }
    s.finish(&mut out);
    let m = last_values(&out);
    assert_eq!(events_at(&m, Tier::Rt, 0), Some(FieldValue::Int(3)));
    assert_eq!(events_at(&m, Tier::Rt, 60_000), Some(FieldValue::Int(1)));
    assert_eq!(events_at(&m, Tier::Rt, 120_000), Some(FieldValue::Int(1)));
    assert_eq!(events_at(&m, Tier::Rt, 180_000), Some(FieldValue::Int(1)));
    assert_eq!(events_at(&m, Tier::Hourly, 0), Some(FieldValue::Int(6)));
}

#[test]
fn combiner_waits_for_every_worker() {
    // Partition 0 and 1 belong to different workers; the minute fires only
    // once both have passed it.
    let mut s = stages(2);
    let now = Instant::now();
    let mut out = Vec::new();
    for p in 0..PARTITIONS {
        s.process("user-events", p, &ev(&format!("a{p}"), "u", 10_000));
    }
    for p in [0, 2] {
        s.process("user-events", p, &ev(&format!("b{p}"), "u", 90_000));
    }
    s.advance(now, &mut out);
    assert_eq!(events_at(&last_values(&out), Tier::Rt, 0), None);
    for p in [1, 3] {
        s.process("user-events", p, &ev(&format!("b{p}"), "u", 90_000));
    }
    // Other topics have no events yet: they hold the watermark back.
    s.advance(now, &mut out);
    assert_eq!(events_at(&last_values(&out), Tier::Rt, 0), None);
    s.finish(&mut out);
    assert_eq!(
        events_at(&last_values(&out), Tier::Rt, 0),
        Some(FieldValue::Int(4))
    );
}

/// One generated event: which user, what, when (offset from the previous).
#[derive(Debug, Clone)]
struct Gen {
    user: u8,
    kind: u8,
    step: i64,
    jitter: i64,
    dup: bool,
}

fn gen_strategy() -> impl Strategy<Value = Gen> {
    (
        0u8..12,
        0u8..10,
        0i64..20_000,
        prop_oneof![8 => -6_000i64..2_000, 1 => -120_000i64..-50_000],
        proptest::bool::weighted(0.05),
    )
        .prop_map(|(user, kind, step, jitter, dup)| Gen {
            user,
            kind,
            step,
            jitter,
            dup,
        })
}

/// Events of every pipeline: page views, content actions with hashtags,
/// profile updates, ad impressions, clicks and conversions.
fn make_events(gens: &[Gen]) -> Vec<Event> {
    let tags = ["rust", "kappa", "news", "cats"];
    let countries = ["DE", "US", "FR"];
    let mut t = 0i64;
    let mut evs: Vec<Event> = Vec::new();
    for (i, g) in gens.iter().enumerate() {
        if g.dup {
            if let Some(prev) = evs.last().cloned() {
                evs.push(prev);
                continue;
            }
        }
        t += g.step;
        let user = format!("u{}", g.user);
        let mut e = ev(&format!("e{i}"), &user, t + g.jitter);
        e.country = Country::parse(countries[g.user as usize % 3]).unwrap_or(Country::UNKNOWN);
        e.device = if g.user % 2 == 0 {
            Device::Ios
        } else {
            Device::Android
        };
        let imp = format!("imp-{}-{}", g.user, i / 3);
        match g.kind {
            0 | 1 => {}
            2 => {
                e.event_type = EventType::View;
                e.post_id = Some("p1".into());
                e.hashtags = vec![tags[i % 4].into(), tags[(i + g.user as usize) % 4].into()];
            }
            3 => {
                e.event_type = EventType::Like;
                e.post_id = Some("p2".into());
                e.hashtags = vec![tags[g.user as usize % 4].into()];
            }
            4 => {
                e.event_type = EventType::PostCreated;
                e.post_id = Some(format!("p{i}"));
                e.hashtags = vec!["kappa".into()];
            }
            5 => {
                e.event_type = EventType::ProfileUpdate;
                e.segment = Some(["pro", "casual"][i % 2].into());
                // Some profiles name no country: sessions then keep their own.
                if i % 3 == 0 {
                    e.country = Country::UNKNOWN;
                }
            }
            6 | 7 => {
                e.event_type = EventType::AdImpression;
                e.campaign_id = Some(format!("c{}", i % 2));
                e.ad_id = Some("ad".into());
                e.impression_id = Some(imp);
                e.cost = Some(0.1 + (i % 7) as f64 * 0.013);
            }
            8 => {
                e.event_type = EventType::AdClick;
                e.campaign_id = Some(format!("c{}", i % 2));
                e.impression_id = Some(imp);
            }
            _ => {
                e.event_type = EventType::AdConversion;
                e.campaign_id = Some(format!("c{}", i % 2));
                e.impression_id = Some(format!("imp-{}-{}", g.user, (i / 3).saturating_sub(1)));
                e.revenue = Some(1.7 + (i % 3) as f64);
            }
        }
        evs.push(e);
    }
    evs
}

/// Splits an event sequence into per-(topic, partition) streams, keeping order.
fn by_partition(events: &[Event]) -> Vec<((&'static str, u32), Vec<Event>)> {
    let mut m: BTreeMap<(&'static str, u32), Vec<Event>> = BTreeMap::new();
    for e in events {
        m.entry(route(e)).or_default().push(e.clone());
    }
    m.into_iter().collect()
}

/// Feeds each partition in batches of the given sizes, round-robin, with
/// `workers` workers; checkpoints and restores into a fresh instance after
/// `restore_after` rounds (if any).
fn run(
    parts: &[((&'static str, u32), Vec<Event>)],
    batches: &[usize],
    workers: usize,
    restore_after: Option<usize>,
) -> (Results, [usize; 3]) {
    let mut s = stages(workers);
    let now = Instant::now();
    let mut out = Vec::new();
    let mut pos = vec![0usize; parts.len()];
    let mut counts = [0usize; 3];
    let mut outcomes = Vec::new();
    let mut round = 0usize;
    while pos.iter().zip(parts).any(|(p, (_, v))| *p < v.len()) {
        if restore_after == Some(round) {
            let offsets: BTreeMap<(String, u32), u64> = parts
                .iter()
                .zip(&pos)
                .map(|(((t, p), _), &o)| ((t.to_string(), *p), o as u64))
                .collect();
            let dir = tempfile::tempdir().unwrap();
            checkpoint::save(dir.path(), &s.checkpoint(&offsets).unwrap()).unwrap();
            let cp: ProcessorCheckpoint = checkpoint::load(dir.path()).unwrap().unwrap();
            s = stages(workers);
            s.restore(&cp).unwrap();
            let restored = cp.offsets();
            for (i, ((t, p), _)) in parts.iter().enumerate() {
                pos[i] = restored[&(t.to_string(), *p)] as usize;
            }
        }
        for (i, ((topic, partition), part)) in parts.iter().enumerate() {
            let n = batches[(round + i) % batches.len()];
            let end = (pos[i] + n).min(part.len());
            // The reference run offers events one by one, the others as runs.
            outcomes.clear();
            if batches == [1] {
                for event in &part[pos[i]..end] {
                    outcomes.push(s.process(topic, *partition, event));
                }
            } else {
                s.process_batch(topic, *partition, &part[pos[i]..end], &mut outcomes);
            }
            for o in &outcomes {
                match o {
                    Outcome::Accepted => counts[0] += 1,
                    Outcome::Duplicate => counts[1] += 1,
                    Outcome::TooLate => counts[2] += 1,
                }
            }
            pos[i] = end;
        }
        s.advance(now, &mut out);
        round += 1;
    }
    s.finish(&mut out);
    (last_values(&out), counts)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn results_do_not_depend_on_batching_workers_or_restarts(
        gens in proptest::collection::vec(gen_strategy(), 1..400),
        batches in proptest::collection::vec(1usize..40, 1..6),
        workers in prop_oneof![Just(2usize), Just(4usize)],
        restore_after in proptest::option::of(0usize..20),
    ) {
        let parts = by_partition(&make_events(&gens));
        let (reference, ref_counts) = run(&parts, &[1], 1, None);
        let (other, counts) = run(&parts, &batches, workers, restore_after);
        prop_assert_eq!(ref_counts, counts);
        let differences = diff(&reference, &other);
        prop_assert!(differences.is_empty(), "{} differences, e.g. {:#?}", differences.len(), &differences[..differences.len().min(6)]);
    }
}

#[test]
fn every_measurement_is_produced() {
    let gens: Vec<Gen> = (0..600)
        .map(|i| Gen {
            user: (i % 12) as u8,
            kind: (i % 10) as u8,
            step: 300 + (i as i64 * 37 % 900),
            jitter: -((i as i64 * 53) % 5_000),
            dup: i % 31 == 0,
        })
        .collect();
    let parts = by_partition(&make_events(&gens));
    let (results, counts) = run(&parts, &[7], 2, Some(5));
    assert!(counts[1] > 0, "duplicates were generated");
    for m in ["traffic", "active_users", "engagement", "trending", "ads"] {
        assert!(
            results.keys().any(|(_, meas, _, _)| meas == m),
            "no {m} points"
        );
    }
}
