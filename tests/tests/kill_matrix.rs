//! The SIGKILL matrix: `tidemark run` over a fixed workload, killed at its
//! own crash points (`TIDEMARK_CRASH_AT`, see `tidemark_model::crash`) in
//! each place: during an append, a checkpoint write, a store write,
//! `replay --follow` and `archive`. After every kill the process starts
//! again and the workload goes on. Every window of the workload's hour must
//! then equal the uninterrupted run's: nothing lost, nothing counted twice.
//!
//! `TIDEMARK_KILLS` kills per place (default 1, CI's five in all;
//! `scripts/kill-matrix.sh` runs 20), at passes drawn from
//! `TIDEMARK_KILL_SEED` (printed; random unless given).

use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tidemark_model::crash::{self, Place};
use tidemark_model::{EventTime, Point};
use tidemark_tests::workload::Workload;
use tidemark_tests::{hour_points, replay, replay_summary, settle, tidemark_bin, Tidemark};

const HOUR: i64 = 3_600_000;
const MINUTE: i64 = 60_000;
const TOPICS: [&str; 4] = [
    "user-events",
    "content-events",
    "ad-events",
    "user-profiles",
];

/// splitmix64: the passes to kill at, repeatable from the printed seed.
#[derive(Debug)]
struct Draws(u64);

impl Draws {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n.max(1)
    }
}

/// The kills of one place: how many are wanted, how many happened, and
/// where the next one is armed.
#[derive(Debug)]
struct Kills {
    place: Place,
    wanted: usize,
    done: usize,
    /// The armed pass is drawn from `1..=most_passes`.
    most_passes: u64,
    /// How long to wait for a kill that is behind schedule before the
    /// workload goes on (a place whose passes come with time, not posts).
    pace: Duration,
    draws: Draws,
}

impl Kills {
    fn new(place: Place, seed: u64) -> Kills {
        let wanted = std::env::var("TIDEMARK_KILLS")
            .ok()
            .and_then(|k| k.parse().ok())
            .unwrap_or(1);
        let (most_passes, pace) = match place {
            Place::Append => (6, Duration::ZERO),
            Place::Checkpoint => (2, Duration::from_secs(5)),
            Place::StoreWrite => (3, Duration::from_secs(2)),
            Place::Follow => (2, Duration::from_secs(3)),
            Place::Archive => (2, Duration::ZERO),
        };
        Kills {
            place,
            wanted,
            done: 0,
            most_passes,
            pace,
            draws: Draws(seed ^ place as u64),
        }
    }

    /// `TIDEMARK_CRASH_AT` for the next start: armed until enough kills.
    fn next_spec(&mut self) -> Option<String> {
        (self.done < self.wanted).then(|| {
            let pass = 1 + self.draws.below(self.most_passes);
            format!("{}:{pass}", self.place.name())
        })
    }

    /// Counts a death, which must be a crash point's SIGKILL.
    fn record(&mut self, status: ExitStatus) {
        assert_eq!(
            status.signal(),
            Some(9),
            "{}: the process ended other than by its crash point: {status}",
            self.place.name()
        );
        self.done += 1;
    }

    /// Whether the kills lag behind an even spread over the batches.
    fn behind(&self, posted: usize, batches: usize) -> bool {
        self.done < self.wanted * posted / batches.max(1)
    }
}

fn assert_same_windows(place: Place, reference: &[Point], got: Vec<Point>) {
    let differences = tidemark_replay::verify::diff(reference.to_vec(), got);
    assert!(
        differences.is_empty(),
        "{}: {} windows differ from the uninterrupted run, e.g. {:?}",
        place.name(),
        differences.len(),
        &differences[..differences.len().min(3)]
    );
}

/// Polls `ended` every 20 ms for up to `timeout`.
async fn ends_within(
    timeout: Duration,
    mut ended: impl FnMut() -> Option<ExitStatus>,
) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = ended() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Restarts `t` armed for the next kill, counting the kills that land
/// before it is healthy again.
async fn restart_armed(t: &mut Tidemark, kills: &mut Kills) {
    loop {
        t.set_env(crash::ENV, kills.next_spec());
        match t.try_restart().await {
            Ok(()) => return,
            Err(status) => kills.record(status),
        }
    }
}

