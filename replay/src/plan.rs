//! From `--from T1 --to T2` to exact offset ranges.
//!
//! A window starting at `T1` can depend on events before it: a session that
//! began earlier, an impression a click is attributed to, a conversion's
//! click, a trending baseline built from earlier windows, a duplicate's first
//! copy. A window ending at `T2` can still change after it: late events
//! within the allowed lateness, and a session that only closes a gap later.
//! [`Reach`] is how far back and forward the selected pipelines look; the
//! plan reads every input partition from the first offset whose event time
//! reaches `T1 − lookback` to the first whose event time reaches
//! `T2 + lookahead` (the log's timestamp index, or Kafka's
//! `offsets_for_times`). Profiles (`user-profiles`, a table keyed by user)
//! are read from their oldest retained record, as live has seen them all.

use std::time::Duration;

use tidemark_log::Log;
use tidemark_model::topic::USER_PROFILES;
use tidemark_model::EventTime;
use tidemark_processor::driver::DriverConfig;
use tidemark_processor::runner::PartitionRange;
use tidemark_processor::PipelineSet;

use crate::ReplayError;

/// How far before `T1` and after `T2` a replay reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    pub lookback: Duration,
    pub lookahead: Duration,
}

impl Reach {
    /// The reach of the selected pipelines under `config`'s watermark rules.
    ///
    /// Back: the dedup horizon and the longest state any pipeline keeps
    /// ([`PipelineSpec::reach`](tidemark_processor::PipelineSpec::reach):
    /// a session gap, a trending window and its baseline warm-up, an ad
    /// attribution). Forward: the longest time a window may still change
    /// after its end. Both add the out-of-orderness and the allowed
    /// lateness, the event-time distance within which a record's place in
    /// the log and its time disagree.
    pub fn of(set: &PipelineSet, config: &DriverConfig) -> Reach {
        let slack = config.out_of_orderness + set.allowed_lateness + Duration::from_secs(60);
        let state = set.reach();
        Reach {
            lookback: state.back.max(config.dedup_horizon) + slack,
            lookahead: state.ahead + slack,
        }
    }
}

/// What a replay reads.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Windows starting at or after this are written.
    pub from: EventTime,
    /// Windows ending at or before this are written.
    pub to: EventTime,
    pub reach: Reach,
    /// One range per input partition, profiles first.
    pub ranges: Vec<PartitionRange>,
    /// Smallest partition count of the input topics (bounds the workers).
    pub min_partitions: u32,
}

impl Plan {
    /// Records the plan reads.
    pub fn records(&self) -> u64 {
        self.ranges
            .iter()
            .map(|r| r.to.unwrap_or(r.from).saturating_sub(r.from))
            .sum()
    }
}

/// Plans a replay of `[from, to]` over `topics` of `log`. Fails, before
/// anything is written, when the range is empty, when the log's retention
/// already deleted events from inside it, or when the log holds no event in
/// it.
pub async fn plan(
    log: &dyn Log,
    topics: &[String],
    from: EventTime,
    to: EventTime,
    reach: Reach,
) -> Result<Plan, ReplayError> {
    if to <= from {
        return Err(ReplayError::empty_range(from, to));
    }
    let (read_from, read_to) = (from.minus(reach.lookback), to.plus(reach.lookahead));
    let mut ranges = Vec::new();
    let mut inside = 0u64;
    let mut min_partitions = u32::MAX;
    // Profiles first: each worker then reads a batch of profiles before the
    // sessions they tag.
    let mut ordered: Vec<&String> = topics.iter().filter(|t| *t == USER_PROFILES).collect();
    ordered.extend(topics.iter().filter(|t| *t != USER_PROFILES));
    for topic in ordered {
        let partitions = log.partition_count(topic).await?;
        min_partitions = min_partitions.min(partitions);
        for partition in 0..partitions {
            let start = log.start_offset(topic, partition).await?;
            let end = log.offset_for_time(topic, partition, read_to).await?;
            let first = if topic == USER_PROFILES {
                start
            } else {
                log.offset_for_time(topic, partition, read_from)
                    .await?
                    .max(start)
            };
            if topic != USER_PROFILES {
                check_retention(log, topic, partition, start, from).await?;
                let a = log.offset_for_time(topic, partition, from).await?;
                let b = log.offset_for_time(topic, partition, to).await?;
                inside += b.saturating_sub(a);
            }
            ranges.push(PartitionRange {
                topic: topic.clone(),
                partition,
                from: first,
                to: Some(end.max(first)),
            });
        }
    }
    if inside == 0 {
        return Err(ReplayError::NothingInRange {
            from: from.to_rfc3339(),
            to: to.to_rfc3339(),
        });
    }
    Ok(Plan {
        from,
        to,
        reach,
        ranges,
        min_partitions: if min_partitions == u32::MAX {
            1
        } else {
            min_partitions
        },
    })
}

/// Fails when retention deleted part of a partition and what is left starts
/// after `from`. A log that still starts at offset 0 lost nothing.
async fn check_retention(
    log: &dyn Log,
    topic: &str,
    partition: u32,
    start: u64,
    from: EventTime,
) -> Result<(), ReplayError> {
    if start == 0 {
        return Ok(());
    }
    let Some(oldest) = log.read(topic, partition, start, 1).await?.first().cloned() else {
        return Ok(());
    };
    if oldest.timestamp > from {
        return Err(ReplayError::OutsideRetention {
            topic: topic.to_string(),
            partition,
            oldest: oldest.timestamp.to_rfc3339(),
            from: from.to_rfc3339(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reach_covers_the_longest_dependency_of_the_selected_pipelines() {
        let config = DriverConfig::default();
        let lateness = config.allowed_lateness;
        let slack = config.out_of_orderness + lateness + Duration::from_secs(60);
        let traffic = PipelineSet::named(&["traffic"], lateness).unwrap();
        assert_eq!(
            Reach::of(&traffic, &config),
            Reach {
                lookback: config.dedup_horizon + slack,
                lookahead: slack,
            }
        );
        let engagement = PipelineSet::named(&["traffic", "engagement"], lateness).unwrap();
        let r = Reach::of(&engagement, &config);
        assert_eq!(r.lookback, Duration::from_secs(30 * 60) + slack);
        assert_eq!(r.lookahead, Duration::from_secs(30 * 60) + slack);
        let all = Reach::of(&PipelineSet::all(lateness), &config);
        assert_eq!(
            all.lookback,
            Duration::from_secs(24 * 3600 + 30 * 60) + slack
        );
    }
}
