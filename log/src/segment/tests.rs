use std::collections::HashMap;
use std::io::Write as _;

use super::*;

fn rec(key: &str, value: &str, ts: i64) -> Record {
    Record {
        key: Bytes::from(key.to_string()),
        value: Bytes::from(value.to_string()),
        timestamp: EventTime(ts),
    }
}

fn config(segment_bytes: u64) -> SegmentLogConfig {
    SegmentLogConfig {
        segment_bytes,
        ..SegmentLogConfig::default()
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("partition dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == SEGMENT_EXT))
        .collect();
    files.sort();
    files
}

/// Appends `batches` batches of `per_batch` records to partition 0 of a
/// one-partition topic; record i has timestamp 1000 + i.
fn fill(log: &SegmentLog, topic: &str, batches: usize, per_batch: usize) {
    log.ensure_topic_blocking(topic, 1).expect("topic");
    for b in 0..batches {
        let recs: Vec<Record> = (0..per_batch)
            .map(|i| {
                let n = b * per_batch + i;
                rec(
                    &format!("k{}", n % 7),
                    &format!("value-{n}"),
                    1000 + n as i64,
                )
            })
            .collect();
        let pos = log.append_blocking(topic, &recs).expect("append");
        let offsets: Vec<u64> = pos.iter().map(|p| p.offset).collect();
        let expected: Vec<u64> = ((b * per_batch) as u64..((b + 1) * per_batch) as u64).collect();
        assert_eq!(offsets, expected);
    }
}

#[test]
fn round_trip_across_segment_rolls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = SegmentLog::open(dir.path(), config(512)).expect("open");
    fill(&log, "t", 40, 25);
    let files = segment_files(&dir.path().join("t/0"));
    assert!(
        files.len() > 3,
        "expected several segments, got {}",
        files.len()
    );
    assert_eq!(log.end_offset_blocking("t", 0).expect("end"), 1000);
    assert_eq!(log.start_offset_blocking("t", 0).expect("start"), 0);

    let mut offset = 0;
    let mut seen = 0;
    while offset < 1000 {
        let got = log.read_blocking("t", 0, offset, 37).expect("read");
        assert!(!got.is_empty() && got.len() <= 37);
        for r in &got {
            assert_eq!(r.offset, offset);
            assert_eq!(r.value, Bytes::from(format!("value-{offset}")));
            assert_eq!(r.key, Bytes::from(format!("k{}", offset % 7)));
            assert_eq!(r.timestamp, EventTime(1000 + offset as i64));
            offset += 1;
            seen += 1;
        }
    }
    assert_eq!(seen, 1000);
    assert!(log
        .read_blocking("t", 0, 1000, 10)
        .expect("read at end")
        .is_empty());
    // Reading from the middle of a batch starts exactly at the requested offset.
    let mid = log.read_blocking("t", 0, 513, 3).expect("read mid");
    assert_eq!(
        mid.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![513, 514, 515]
    );
}

#[test]
fn visiting_sees_what_reading_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = SegmentLog::open(dir.path(), config(512)).expect("open");
    fill(&log, "t", 40, 25);
    for (from, max) in [(0, 1000), (513, 3), (37, 100), (990, 50), (1000, 5)] {
        let read: Vec<(u64, Vec<u8>)> = log
            .read_blocking("t", 0, from, max)
            .expect("read")
            .iter()
            .map(|r| (r.offset, r.value.to_vec()))
            .collect();
        let mut visited = Vec::new();
        let n = log
            .visit_blocking("t", 0, from, max, |offset, value| {
                visited.push((offset, value.to_vec()))
            })
            .expect("visit");
        assert_eq!(n, visited.len());
        assert_eq!(visited, read, "from {from}, max {max}");
    }
}

