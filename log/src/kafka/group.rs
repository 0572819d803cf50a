//! Consumer-group membership as a lease: the partitions of a topic that a
//! group assigns to this member are what it runs (a shard, the combiner).
//! Rebalance callbacks wait until the member gave its partitions up, so a
//! new holder starts from its last checkpoint.
//!
//! Some brokers (tansu) drop a dead member only when another one joins:
//! holders write the time every second into alive files, and a member that
//! sees a partition's time go stale joins again.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntCounterVec;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::ClientContext;
use tidemark_model::EventTime;
use tokio::sync::mpsc;

use crate::LogError;

/// Session timeout of the groups: how long a dead member keeps its
/// partitions (Kafka's smallest default `group.min.session.timeout.ms`).
const LEASE_SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// Longest wait for the member to give its partitions up before a revoked
/// lease is handed on anyway.
const REVOKE_WAIT: Duration = Duration::from_secs(60);
/// How old the alive time may get before a standby rejoins the group.
const ALIVE_STALE: Duration = Duration::from_secs(12);

/// What a group membership tells the service.
#[derive(Debug)]
pub enum GroupEvent {
    /// These partitions of the group's topic are now this instance's.
    Assigned(Vec<u32>),
    /// Give every partition up, then answer on the channel (they are handed
    /// on then).
    Revoked(std::sync::mpsc::SyncSender<()>),
}

/// Membership in one consumer group over one topic, polled on its own
/// thread (rebalance callbacks run there and may block until the roles
/// checkpointed).
#[derive(Debug)]
pub struct Membership {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct GroupContext {
    events: mpsc::UnboundedSender<GroupEvent>,
    rebalances: IntCounterVec,
    /// The partitions this member holds.
    holding: Mutex<Vec<u32>>,
    alive: AliveFiles,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            if tpl.count() == 0 {
                return;
            }
            self.rebalances.with_label_values(&["revoke"]).inc();
            let (done, wait) = std::sync::mpsc::sync_channel(1);
            if self.events.send(GroupEvent::Revoked(done)).is_ok()
                && wait.recv_timeout(REVOKE_WAIT).is_err()
            {
                tracing::warn!("The processor did not checkpoint in time; handing on anyway");
            }
            // Handed on in good order: nobody needs to wait for these to go stale.
            if let Ok(mut holding) = self.holding.lock() {
                for p in holding.drain(..) {
                    self.alive.forget(p);
                }
            }
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if tpl.count() == 0 {
                return;
            }
            self.rebalances.with_label_values(&["assign"]).inc();
            let partitions: Vec<u32> = tpl
                .elements()
                .iter()
                .map(|e| e.partition().max(0) as u32)
                .collect();
            for &p in &partitions {
                self.alive.touch(p);
            }
            if let Ok(mut holding) = self.holding.lock() {
                holding.clone_from(&partitions);
            }
            let _ = self.events.send(GroupEvent::Assigned(partitions));
        }
    }
}

/// One file per partition of a group's topic, in which its holder writes
/// the time every second: some brokers (tansu) drop a dead member only when
/// another one joins, so a member that sees a partition's time go stale
/// joins again.
#[derive(Debug, Clone)]
struct AliveFiles {
    dir: PathBuf,
    topic: &'static str,
}

impl AliveFiles {
    fn file(&self, partition: u32) -> PathBuf {
        self.dir.join(format!("{}-{partition}", self.topic))
    }

    fn touch(&self, partition: u32) {
        let now = EventTime::now().millis().to_string();
        if let Err(e) = std::fs::write(self.file(partition), now) {
            tracing::warn!(error = %e, "Cannot write an alive file");
        }
    }

    fn forget(&self, partition: u32) {
        let _ = std::fs::remove_file(self.file(partition));
    }

    /// Whether a holder's time of `partition` is older than [`ALIVE_STALE`]
    /// (no file: nobody held it, or it was handed on in good order).
    fn is_stale(&self, partition: u32) -> bool {
        let Ok(text) = std::fs::read_to_string(self.file(partition)) else {
            return false;
        };
        let Ok(written) = text.trim().parse::<i64>() else {
            return false;
        };
        EventTime::now().millis().saturating_sub(written) > ALIVE_STALE.as_millis() as i64
    }
}

impl Membership {
    /// Joins `group` on `topic` (of `partitions` partitions).
    ///
    /// `config` is the client's connection; members are assigned partitions
    /// in order of their member ids, which brokers begin with the client id.
    /// `rebalances` counts assignments and revocations by `kind`.
    pub fn join(
        mut config: ClientConfig,
        topic: &'static str,
        partitions: u32,
        group: String,
        rebalances: IntCounterVec,
        alive_dir: &Path,
    ) -> Result<(Membership, mpsc::UnboundedReceiver<GroupEvent>), LogError> {
        std::fs::create_dir_all(alive_dir)?;
        let (tx, rx) = mpsc::unbounded_channel();
        config
            .set("group.id", group)
            .set(
                "session.timeout.ms",
                LEASE_SESSION_TIMEOUT.as_millis().to_string(),
            )
            .set("heartbeat.interval.ms", "1000")
            .set("partition.assignment.strategy", "range")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "latest");
        let alive = AliveFiles {
            dir: alive_dir.to_path_buf(),
            topic,
        };
        let consumer: BaseConsumer<GroupContext> = config
            .create_with_context(GroupContext {
                events: tx,
                rebalances,
                holding: Mutex::new(Vec::new()),
                alive: alive.clone(),
            })
            .map_err(|e| LogError::Unavailable(format!("cannot create a group consumer: {e}")))?;
        consumer
            .subscribe(&[topic])
            .map_err(|e| LogError::Unavailable(format!("cannot join the group of {topic}: {e}")))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tidemark-{topic}"))
            .spawn(move || {
                let mut last_rejoin = std::time::Instant::now();
                let mut last_touch = std::time::Instant::now();
                while !stopping.load(Ordering::Acquire) {
                    if let Some(Err(e)) = consumer.poll(Duration::from_millis(200)) {
                        tracing::warn!(error = %e, topic, "Group consumer error");
                    }
                    let holding = consumer
                        .context()
                        .holding
                        .lock()
                        .map(|h| h.clone())
                        .unwrap_or_default();
                    if last_touch.elapsed() >= Duration::from_secs(1) {
                        last_touch = std::time::Instant::now();
                        for &p in &holding {
                            alive.touch(p);
                        }
                    }
                    let orphaned =
                        (0..partitions).any(|p| !holding.contains(&p) && alive.is_stale(p));
                    if orphaned && last_rejoin.elapsed() >= ALIVE_STALE {
                        tracing::info!(topic, "A holder looks dead; rejoining the group");
                        last_rejoin = std::time::Instant::now();
                        consumer.unsubscribe();
                        if let Err(e) = consumer.subscribe(&[topic]) {
                            tracing::warn!(error = %e, topic, "Cannot rejoin the group");
                        }
                    }
                }
                // Leaving the group now hands the partitions on without
                // waiting for the session timeout.
                consumer.unsubscribe();
                let _ = consumer.poll(Duration::from_millis(100));
                drop(consumer);
            })?;
        Ok((
            Membership {
                stop,
                thread: Some(thread),
            },
            rx,
        ))
    }

    /// Leaves the group, handing the partitions on at once.
    pub async fn leave(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}
