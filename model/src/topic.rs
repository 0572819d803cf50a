//! Topic names and routing of events to topics.

use crate::event::EventType;

pub const USER_EVENTS: &str = "user-events";
pub const CONTENT_EVENTS: &str = "content-events";
pub const AD_EVENTS: &str = "ad-events";
pub const USER_PROFILES: &str = "user-profiles";
/// Rejected and too-late events, each with its reason.
pub const DEAD_LETTER: &str = "dead-letter";

/// Stage-1 partials on their way to the combiner when the stages run in
/// separate processes.
pub const PARTIALS: &str = "tidemark-partials";

/// The topics that carry events into the processor.
pub const INPUT_TOPICS: [&str; 4] = [USER_EVENTS, CONTENT_EVENTS, AD_EVENTS, USER_PROFILES];

/// The topic an event type is written to. Key = `user_id` everywhere.
pub fn topic_for(event_type: &EventType) -> &'static str {
    match event_type {
        EventType::PostCreated
        | EventType::View
        | EventType::Like
        | EventType::Comment
        | EventType::Share => CONTENT_EVENTS,
        EventType::AdImpression | EventType::AdClick | EventType::AdConversion => AD_EVENTS,
        EventType::ProfileUpdate => USER_PROFILES,
        EventType::PageView
        | EventType::Login
        | EventType::Follow
        | EventType::Search
        | EventType::Custom(_) => USER_EVENTS,
    }
}

/// Default partition counts of the reference design.
pub fn default_partitions(topic: &str) -> u32 {
    match topic {
        USER_EVENTS | CONTENT_EVENTS => 32,
        AD_EVENTS => 16,
        USER_PROFILES => 8,
        _ => 4,
    }
}

/// The partition of a key: Kafka's default partitioner (murmur2, positive,
/// modulo), so the embedded log and Kafka place a user on the same partition.
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// Kafka's murmur2 hash (seed 0x9747b28c), as its Java client computes it.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Values from Kafka's UtilsTest.testMurmur2.
        assert_eq!(murmur2(b"21") as i32, -973932308);
        assert_eq!(murmur2(b"foobar") as i32, -790332482);
        assert_eq!(murmur2(b"a-little-bit-long-string") as i32, -985981536);
        assert_eq!(murmur2(b"a-little-bit-longer-string") as i32, -1486304829);
        assert_eq!(
            murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8") as i32,
            -58897971
        );
        assert_eq!(murmur2(b"abc") as i32, 479470107);
    }
}
