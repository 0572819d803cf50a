//! The synchronous core: exact counts, dedup, lateness, determinism across
//! batchings, and snapshot/restore in the middle of a stream.

use std::collections::BTreeMap;
use std::time::Instant;

use proptest::prelude::*;
use tidemark_model::{Country, Device, Event, EventTime, EventType, FieldValue, Point, Tier};
use tidemark_processor::{checkpoint, default_pipelines, DriverConfig, Engine, Outcome};

type Identity = (Tier, String, Vec<(String, String)>, EventTime);
type Results = BTreeMap<Identity, Vec<(String, FieldValue)>>;

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

fn engine(partitions: u32) -> (Engine, Vec<usize>) {
    let mut e = Engine::new(&DriverConfig::default(), default_pipelines());
    let slots = (0..partitions)
        .map(|p| e.register("user-events", p))
        .collect();
    (e, slots)
}

/// Last value per point identity.
fn last_values(points: &[Point]) -> Results {
    let mut m = BTreeMap::new();
    for p in points {
        m.insert(
            (p.tier, p.measurement.clone(), p.tags.clone(), p.time),
            p.fields.clone(),
        );
    }
    m
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
    let (mut e, s) = engine(1);
    let now = Instant::now();
    let mut out = Vec::new();
    let inputs = [
        (ev("a", "u1", 10_000), Outcome::Accepted),
        (ev("b", "u2", 6_000), Outcome::Accepted), // 4 s out of order
        (ev("a", "u1", 10_000), Outcome::Duplicate),
        (ev("c", "u1", 70_000), Outcome::Accepted),
        (ev("d", "u3", 30_000), Outcome::Accepted), // late but within 60 s of wm 65 s
        (ev("e", "u3", 200_000), Outcome::Accepted),
        (ev("f", "u4", 130_000), Outcome::TooLate), // wm 195 s - 60 s = 135 s
        (ev("g", "u4", 135_000), Outcome::Accepted),
    ];
    for (i, (event, expected)) in inputs.iter().enumerate() {
        assert_eq!(e.process(s[0], event, &mut out), *expected, "event {i}");
        e.advance(now, &mut out);
    }
    e.finish(&mut out);
    let m = last_values(&out);
    assert_eq!(events_at(&m, Tier::Rt, 0), Some(FieldValue::Int(3)));
    assert_eq!(events_at(&m, Tier::Rt, 60_000), Some(FieldValue::Int(1)));
    assert_eq!(events_at(&m, Tier::Rt, 120_000), Some(FieldValue::Int(1)));
    assert_eq!(events_at(&m, Tier::Rt, 180_000), Some(FieldValue::Int(1)));
    assert_eq!(events_at(&m, Tier::Hourly, 0), Some(FieldValue::Int(6)));
    let users = m
        .iter()
        .find(|((t, meas, _, time), _)| {
            *t == Tier::Rt && meas == "active_users" && *time == EventTime(0)
        })
        .map(|(_, f)| f[0].1);
    assert_eq!(users, Some(FieldValue::Int(3)));
}

#[test]
fn late_event_within_lateness_corrects_a_fired_window() {
    let (mut e, s) = engine(1);
    let now = Instant::now();
    let mut out = Vec::new();
    e.process(s[0], &ev("a", "u1", 10_000), &mut out);
    e.process(s[0], &ev("b", "u1", 66_000), &mut out);
    e.advance(now, &mut out);
    assert_eq!(
        events_at(&last_values(&out), Tier::Rt, 0),
        Some(FieldValue::Int(1))
    );
    out.clear();
    assert_eq!(
        e.process(s[0], &ev("c", "u2", 20_000), &mut out),
        Outcome::Accepted
    );
    e.advance(now, &mut out);
    assert_eq!(
        events_at(&last_values(&out), Tier::Rt, 0),
        Some(FieldValue::Int(2))
    );
}

#[derive(Debug, Clone)]
struct Gen {
    step: i64,
    jitter: i64,
    dup: bool,
}

fn partition_events(p: usize, gens: &[Gen]) -> Vec<Event> {
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
        let mut e = ev(&format!("p{p}-{i}"), &format!("u{}", i % 7), t + g.jitter);
        e.device = if i % 2 == 0 {
            Device::Ios
        } else {
            Device::Android
        };
        evs.push(e);
    }
    evs
}

fn gen_strategy() -> impl Strategy<Value = Gen> {
    (
        0i64..4_000,
        prop_oneof![8 => -6_000i64..2_000, 1 => -120_000i64..-50_000],
        proptest::bool::weighted(0.05),
    )
        .prop_map(|(step, jitter, dup)| Gen { step, jitter, dup })
}

