//! The arguments of `tidemark bench`, shared by every benchmark.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Stage {
    /// Appends encoded events to the embedded log (durable, group fsync).
    Log,
    /// Reads the embedded log, decodes, and runs the pipelines (one thread per worker).
    Pipeline,
    /// HTTP ingest into a durable embedded log, from a local client.
    Ingest,
    /// Event-to-update latency: ingest receive to WebSocket push.
    Latency,
    /// The live processor (both stages, no checkpoints) from the log into
    /// InfluxDB (`--influx-url`): the events are loaded first (untimed), the
    /// clock stops once every one was processed and the store acknowledged
    /// every fired window.
    Process,
    /// Reads every input partition from its start to its end through the
    /// log, one partition after another, without decoding (events loaded
    /// first, untimed): the log's own read ceiling under `process`.
    Read,
    /// WebSocket fan-out: `--clients` loopback clients subscribed to
    /// `overview`, publish-to-last-client latency of `--updates` updates and
    /// the server's memory per connection (the server in a child process).
    Fanout,
    /// Read latency over `--days` of 1-minute traffic in SQLite: 24 h at
    /// 1 m by event type (metrics route and SQL), and the newest hour from
    /// the hot cache.
    Query,
    /// The single process under `--rate` events a second for `--minutes`:
    /// a JSON line a minute (resident memory, lag, events/s, state bytes)
    /// and a summary with the memory growth after minute 10.
    Soak,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub stage: Stage,
    /// NDJSON event file to use instead of generated events.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// Number of generated events (without `--input`).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Records per append (log) or events per request (ingest, latency, soak).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Concurrent appenders (log) or requests in flight (ingest).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Offered load for `latency` and `soak`, events per second.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// Pipelines for `pipeline`, comma-separated (default: all).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "traffic,engagement,trending,ads,patterns"
    )]
    pub pipelines: Vec<String>,
    /// Business alert rules (TOML) the combiner evaluates in `pipeline` and
    /// `process`, e.g. `bench/alert-rules.toml`.
    #[arg(long)]
    pub alert_rules: Option<std::path::PathBuf>,
    /// Distinct users of generated events.
    #[arg(long, default_value_t = 1_000_000)]
    pub users: usize,
    /// Generated events per second of event time.
    #[arg(long, default_value_t = 5_000)]
    pub event_rate: u64,
    /// Also report the processor state's size after the last event
    /// (`state_bytes`; measuring it serialises the state, so it is timed).
    #[arg(long)]
    pub state: bool,
    /// `pipeline`: keep the embedded log in this folder, and when it already
    /// holds one, run over it without loading anything (so a second run's
    /// memory figures are the processor's alone).
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Stage-1 worker threads for `pipeline` (the combiner adds one).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Duration of the `latency` run, seconds.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// `latency`: the early-results interval of the system measured
    /// (`run`'s default).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub early_interval: Duration,
    /// `ingest`, `process`: run over Kafka at these brokers instead of the
    /// embedded log (topics are provisioned; use a fresh cluster per run, as
    /// `process` reads every partition from its start).
    #[arg(long)]
    pub kafka_brokers: Option<String>,
    /// `process`: the InfluxDB 1.x server the points go to.
    #[arg(long)]
    pub influx_url: Option<String>,
    /// `process`: the database the points go to.
    #[arg(long, default_value = "tidemark_bench")]
    pub influx_db: String,
    /// `process`: run the stages as `tidemark process` does, `--threads`
    /// shards reporting through the partials topic to a separate combiner,
    /// instead of in one driver.
    #[arg(long)]
    pub sharded: bool,
    /// `fanout`: WebSocket clients subscribed to `overview`.
    #[arg(long, default_value_t = 20_000)]
    pub clients: usize,
    /// `fanout`: updates published, one at a time.
    #[arg(long, default_value_t = 200)]
    pub updates: usize,
    /// `fanout`: time from one update's publishing to the next's.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub update_interval: Duration,
    /// `fanout`: closed windows in the overview before clients connect
    /// (60 = the full hour a running server holds).
    #[arg(long, default_value_t = 60)]
    pub warm_windows: usize,
    /// `query`: days of 1-minute data loaded into the store.
    #[arg(long, default_value_t = 7)]
    pub days: u64,
    /// `soak`: how long the load runs, minutes.
    #[arg(long, default_value_t = 30)]
    pub minutes: usize,
    /// `query`: times each read is measured.
    #[arg(long, default_value_t = 50)]
    pub runs: usize,
    /// `fanout`: be the server under test (the bench starts itself so).
    #[arg(long, hide = true)]
    pub fanout_server: bool,
    /// Seals the embedded log (and checkpoints) the bench writes, to measure
    /// what encryption at rest costs.
    #[command(flatten)]
    pub encryption: tidemark_model::keyring::EncryptionArgs,
}