#[test]
fn unknown_topic_and_partition_are_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = SegmentLog::open(dir.path(), config(1 << 20)).expect("open");
    assert!(matches!(
        log.append_blocking("nope", &[rec("a", "b", 1)]),
        Err(LogError::UnknownTopic(_))
    ));
    log.ensure_topic_blocking("t", 2).expect("topic");
    assert!(matches!(
        log.read_blocking("t", 2, 0, 1),
        Err(LogError::UnknownPartition { .. })
    ));
    assert!(matches!(
        log.ensure_topic_blocking("../evil", 1),
        Err(LogError::Config(_))
    ));
    assert!(matches!(
        log.ensure_topic_blocking("zero", 0),
        Err(LogError::Config(_))
    ));
    // An existing topic keeps its partition count.
    log.ensure_topic_blocking("t", 5).expect("idempotent");
    assert_eq!(log.partition_count_blocking("t").expect("count"), 2);
}

#[test]
fn per_key_order_is_kept_across_partitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = SegmentLog::open(dir.path(), config(4096)).expect("open");
    log.ensure_topic_blocking("t", 4).expect("topic");
    let mut positions = Vec::new();
    let mut all = Vec::new();
    for round in 0..20 {
        let recs: Vec<Record> = (0..50)
            .map(|i| rec(&format!("user{}", i % 9), &format!("{round}:{i}"), i))
            .collect();
        positions.extend(log.append_blocking("t", &recs).expect("append"));
        all.extend(recs);
    }
    let mut expected: HashMap<Bytes, Vec<Bytes>> = HashMap::new();
    for (r, p) in all.iter().zip(&positions) {
        assert_eq!(p.partition, partition_for_key(&r.key, 4));
        expected
            .entry(r.key.clone())
            .or_default()
            .push(r.value.clone());
    }
    let mut actual: HashMap<Bytes, Vec<Bytes>> = HashMap::new();
    let mut total = 0;
    for p in 0..4 {
        let end = log.end_offset_blocking("t", p).expect("end");
        let got = log.read_blocking("t", p, 0, usize::MAX).expect("read");
        assert_eq!(got.len() as u64, end);
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.offset, i as u64);
            actual
                .entry(r.key.clone())
                .or_default()
                .push(r.value.clone());
        }
        total += got.len();
    }
    assert_eq!(total, all.len());
    assert_eq!(actual, expected);
}

#[test]
fn offset_for_time_finds_first_record_reaching_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = SegmentLog::open(dir.path(), config(600)).expect("open");
    fill(&log, "t", 20, 10);
    // Record n has timestamp 1000 + n.
    assert_eq!(
        log.offset_for_time_blocking("t", 0, EventTime(0))
            .expect("oft"),
        0
    );
    assert_eq!(
        log.offset_for_time_blocking("t", 0, EventTime(1000))
            .expect("oft"),
        0
    );
    assert_eq!(
        log.offset_for_time_blocking("t", 0, EventTime(1057))
            .expect("oft"),
        57
    );
    assert_eq!(
        log.offset_for_time_blocking("t", 0, EventTime(1199))
            .expect("oft"),
        199
    );
    assert_eq!(
        log.offset_for_time_blocking("t", 0, EventTime(1200))
            .expect("oft"),
        200
    );

    // Out-of-order timestamps: the first offset whose running max reaches t.
    log.ensure_topic_blocking("o", 1).expect("topic");
    let recs = vec![
        rec("a", "0", 10),
        rec("a", "1", 50),
        rec("a", "2", 20),
        rec("a", "3", 60),
    ];
    log.append_blocking("o", &recs).expect("append");
    log.append_blocking("o", &[rec("a", "4", 30), rec("a", "5", 70)])
        .expect("append");
    assert_eq!(
        log.offset_for_time_blocking("o", 0, EventTime(20))
            .expect("oft"),
        1
    );
    assert_eq!(
        log.offset_for_time_blocking("o", 0, EventTime(55))
            .expect("oft"),
        3
    );
    assert_eq!(
        log.offset_for_time_blocking("o", 0, EventTime(65))
            .expect("oft"),
        5
    );
    assert_eq!(
        log.offset_for_time_blocking("o", 0, EventTime(71))
            .expect("oft"),
        6
    );
}

