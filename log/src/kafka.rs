//! The Kafka implementation of [`Log`], over librdkafka (`rdkafka`).
//!
//! Used by the scale-out deployment: ingest appends through [`KafkaLog`], the
//! processor and replay read partitions by offset through it. Behaviour matches
//! the embedded [`SegmentLog`](crate::segment::SegmentLog) so the stages do not
//! care which one they run on:
//!
//! - **Routing.** Every record is sent to the partition chosen by
//!   [`partition_for_key`] explicitly (Kafka's murmur2 partitioner), so the two
//!   logs place a user on the same partition.
//! - **Durability.** An idempotent producer with `acks=all`; [`Log::append`]
//!   waits for the delivery report of every record and fails the whole call
//!   (retryably) if any is missing, so a caller never takes an unconfirmed
//!   record for persisted. A failed call may still have written some of its
//!   records: retrying it is at-least-once.
//! - **Event time.** A record's [`Record::timestamp`] is the Kafka message
//!   timestamp (`CreateTime`), which is what [`Log::offset_for_time`] searches.
//! - **Reads.** No consumer group and no committed offsets: offsets live in
//!   the caller's checkpoints. Each (topic, partition) being read gets its own
//!   cached `BaseConsumer`, assigned at the requested offset and re-assigned
//!   only when the caller jumps elsewhere.
//!
//! Everything blocking in librdkafka (metadata, watermarks, polling) runs on
//! tokio's blocking pool.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tidemark_model::topic::{self, default_partitions, partition_for_key};
use tidemark_model::EventTime;

use crate::{Log, LogError, Position, Record, StoredRecord};

pub mod group;
pub mod testing;

/// The `rdkafka` this module is built on, for callers that need its types
/// (e.g. `rdkafka::mocking` in tests) without depending on it themselves.
pub use rdkafka;

/// librdkafka properties that [`KafkaLog`] always sets itself, after the
/// caller's [`KafkaConfig::properties`]: they carry the log's guarantees.
const PINNED_PRODUCER: [(&str, &str); 3] = [
    ("acks", "all"),
    ("enable.idempotence", "true"),
    ("max.in.flight.requests.per.connection", "5"),
];
const PINNED_CONSUMER: [(&str, &str); 4] = [
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("enable.partition.eof", "true"),
    ("auto.offset.reset", "error"),
];

/// Configuration of a [`KafkaLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// `client.id` of every client (suffixed with its role).
    pub client_id: String,
    /// Extra librdkafka properties for every client (producer, consumers and
    /// admin), applied after tidemark's defaults: TLS (`security.protocol`,
    /// `ssl.*`), SASL (`sasl.*`), tuning. `acks`, idempotence, offset
    /// commits, `auto.offset.reset` and partition EOF cannot be overridden.
    pub properties: Vec<(String, String)>,
    /// Partition counts that replace [`default_partitions`] for some topics
    /// (see [`KafkaConfig::partitions_for`]).
    pub partitions: HashMap<String, u32>,
    /// `retention.ms` of topics this log creates (not of compacted ones);
    /// `None` keeps the broker's default.
    pub retention: Option<Duration>,
    /// Replication factor of topics this log creates; `None` = the broker's
    /// `default.replication.factor`.
    pub replication_factor: Option<u16>,
    /// How long one [`Log::append`] may take in all before it fails
    /// retryably. librdkafka goes on delivering the records for at least
    /// [`DELIVERY_TIMEOUT`] (its `message.timeout.ms`).
    pub produce_timeout: Duration,
    /// Timeout of metadata, watermark, time-index and admin requests.
    pub request_timeout: Duration,
    /// How long [`Log::read`] waits for the first record when none is buffered.
    pub read_wait: Duration,
}

/// How long librdkafka keeps trying to deliver a record after the append
/// that sent it gave up (at least the produce timeout). A record that times
/// out inside an idempotent producer makes it bump its epoch, and a broker
/// under load when that happens may not take it: tansu 0.6 stops serving
/// produce requests altogether. So a slow moment only makes an append fail
/// retryably, and its records usually land a little later (at least once:
/// the event ids make that safe).
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);

