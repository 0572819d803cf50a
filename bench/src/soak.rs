//! `bench soak`: the single-process stack (`tidemark run`: HTTP ingest, the
//! embedded log, both processor stages with checkpoints, SQLite, live
//! updates) in this process under a steady offered load of `--rate` events a
//! second for `--minutes`. Every minute it prints one JSON line: resident
//! memory, lag, events processed a second, the state in the newest
//! checkpoint, and what the allocator holds (live bytes, and the pages it
//! keeps for them); at the end a summary whose `rss_growth_after_minute_10_pct`
//! is the memory limit's figure (under 5 %).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tidemark_generator::{EventFactory, GeneratorConfig};
use tidemark_model::EventTime;
use tokio_util::sync::CancellationToken;

use crate::args::BenchArgs;
use crate::report::summary;
use crate::InProcess;

/// The limit on growth after the warm-up, percent.
const RSS_GROWTH_LIMIT_PCT: f64 = 5.0;
/// The minute after which memory must stay flat: windows, sessions and the
/// dedup horizon have filled by then.
const WARM_MINUTES: usize = 10;

pub(crate) async fn run(args: &BenchArgs) -> anyhow::Result<Value> {
    anyhow::ensure!(args.minutes > 0, "--minutes must be at least 1");
    anyhow::ensure!(args.rate > 0, "--rate must be at least 1");
    let run = InProcess::start(args, tidemark_ws_server::Role::Admin).await?;
    let (addr, cancel) = (run.addr, run.cancel.clone());

    let load = Load::default();
    let poster = tokio::spawn(post_steadily(
        format!("http://{addr}/v1/events"),
        run.key.clone(),
        args.rate,
        args.batch.unwrap_or(500),
        load.clone(),
        cancel.clone(),
    ));
    let client = reqwest::Client::new();
    let metrics_url = format!("http://{addr}/metrics");
    let started = Instant::now();
    let mut minutes = Vec::with_capacity(args.minutes);
    let (mut last_processed, mut last_accepted, mut last_at) = (0.0, 0, started);
    for minute in 1..=args.minutes {
        tokio::time::sleep_until((started + Duration::from_secs(60 * minute as u64)).into()).await;
        let text = client
            .get(&metrics_url)
            .bearer_auth(&run.token)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let now = Instant::now();
        let seconds = now.duration_since(last_at).as_secs_f64();
        let processed = sample(&text, "tidemark_processor_events_total");
        let accepted = load.accepted.load(Ordering::Relaxed);
        let heap = heap_bytes();
        let line = json!({
            "bench": "soak",
            "minute": minute,
            "rss_bytes": rss_bytes(),
            "heap_allocated_bytes": heap.map(|h| h.allocated),
            "heap_resident_bytes": heap.map(|h| h.resident),
            "lag_records": sample(&text, "tidemark_processor_lag_records") as u64,
            "watermark_delay_seconds": round1(sample(&text, "tidemark_processor_watermark_delay_seconds")),
            "events_per_sec": ((processed - last_processed) / seconds).round(),
            "accepted_per_sec": ((accepted - last_accepted) as f64 / seconds).round(),
            "state_bytes": sample(&text, "tidemark_processor_state_bytes") as u64,
            "failed_requests": load.failed.load(Ordering::Relaxed),
        });
        println!("{line}");
        (last_processed, last_accepted, last_at) = (processed, accepted, now);
        minutes.push(line);
    }
    cancel.cancel();
    poster.await??;
    run.system.await??;
    Ok(soak_summary(
        args,
        &minutes,
        started.elapsed().as_secs_f64(),
    ))
}

fn soak_summary(args: &BenchArgs, minutes: &[Value], seconds: f64) -> Value {
    let rss = |m: &Value| m["rss_bytes"].as_u64().unwrap_or(0);
    let per_sec: Vec<f64> = (minutes.iter())
        .filter_map(|m| m["events_per_sec"].as_f64())
        .collect();
    let processed: f64 = per_sec.iter().sum::<f64>() * 60.0;
    // Growth from minute 10 to the largest later minute; none before.
    let growth = minutes.get(WARM_MINUTES - 1).and_then(|warm| {
        let later = minutes[WARM_MINUTES..].iter().map(rss).max()?;
        Some((later as f64 - rss(warm) as f64) / rss(warm).max(1) as f64 * 100.0)
    });
    summary(
        "soak",
        processed as u64,
        seconds,
        json!({
            "rate": args.rate,
            "minutes": args.minutes,
            "median_events_per_sec": median(per_sec),
            "max_lag_records": minutes.iter().filter_map(|m| m["lag_records"].as_u64()).max(),
            "rss_bytes_minute_10": minutes.get(WARM_MINUTES - 1).map(rss),
            "rss_bytes_last": minutes.last().map(rss),
            "rss_growth_after_minute_10_pct": growth.map(round1),
            "rss_growth_limit_pct": RSS_GROWTH_LIMIT_PCT,
            "within_memory_limit": growth.map(|g| g < RSS_GROWTH_LIMIT_PCT),
            "state_bytes_minute_10": minutes.get(WARM_MINUTES - 1).map(|m| m["state_bytes"].clone()),
            "state_bytes_last": minutes.last().map(|m| m["state_bytes"].clone()),
            "heap_allocated_bytes_minute_10": minutes.get(WARM_MINUTES - 1).map(|m| m["heap_allocated_bytes"].clone()),
            "heap_allocated_bytes_last": minutes.last().map(|m| m["heap_allocated_bytes"].clone()),
        }),
    )
}

