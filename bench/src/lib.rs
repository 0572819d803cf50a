//! `tidemark bench`: measures one stage and prints one JSON line with at least
//! `events`, `seconds` and `events_per_sec` (and `p50_ms`, `p99_ms` for
//! latency; `soak` prints a line a minute before it).

use std::io::BufRead as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;

use futures::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tidemark_log::segment::SegmentLog;
use tidemark_log::{Log, LogError, Record, StoredRecord};
use tidemark_model::{topic, wire, Event, EventTime, Limits};
use tidemark_processor::driver::DriverConfig;
use tidemark_processor::runner::{
    run_parallel, usable_workers, PartitionRange, RecordSource, RunSummary,
};
use tidemark_processor::PipelineSet;
use tokio_util::sync::CancellationToken;

use tidemark_generator::{EventFactory, GeneratorConfig};
use tidemark_standalone::{self as app, RunConfig};
use tidemark_tsdb_writer::influx::InfluxConfig;
use tidemark_tsdb_writer::StoreTarget;

mod args;
mod fanout;
mod query;
mod report;
mod soak;

pub use args::{BenchArgs, Stage};
use report::{cpu_seconds, summary};

/// Opens the Kafka log a bench runs over with `--kafka-brokers`. The binary
/// supplies it, as the topic set is the scale-out services'; a build without
/// Kafka has none.
pub type KafkaLogOpener = fn(&str) -> futures::future::BoxFuture<'_, anyhow::Result<Arc<dyn Log>>>;

pub async fn run(args: BenchArgs, kafka: Option<KafkaLogOpener>) -> anyhow::Result<()> {
    if args.stage == Stage::Fanout && args.fanout_server {
        return fanout::serve_child(&args).await;
    }
    let summary = match args.stage {
        Stage::Log => bench_log(&args).await?,
        Stage::Pipeline => bench_pipeline(&args).await?,
        Stage::Ingest => bench_ingest(&args, kafka).await?,
        Stage::Latency => bench_latency(&args).await?,
        Stage::Process => bench_process(&args, kafka).await?,
        Stage::Read => bench_read(&args, kafka).await?,
        Stage::Fanout => fanout::run(&args).await?,
        Stage::Query => query::run(&args).await?,
        Stage::Soak => soak::run(&args).await?,
    };
    println!("{summary}");
    Ok(())
}