/// Runs the workload into `dir` with `kills` armed in `tidemark run`, and
/// returns the hour's windows after a clean stop.
async fn run_with_kills(dir: &Path, workload: &Workload, kills: &mut Kills) -> Vec<Point> {
    let batches = &workload.batches;
    let mut t = Tidemark::start(dir, &[]).await;
    restart_armed(&mut t, kills).await;
    let mut posted = 0;
    while posted < batches.len() {
        if let Some(status) = t.exit_status() {
            kills.record(status);
            restart_armed(&mut t, kills).await;
            continue;
        }
        if kills.behind(posted, batches.len()) {
            if let Some(status) = ends_within(kills.pace, || t.exit_status()).await {
                kills.record(status);
                restart_armed(&mut t, kills).await;
                continue;
            }
        }
        match t.try_post(&batches[posted]).await {
            Ok((202, _)) => posted += 1,
            Ok((status, reply)) => panic!("batch {posted}: {status} {reply}"),
            // No answer: the process died in the middle, and the client
            // sends the batch again (at least once; event ids dedup it).
            Err(error) => assert!(
                ends_within(Duration::from_secs(10), || t.exit_status())
                    .await
                    .is_some(),
                "batch {posted} got no answer ({error}) but tidemark runs on"
            ),
        }
    }
    while kills.done < kills.wanted {
        let Some(status) = ends_within(Duration::from_secs(20), || t.exit_status()).await else {
            break;
        };
        kills.record(status);
        restart_armed(&mut t, kills).await;
    }
    assert_eq!(
        kills.done,
        kills.wanted,
        "{}: the workload passed too few crash points",
        kills.place.name()
    );
    settle(&t, workload).await;
    assert!(t.terminate().success(), "a clean stop after the kills");
    hour_points(&dir.join("store.sqlite"), workload.hour).await
}

/// A `replay --follow` process into `next`, armed by its environment.
#[derive(Debug)]
struct Follower {
    child: Child,
}

