//! Prometheus metrics of the collector.

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

pub const REQUESTS_TOTAL: &str = "tidemark_ingest_requests_total";
pub const EVENTS_ACCEPTED_TOTAL: &str = "tidemark_ingest_events_accepted_total";
pub const EVENTS_REJECTED_TOTAL: &str = "tidemark_ingest_events_rejected_total";
pub const DUPLICATES_TOTAL: &str = "tidemark_ingest_duplicates_total";
pub const NEWEST_EVENT_TIMESTAMP_SECONDS: &str = "tidemark_ingest_newest_event_timestamp_seconds";
pub const APPEND_SECONDS: &str = "tidemark_ingest_append_seconds";
pub const LOG_APPENDED_EVENTS_TOTAL: &str = "tidemark_log_appended_events_total";

/// The collector's metrics, registered in a registry the caller owns.
#[derive(Debug, Clone)]
pub struct IngestMetrics {
    /// Requests by HTTP status code.
    pub requests: IntCounterVec,
    /// Events appended to their topic (duplicates excluded).
    pub accepted: IntCounter,
    /// Rejections by reason: an [`tidemark_model::EventError::reason`] per event,
    /// or a request-level reason (`unauthorized`, `body_too_large`, ...) per request.
    pub rejected: IntCounterVec,
    /// Events dropped as already seen within the dedup window.
    pub duplicates: IntCounter,
    /// The newest event time appended, as a Unix time; the processor's
    /// counterpart is subtracted from it for the lag in event time.
    pub newest_event_timestamp_seconds: Gauge,
    /// Latency of one produce (`Log::append`) call.
    pub append_seconds: Histogram,
    /// Records appended to the log, dead letters included.
    pub log_appended: IntCounter,
}

impl IngestMetrics {
    /// Creates the metrics and registers them in `registry`. Fails only if they
    /// are already registered there.
    pub fn new(registry: &Registry) -> Result<IngestMetrics, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(REQUESTS_TOTAL, "Ingest HTTP requests by status."),
            &["status"],
        )?;
        let accepted = IntCounter::new(
            EVENTS_ACCEPTED_TOTAL,
            "Events accepted and appended to the log.",
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                EVENTS_REJECTED_TOTAL,
                "Rejected events or requests by reason.",
            ),
            &["reason"],
        )?;
        let duplicates = IntCounter::new(
            DUPLICATES_TOTAL,
            "Events dropped as duplicates of a recent event_id.",
        )?;
        let newest_event_timestamp_seconds = Gauge::new(
            NEWEST_EVENT_TIMESTAMP_SECONDS,
            "The newest event time appended to the log, as a Unix time.",
        )?;
        let append_seconds = Histogram::with_opts(
            HistogramOpts::new(
                APPEND_SECONDS,
                "Latency of one append to the log (produce latency).",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        let log_appended = IntCounter::new(
            LOG_APPENDED_EVENTS_TOTAL,
            "Records appended to the log by ingest.",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(accepted.clone()))?;
        registry.register(Box::new(rejected.clone()))?;
        registry.register(Box::new(duplicates.clone()))?;
        registry.register(Box::new(newest_event_timestamp_seconds.clone()))?;
        registry.register(Box::new(append_seconds.clone()))?;
        registry.register(Box::new(log_appended.clone()))?;
        Ok(IngestMetrics {
            requests,
            accepted,
            rejected,
            duplicates,
            newest_event_timestamp_seconds,
            append_seconds,
            log_appended,
        })
    }

    /// Raises the newest appended event time to the newest of `times`.
    pub fn observe_appended(&self, times: impl Iterator<Item = tidemark_model::EventTime>) {
        if let Some(newest) = times.max() {
            let seconds = newest.0 as f64 / 1000.0;
            if seconds > self.newest_event_timestamp_seconds.get() {
                self.newest_event_timestamp_seconds.set(seconds);
            }
        }
    }
}