/// What the poster got through.
#[derive(Debug, Clone, Default)]
struct Load {
    accepted: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

/// Posts generated events in batches of `batch` at `rate` a second until
/// `cancel`; a batch the server is late for is sent as soon as it can be, so
/// the offered load stays `rate` on average.
async fn post_steadily(
    url: String,
    key: String,
    rate: u64,
    batch: usize,
    load: Load,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let mut factory = EventFactory::new(GeneratorConfig {
        invalid: 0.0,
        out_of_order: 0.0,
        ..Default::default()
    });
    let mut tick = tokio::time::interval(Duration::from_secs_f64(batch as f64 / rate as f64));
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = EventTime::now();
        let body: Vec<Value> = (0..batch).map(|_| factory.event(now)).collect();
        let request = client.post(&url).bearer_auth(&key).json(&body);
        let load = load.clone();
        in_flight.spawn(async move {
            let accepted = match request.send().await {
                Ok(reply) if reply.status().is_success() => reply
                    .json::<Value>()
                    .await
                    .ok()
                    .and_then(|v| v["accepted"].as_u64()),
                _ => None,
            };
            match accepted {
                Some(n) => load.accepted.fetch_add(n, Ordering::Relaxed),
                None => load.failed.fetch_add(1, Ordering::Relaxed),
            };
        });
        while in_flight.len() > 64 {
            in_flight.join_next().await;
        }
    }
    while in_flight.join_next().await.is_some() {}
    Ok(())
}

/// The sum of a metric's samples (every label set) in Prometheus text.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The process's resident memory now (Linux `VmRSS`).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What the allocator holds: bytes in live allocations, and the pages it
/// keeps resident for them. RSS growing while `allocated` stays flat is
/// fragmentation, not state.
#[derive(Debug, Clone, Copy)]
struct Heap {
    allocated: u64,
    resident: u64,
}

#[cfg(not(target_env = "msvc"))]
fn heap_bytes() -> Option<Heap> {
    use tikv_jemalloc_ctl::{epoch, stats};
    // The statistics are a snapshot taken at the last epoch.
    epoch::advance().ok()?;
    Some(Heap {
        allocated: stats::allocated::read().ok()? as u64,
        resident: stats::resident::read().ok()? as u64,
    })
}

#[cfg(target_env = "msvc")]
fn heap_bytes() -> Option<Heap> {
    None
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_sum_every_label_set_of_exactly_the_named_metric() {
        let text = "# HELP tidemark_processor_lag_records x\n\
                    tidemark_processor_lag_records{topic=\"a\"} 3\n\
                    tidemark_processor_lag_records{topic=\"b\"} 4\n\
                    tidemark_processor_lag_records_other 100\n\
                    tidemark_processor_state_bytes 12345\n";
        assert_eq!(sample(text, "tidemark_processor_lag_records"), 7.0);
        assert_eq!(sample(text, "tidemark_processor_state_bytes"), 12345.0);
        assert_eq!(sample(text, "tidemark_processor_missing"), 0.0);
    }

    #[test]
    fn growth_is_measured_from_minute_ten_to_the_largest_later_minute() {
        let minute =
            |rss: u64| json!({"rss_bytes": rss, "events_per_sec": 50_000.0, "lag_records": 0});
        let mut minutes: Vec<Value> = (0..9).map(|i| minute(100 + i)).collect();
        minutes.push(minute(1_000));
        minutes.extend([minute(1_030), minute(1_010)]);
        #[derive(clap::Parser)]
        struct Command {
            #[command(flatten)]
            args: BenchArgs,
        }
        let args = <Command as clap::Parser>::parse_from(["bench", "soak", "--minutes", "12"]).args;
        let s = soak_summary(&args, &minutes, 720.0);
        assert_eq!(s["rss_growth_after_minute_10_pct"], json!(3.0));
        assert_eq!(s["within_memory_limit"], json!(true));
        let short = soak_summary(&args, &minutes[..5], 300.0);
        assert_eq!(short["rss_growth_after_minute_10_pct"], Value::Null);
    }
}