#[test]
fn reopen_preserves_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = {
        let log = SegmentLog::open(dir.path(), config(700)).expect("open");
        fill(&log, "t", 30, 10);
        log.ensure_topic_blocking("other", 3).expect("topic");
        log.append_blocking("other", &[rec("x", "y", 5)])
            .expect("append");
        log.read_blocking("t", 0, 0, usize::MAX).expect("read")
    };
    let log = SegmentLog::open(dir.path(), config(700)).expect("reopen");
    assert_eq!(log.partition_count_blocking("other").expect("count"), 3);
    assert_eq!(
        log.read_blocking("t", 0, 0, usize::MAX).expect("read"),
        before
    );
    assert_eq!(log.end_offset_blocking("t", 0).expect("end"), 300);
    assert_eq!(
        log.offset_for_time_blocking("t", 0, EventTime(1150))
            .expect("oft"),
        150
    );
    let pos = log
        .append_blocking("t", &[rec("k", "after", 9999)])
        .expect("append");
    assert_eq!(pos[0].offset, 300);
    assert_eq!(
        log.read_blocking("t", 0, 300, 5).expect("read")[0].value,
        Bytes::from("after")
    );
}

fn last_segment(dir: &Path) -> PathBuf {
    segment_files(dir).pop().expect("a segment")
}

#[test]
fn torn_tail_with_garbage_is_truncated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good_len = {
        let log = SegmentLog::open(dir.path(), config(1 << 20)).expect("open");
        fill(&log, "t", 5, 10);
        fs::metadata(last_segment(&dir.path().join("t/0")))
            .expect("meta")
            .len()
    };
    let path = last_segment(&dir.path().join("t/0"));
    let mut f = OpenOptions::new()
        .append(true)
        .open(&path)
        .expect("open seg");
    f.write_all(&[0xAB; 100]).expect("garbage");
    drop(f);

    let log = SegmentLog::open(dir.path(), config(1 << 20)).expect("reopen");
    assert_eq!(fs::metadata(&path).expect("meta").len(), good_len);
    assert_eq!(log.end_offset_blocking("t", 0).expect("end"), 50);
    let pos = log
        .append_blocking("t", &[rec("k", "next", 1)])
        .expect("append");
    assert_eq!(pos[0].offset, 50);
    let all = log.read_blocking("t", 0, 0, usize::MAX).expect("read");
    assert_eq!(all.len(), 51);
    assert_eq!(all[50].value, Bytes::from("next"));
}

#[test]
fn torn_tail_mid_batch_is_truncated_to_last_good_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (len_after_4, len_after_5) = {
        let log = SegmentLog::open(dir.path(), config(1 << 20)).expect("open");
        fill(&log, "t", 4, 10);
        let seg = last_segment(&dir.path().join("t/0"));
        let a = fs::metadata(&seg).expect("meta").len();
        log.append_blocking("t", &(0..10).map(|i| rec("k", "v", i)).collect::<Vec<_>>())
            .expect("append");
        (a, fs::metadata(&seg).expect("meta").len())
    };
    let path = last_segment(&dir.path().join("t/0"));
    // Cut the fifth batch in half.
    let f = OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open seg");
    f.set_len((len_after_4 + len_after_5) / 2)
        .expect("truncate");
    drop(f);

    let log = SegmentLog::open(dir.path(), config(1 << 20)).expect("reopen");
    assert_eq!(fs::metadata(&path).expect("meta").len(), len_after_4);
    assert_eq!(log.end_offset_blocking("t", 0).expect("end"), 40);
    assert_eq!(
        log.append_blocking("t", &[rec("k", "v", 1)])
            .expect("append")[0]
            .offset,
        40
    );

    // A flipped payload byte fails the CRC and is cut too.
    drop(log);
    let len = fs::metadata(&path).expect("meta").len();
    let mut bytes = fs::read(&path).expect("read seg");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&path, &bytes).expect("write seg");
    let log = SegmentLog::open(dir.path(), config(1 << 20)).expect("reopen");
    assert_eq!(log.end_offset_blocking("t", 0).expect("end"), 40);
    assert_eq!(fs::metadata(&path).expect("meta").len(), len_after_4);
    assert!(len > len_after_4);
}