impl Follower {
    fn start(dir: &Path, hour: i64, crash_at: Option<String>) -> Follower {
        let mut command = Command::new(tidemark_bin());
        command
            .args(["replay", "--from", &hour.to_string()])
            .args(["--to", &(hour + HOUR).to_string()])
            .args(["--into", "next", "--follow", "--data-dir"])
            .arg(dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        if let Some(spec) = crash_at {
            command.env(crash::ENV, spec);
        }
        Follower {
            child: command.spawn().expect("replay --follow starts"),
        }
    }

    fn ended(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("follower status")
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The uninterrupted run, with `replay --follow` beside it killed at its
/// crash point: returns the run's hour, which the follower's must equal.
async fn uninterrupted_with_a_killed_follower(
    dir: &Path,
    workload: &Workload,
    kills: &mut Kills,
) -> Vec<Point> {
    let batches = &workload.batches;
    let hour = workload.hour;
    let t = Tidemark::start(dir, &[]).await;
    // The follower starts once the log holds a quarter of the workload,
    // well into the hour it follows, as in the follow test.
    let start = batches.len() / 4;
    for batch in &batches[..start] {
        let (status, reply) = t.post(batch).await;
        assert_eq!(status, 202, "{reply}");
    }
    let mut follower = Follower::start(dir, hour, kills.next_spec());
    let mut posted = start;
    while posted < batches.len() {
        if let Some(status) = follower.ended() {
            kills.record(status);
            follower = Follower::start(dir, hour, kills.next_spec());
            continue;
        }
        if kills.behind(posted - start, batches.len() - start) {
            if let Some(status) = ends_within(kills.pace, || follower.ended()).await {
                kills.record(status);
                follower = Follower::start(dir, hour, kills.next_spec());
                continue;
            }
        }
        let (status, reply) = t.post(&batches[posted]).await;
        assert_eq!(status, 202, "{reply}");
        posted += 1;
    }
    settle(&t, workload).await;
    // Both stores get the last windows with their writers' next flush; a
    // kill still due lands at one of the follower's checkpoints.
    let deadline = Instant::now() + Duration::from_secs(90);
    let live = loop {
        if let Some(status) = follower.ended() {
            kills.record(status);
            follower = Follower::start(dir, hour, kills.next_spec());
        }
        let live = hour_points(&dir.join("store.sqlite"), hour).await;
        let next = hour_points(&dir.join("next.sqlite"), hour).await;
        let stored = live.len();
        let differences = tidemark_replay::verify::diff(live.clone(), next);
        if stored > 1_000 && differences.is_empty() && kills.done == kills.wanted {
            break live;
        }
        assert!(
            Instant::now() < deadline,
            "follow: {stored} live points, {} differences after {} kills, e.g. {:?}",
            differences.len(),
            kills.done,
            differences.first()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        kills.done, kills.wanted,
        "follow: the workload passed too few crash points"
    );
    assert_eq!(follower.ended(), None, "still following");
    let mut t = t;
    assert!(t.terminate().success(), "the run stops cleanly");
    live
}

/// `tidemark archive` of every topic up to each of the cut points, killed
/// at its crash point and run again until it finishes.
fn archive_with_kills(dir: &Path, cuts: &[String], kills: &mut Kills) {
    for cut in cuts {
        for topic in TOPICS {
            loop {
                let mut command = Command::new(tidemark_bin());
                command
                    .args(["archive", "--topic", topic, "--before", cut, "--data-dir"])
                    .arg(dir)
                    .env("RUST_LOG", "warn")
                    .stdout(Stdio::null());
                if let Some(spec) = kills.next_spec() {
                    command.env(crash::ENV, spec);
                }
                let status = command.status().expect("tidemark archive runs");
                if status.success() {
                    break;
                }
                kills.record(status);
            }
        }
    }
    assert_eq!(
        kills.done, kills.wanted,
        "archive: too few crash points passed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkills_in_every_place_lose_and_double_nothing() {
    let seed = tidemark_tests::seed_from_env("TIDEMARK_KILL_SEED");
    eprintln!("kill matrix: TIDEMARK_KILL_SEED={seed}");
    let hour = (EventTime::now().millis() / HOUR - 3) * HOUR;
    let workload = Workload::new(hour, 7);

    let reference_dir = tempfile::tempdir().unwrap();
    let mut follow = Kills::new(Place::Follow, seed);
    let reference =
        uninterrupted_with_a_killed_follower(reference_dir.path(), &workload, &mut follow).await;

    // Archived in steps across the workload, killed along the way; then
    // the archive alone, without the log, rebuilds the same windows from
    // the same records.
    let mut archive = Kills::new(Place::Archive, seed);
    let steps = (2 * archive.wanted).max(3) as i64;
    let span = 80 * MINUTE;
    let mut cuts: Vec<String> = (1..=steps)
        .map(|k| (hour - 10 * MINUTE + span * k / steps).to_string())
        .collect();
    cuts.push("2100-01-01T00:00:00Z".into());
    let (from, to) = (hour.to_string(), (hour + HOUR).to_string());
    let from_log = replay(
        reference_dir.path(),
        &["--from", &from, "--to", &to, "--into", "from_log"],
    );
    assert!(from_log.status.success(), "{}", replay_summary(&from_log));
    archive_with_kills(reference_dir.path(), &cuts, &mut archive);
    let log = reference_dir.path().join("log");
    std::fs::rename(&log, log.with_extension("gone")).unwrap();
    let from_archive = replay(
        reference_dir.path(),
        &[
            "--from",
            &from,
            "--to",
            &to,
            "--source",
            "archive",
            "--into",
            "from_archive",
            "--verify",
        ],
    );
    let summary = replay_summary(&from_archive);
    assert!(from_archive.status.success(), "archive: {summary}");
    for difference in ["missing", "extra", "changed"] {
        assert_eq!(summary["verify"][difference], 0, "archive: {summary}");
    }
    assert_eq!(
        summary["events"],
        replay_summary(&from_log)["events"],
        "archive: the same records as the log"
    );

    for place in [Place::Append, Place::Checkpoint, Place::StoreWrite] {
        let dir = tempfile::tempdir().unwrap();
        let mut kills = Kills::new(place, seed);
        let got = run_with_kills(dir.path(), &workload, &mut kills).await;
        assert_same_windows(place, &reference, got);
        eprintln!("kill matrix: {} killed {} times", place.name(), kills.done);
    }
    eprintln!(
        "kill matrix: follow killed {} times, archive {} times; seed {seed}",
        follow.done, archive.done
    );
}
