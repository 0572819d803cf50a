//! A [`Log`] that counts what it produces, for the services' `/metrics`.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tidemark_model::EventTime;

use crate::{Log, LogError, Position, Record, StoredRecord};

pub const PRODUCE_SECONDS: &str = "tidemark_kafka_produce_seconds";
pub const PRODUCED_RECORDS_TOTAL: &str = "tidemark_kafka_produced_records_total";
pub const DELIVERY_FAILURES_TOTAL: &str = "tidemark_kafka_delivery_failures_total";

/// Produce metrics of a [`Log`]: latency, records and failed deliveries per topic.
#[derive(Debug, Clone)]
pub struct ProduceMetrics {
    seconds: HistogramVec,
    records: IntCounterVec,
    failures: IntCounterVec,
}

impl ProduceMetrics {
    pub fn new(registry: &Registry) -> Result<ProduceMetrics, prometheus::Error> {
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                PRODUCE_SECONDS,
                "Time until the brokers confirmed every record of one append.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["topic"],
        )?;
        let records = IntCounterVec::new(
            Opts::new(PRODUCED_RECORDS_TOTAL, "Records the brokers confirmed."),
            &["topic"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                DELIVERY_FAILURES_TOTAL,
                "Records of appends that failed (not confirmed by the brokers).",
            ),
            &["topic"],
        )?;
        registry.register(Box::new(seconds.clone()))?;
        registry.register(Box::new(records.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        Ok(ProduceMetrics {
            seconds,
            records,
            failures,
        })
    }
}

/// A [`Log`] that counts what it produces; reads pass straight through.
/// The Kafka log itself bounds an append by its produce timeout.
#[derive(Debug)]
pub struct MeteredLog {
    inner: Arc<dyn Log>,
    metrics: ProduceMetrics,
}

impl MeteredLog {
    /// Counts `inner`'s appends into `metrics`.
    pub fn new(inner: Arc<dyn Log>, metrics: ProduceMetrics) -> MeteredLog {
        MeteredLog { inner, metrics }
    }
}

#[async_trait]
impl Log for MeteredLog {
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), LogError> {
        self.inner.ensure_topic(topic, partitions).await
    }

    async fn partition_count(&self, topic: &str) -> Result<u32, LogError> {
        self.inner.partition_count(topic).await
    }

    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        let n = records.len() as u64;
        let started = Instant::now();
        let result = self.inner.append(topic, records).await;
        match &result {
            Ok(_) => {
                self.metrics
                    .seconds
                    .with_label_values(&[topic])
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.records.with_label_values(&[topic]).inc_by(n);
            }
            Err(_) => self.metrics.failures.with_label_values(&[topic]).inc_by(n),
        }
        result
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

    fn read_now(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
    ) -> Option<Result<Vec<StoredRecord>, LogError>> {
        self.inner.read_now(topic, partition, offset, max_records)
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
        self.inner.start_offset(topic, partition).await
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.inner.end_offset(topic, partition).await
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::segment::{SegmentLog, SegmentLogConfig};

    fn record() -> Record {
        Record {
            key: Bytes::from_static(b"u1"),
            value: Bytes::from_static(b"e1"),
            timestamp: EventTime(1),
        }
    }

    #[tokio::test]
    async fn confirmed_and_failed_appends_are_counted_per_topic() {
        let dir = tempfile::tempdir().unwrap();
        let inner = Arc::new(SegmentLog::open(dir.path(), SegmentLogConfig::default()).unwrap());
        let registry = Registry::new();
        let log = MeteredLog::new(inner, ProduceMetrics::new(&registry).unwrap());
        log.ensure_topic("events", 1).await.unwrap();
        log.append("events", vec![record(), record()])
            .await
            .unwrap();
        assert!(log.append("missing", vec![record()]).await.is_err());
        assert_eq!(log.read("events", 0, 0, 10).await.unwrap().len(), 2);

        let families = registry.gather();
        let value = |name: &str, topic: &str| {
            families
                .iter()
                .find(|f| f.get_name() == name)
                .and_then(|f| {
                    f.get_metric().iter().find(|m| {
                        m.get_label()
                            .iter()
                            .any(|l| l.get_name() == "topic" && l.get_value() == topic)
                    })
                })
                .map(|m| m.get_counter().get_value())
        };
        assert_eq!(value(PRODUCED_RECORDS_TOTAL, "events"), Some(2.0));
        assert_eq!(value(DELIVERY_FAILURES_TOTAL, "missing"), Some(1.0));
        assert_eq!(value(DELIVERY_FAILURES_TOTAL, "events"), None);
    }
}