#[test]
fn retention_deletes_old_and_excess_sealed_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = SegmentLogConfig {
        segment_bytes: 300,
        retention_age: Some(Duration::from_millis(500)),
        retention_bytes: None,
        sync: SyncPolicy::Never,
    };
    let log = SegmentLog::open(dir.path(), cfg.clone()).expect("open");
    fill(&log, "t", 20, 10); // timestamps 1000..1200
    let pdir = dir.path().join("t/0");
    let n_before = segment_files(&pdir).len();
    assert!(n_before > 3);
    // Nothing is older than 500 ms before 1400.
    assert_eq!(
        log.enforce_retention(EventTime(1400)).expect("retention"),
        0
    );
    // Before 1650 - 500 = 1150: segments whose newest record is < 1150 go.
    let deleted = log.enforce_retention(EventTime(1650)).expect("retention");
    assert!(deleted > 0);
    let start = log.start_offset_blocking("t", 0).expect("start");
    assert!(start > 0 && start <= 150, "start {start}");
    assert!(
        matches!(log.read_blocking("t", 0, 0, 10), Err(LogError::OffsetOutOfRange { earliest, .. }) if earliest == start)
    );
    assert_eq!(
        log.read_blocking("t", 0, start, 1).expect("read")[0].offset,
        start
    );
    // Far in the future everything but the active segment goes.
    log.enforce_retention(EventTime(1_000_000))
        .expect("retention");
    assert_eq!(segment_files(&pdir).len(), 1);
    assert_eq!(log.end_offset_blocking("t", 0).expect("end"), 200);

    // Reopen sees the trimmed partition.
    drop(log);
    let log = SegmentLog::open(dir.path(), cfg).expect("reopen");
    assert_eq!(log.end_offset_blocking("t", 0).expect("end"), 200);
    assert_eq!(
        log.start_offset_blocking("t", 0).expect("start"),
        start_of(&pdir)
    );

    // Size-based retention.
    let dir2 = tempfile::tempdir().expect("tempdir");
    let cfg2 = SegmentLogConfig {
        segment_bytes: 300,
        retention_age: None,
        retention_bytes: Some(1000),
        sync: SyncPolicy::Never,
    };
    let log2 = SegmentLog::open(dir2.path(), cfg2).expect("open");
    fill(&log2, "t", 30, 10);
    assert!(log2.enforce_retention(EventTime(0)).expect("retention") > 0);
    let total: u64 = segment_files(&dir2.path().join("t/0"))
        .iter()
        .map(|p| fs::metadata(p).expect("meta").len())
        .sum();
    assert!(total <= 1000, "total {total}");
}

fn start_of(pdir: &Path) -> u64 {
    let first = segment_files(pdir).into_iter().next().expect("segment");
    first
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("base")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_unique_contiguous_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = SegmentLog::open(dir.path(), config(8 * 1024)).expect("open");
    log.ensure_topic("t", 2).await.expect("topic");
    let mut tasks = Vec::new();
    for task in 0..16 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut positions = Vec::new();
            for round in 0..20 {
                let recs: Vec<Record> = (0..7)
                    .map(|i| {
                        rec(
                            &format!("key{}", (task + i) % 5),
                            &format!("{task}-{round}-{i}"),
                            i as i64,
                        )
                    })
                    .collect();
                positions.extend(log.append("t", recs).await.expect("append"));
            }
            positions
        }));
    }
    let mut per_partition: HashMap<u32, Vec<u64>> = HashMap::new();
    for t in tasks {
        for p in t.await.expect("task") {
            per_partition.entry(p.partition).or_default().push(p.offset);
        }
    }
    let mut total = 0;
    for (p, mut offsets) in per_partition {
        offsets.sort_unstable();
        let n = offsets.len() as u64;
        assert_eq!(offsets, (0..n).collect::<Vec<_>>(), "partition {p}");
        assert_eq!(log.end_offset("t", p).await.expect("end"), n);
        assert_eq!(
            log.read("t", p, 0, usize::MAX).await.expect("read").len() as u64,
            n
        );
        total += n;
    }
    assert_eq!(total, 16 * 20 * 7);
}

