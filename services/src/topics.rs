//! The topics the services add to the input topics.

/// Topic of live updates, from `process` to every `serve`.
pub const UPDATES_TOPIC: &str = "tidemark-updates";
/// Topic of stage-1 partials on their way to the combiner, which may run in
/// another `process` instance (see [`tidemark_processor::shards`]).
pub const PARTIALS_TOPIC: &str = tidemark_model::topic::PARTIALS;
/// One-partition topic whose consumer-group assignment decides which
/// `process` instance runs the combiner.
pub const PROCESSOR_LEASE_TOPIC: &str = "tidemark-processor-lease";
/// Topic with one partition per stage-1 shard, whose consumer-group
/// assignment spreads the shards over the `process` instances (created by
/// `process` with `--workers` partitions).
pub const PROCESSOR_SHARDS_TOPIC: &str = "tidemark-processor-shards";