impl KafkaConfig {
    /// Defaults for `brokers`: client id `tidemark`, 7 days of retention (as the
    /// embedded log), 30 s produce timeout, 10 s request timeout, 100 ms read wait.
    pub fn new(brokers: impl Into<String>) -> KafkaConfig {
        KafkaConfig {
            brokers: brokers.into(),
            client_id: "tidemark".to_string(),
            properties: Vec::new(),
            partitions: HashMap::new(),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            replication_factor: None,
            produce_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            read_wait: Duration::from_millis(100),
        }
    }

    /// Partition count for `topic`: the override if any, else [`default_partitions`].
    pub fn partitions_for(&self, topic: &str) -> u32 {
        self.partitions
            .get(topic)
            .copied()
            .unwrap_or_else(|| default_partitions(topic))
    }

    fn client_config(&self, role: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", format!("{}-{role}", self.client_id))
            .set("socket.keepalive.enable", "true");
        c
    }

    fn apply_extra(&self, c: &mut ClientConfig, pinned: &[(&str, &str)]) {
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        for (k, v) in pinned {
            c.set(*k, *v);
        }
    }

    fn producer_config(&self) -> ClientConfig {
        let mut c = self.client_config("producer");
        c.set("compression.type", "zstd")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("batch.size", "1000000")
            .set("queue.buffering.max.messages", "200000")
            .set("queue.buffering.max.kbytes", "262144")
            .set("retry.backoff.ms", "100")
            .set(
                "message.timeout.ms",
                self.produce_timeout
                    .max(DELIVERY_TIMEOUT)
                    .as_millis()
                    .to_string(),
            );
        self.apply_extra(&mut c, &PINNED_PRODUCER);
        c
    }

    fn consumer_config(&self, role: &str) -> ClientConfig {
        let mut c = self.client_config(role);
        // librdkafka needs a group to `assign`; it is never joined (no
        // `subscribe`) and nothing is committed to it.
        c.set("group.id", format!("{}-reader", self.client_id))
            .set("fetch.wait.max.ms", "100")
            .set("queued.max.messages.kbytes", "8192")
            .set("allow.auto.create.topics", "false");
        self.apply_extra(&mut c, &PINNED_CONSUMER);
        c
    }

    fn admin_config(&self) -> ClientConfig {
        let mut c = self.client_config("admin");
        self.apply_extra(&mut c, &[]);
        c
    }
}

/// The Kafka-backed [`Log`]. Cheap to clone; clones share the clients.
#[derive(Clone)]
pub struct KafkaLog {
    inner: Arc<Inner>,
}

struct Inner {
    config: KafkaConfig,
    /// Replaced when librdkafka reports a fatal (idempotence) error, after
    /// which the old instance can never produce again.
    producer: RwLock<FutureProducer>,
    /// Metadata, watermarks and time look-ups; never assigned.
    meta: BaseConsumer,
    admin: AdminClient<DefaultClientContext>,
    partition_counts: Mutex<HashMap<String, u32>>,
    readers: Mutex<HashMap<(String, u32), SharedReader>>,
}

type SharedReader = Arc<Mutex<Reader>>;

/// A consumer dedicated to one partition.
struct Reader {
    consumer: BaseConsumer<ReaderContext>,
    /// The offset the consumer will deliver next, if it is assigned and healthy.
    next: Option<u64>,
}

/// Context of the reading consumers. librdkafka also reports reaching the
/// end of a partition as an error event; for a reader that is the normal
/// way a read ends, so only other errors are logged.
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
        {
            return;
        }
        tracing::error!(error = %error, reason, "Kafka reader error");
    }
}

impl ConsumerContext for ReaderContext {}