#[test]
fn corrupt_payload_in_read_is_an_error_not_a_panic() {
    let (buf, path) = (Bytes::from_static(&[1, 2, 3]), Path::new("x"));
    assert!(walk_records(&buf, 0, 1, path, |_| true).is_err());
    assert!(decompress(&[0u8; 16], path, 0).is_err());
}

/// Prints append and read throughput; run with
/// `cargo test -p tidemark-log --release -- --ignored --nocapture append_speed`.
#[test]
#[ignore]
fn append_speed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = SegmentLog::open(dir.path(), SegmentLogConfig::default()).expect("open");
    log.ensure_topic_blocking("t", 1).expect("topic");
    let value = "x".repeat(120);
    let batches = 500;
    let recs: Vec<Record> = (0..1000)
        .map(|i| {
            rec(
                &format!("user-{i:08}"),
                &format!("{value}{i:010}"),
                1_700_000_000_000 + i,
            )
        })
        .collect();
    let t = std::time::Instant::now();
    for _ in 0..batches {
        log.append_blocking("t", &recs).expect("append");
    }
    let secs = t.elapsed().as_secs_f64();
    println!("append: {:.0} records/s", (batches * 1000) as f64 / secs);
    let t = std::time::Instant::now();
    let mut offset = 0;
    let mut n = 0;
    loop {
        let got = log.read_blocking("t", 0, offset, 10_000).expect("read");
        if got.is_empty() {
            break;
        }
        n += got.len();
        offset += got.len() as u64;
    }
    assert_eq!(n, batches * 1000);
    println!(
        "read: {:.0} records/s",
        n as f64 / t.elapsed().as_secs_f64()
    );
}

#[test]
fn a_read_only_reader_stops_before_a_torn_tail_and_leaves_it_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = SegmentLog::open(dir.path(), config(1 << 20)).expect("open");
    fill(&log, "t", 3, 10);
    let seg = segment_files(&dir.path().join("t/0"))
        .pop()
        .expect("segment");
    let len = fs::metadata(&seg).expect("meta").len();
    // A batch the writer is still writing: a header and half a payload.
    fs::OpenOptions::new()
        .append(true)
        .open(&seg)
        .expect("segment")
        .write_all(&[0x31, 0x4d, 0x44, 0x54, 100, 0, 0, 0])
        .expect("write");
    let reader = SegmentLog::open_read_only(dir.path()).expect("read-only open");
    assert_eq!(reader.end_offset_blocking("t", 0).expect("end"), 30);
    assert_eq!(
        reader.read_blocking("t", 0, 25, 100).expect("read").len(),
        5
    );
    assert_eq!(
        fs::metadata(&seg).expect("meta").len(),
        len + 8,
        "nothing truncated"
    );
    assert!(reader.append_blocking("t", &[rec("k", "v", 1)]).is_err());
    assert!(reader.ensure_topic_blocking("other", 1).is_err());
    assert!(SegmentLog::open_read_only(dir.path().join("missing")).is_err());
}