/// Feeds each partition in batches of the given sizes, round-robin.
fn run(parts: &[Vec<Event>], batches: &[usize]) -> (Results, [usize; 3]) {
    let (mut e, slots) = engine(parts.len() as u32);
    let now = Instant::now();
    let mut out = Vec::new();
    let mut pos = vec![0usize; parts.len()];
    let mut counts = [0usize; 3];
    let mut round = 0usize;
    while pos.iter().zip(parts).any(|(p, v)| *p < v.len()) {
        for (i, part) in parts.iter().enumerate() {
            let n = batches[(round + i) % batches.len()];
            let end = (pos[i] + n).min(part.len());
            for event in &part[pos[i]..end] {
                match e.process(slots[i], event, &mut out) {
                    Outcome::Accepted => counts[0] += 1,
                    Outcome::Duplicate => counts[1] += 1,
                    Outcome::TooLate => counts[2] += 1,
                }
            }
            pos[i] = end;
        }
        e.advance(now, &mut out);
        round += 1;
    }
    e.finish(&mut out);
    (last_values(&out), counts)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn results_do_not_depend_on_batching(
        gens in proptest::collection::vec(proptest::collection::vec(gen_strategy(), 0..120), 1..4),
        batches in proptest::collection::vec(1usize..40, 1..6),
    ) {
        let parts: Vec<Vec<Event>> = gens.iter().enumerate().map(|(p, g)| partition_events(p, g)).collect();
        let (reference, ref_counts) = run(&parts, &[1]);
        let (other, counts) = run(&parts, &batches);
        prop_assert_eq!(ref_counts, counts);
        prop_assert_eq!(reference, other);
    }
}

#[test]
fn restore_mid_stream_matches_uninterrupted_run() {
    let gens: Vec<Gen> = (0..400)
        .map(|i| Gen {
            step: 700 + (i * 37 % 900),
            jitter: -((i * 53) % 5_000),
            dup: i % 31 == 0,
        })
        .collect();
    let parts = vec![
        partition_events(0, &gens),
        partition_events(1, &gens[..300]),
    ];
    let (reference, _) = run(&parts, &[7]);

    let dir = tempfile::tempdir().unwrap();
    let now = Instant::now();
    let (mut e, slots) = engine(2);
    let mut out = Vec::new();
    let half: Vec<usize> = parts.iter().map(|p| p.len() / 2).collect();
    for (i, part) in parts.iter().enumerate() {
        for chunk in part[..half[i]].chunks(7) {
            for event in chunk {
                e.process(slots[i], event, &mut out);
            }
            e.advance(now, &mut out);
        }
    }
    let offsets = (0..2u32)
        .map(|p| (("user-events".to_string(), p), half[p as usize] as u64))
        .collect();
    checkpoint::save(dir.path(), &e.checkpoint(offsets)).unwrap();
    drop(e);

    let cp = checkpoint::load(dir.path()).unwrap().unwrap();
    let (mut e, slots) = engine(2);
    e.restore(&cp).unwrap();
    for (i, part) in parts.iter().enumerate() {
        let from = cp.offsets[&("user-events".to_string(), i as u32)] as usize;
        for chunk in part[from..].chunks(7) {
            for event in chunk {
                e.process(slots[i], event, &mut out);
            }
            e.advance(now, &mut out);
        }
    }
    e.finish(&mut out);
    assert!(!reference.is_empty());
    assert_eq!(last_values(&out), reference);
}

/// Throughput of the core on one thread; run with
/// `cargo test --release -p tidemark-processor --test engine -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput() {
    let n = 2_000_000usize;
    let types = [
        EventType::PageView,
        EventType::Like,
        EventType::View,
        EventType::AdImpression,
    ];
    let devices = [Device::Ios, Device::Android, Device::Web];
    let countries = ["DE", "US", "FR", "GB", "BR"];
    let events: Vec<Event> = (0..n)
        .map(|i| Event {
            event_id: format!("{i:016x}-event"),
            event_type: types[i % types.len()].clone(),
            user_id: format!("user-{}", i % 50_000),
            timestamp: EventTime(1_795_420_800_000 + (i as i64) / 10),
            country: Country::parse(countries[i % countries.len()]).unwrap_or(Country::UNKNOWN),
            device: devices[i % devices.len()],
            ..Event::default()
        })
        .collect();
    let (mut e, s) = engine(1);
    let now = Instant::now();
    let mut out = Vec::new();
    let start = Instant::now();
    for chunk in events.chunks(2000) {
        for event in chunk {
            e.process(s[0], event, &mut out);
        }
        e.advance(now, &mut out);
        out.clear();
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{:.0} events/s", n as f64 / secs);
    assert!(n as f64 / secs > 100_000.0);
}