impl fmt::Debug for KafkaLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaLog")
            .field("brokers", &self.inner.config.brokers)
            .field("client_id", &self.inner.config.client_id)
            .finish_non_exhaustive()
    }
}

impl KafkaLog {
    /// Creates the clients and checks that the brokers answer a metadata request
    /// within [`KafkaConfig::request_timeout`]: [`LogError::Unavailable`] naming
    /// the brokers if they do not, [`LogError::Config`] for a property
    /// librdkafka rejects.
    pub async fn connect(config: KafkaConfig) -> Result<KafkaLog, LogError> {
        let producer: FutureProducer = create(&config.producer_config(), "producer")?;
        let meta: BaseConsumer = create(&config.consumer_config("meta"), "consumer")?;
        let admin: AdminClient<DefaultClientContext> = create(&config.admin_config(), "admin")?;
        let log = KafkaLog {
            inner: Arc::new(Inner {
                config,
                producer: RwLock::new(producer),
                meta,
                admin,
                partition_counts: Mutex::new(HashMap::new()),
                readers: Mutex::new(HashMap::new()),
            }),
        };
        let l = log.clone();
        blocking(move || {
            let cfg = &l.inner.config;
            l.inner
                .meta
                .fetch_metadata(None, cfg.request_timeout)
                .map_err(|e| {
                    LogError::Unavailable(format!(
                        "cannot reach the Kafka brokers `{}`: {e}",
                        cfg.brokers
                    ))
                })?;
            Ok(())
        })
        .await?;
        tracing::info!(brokers = %log.inner.config.brokers, "Connected to Kafka");
        Ok(log)
    }

