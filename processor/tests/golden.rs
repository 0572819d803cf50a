//! Golden files: `golden/<pipeline>.jsonl` in, `golden/<pipeline>.lp` out.
//!
//! Each input file is one partition's events in log order. They are offered
//! one by one to both stages (one worker, that pipeline only), the watermark
//! advancing after each; at the end every window fires. The output lists
//! every point in the order it was emitted, as `<tier> <line protocol>`, so
//! corrected points appear again with their new values, and every event the
//! processor refused as `dead_letter <reason> <event_id>`.
//!
//! Set `UPDATE_GOLDEN=1` to rewrite the `.lp` files after a deliberate change
//! (then review the diff).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tidemark_model::{Event, EventTime, Limits};
use tidemark_processor::runner::Stages;
use tidemark_processor::{DriverConfig, Outcome, PipelineSet};

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn render(pipeline: &str) -> String {
    let input = std::fs::read_to_string(golden_dir().join(format!("{pipeline}.jsonl")))
        .expect("golden input");
    // Fixture times are small epoch milliseconds: accept any age.
    let century = Duration::from_secs(100 * 365 * 24 * 3600);
    let limits = Limits {
        max_past: century,
        max_future: century,
        ..Limits::default()
    };
    let config = DriverConfig::default();
    let set = PipelineSet::named(&[pipeline], config.allowed_lateness).expect("known pipeline");
    let mut stages = Stages::new(&config.worker(), &set, 1);
    let now = Instant::now();
    let mut text = String::new();
    let mut points = Vec::new();
    let flush = |points: &mut Vec<tidemark_model::Point>, text: &mut String| {
        for p in points.drain(..) {
            text.push_str(p.tier.name());
            text.push(' ');
            text.push_str(&p.to_line_protocol());
            text.push('\n');
        }
    };
    for (n, line) in input.lines().enumerate() {
        let ev = Event::from_json(line.as_bytes(), EventTime(0), &limits)
            .unwrap_or_else(|e| panic!("{pipeline}.jsonl:{}: {e}", n + 1));
        match stages.process("golden", 0, &ev) {
            Outcome::Accepted => {}
            Outcome::Duplicate => text.push_str(&format!("dropped duplicate {}\n", ev.event_id)),
            Outcome::TooLate => text.push_str(&format!("dead_letter too_late {}\n", ev.event_id)),
        }
        stages.advance(now, &mut points);
        flush(&mut points, &mut text);
    }
    stages.finish(&mut points);
    flush(&mut points, &mut text);
    text
}

fn check(pipeline: &str) {
    let got = render(pipeline);
    let path = golden_dir().join(format!("{pipeline}.lp"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).expect("write golden output");
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        got == want,
        "{pipeline}: output differs from {}\n--- got ---\n{got}--- want ---\n{want}",
        path.display()
    );
}

#[test]
fn traffic() {
    check("traffic");
}

#[test]
fn engagement() {
    check("engagement");
}

#[test]
fn trending() {
    check("trending");
}

#[test]
fn ads() {
    check("ads");
}