#[test]
fn a_read_only_reader_follows_later_appends_across_segment_rolls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let writer = SegmentLog::open(dir.path(), config(2_000)).expect("open");
    writer.ensure_topic_blocking("t", 1).expect("topic");
    writer.ensure_topic_blocking("empty", 1).expect("topic");
    fill(&writer, "t", 2, 10);
    let reader = SegmentLog::open_read_only(dir.path()).expect("read-only open");
    assert_eq!(reader.end_offset_blocking("t", 0).expect("end"), 20);
    for b in 0..40 {
        let recs: Vec<Record> = (0..10)
            .map(|i| rec("k", &format!("later-{b}-{i}"), 5_000 + b * 10 + i))
            .collect();
        writer.append_blocking("t", &recs).expect("append");
        writer.append_blocking("empty", &recs[..1]).expect("append");
    }
    assert!(segment_files(&dir.path().join("t/0")).len() > 2, "rolled");
    let mut seen = Vec::new();
    loop {
        let batch = reader
            .read_blocking("t", 0, seen.len() as u64, 64)
            .expect("read");
        if batch.is_empty() {
            break;
        }
        seen.extend(batch);
    }
    assert_eq!(seen.len(), 420);
    assert!(seen.iter().enumerate().all(|(i, r)| r.offset == i as u64));
    assert_eq!(reader.end_offset_blocking("empty", 0).expect("end"), 40);
    assert_eq!(
        reader
            .read_blocking("empty", 0, 0, 100)
            .expect("read")
            .len(),
        40
    );
}

#[tokio::test]
async fn a_read_on_the_calling_thread_sees_what_an_awaited_read_sees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = SegmentLog::open(dir.path(), config(512)).expect("open");
    fill(&log, "t", 4, 25);
    let now = log
        .read_now("t", 0, 10, 30)
        .expect("synchronous")
        .expect("read");
    assert_eq!(now, log.read("t", 0, 10, 30).await.expect("read"));
    assert_eq!(now.len(), 30);
    assert!(matches!(
        log.read_now("missing", 0, 0, 1),
        Some(Err(LogError::UnknownTopic(_)))
    ));
}

fn ring(keys: &[(u32, u8)]) -> Arc<KeyRing> {
    let keys: Vec<(u32, [u8; 32])> = keys.iter().map(|&(id, b)| (id, [b; 32])).collect();
    Arc::new(KeyRing::from_keys(&keys, Path::new("keys")))
}

fn sealed(dir: &Path, segment_bytes: u64, keys: &Arc<KeyRing>) -> Result<SegmentLog, LogError> {
    SegmentLog::open_with_keys(dir, config(segment_bytes), Some(keys.clone()))
}

fn values(log: &SegmentLog) -> Vec<Bytes> {
    log.read_blocking("t", 0, 0, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|r| r.value)
        .collect()
}

#[test]
fn sealed_batches_hold_no_plaintext_and_read_back_after_a_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k1 = ring(&[(1, 1)]);
    {
        let log = sealed(dir.path(), 512, &k1).expect("open");
        fill(&log, "t", 20, 10);
    }
    for f in segment_files(&dir.path().join("t/0")) {
        let bytes = fs::read(&f).expect("segment");
        assert!(!bytes.windows(6).any(|w| w == b"value-"), "{}", f.display());
        assert_eq!(&bytes[..4], &MAGIC_SEALED.to_le_bytes());
    }
    // Rotated: the old batches open with key 1, new ones are sealed with 2,
    // in the same segment as the old.
    let k12 = ring(&[(1, 1), (2, 2)]);
    let log = sealed(dir.path(), 1 << 20, &k12).expect("reopen");
    log.append_blocking("t", &[rec("k", "after-rotation", 5)])
        .expect("append");
    let all = values(&log);
    assert_eq!(all.len(), 201);
    assert_eq!(all[0], Bytes::from("value-0"));
    assert_eq!(all[200], Bytes::from("after-rotation"));
    assert_eq!(
        log.offset_for_time_blocking("t", 0, EventTime(1100))
            .unwrap(),
        100
    );
    drop(log);
    let reader = SegmentLog::open_read_only_with_keys(dir.path(), Some(k12)).expect("reader");
    assert_eq!(values(&reader).len(), 201);
    // A plaintext log stays readable once a key is given.
    let plain = tempfile::tempdir().expect("tempdir");
    fill(
        &SegmentLog::open(plain.path(), config(1 << 20)).expect("open"),
        "t",
        2,
        5,
    );
    let log = sealed(plain.path(), 1 << 20, &k1).expect("reopen");
    log.append_blocking("t", &[rec("k", "sealed", 5)])
        .expect("append");
    assert_eq!(values(&log).len(), 11);
}