    /// The configuration this log was built with.
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }

    /// Creates every topic of `topics` (`(name, partitions, compacted)`) that
    /// does not exist yet, in one request. Compacted topics get
    /// `cleanup.policy=compact`, the others [`KafkaConfig::retention`].
    /// Returns once every topic is visible in the metadata. When every topic
    /// exists already, no admin request is made (a client without the right
    /// to create topics can start against a provisioned cluster).
    pub async fn provision(&self, topics: &[(&str, u32, bool)]) -> Result<(), LogError> {
        let mut missing = Vec::with_capacity(topics.len());
        for &t in topics {
            match self.fetch_partition_count(t.0).await {
                Ok(_) => {}
                Err(LogError::UnknownTopic(_)) => missing.push(t),
                Err(e) => return Err(e),
            }
        }
        let topics = missing.as_slice();
        if topics.is_empty() {
            return Ok(());
        }
        let cfg = &self.inner.config;
        let retention = cfg.retention.map(|r| r.as_millis().to_string());
        let replication = cfg.replication_factor.map_or(-1, i32::from);
        let mut new_topics = Vec::with_capacity(topics.len());
        for &(name, partitions, compacted) in topics {
            if partitions == 0 || partitions > i32::MAX as u32 {
                return Err(LogError::Config(format!(
                    "topic `{name}` cannot have {partitions} partitions"
                )));
            }
            let mut t = NewTopic::new(
                name,
                partitions as i32,
                TopicReplication::Fixed(replication),
            );
            if compacted {
                t = t.set("cleanup.policy", "compact");
            } else if let Some(ms) = &retention {
                t = t.set("retention.ms", ms);
            }
            new_topics.push(t);
        }
        let opts = AdminOptions::new()
            .request_timeout(Some(cfg.request_timeout))
            .operation_timeout(Some(cfg.request_timeout));
        let results = self
            .inner
            .admin
            .create_topics(&new_topics, &opts)
            .await
            .map_err(|e| self.unavailable("create topics", e))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(LogError::Config(format!(
                        "the brokers refused to create topic `{name}`: {code}"
                    )))
                }
            }
        }
        for &(name, _, _) in topics {
            self.wait_for_topic(name).await?;
        }
        Ok(())
    }

    /// [`provision`](Self::provision)s tidemark's topics: the input topics and
    /// the dead-letter topic, with [`KafkaConfig::partitions_for`] partitions;
    /// `user-profiles` is compacted.
    pub async fn provision_defaults(&self) -> Result<(), LogError> {
        let cfg = &self.inner.config;
        let topics: Vec<(&str, u32, bool)> = topic::INPUT_TOPICS
            .iter()
            .chain(std::iter::once(&topic::DEAD_LETTER))
            .map(|&t| (t, cfg.partitions_for(t), t == topic::USER_PROFILES))
            .collect();
        self.provision(&topics).await
    }

    /// Polls the metadata until `topic` shows up (a created topic takes a
    /// moment to propagate), caching its partition count.
    async fn wait_for_topic(&self, topic: &str) -> Result<u32, LogError> {
        let deadline = Instant::now() + self.inner.config.request_timeout;
        let mut delay = Duration::from_millis(20);
        loop {
            match self.fetch_partition_count(topic).await {
                Ok(n) => return Ok(n),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    async fn fetch_partition_count(&self, topic: &str) -> Result<u32, LogError> {
        let (l, t) = (self.clone(), topic.to_string());
        let n = blocking(move || {
            let md = l
                .inner
                .meta
                .fetch_metadata(Some(&t), l.inner.config.request_timeout)
                .map_err(|e| l.unavailable("fetch metadata", e))?;
            let Some(tm) = md.topics().iter().find(|tm| tm.name() == t) else {
                return Err(LogError::UnknownTopic(t));
            };
            if let Some(err) = tm.error() {
                return Err(match RDKafkaErrorCode::from(err) {
                    RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic => {
                        LogError::UnknownTopic(t)
                    }
                    code => LogError::Unavailable(format!("metadata of topic `{t}`: {code}")),
                });
            }
            match tm.partitions().len() {
                0 => Err(LogError::UnknownTopic(t)),
                n => Ok(n as u32),
            }
        })
        .await?;
        lock(&self.inner.partition_counts).insert(topic.to_string(), n);
        Ok(n)
    }

    /// The cached partition count of `topic`, fetched on first use. The count
    /// is kept for the life of the log: adding partitions to a live topic
    /// would move keys anyway, and needs a restart of every stage.
    async fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        if let Some(&n) = lock(&self.inner.partition_counts).get(topic) {
            return Ok(n);
        }
        self.fetch_partition_count(topic).await
    }

    async fn check_partition(&self, topic: &str, partition: u32) -> Result<(), LogError> {
        if partition >= self.partitions(topic).await? {
            return Err(LogError::UnknownPartition {
                topic: topic.to_string(),
                partition,
            });
        }
        Ok(())
    }

    fn producer(&self) -> FutureProducer {
        self.inner
            .producer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// After a failed delivery: if the producer hit a fatal error (idempotence
    /// broken: it will never deliver again), replace it with a fresh one.
    fn recover_producer(&self, failed: &FutureProducer) {
        let Some((code, reason)) = failed.client().fatal_error() else {
            return;
        };
        let mut slot = self
            .inner
            .producer
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if slot.client().native_ptr() != failed.client().native_ptr() {
            return; // already replaced by another caller
        }
        tracing::warn!(error = %code, reason, "Kafka producer failed fatally, recreating it");
        match self.inner.config.producer_config().create() {
            Ok(p) => *slot = p,
            Err(e) => tracing::error!(error = %e, "Could not recreate the Kafka producer"),
        }
    }

    fn unavailable(&self, what: &str, e: KafkaError) -> LogError {
        LogError::Unavailable(format!(
            "Kafka ({}): {what} failed: {e}",
            self.inner.config.brokers
        ))
    }

    async fn append_inner(
        &self,
        topic: &str,
        records: &[Record],
    ) -> Result<Vec<Position>, LogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let partitions = self.partitions(topic).await?;
        let producer = self.producer();
        let mut deliveries: Vec<DeliveryFuture> = Vec::with_capacity(records.len());
        let mut positions: Vec<Position> = Vec::with_capacity(records.len());
        // Records are enqueued strictly in input order (a record waits for queue
        // space before the next one is tried), which keeps per-partition order.
        for rec in records {
            let partition = partition_for_key(&rec.key, partitions) as i32;
            loop {
                let fr = FutureRecord::to(topic)
                    .partition(partition)
                    .key(rec.key.as_ref())
                    .payload(rec.value.as_ref())
                    .timestamp(rec.timestamp.millis());
                match producer.send_result(fr) {
                    Ok(d) => {
                        deliveries.push(d);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        // Waiting for our oldest outstanding record frees space.
                        if positions.len() < deliveries.len() {
                            let d = &mut deliveries[positions.len()];
                            positions.push(self.delivered(topic, &producer, d).await?);
                        } else {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                    }
                    Err((e, _)) => return Err(self.enqueue_error(topic, partition, e)),
                }
            }
        }
        for d in &mut deliveries[positions.len()..] {
            positions.push(self.delivered(topic, &producer, d).await?);
        }
        Ok(positions)
    }

    async fn delivered(
        &self,
        topic: &str,
        producer: &FutureProducer,
        delivery: &mut DeliveryFuture,
    ) -> Result<Position, LogError> {
        match delivery.await {
            Ok(Ok(d)) => Ok(Position {
                partition: d.partition as u32,
                offset: d.offset as u64,
            }),
            Ok(Err((e, _))) => {
                self.recover_producer(producer);
                Err(self.delivery_error(topic, e))
            }
            Err(_) => Err(LogError::Unavailable(
                "Kafka producer closed before delivery".to_string(),
            )),
        }
    }

    fn enqueue_error(&self, topic: &str, partition: i32, e: KafkaError) -> LogError {
        match e.rdkafka_error_code() {
            Some(RDKafkaErrorCode::UnknownPartition) => LogError::UnknownPartition {
                topic: topic.to_string(),
                partition: partition as u32,
            },
            Some(RDKafkaErrorCode::UnknownTopic) => LogError::UnknownTopic(topic.to_string()),
            Some(RDKafkaErrorCode::MessageSizeTooLarge) => LogError::Config(format!(
                "a record for `{topic}` is larger than the producer's message.max.bytes"
            )),
            _ => self.unavailable("produce", e),
        }
    }

    /// A failed delivery. Retryable, except for the few rejections that no
    /// retry can fix (the record itself is unacceptable to the broker).
    fn delivery_error(&self, topic: &str, e: KafkaError) -> LogError {
        match e.rdkafka_error_code() {
            Some(
                code @ (RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidTimestamp
                | RDKafkaErrorCode::InvalidRecord),
            ) => LogError::Config(format!(
                "the brokers rejected a record for `{topic}` for good: {code}"
            )),
            _ => self.unavailable("delivery", e),
        }
    }

    fn reader(&self, topic: &str, partition: u32) -> Result<SharedReader, LogError> {
        let mut readers = lock(&self.inner.readers);
        if let Some(r) = readers.get(&(topic.to_string(), partition)) {
            return Ok(Arc::clone(r));
        }
        let role = format!("reader-{topic}-{partition}");
        let consumer: BaseConsumer<ReaderContext> = self
            .inner
            .config
            .consumer_config(&role)
            .create_with_context(ReaderContext)
            .map_err(|e| LogError::Config(format!("cannot create the Kafka consumer: {e}")))?;
        let r = Arc::new(Mutex::new(Reader {
            consumer,
            next: None,
        }));
        readers.insert((topic.to_string(), partition), Arc::clone(&r));
        Ok(r)
    }

    fn read_blocking(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        let reader = self.reader(topic, partition)?;
        let mut r = lock(&reader);
        if r.next != Some(offset) {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, partition as i32, Offset::Offset(offset as i64))
                .and_then(|()| r.consumer.assign(&tpl))
                .map_err(|e| self.unavailable("assign", e))?;
            r.next = Some(offset);
        }
        let deadline = Instant::now() + self.inner.config.read_wait;
        let mut out: Vec<StoredRecord> = Vec::with_capacity(max_records.min(1024));
        while out.len() < max_records {
            // Wait for the first record; after that only take what is buffered.
            let wait = if out.is_empty() {
                deadline.saturating_duration_since(Instant::now())
            } else {
                Duration::ZERO
            };
            match r.consumer.poll(wait) {
                Some(Ok(m)) => {
                    let Ok(at) = u64::try_from(m.offset()) else {
                        continue;
                    };
                    if at < offset {
                        continue;
                    }
                    out.push(StoredRecord {
                        offset: at,
                        key: m.key().map(Bytes::copy_from_slice).unwrap_or_default(),
                        value: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
                        timestamp: EventTime(m.timestamp().to_millis().unwrap_or(0)),
                    });
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => {
                    let out_of_range = matches!(
                        e.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::AutoOffsetReset | RDKafkaErrorCode::OffsetOutOfRange
                        )
                    );
                    if !out.is_empty() {
                        // Hand over what we have; a lasting fault shows again next call.
                        break;
                    }
                    r.next = None; // the fetcher is stopped; assign again next time
                    if !out_of_range {
                        return Err(self.unavailable("fetch", e));
                    }
                    let (low, high) = self.watermarks_blocking(topic, partition)?;
                    if offset < low {
                        return Err(LogError::OffsetOutOfRange {
                            topic: topic.to_string(),
                            partition,
                            offset,
                            earliest: low,
                        });
                    }
                    if offset >= high {
                        // Past the end: empty, as in the embedded log.
                        return Ok(Vec::new());
                    }
                    // The broker holds the offset after all (e.g. a leader
                    // change in between): retry.
                    return Err(self.unavailable("fetch", e));
                }
                None if out.is_empty() && Instant::now() < deadline => {}
                None => break,
            }
        }
        if let Some(last) = out.last() {
            r.next = Some(last.offset + 1);
        }
        Ok(out)
    }

    fn watermarks_blocking(&self, topic: &str, partition: u32) -> Result<(u64, u64), LogError> {
        let (low, high) = self
            .inner
            .meta
            .fetch_watermarks(topic, partition as i32, self.inner.config.request_timeout)
            .map_err(|e| self.partition_error(topic, partition, "fetch watermarks", e))?;
        Ok((low.max(0) as u64, high.max(0) as u64))
    }

    fn partition_error(&self, topic: &str, partition: u32, what: &str, e: KafkaError) -> LogError {
        match e.rdkafka_error_code() {
            Some(
                RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownPartition,
            ) => LogError::UnknownPartition {
                topic: topic.to_string(),
                partition,
            },
            Some(RDKafkaErrorCode::UnknownTopic) => LogError::UnknownTopic(topic.to_string()),
            _ => self.unavailable(what, e),
        }
    }

    fn offset_for_time_blocking(
        &self,
        topic: &str,
        partition: u32,
        time: EventTime,
    ) -> Result<u64, LogError> {
        if time.millis() <= 0 {
            // Kafka timestamps are never negative, and -1/-2 mean latest/earliest.
            return Ok(self.watermarks_blocking(topic, partition)?.0);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition as i32, Offset::Offset(time.millis()))
            .map_err(|e| self.unavailable("offsets for times", e))?;
        let found = self
            .inner
            .meta
            .offsets_for_times(tpl, self.inner.config.request_timeout)
            .map_err(|e| self.partition_error(topic, partition, "offsets for times", e))?;
        let elem = found
            .find_partition(topic, partition as i32)
            .ok_or_else(|| LogError::Unavailable("offsets for times: no answer".to_string()))?;
        elem.error()
            .map_err(|e| self.partition_error(topic, partition, "offsets for times", e))?;
        match elem.offset() {
            // Some brokers (tansu 0.6) answer 0 instead of -1 when no record is
            // at or after `time`; a real 0 is confirmed by the record itself.
            Offset::Offset(0) => {
                let (low, high) = self.watermarks_blocking(topic, partition)?;
                if low > 0 {
                    return Ok(high); // 0 is not even retained: "none"
                }
                if high == 0 {
                    return Ok(0);
                }
                let first = self.first_record_from(topic, partition, 0)?;
                Ok(if first.timestamp >= time { 0 } else { high })
            }
            Offset::Offset(o) if o > 0 => Ok(o as u64),
            // No record at or after `time`.
            _ => Ok(self.watermarks_blocking(topic, partition)?.1),
        }
    }

    /// The first record at or after `offset`, which must exist, waiting up to
    /// the request timeout for it to be fetched.
    fn first_record_from(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<StoredRecord, LogError> {
        let deadline = Instant::now() + self.inner.config.request_timeout;
        loop {
            if let Some(r) = self
                .read_blocking(topic, partition, offset, 1)?
                .into_iter()
                .next()
            {
                return Ok(r);
            }
            if Instant::now() >= deadline {
                return Err(LogError::Unavailable(format!(
                    "Kafka ({}): no record of {topic}/{partition} at {offset} arrived",
                    self.inner.config.brokers
                )));
            }
        }
    }
}

#[async_trait]
impl Log for KafkaLog {
    /// `user-profiles` is created compacted (the enrichment join needs only
    /// the latest profile per user); other topics get [`KafkaConfig::retention`].
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), LogError> {
        let compacted = topic == topic::USER_PROFILES;
        self.provision(&[(topic, partitions, compacted)]).await
    }

    async fn partition_count(&self, topic: &str) -> Result<u32, LogError> {
        self.partitions(topic).await
    }

    /// Fails with [`LogError::Unavailable`] once [`KafkaConfig::produce_timeout`]
    /// has passed without every record confirmed, wherever the wait is: a
    /// metadata fetch, a full producer queue or the deliveries. librdkafka's
    /// own `message.timeout.ms` is not that bound: it is checked on a
    /// one-second timer, and an idempotent producer keeps an in-flight batch
    /// until its request times out. Records not confirmed by then may still
    /// be delivered later (at least once); the event ids make that safe.
    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        let timeout = self.inner.config.produce_timeout;
        match tokio::time::timeout(timeout, self.append_inner(topic, &records)).await {
            Ok(result) => result,
            Err(_) => Err(LogError::Unavailable(format!(
                "Kafka ({}): {} record(s) for `{topic}` not confirmed within {timeout:?}",
                self.inner.config.brokers,
                records.len()
            ))),
        }
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        self.check_partition(topic, partition).await?;
        if max_records == 0 {
            return Ok(Vec::new());
        }
        let (l, t) = (self.clone(), topic.to_string());
        blocking(move || l.read_blocking(&t, partition, offset, max_records)).await
    }

    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        time: EventTime,
    ) -> Result<u64, LogError> {
        self.check_partition(topic, partition).await?;
        let (l, t) = (self.clone(), topic.to_string());
        blocking(move || l.offset_for_time_blocking(&t, partition, time)).await
    }

    async fn start_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.check_partition(topic, partition).await?;
        let (l, t) = (self.clone(), topic.to_string());
        blocking(move || Ok(l.watermarks_blocking(&t, partition)?.0)).await
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.check_partition(topic, partition).await?;
        let (l, t) = (self.clone(), topic.to_string());
        blocking(move || Ok(l.watermarks_blocking(&t, partition)?.1)).await
    }
}

fn create<T: rdkafka::config::FromClientConfig>(
    config: &ClientConfig,
    what: &str,
) -> Result<T, LogError> {
    config
        .create()
        .map_err(|e| LogError::Config(format!("cannot create the Kafka {what}: {e}")))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, LogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LogError::Unavailable(format!("Kafka worker failed: {e}")))?
}
