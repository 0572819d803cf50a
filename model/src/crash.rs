//! Crash points for the SIGKILL matrix (`scripts/kill-matrix.sh`).
//!
//! With `TIDEMARK_CRASH_AT=PLACE:N` in its environment, a process kills
//! itself with SIGKILL the N-th time it passes [`point`] for `PLACE`: in
//! the middle of the very write that place names, where an outside `kill`
//! could only land by luck. Without the variable a point is one load of an
//! initialised cell, so the hooks stay in release builds, where the matrix
//! runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable that arms one crash point.
pub const ENV: &str = "TIDEMARK_CRASH_AT";

/// A write that a SIGKILL may interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The embedded log, between the two halves of a batch's frame (a torn
    /// tail), before the append is acknowledged.
    Append,
    /// A checkpoint's temporary file, after its header, before its payload.
    Checkpoint,
    /// The embedded store, inside a transaction, before its commit.
    StoreWrite,
    /// `replay --follow`, as it hands fired windows to its store writer, and
    /// between a flush of the store and the checkpoint after it.
    Follow,
    /// An archive or index file, between its two halves, before the rename.
    Archive,
}

impl Place {
    pub const ALL: [Place; 5] = [
        Place::Append,
        Place::Checkpoint,
        Place::StoreWrite,
        Place::Follow,
        Place::Archive,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Place::Append => "append",
            Place::Checkpoint => "checkpoint",
            Place::StoreWrite => "store_write",
            Place::Follow => "follow",
            Place::Archive => "archive",
        }
    }

    fn parse(name: &str) -> Option<Place> {
        Place::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// An armed crash point: the place, the pass that kills, the passes so far.
#[derive(Debug)]
struct Armed {
    place: Place,
    at: u64,
    passes: AtomicU64,
}

/// Parses `PLACE:N` (N ≥ 1).
fn parse(spec: &str) -> Result<Armed, String> {
    let known = || {
        Place::ALL
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (name, at) = spec
        .split_once(':')
        .ok_or_else(|| format!("{ENV}={spec:?}: expected PLACE:N, PLACE one of {}", known()))?;
    let place = Place::parse(name)
        .ok_or_else(|| format!("{ENV}={spec:?}: unknown place {name:?}; known: {}", known()))?;
    let at = at
        .parse::<u64>()
        .ok()
        .filter(|&n| n >= 1)
        .ok_or_else(|| format!("{ENV}={spec:?}: N must be a whole number of at least 1"))?;
    Ok(Armed {
        place,
        at,
        passes: AtomicU64::new(0),
    })
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| std::env::var(ENV).ok().and_then(|s| parse(&s).ok()))
        .as_ref()
}

/// Checks the variable, so that a mistyped one stops the start instead of
/// silently never firing.
pub fn check_env() -> Result<(), String> {
    match std::env::var(ENV) {
        Ok(spec) => parse(&spec).map(|_| ()),
        Err(_) => Ok(()),
    }
}

/// Whether `place` is the armed one (a writer may then split its write).
pub fn is_armed(place: Place) -> bool {
    armed().is_some_and(|a| a.place == place)
}

/// Passes the crash point `place`: on the armed pass, the process is gone.
pub fn point(place: Place) {
    let Some(armed) = armed() else { return };
    if armed.place == place && armed.passes.fetch_add(1, Ordering::Relaxed) + 1 == armed.at {
        kill_self(place, armed.at);
    }
}

fn kill_self(place: Place, pass: u64) -> ! {
    eprintln!("crash point {}: SIGKILL at pass {pass}", place.name());
    // The kill command, since the workspace forbids the unsafe a direct
    // signal would need; this thread waits here until the signal lands.
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &std::process::id().to_string()])
        .status();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_or_say_what_is_wrong() {
        let armed = parse("store_write:3").unwrap();
        assert_eq!((armed.place, armed.at), (Place::StoreWrite, 3));
        for (bad, says) in [
            ("append", "expected PLACE:N"),
            (
                "disk:1",
                "unknown place \"disk\"; known: append, checkpoint",
            ),
            ("append:0", "at least 1"),
            ("append:x", "at least 1"),
        ] {
            let error = parse(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }
}
