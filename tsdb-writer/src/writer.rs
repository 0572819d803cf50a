//! The batching writer between the processor and a store.
//!
//! Producers send vectors of points through a bounded channel (a full channel
//! is the backpressure). One task collects them into batches of at most
//! [`WriterConfig::max_batch_points`], written when full or when the oldest
//! buffered point has waited [`WriterConfig::max_delay`]. A retryable store
//! error holds the pipeline back: the same batch is retried with exponential
//! backoff until it succeeds, so nothing is dropped while the store is down.
//! A batch the store rejects outright is logged, counted and dropped, because
//! resending the same request can never succeed and would block every later
//! point behind it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use tidemark_model::Point;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::{Store, StoreError};

pub const BATCHES_TOTAL: &str = "tidemark_writer_batches_total";
pub const POINTS_TOTAL: &str = "tidemark_writer_points_total";
pub const RETRIES_TOTAL: &str = "tidemark_writer_retries_total";
pub const FAILURES_TOTAL: &str = "tidemark_writer_failures_total";
pub const STORE_UP: &str = "tidemark_writer_store_up";
pub const POINTS_BEYOND_RETENTION_TOTAL: &str = "tidemark_writer_points_beyond_retention_total";

/// How often refusals of points beyond their tier's retention are logged at
/// most: once a window, however many batches meet them.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);
pub const BATCH_POINTS: &str = "tidemark_writer_batch_points";
pub const BATCH_LATENCY_SECONDS: &str = "tidemark_writer_batch_latency_seconds";

/// Tuning of the batching writer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterConfig {
    /// A batch is written as soon as it holds this many points.
    pub max_batch_points: usize,
    /// A non-empty batch is written at the latest this long after its first point arrived.
    pub max_delay: Duration,
    /// Capacity of the channel, in messages (each a vector of points).
    pub channel_capacity: usize,
    /// First wait after a retryable failure; doubled per retry.
    pub initial_backoff: Duration,
    /// Upper bound of the wait between retries.
    pub max_backoff: Duration,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            max_batch_points: 5000,
            max_delay: Duration::from_millis(200),
            channel_capacity: 64,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// The writer's metrics.
#[derive(Debug, Clone)]
pub struct WriterMetrics {
    pub batches: IntCounter,
    pub points: IntCounter,
    pub retries: IntCounter,
    pub failures: IntCounter,
    /// 0 while a batch is being retried, 1 once the store took one; what
    /// an alert on failing writes watches, since retries hold every later
    /// point back.
    pub store_up: IntGauge,
    /// Points the store refused as older than their tier keeps (a replay
    /// of old history, say): counted, logged once a minute, not retried.
    pub beyond_retention: IntCounter,
    pub batch_size: Histogram,
    pub batch_latency: Histogram,
}

impl WriterMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<WriterMetrics, prometheus::Error> {
        let batches = IntCounter::new(BATCHES_TOTAL, "Batches written to the store.")?;
        let points = IntCounter::new(POINTS_TOTAL, "Points written to the store.")?;
        let retries = IntCounter::new(
            RETRIES_TOTAL,
            "Retried batch writes after a retryable error.",
        )?;
        let failures = IntCounter::new(
            FAILURES_TOTAL,
            "Batches dropped because the store rejected them.",
        )?;
        let store_up = IntGauge::new(
            STORE_UP,
            "1 when the store took the last batch written, 0 while writes are retried.",
        )?;
        // Up until a write says otherwise: a writer with nothing to write
        // yet has no failure to report.
        store_up.set(1);
        let beyond_retention = IntCounter::new(
            POINTS_BEYOND_RETENTION_TOTAL,
            "Points the store refused because they are older than their tier's retention.",
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new(BATCH_POINTS, "Points per written batch.")
                .buckets(prometheus::exponential_buckets(1.0, 4.0, 8)?),
        )?;
        let batch_latency = Histogram::with_opts(HistogramOpts::new(
            BATCH_LATENCY_SECONDS,
            "Time to write one batch, retries included.",
        ))?;
        registry.register(Box::new(batches.clone()))?;
        registry.register(Box::new(points.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(store_up.clone()))?;
        registry.register(Box::new(beyond_retention.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(batch_latency.clone()))?;
        Ok(WriterMetrics {
            batches,
            points,
            retries,
            failures,
            store_up,
            beyond_retention,
            batch_size,
            batch_latency,
        })
    }
}

enum Message {
    Points(Vec<Point>),
    Flush(oneshot::Sender<Result<(), StoreError>>),
}

/// The sending side of a [`BatchingWriter`]; cheap to clone.
#[derive(Debug, Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Message>,
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Message::Points(p) => write!(f, "Points({})", p.len()),
            Message::Flush(_) => f.write_str("Flush"),
        }
    }
}

fn stopped() -> StoreError {
    StoreError::Unavailable("writer task has stopped".into())
}

impl WriterHandle {
    /// Queues points for writing; waits while the channel is full.
    pub async fn send(&self, points: Vec<Point>) -> Result<(), StoreError> {
        if points.is_empty() {
            return Ok(());
        }
        self.tx
            .send(Message::Points(points))
            .await
            .map_err(|_| stopped())
    }

