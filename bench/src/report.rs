//! What every benchmark reports: its JSON summary line and the CPU time used.

use serde_json::{json, Value};

pub(crate) fn summary(stage: &str, events: u64, seconds: f64, extra: Value) -> Value {
    let mut out = json!({
        "bench": stage,
        "events": events,
        "seconds": (seconds * 1000.0).round() / 1000.0,
        "events_per_sec": (events as f64 / seconds.max(1e-9)).round(),
    });
    if let (Some(out), Some(extra)) = (out.as_object_mut(), extra.as_object()) {
        out.extend(extra.clone());
    }
    out
}

/// CPU time process `pid` used so far, user plus system, in seconds (Linux
/// `/proc/<pid>/stat`, in clock ticks of 1/100 s).
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user + system) as f64 / 100.0)
}
