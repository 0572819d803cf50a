//! `--follow`: after the bounded replay, keep the target database up to date
//! from the log as live does, so a new processing version can run beside
//! the live one and take over (`tidemark promote`).
//!
//! The follower is the live driver itself ([`run_driver`]: watermarks with
//! idleness, corrections, checkpoints) started at the plan's first offsets
//! instead of the log's start, writing windows starting at or after `from`
//! into the target. It checkpoints in its own folder, so a restarted
//! follower resumes where it stopped; it never creates topics or writes the
//! log (too-late events are dead-lettered by live already).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use tidemark_log::{Log, LogError, Position, Record, StoredRecord};
use tidemark_model::crash::{self, Place};
use tidemark_model::{EventTime, Point, Update};
use tidemark_processor::driver::{
    run_driver, BoxFuture, DriverConfig, PointSink, ProcessorMetrics,
};
use tidemark_processor::{PipelineSet, ProcessorError};
use tidemark_tsdb_writer::writer::{BatchingWriter, WriterConfig, WriterHandle, WriterMetrics};
use tidemark_tsdb_writer::Store;
use tokio_util::sync::CancellationToken;

use crate::plan::Plan;
use crate::ReplayError;

/// A log that starts where the plan starts and never writes.
#[derive(Debug)]
struct Resume {
    inner: Arc<dyn Log>,
    starts: BTreeMap<(String, u32), u64>,
}

#[async_trait]
impl Log for Resume {
    async fn ensure_topic(&self, _topic: &str, _partitions: u32) -> Result<(), LogError> {
        Ok(())
    }

    async fn partition_count(&self, topic: &str) -> Result<u32, LogError> {
        self.inner.partition_count(topic).await
    }

    async fn append(&self, _topic: &str, _records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        Ok(Vec::new())
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        self.inner.read(topic, partition, offset, max_records).await
    }

    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        time: EventTime,
    ) -> Result<u64, LogError> {
        self.inner.offset_for_time(topic, partition, time).await
    }

    async fn start_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        match self.starts.get(&(topic.to_string(), partition)) {
            Some(&o) => Ok(o),
            None => self.inner.start_offset(topic, partition).await,
        }
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.inner.end_offset(topic, partition).await
    }
}

/// The store writer, keeping only windows starting at or after `from`.
struct FromSink {
    writer: WriterHandle,
    from: EventTime,
}

impl PointSink for FromSink {
    fn send(&self, points: Vec<Point>) -> BoxFuture<'_, Result<(), ProcessorError>> {
        Box::pin(async move {
            let kept: Vec<Point> = points.into_iter().filter(|p| p.time >= self.from).collect();
            if kept.is_empty() {
                return Ok(());
            }
            crash::point(Place::Follow);
            Ok(self.writer.send(kept).await?)
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ProcessorError>> {
        Box::pin(async move {
            self.writer.flush().await?;
            // A checkpoint is next: a kill here leaves the store ahead of it.
            crash::point(Place::Follow);
            Ok(())
        })
    }
}

/// Where a follower checkpoints, and the keys that seal its checkpoints.
pub type Checkpoints = (PathBuf, Option<Arc<tidemark_model::KeyRing>>);

/// Follows `log` from the plan's first offsets into `store` until `cancel`,
/// checkpointing in `checkpoint_dir`.
pub async fn follow(
    log: Arc<dyn Log>,
    plan: &Plan,
    pipelines: PipelineSet,
    workers: usize,
    store: Arc<dyn Store>,
    checkpoints: Checkpoints,
    cancel: CancellationToken,
) -> Result<(), ReplayError> {
    let (checkpoint_dir, checkpoint_keys) = checkpoints;
    std::fs::create_dir_all(&checkpoint_dir)?;
    let starts = plan
        .ranges
        .iter()
        .map(|r| ((r.topic.clone(), r.partition), r.from))
        .collect();
    let registry = prometheus::Registry::new();
    let metrics = WriterMetrics::new(&registry).map_err(|e| ReplayError::Invalid(e.to_string()))?;
    let (writer, writer_task) = BatchingWriter::spawn(store, WriterConfig::default(), metrics);
    let sink = Arc::new(FromSink {
        writer: writer.clone(),
        from: plan.from,
    });
    let (updates, _) = tokio::sync::broadcast::channel::<Update>(16);
    let config = DriverConfig {
        checkpoint_dir: Some(checkpoint_dir),
        checkpoint_keys,
        workers,
        allowed_lateness: pipelines.allowed_lateness,
        ..DriverConfig::default()
    };
    let result = run_driver(
        config,
        Arc::new(Resume { inner: log, starts }),
        pipelines,
        sink,
        updates,
        ProcessorMetrics::new(&registry),
        cancel,
    )
    .await;
    drop(writer);
    let _ = writer_task.await;
    Ok(result?)
}