#[test]
fn a_missing_or_wrong_key_is_an_error_at_open_naming_file_and_key_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = sealed(dir.path(), 1 << 20, &ring(&[(7, 1)])).expect("open");
        fill(&log, "t", 3, 10);
    }
    let seg = last_segment(&dir.path().join("t/0")).display().to_string();
    let len = fs::metadata(&seg).unwrap().len();
    let cases = [
        SegmentLog::open(dir.path(), config(1 << 20)),
        sealed(dir.path(), 1 << 20, &ring(&[(8, 1)])),
        sealed(dir.path(), 1 << 20, &ring(&[(7, 9)])),
        SegmentLog::open_read_only(dir.path()),
    ];
    for case in cases {
        let err = case.expect_err("refused");
        let msg = err.to_string();
        assert!(matches!(err, LogError::Encryption(_)), "{msg}");
        assert!(msg.contains(&seg) && msg.contains("key id 7"), "{msg}");
        assert!(!err.is_retryable());
    }
    // Nothing was cut while refusing.
    assert_eq!(fs::metadata(&seg).unwrap().len(), len);
    let log = sealed(dir.path(), 1 << 20, &ring(&[(7, 1)])).expect("right key");
    assert_eq!(values(&log).len(), 30);
}

#[test]
fn a_damaged_sealed_batch_is_cut_at_the_tail_and_an_error_in_the_middle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = ring(&[(1, 1)]);
    let (len_after_4, len_after_5) = {
        let log = sealed(dir.path(), 1 << 20, &keys).expect("open");
        fill(&log, "t", 4, 10);
        let seg = last_segment(&dir.path().join("t/0"));
        let a = fs::metadata(&seg).expect("meta").len();
        log.append_blocking("t", &(0..10).map(|i| rec("k", "v", i)).collect::<Vec<_>>())
            .expect("append");
        (a, fs::metadata(&seg).expect("meta").len())
    };
    let path = last_segment(&dir.path().join("t/0"));
    // Torn: the fifth batch cut in half.
    let f = OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open seg");
    f.set_len((len_after_4 + len_after_5) / 2)
        .expect("truncate");
    drop(f);
    let log = sealed(dir.path(), 1 << 20, &keys).expect("reopen");
    assert_eq!(fs::metadata(&path).expect("meta").len(), len_after_4);
    assert_eq!(log.end_offset_blocking("t", 0).expect("end"), 40);
    drop(log);
    // A flipped tag byte of the last batch: cut as a CRC failure.
    let mut bytes = fs::read(&path).expect("read seg");
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    fs::write(&path, &bytes).expect("write seg");
    let log = sealed(dir.path(), 1 << 20, &keys).expect("reopen");
    assert_eq!(log.end_offset_blocking("t", 0).expect("end"), 30);
    drop(log);

    // In a sealed segment (not the tail) a flipped byte is an error naming it.
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let log = sealed(dir.path(), 400, &keys).expect("open");
        fill(&log, "t", 12, 10);
    }
    let first = segment_files(&dir.path().join("t/0")).remove(0);
    let mut bytes = fs::read(&first).expect("read seg");
    let mid = HEADER_LEN + SEAL_PREFIX + 10;
    bytes[mid] ^= 0x40;
    fs::write(&first, &bytes).expect("write seg");
    let log = sealed(dir.path(), 400, &keys).expect("opens: checked on read");
    let err = log
        .read_blocking("t", 0, 0, usize::MAX)
        .expect_err("damaged");
    assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
    assert!(
        err.to_string().contains(&first.display().to_string()),
        "{err}"
    );
}