    /// Resolves once every point sent before this call (through any handle)
    /// has been written or, if the store rejected its batch, dropped. Returns
    /// the rejection if a batch was dropped since the previous flush.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Message::Flush(tx))
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

/// The batching writer task.
#[derive(Debug)]
pub struct BatchingWriter {
    store: Arc<dyn Store>,
    config: WriterConfig,
    metrics: WriterMetrics,
    buffer: Vec<Point>,
    /// The last rejection since the previous flush, reported to that flush.
    rejected: Option<String>,
    /// The store's count of points beyond retention when last looked at.
    beyond_retention_seen: u64,
    /// Refused points not logged yet, and when they were last logged.
    beyond_retention_unlogged: u64,
    beyond_retention_logged_at: Option<Instant>,
}

impl BatchingWriter {
    /// Starts the writer task. It ends, after writing what is buffered, once
    /// every handle is dropped. While the store stays unavailable it keeps
    /// retrying; abort the join handle to give up on the buffered points.
    pub fn spawn(
        store: Arc<dyn Store>,
        config: WriterConfig,
        metrics: WriterMetrics,
    ) -> (WriterHandle, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.channel_capacity.max(1));
        let writer = BatchingWriter {
            store,
            config,
            metrics,
            buffer: Vec::new(),
            rejected: None,
            beyond_retention_seen: 0,
            beyond_retention_unlogged: 0,
            beyond_retention_logged_at: None,
        };
        let task = tokio::spawn(writer.run(rx));
        (WriterHandle { tx }, task)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Message>) {
        let max_batch = self.config.max_batch_points.max(1);
        // When the oldest buffered point must be written at the latest.
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let message = match deadline {
                Some(at) => tokio::select! {
                    m = rx.recv() => m,
                    _ = tokio::time::sleep_until(at) => {
                        self.write_buffered(max_batch).await;
                        deadline = None;
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            match message {
                Some(Message::Points(points)) => {
                    if self.buffer.is_empty() {
                        deadline = Some(tokio::time::Instant::now() + self.config.max_delay);
                    }
                    self.buffer.extend(points);
                    while self.buffer.len() >= max_batch {
                        let batch: Vec<Point> = self.buffer.drain(..max_batch).collect();
                        self.write_batch(batch).await;
                    }
                    if self.buffer.is_empty() {
                        deadline = None;
                    }
                }
                Some(Message::Flush(reply)) => {
                    self.write_buffered(max_batch).await;
                    deadline = None;
                    let result = match self.rejected.take() {
                        Some(reason) => Err(StoreError::Rejected(reason)),
                        None => Ok(()),
                    };
                    // The flusher may have given up waiting; nothing to tell then.
                    let _ = reply.send(result);
                }
                None => {
                    self.write_buffered(max_batch).await;
                    return;
                }
            }
        }
    }

    async fn write_buffered(&mut self, max_batch: usize) {
        while !self.buffer.is_empty() {
            let n = self.buffer.len().min(max_batch);
            let batch: Vec<Point> = self.buffer.drain(..n).collect();
            self.write_batch(batch).await;
        }
    }

    /// Counts the points the store refused as beyond retention since the
    /// last look, and logs them at most once per [`REFUSAL_LOG_INTERVAL`].
    fn count_beyond_retention(&mut self) {
        let total = self.store.points_beyond_retention();
        let new = total.saturating_sub(self.beyond_retention_seen);
        self.beyond_retention_seen = total;
        if new == 0 {
            return;
        }
        self.metrics.beyond_retention.inc_by(new);
        self.beyond_retention_unlogged += new;
        let due = self
            .beyond_retention_logged_at
            .is_none_or(|at| at.elapsed() >= REFUSAL_LOG_INTERVAL);
        if due {
            tracing::warn!(
                points = self.beyond_retention_unlogged,
                store = self.store.kind(),
                "The store refused points older than their tier's retention (not stored, not retried)"
            );
            self.beyond_retention_unlogged = 0;
            self.beyond_retention_logged_at = Some(Instant::now());
        }
    }

    async fn write_batch(&mut self, batch: Vec<Point>) {
        let started = Instant::now();
        let mut backoff = self.config.initial_backoff;
        loop {
            match self.store.write(&batch).await {
                Ok(()) => {
                    self.count_beyond_retention();
                    self.metrics.store_up.set(1);
                    self.metrics.batches.inc();
                    self.metrics.points.inc_by(batch.len() as u64);
                    self.metrics.batch_size.observe(batch.len() as f64);
                    self.metrics
                        .batch_latency
                        .observe(started.elapsed().as_secs_f64());
                    return;
                }
                Err(error) if error.is_retryable() => {
                    self.metrics.store_up.set(0);
                    self.metrics.retries.inc();
                    tracing::warn!(
                        %error,
                        store = self.store.kind(),
                        points = batch.len(),
                        backoff_ms = backoff.as_millis() as u64,
                        "Store write failed, retrying"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
                Err(error) => {
                    self.metrics.failures.inc();
                    tracing::error!(
                        %error,
                        store = self.store.kind(),
                        points = batch.len(),
                        "Store rejected a batch, dropping it"
                    );
                    self.rejected = Some(error.to_string());
                    return;
                }
            }
        }
    }
}