/// The benchmark's events as validated `Event`s: from `--input` or generated,
/// with event time advancing 5,000 events per second like the peers' workload.
fn load_events(args: &BenchArgs) -> anyhow::Result<Vec<Event>> {
    // Benchmark files carry old event times: accept any within a century.
    let century = Duration::from_secs(100 * 365 * 24 * 3600);
    let limits = Limits {
        max_past: century,
        max_future: century,
        ..Limits::default()
    };
    match &args.input {
        Some(path) => {
            let file = std::fs::File::open(path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let mut events = Vec::new();
            for (n, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
                let line = line?;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let ev = Event::from_json(&line, EventTime(0), &limits)
                    .with_context(|| format!("{}:{}: invalid event", path.display(), n + 1))?;
                events.push(ev);
            }
            Ok(events)
        }
        None => {
            let mut factory = EventFactory::new(GeneratorConfig {
                invalid: 0.0,
                users: args.users,
                ..GeneratorConfig::default()
            });
            let start = 1_790_000_000_000i64;
            let per_ms = (args.event_rate.max(1) as f64) / 1000.0;
            (0..args.events)
                .map(|i| {
                    let now = EventTime(start + (i as f64 / per_ms) as i64);
                    let raw = serde_json::to_vec(&factory.event(now))?;
                    Ok(Event::from_json(&raw, now, &limits)?)
                })
                .collect()
        }
    }
}

/// The log a bench runs over: Kafka with `--kafka-brokers`, else the
/// embedded log in `dir`; with its name for the summary.
async fn open_bench_log(
    args: &BenchArgs,
    dir: &std::path::Path,
    kafka: Option<KafkaLogOpener>,
) -> anyhow::Result<(Arc<dyn Log>, &'static str)> {
    match &args.kafka_brokers {
        None => Ok((
            app::open_log_with_keys(dir, args.encryption.keys()?).await? as Arc<dyn Log>,
            "embedded",
        )),
        Some(brokers) => match kafka {
            Some(open) => Ok((open(brokers).await?, "kafka")),
            None => anyhow::bail!("this build has no Kafka support (cargo feature `kafka`)"),
        },
    }
}

/// Encoded records grouped by topic and partition, as a producer's batching would.
async fn records_by_partition(
    log: &dyn Log,
    events: &[Event],
) -> anyhow::Result<Vec<(&'static str, Vec<Record>)>> {
    let mut groups: std::collections::BTreeMap<(&'static str, u32), Vec<Record>> =
        Default::default();
    for ev in events {
        let topic_name = topic::topic_for(&ev.event_type);
        let partitions = log.partition_count(topic_name).await?;
        let partition = topic::partition_for_key(ev.user_id.as_bytes(), partitions);
        let mut value = Vec::with_capacity(128);
        wire::encode(ev, &mut value);
        groups
            .entry((topic_name, partition))
            .or_default()
            .push(Record {
                key: Bytes::copy_from_slice(ev.user_id.as_bytes()),
                value: Bytes::from(value),
                timestamp: ev.timestamp,
            });
    }
    Ok(groups
        .into_iter()
        .map(|((t, _), records)| (t, records))
        .collect())
}

async fn bench_log(args: &BenchArgs) -> anyhow::Result<Value> {
    let events = load_events(args)?;
    let dir = tempfile::tempdir()?;
    let keys = args.encryption.keys()?;
    let encrypted = keys.is_some();
    let log = app::open_log_with_keys(dir.path(), keys).await?;
    let batch = args.batch.unwrap_or(1_000);
    let mut batches = Vec::new();
    for (topic_name, records) in records_by_partition(log.as_ref(), &events).await? {
        for chunk in records.chunks(batch) {
            batches.push((topic_name, chunk.to_vec()));
        }
    }
    let batch_count = batches.len();
    let queue = Arc::new(std::sync::Mutex::new(batches));
    let started = Instant::now();
    let mut appenders = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (log, queue) = (log.clone(), queue.clone());
        appenders.spawn(async move {
            loop {
                let next = queue
                    .lock()
                    .map_err(|_| anyhow::anyhow!("queue poisoned"))?
                    .pop();
                let Some((topic_name, records)) = next else {
                    return anyhow::Ok(());
                };
                log.append(topic_name, records).await?;
            }
        });
    }
    while let Some(done) = appenders.join_next().await {
        done??;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(summary(
        "log",
        events.len() as u64,
        seconds,
        json!({
            "batch": batch,
            "batches": batch_count,
            "sync": "group fsync before ack",
            "encrypted": encrypted,
        }),
    ))
}

/// The pipelines of `--pipelines`, with the rules of `--alert-rules`.
fn pipeline_set(args: &BenchArgs) -> anyhow::Result<PipelineSet> {
    let set = PipelineSet::named(&args.pipelines, DriverConfig::default().allowed_lateness)
        .map_err(anyhow::Error::msg)?;
    let Some(path) = &args.alert_rules else {
        return Ok(set);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the alert rules {}", path.display()))?;
    let rules = tidemark_processor::alerts::AlertRules::from_toml(&text)?;
    Ok(set.with_alert_rules(Arc::new(rules)))
}

async fn bench_pipeline(args: &BenchArgs) -> anyhow::Result<Value> {
    let set = pipeline_set(args)?;
    let alert_rules = set.alert_rules().map_or(0, |r| r.rules().len());
    let scratch = tempfile::tempdir()?;
    let (dir, reuse) = match &args.log_dir {
        Some(dir) => (dir.clone(), dir.join("log").exists()),
        None => (scratch.path().to_path_buf(), false),
    };
    let keys = args.encryption.keys()?;
    let encrypted = keys.is_some();
    let log = app::open_log_with_keys(&dir, keys).await?;
    if !reuse {
        let events = load_events(args)?;
        for (topic_name, records) in records_by_partition(log.as_ref(), &events).await? {
            for chunk in records.chunks(10_000) {
                log.append(topic_name, chunk.to_vec()).await?;
            }
        }
    }
    let (threads, measure_state) = (args.threads.max(1), args.state);
    let cpu_before = process_cpu_seconds();
    let (run, workers, seconds) =
        tokio::task::spawn_blocking(move || pipelines_from_log(log, &set, threads, measure_state))
            .await??;
    let cpu_seconds = process_cpu_seconds()
        .zip(cpu_before)
        .map(|(after, before)| ((after - before) * 100.0).round() / 100.0);
    Ok(summary(
        "pipeline",
        run.counts.accepted + run.counts.duplicates + run.counts.too_late,
        seconds,
        json!({
            "points": run.points,
            "workers": workers,
            "threads": workers + 1,
            "duplicates": run.counts.duplicates,
            "too_late": run.counts.too_late,
            "state_bytes": args.state.then_some(run.state_bytes),
            "peak_rss_bytes": peak_rss_bytes(),
            "cpu_seconds": cpu_seconds,
            "pipelines": args.pipelines,
            "alert_rules": alert_rules,
            "encrypted": encrypted,
        }),
    ))
}

/// CPU time the process used so far, user plus system, in seconds: on a
/// busy machine the CPU a run took is steadier than its wall time.
fn process_cpu_seconds() -> Option<f64> {
    cpu_seconds(std::process::id())
}

/// The process's peak resident memory (Linux `VmHWM`), if known.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The embedded log as a [`RecordSource`] that lends its buffers.
struct SegmentSource(Arc<SegmentLog>);

impl RecordSource for SegmentSource {
    fn read(
        &mut self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        self.0.read_blocking(topic, partition, offset, max)
    }

    fn visit(
        &mut self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
        visit: &mut dyn FnMut(u64, &[u8]),
    ) -> Result<usize, LogError> {
        self.0.visit_blocking(topic, partition, offset, max, visit)
    }
}

/// Reads every input partition of `log` to its end with one thread per
/// stage-1 worker (the combiner on this thread), decoding and running the
/// pipelines as live: the processor's own parallel runner. Returns the run's
/// summary, the worker count and the seconds it took.
fn pipelines_from_log(
    log: Arc<SegmentLog>,
    set: &PipelineSet,
    threads: usize,
    measure_state: bool,
) -> anyhow::Result<(RunSummary, usize, f64)> {
    let config = DriverConfig::default();
    let mut ranges = Vec::new();
    let mut min_partitions = u32::MAX;
    for topic_name in &config.topics {
        let n = log.partition_count_blocking(topic_name)?;
        min_partitions = min_partitions.min(n);
        ranges.extend((0..n).map(|partition| PartitionRange {
            topic: topic_name.clone(),
            partition,
            from: 0,
            to: None,
        }));
    }
    let workers = usable_workers(threads, min_partitions);
    let started = Instant::now();
    let summary = run_parallel(
        &config.worker(),
        config.max_batch,
        set,
        workers,
        measure_state,
        ranges,
        || SegmentSource(log.clone()),
        wire::decode_into,
        |_points| Ok(()),
    )?;
    Ok((summary, workers, started.elapsed().as_secs_f64()))
}

async fn bench_ingest(args: &BenchArgs, kafka: Option<KafkaLogOpener>) -> anyhow::Result<Value> {
    let events = load_events(args)?;
    let batch = args.batch.unwrap_or(100);
    let bodies: Vec<Bytes> = events
        .chunks(batch)
        .map(|chunk| {
            let now = EventTime::now();
            let mut body = Vec::new();
            for ev in chunk {
                // Fresh event times so the skew window accepts them.
                let mut ev = ev.clone();
                ev.timestamp = now;
                body.extend_from_slice(ev.to_json().as_bytes());
                body.push(b'\n');
            }
            Bytes::from(body)
        })
        .collect();
    let dir = tempfile::tempdir()?;
    let (log, log_kind) = open_bench_log(args, dir.path(), kafka).await?;
    let registry = prometheus::Registry::new();
    let key = "bench-key".to_string();
    let state = tidemark_ingest::IngestState::new(
        tidemark_ingest::IngestConfig {
            api_keys: vec![key.clone()],
            ..Default::default()
        },
        log,
        tidemark_ingest::IngestMetrics::new(&registry)?,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/v1/events", listener.local_addr()?);
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let server = tokio::spawn(tidemark_ws_server::serve(
        listener,
        tidemark_ingest::router(Arc::new(state)),
        async move { stop.cancelled().await },
    ));
    let client = reqwest::Client::new();
    let queue = Arc::new(std::sync::Mutex::new(bodies));
    let started = Instant::now();
    let mut posters = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) * 4 {
        let (client, queue, url, key) = (client.clone(), queue.clone(), url.clone(), key.clone());
        posters.spawn(async move {
            let mut accepted = 0u64;
            loop {
                let next = queue
                    .lock()
                    .map_err(|_| anyhow::anyhow!("queue poisoned"))?
                    .pop();
                let Some(body) = next else {
                    return anyhow::Ok(accepted);
                };
                let reply = client
                    .post(&url)
                    .bearer_auth(&key)
                    .body(body)
                    .send()
                    .await?;
                anyhow::ensure!(
                    reply.status().as_u16() == 202,
                    "ingest answered {}",
                    reply.status()
                );
                let reply: Value = reply.json().await?;
                accepted += reply["accepted"].as_u64().unwrap_or(0);
            }
        });
    }
    let mut accepted = 0;
    while let Some(done) = posters.join_next().await {
        accepted += done??;
    }
    let seconds = started.elapsed().as_secs_f64();
    cancel.cancel();
    server.await??;
    Ok(summary(
        "ingest",
        accepted,
        seconds,
        json!({"batch": batch, "durable": true, "log": log_kind}),
    ))
}

async fn bench_process(args: &BenchArgs, kafka: Option<KafkaLogOpener>) -> anyhow::Result<Value> {
    use tidemark_processor::driver::{run_driver, ProcessorMetrics};
    use tidemark_tsdb_writer::writer::{BatchingWriter, WriterConfig, WriterMetrics};

    let url = args
        .influx_url
        .clone()
        .context("bench process needs --influx-url")?;
    let set = pipeline_set(args)?;
    let mut events = load_events(args)?;
    // Event times ending now, as in a live run.
    if let Some(last) = events.iter().map(|e| e.timestamp).max() {
        let shift = EventTime::now().millis() - last.millis();
        for e in &mut events {
            e.timestamp = EventTime(e.timestamp.millis() + shift);
        }
    }
    let dir = tempfile::tempdir()?;
    let (log, log_kind) = open_bench_log(args, dir.path(), kafka).await?;
    for (topic_name, records) in records_by_partition(log.as_ref(), &events).await? {
        for chunk in records.chunks(10_000) {
            log.append(topic_name, chunk.to_vec()).await?;
        }
    }
    // An empty topic's partitions would hold every window back until they
    // count as idle (10 s): leave them out, as a live run's data would.
    let mut topics = Vec::new();
    for t in topic::INPUT_TOPICS {
        let mut records = 0;
        for p in 0..log.partition_count(t).await? {
            records += log.end_offset(t, p).await?;
        }
        if records > 0 {
            topics.push(t.to_string());
        }
    }
    let cancel = CancellationToken::new();
    let config = RunConfig {
        data_dir: dir.path().to_path_buf(),
        api_keys: Vec::new(),
        cors_origins: Vec::new(),
        rate_limit: None,
        store: StoreTarget::Influx {
            config: InfluxConfig {
                url,
                database: args.influx_db.clone(),
                ..InfluxConfig::default()
            },
        },
        web_dir: None,
        workers: args.threads,
        early_interval: args.early_interval,
        access: Default::default(),
        keys: args.encryption.keys()?,
        alerts: Default::default(),
    };
    let (store, _) = app::open_store(&config.store, &cancel).await?;
    let registry = prometheus::Registry::new();
    let writer_metrics = WriterMetrics::new(&registry)?;
    let (writer, writer_task) =
        BatchingWriter::spawn(store, WriterConfig::default(), writer_metrics.clone());
    let metrics = ProcessorMetrics::new(&registry);
    let (updates, _) = tokio::sync::broadcast::channel(1024);
    let total = events.len() as u64;
    let started = Instant::now();
    if args.sharded {
        let sink = Arc::new(app::WriterSink(writer.clone()));
        let sharded = ShardedRun {
            topics,
            total,
            dir: dir.path(),
        };
        run_sharded(args, sharded, log, set, sink, updates, metrics.clone()).await?;
    } else {
        let mut driver = tokio::spawn(run_driver(
            DriverConfig {
                topics,
                workers: args.threads,
                checkpoint_dir: None,
                ..DriverConfig::default()
            },
            log,
            set,
            Arc::new(app::WriterSink(writer.clone())),
            updates,
            metrics.clone(),
            cancel.clone(),
        ));
        await_processed(&metrics, total, &mut driver, "the processor").await?;
        // The driver's shutdown flushes the store writer: fired windows are stored.
        cancel.cancel();
        driver.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    drop(writer);
    let _ = writer_task.await;
    Ok(summary(
        "process",
        processed(&metrics),
        seconds,
        json!({
            "log": log_kind,
            "store": "influxdb",
            "points": writer_metrics.points.get(),
            "workers": args.threads,
            "pipelines": args.pipelines,
            "sharded": args.sharded,
        }),
    ))
}

/// Events the processor took (accepted, duplicates and too late).
fn processed(metrics: &tidemark_processor::driver::ProcessorMetrics) -> u64 {
    metrics.events_processed.get() + metrics.duplicates.get() + metrics.late_events.get()
}

/// Waits until the processor took `total` events; `what` (a task that
/// never ends by itself) ending first is an error.
async fn await_processed(
    metrics: &tidemark_processor::driver::ProcessorMetrics,
    total: u64,
    task: &mut tokio::task::JoinHandle<Result<(), tidemark_processor::ProcessorError>>,
    what: &str,
) -> anyhow::Result<()> {
    while processed(metrics) < total {
        if let Ok(joined) = tokio::time::timeout(Duration::from_millis(10), &mut *task).await {
            joined??;
            anyhow::bail!("{what} stopped after {} events", processed(metrics));
        }
    }
    Ok(())
}

/// What a sharded `bench process` runs over.
struct ShardedRun<'a> {
    topics: Vec<String>,
    /// Events in the log.
    total: u64,
    /// Where the checkpoints go.
    dir: &'a std::path::Path,
}

/// `bench process --sharded`: every shard and the combiner, joined by the
/// partials topic of `log`, until every event is processed and every
/// report combined; the combiner's shutdown flushes the store writer.
async fn run_sharded(
    args: &BenchArgs,
    run: ShardedRun<'_>,
    log: Arc<dyn Log>,
    set: PipelineSet,
    sink: Arc<app::WriterSink>,
    updates: tokio::sync::broadcast::Sender<tidemark_model::Update>,
    metrics: tidemark_processor::driver::ProcessorMetrics,
) -> anyhow::Result<()> {
    let ShardedRun { topics, total, dir } = run;
    use tidemark_processor::shards::{run_combiner, run_shards, shard_count, ShardedConfig};

    use tidemark_model::topic::PARTIALS;
    log.ensure_topic(PARTIALS, topic::default_partitions(PARTIALS))
        .await?;
    let sharded = ShardedConfig {
        driver: DriverConfig {
            topics,
            workers: args.threads,
            checkpoint_dir: Some(dir.join("checkpoints")),
            ..DriverConfig::default()
        },
        partials_topic: PARTIALS.to_string(),
    };
    let shards: Vec<usize> = (0..shard_count(&sharded.driver, log.as_ref()).await?).collect();
    let (stop_shards, stop_combiner) = (CancellationToken::new(), CancellationToken::new());
    let mut stage1 = {
        let (sharded, log, set, metrics, stop) = (
            sharded.clone(),
            log.clone(),
            set.clone(),
            metrics.clone(),
            stop_shards.clone(),
        );
        tokio::spawn(async move { run_shards(sharded, &shards, log, set, metrics, stop).await })
    };
    let combiner = tokio::spawn(run_combiner(
        sharded,
        log.clone(),
        set,
        sink,
        updates,
        metrics.clone(),
        stop_combiner.clone(),
    ));
    await_processed(&metrics, total, &mut stage1, "the shards").await?;
    stop_shards.cancel();
    stage1.await??;
    let mut reports = 0;
    for p in 0..log.partition_count(PARTIALS).await? {
        reports += log.end_offset(PARTIALS, p).await? - log.start_offset(PARTIALS, p).await?;
    }
    while metrics.shard_reports.get() < reports {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop_combiner.cancel();
    combiner.await??;
    Ok(())
}

async fn bench_read(args: &BenchArgs, kafka: Option<KafkaLogOpener>) -> anyhow::Result<Value> {
    let events = load_events(args)?;
    let dir = tempfile::tempdir()?;
    let (log, log_kind) = open_bench_log(args, dir.path(), kafka).await?;
    for (topic_name, records) in records_by_partition(log.as_ref(), &events).await? {
        for chunk in records.chunks(10_000) {
            log.append(topic_name, chunk.to_vec()).await?;
        }
    }
    let started = Instant::now();
    let mut read = 0u64;
    for t in topic::INPUT_TOPICS {
        for p in 0..log.partition_count(t).await? {
            let end = log.end_offset(t, p).await?;
            let mut offset = log.start_offset(t, p).await?;
            while offset < end {
                let records = log.read(t, p, offset, 2_000).await?;
                if let Some(last) = records.last() {
                    offset = last.offset + 1;
                }
                read += records.len() as u64;
            }
        }
    }
    Ok(summary(
        "read",
        read,
        started.elapsed().as_secs_f64(),
        json!({"log": log_kind}),
    ))
}

/// The single process (`tidemark run`'s stack) in this process over a
/// temporary folder and SQLite, on a loopback port; stopped by `cancel`.
pub(crate) struct InProcess {
    pub(crate) addr: std::net::SocketAddr,
    /// The ingest key.
    pub(crate) key: String,
    /// A service token of `role`.
    pub(crate) token: String,
    pub(crate) cancel: CancellationToken,
    pub(crate) system: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl InProcess {
    pub(crate) async fn start(
        args: &BenchArgs,
        role: tidemark_ws_server::Role,
    ) -> anyhow::Result<InProcess> {
        let dir = tempfile::tempdir()?;
        let key = "bench-key".to_string();
        let config = RunConfig {
            data_dir: dir.path().to_path_buf(),
            api_keys: vec![key.clone()],
            cors_origins: Vec::new(),
            rate_limit: None,
            store: StoreTarget::Sqlite {
                data_dir: dir.path().to_path_buf(),
            },
            web_dir: None,
            workers: args.threads.max(1),
            early_interval: args.early_interval,
            access: Default::default(),
            keys: args.encryption.keys()?,
            alerts: Default::default(),
        };
        let (token, _) =
            tidemark_ws_server::auth::UsersFile::new(config.access.users_file(&config.data_dir))
                .create_token(role, "bench")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cancel = CancellationToken::new();
        let system = tokio::spawn(app::run(config, listener, cancel.clone()));
        Ok(InProcess {
            addr,
            key,
            token,
            cancel,
            system,
            _dir: dir,
        })
    }
}

async fn bench_latency(args: &BenchArgs) -> anyhow::Result<Value> {
    let run = InProcess::start(args, tidemark_ws_server::Role::Analyst).await?;
    let (addr, key, token) = (run.addr, run.key.clone(), run.token.clone());
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await?;
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        json!({"op": "auth", "token": token}).to_string(),
    ))
    .await?;
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        r#"{"op":"subscribe","channel":"overview"}"#.to_string(),
    ))
    .await?;

    // Posted batches: (cumulative events after the batch, when it was sent).
    let posted: Arc<std::sync::Mutex<std::collections::VecDeque<(u64, Instant)>>> =
        Default::default();
    let batch = args.batch.unwrap_or(100);
    let total_batches = (args.rate * args.seconds) as usize / batch;
    let poster = {
        let posted = posted.clone();
        let (url, key, rate) = (format!("http://{addr}/v1/events"), key.clone(), args.rate);
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut factory = EventFactory::new(GeneratorConfig {
                invalid: 0.0,
                out_of_order: 0.0,
                ..Default::default()
            });
            let mut tick =
                tokio::time::interval(Duration::from_secs_f64(batch as f64 / rate as f64));
            let mut cumulative = 0u64;
            let mut in_flight = tokio::task::JoinSet::new();
            for _ in 0..total_batches {
                tick.tick().await;
                let now = EventTime::now();
                let body: Vec<Value> = (0..batch).map(|_| factory.event(now)).collect();
                cumulative += batch as u64;
                posted
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push_back((cumulative, Instant::now()));
                let request = client.post(&url).bearer_auth(&key).json(&body);
                in_flight.spawn(async move { request.send().await.map(|r| r.status()) });
                while in_flight.len() > 64 {
                    in_flight.join_next().await;
                }
            }
            while in_flight.join_next().await.is_some() {}
            anyhow::Ok(cumulative)
        })
    };

    let mut windows: std::collections::HashMap<String, u64> = Default::default();
    let mut latencies_ms = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(args.seconds + 15);
    let expected = (total_batches * batch) as u64;
    while Instant::now() < deadline {
        let message = match tokio::time::timeout(Duration::from_secs(2), ws.next()).await {
            Ok(Some(message)) => message?,
            Ok(None) => break,
            Err(_) if poster.is_finished() && latencies_ms.len() >= total_batches => break,
            Err(_) => continue,
        };
        let Ok(text) = message.to_text() else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<Value>(text) else {
            continue;
        };
        collect_window_counts(&value, &mut windows);
        let seen: u64 = windows.values().sum();
        let now = Instant::now();
        let mut posted = posted.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        while posted
            .front()
            .is_some_and(|(cumulative, _)| *cumulative <= seen)
        {
            if let Some((_, sent)) = posted.pop_front() {
                latencies_ms.push(now.duration_since(sent).as_secs_f64() * 1000.0);
            }
        }
        if seen >= expected && poster.is_finished() {
            break;
        }
    }
    let posted_events = poster.await??;
    run.cancel.cancel();
    run.system.await??;
    anyhow::ensure!(
        !latencies_ms.is_empty(),
        "no update reflected any posted event"
    );
    latencies_ms.sort_by(f64::total_cmp);
    let pct = |q: f64| latencies_ms[((latencies_ms.len() - 1) as f64 * q).round() as usize];
    let measured = latencies_ms.len() * batch;
    Ok(summary(
        "latency",
        posted_events,
        args.seconds as f64,
        json!({
            "offered_rate": args.rate,
            "early_interval_ms": args.early_interval.as_millis() as u64,
            "events_seen_in_updates": measured,
            "p50_ms": (pct(0.50) * 10.0).round() / 10.0,
            "p99_ms": (pct(0.99) * 10.0).round() / 10.0,
            "max_ms": (pct(1.0) * 10.0).round() / 10.0,
        }),
    ))
}

/// Keeps the newest total event count per window from an overview message.
fn collect_window_counts(value: &Value, windows: &mut std::collections::HashMap<String, u64>) {
    match value {
        Value::Object(map) => {
            if let (Some(start), Some(Value::Object(traffic))) =
                (map.get("window_start"), map.get("traffic"))
            {
                let total = traffic.values().filter_map(Value::as_u64).sum();
                windows.insert(start.to_string(), total);
            }
            for v in map.values() {
                collect_window_counts(v, windows);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_window_counts(v, windows)),
        _ => {}
    }
}
