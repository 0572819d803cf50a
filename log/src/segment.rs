//! The embedded segment log: topics × partitions as segment files on local disk.
//!
//! Layout: `<dir>/<topic>/meta` holds the partition count, and each partition
//! is a folder `<dir>/<topic>/<partition>/` of segment files named by the
//! offset of their first record, `<base_offset:020>.seg`. A segment is a run
//! of batches; a batch is a fixed header followed by a zstd-compressed payload:
//!
//! ```text
//! header (32 bytes, little endian):
//!   magic u32 | payload_len u32 | crc32(payload) u32 | base_offset u64
//!   | record_count u32 | max_timestamp i64
//! payload = zstd(records), record = timestamp i64 | varint key_len | key
//!                                  | varint value_len | value
//! ```
//!
//! With a key ring ([`SegmentLog::open_with_keys`]) a batch is sealed with
//! AES-256-GCM: magic `TDE1`, and the payload is `key id u32 | nonce [12] |
//! AES-GCM(zstd(records)) | tag [16]`, authenticated together with the
//! batch's base offset and record count. The CRC still covers the stored
//! payload, so a torn or damaged batch is found without the key, and a CRC
//! that holds while authentication fails means a wrong key.
//!
//! Only the last segment of a partition is ever written. On open it is scanned
//! batch by batch and a torn or corrupt tail (from a crash mid-write) is cut
//! off, so appends continue right after the last complete batch.
//!
//! Durability ([`SyncPolicy::Always`]) uses group commit: writers append their
//! batch under the partition's write lock, then queue on the partition's sync
//! lock; whoever gets it issues one `fdatasync` that covers every batch written
//! so far, so concurrent appenders share one sync instead of paying one each.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tidemark_model::crash::{self, Place};
use tidemark_model::keyring::{sealed_key_id, OpenError, SEAL_PREFIX};
use tidemark_model::topic::partition_for_key;
use tidemark_model::{EventTime, KeyRing};

use crate::{Log, LogError, Position, Record, StoredRecord};

const MAGIC: u32 = 0x5444_4d31; // "TDM1"
const MAGIC_SEALED: u32 = 0x5444_4531; // "TDE1"
const HEADER_LEN: usize = 32;
/// A sealed batch's header with the key id and nonce that open its payload.
const SEALED_HEADER_LEN: usize = HEADER_LEN + SEAL_PREFIX;
const AAD_PREFIX: &[u8] = b"tidemark segment batch";
const ZSTD_LEVEL: i32 = 1;
/// Upper bound on a batch's decompressed size; a header claiming more is corrupt.
const MAX_DECOMPRESSED: u64 = 1 << 30;
const SEGMENT_EXT: &str = "seg";
const META_FILE: &str = "meta";

/// When appended bytes are forced to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncPolicy {
    /// An append returns only after its bytes are `fdatasync`ed (shared by
    /// concurrent appenders through group commit).
    #[default]
    Always,
    /// Leave flushing to the operating system; a machine crash may lose the
    /// most recent appends (a process crash does not).
    Never,
}

/// Configuration of a [`SegmentLog`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentLogConfig {
    /// A segment is sealed and a new one started once it reaches this size.
    pub segment_bytes: u64,
    /// Sealed segments whose newest record is older than this are deleted by
    /// [`SegmentLog::enforce_retention`].
    pub retention_age: Option<Duration>,
    /// Per partition: the oldest sealed segments are deleted while the
    /// partition is larger than this.
    pub retention_bytes: Option<u64>,
    pub sync: SyncPolicy,
}

impl Default for SegmentLogConfig {
    fn default() -> Self {
        SegmentLogConfig {
            segment_bytes: 64 * 1024 * 1024,
            retention_age: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_bytes: None,
            sync: SyncPolicy::Always,
        }
    }
}

/// The embedded, file-backed [`Log`]. Cheap to clone; clones share state.
#[derive(Debug, Clone)]
pub struct SegmentLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    config: SegmentLogConfig,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    /// Opened by a reader beside the writing process (replay, archive): never
    /// writes, creates or truncates anything.
    read_only: bool,
    /// Seals new batches with the ring's current key and opens sealed ones
    /// by their key id; `None` writes plaintext and refuses sealed batches.
    keys: Option<Arc<KeyRing>>,
}

/// What a sealed batch needs at open: the ring, and the key ids already shown
/// to open a batch (one trial per id tells a wrong key from a damaged batch).
struct KeyCheck<'a> {
    keys: Option<&'a KeyRing>,
    proven: HashSet<u32>,
}

#[derive(Debug)]
struct Topic {
    partitions: Vec<Arc<Partition>>,
}

#[derive(Debug)]
struct Partition {
    name: String,
    dir: PathBuf,
    state: Mutex<PartState>,
    /// Write sequence (see [`PartState::write_seq`]) known to be on stable storage.
    /// Holding this lock is what makes one sync serve a whole group of writers.
    synced_seq: Mutex<u64>,
    /// The most recently decompressed batch, keyed by its base offset: a
    /// consumer reading a batch in several calls decompresses it once.
    read_cache: Mutex<Option<(u64, Bytes)>>,
}

#[derive(Debug)]
struct PartState {
    /// Sorted by base offset; never empty; the last one is the active segment.
    segments: Vec<Segment>,
    next_offset: u64,
    /// Records below this offset are durable (per the sync policy) and may be
    /// read; consumers never see a record that a crash could still take back.
    visible_offset: u64,
    /// Bytes written by this process, ever; a batch is durable once
    /// `synced_seq` reaches the value this had after writing it.
    write_seq: u64,
    /// Set when a failed write could not be rolled back: the active segment's
    /// tail is unknown, so further appends would corrupt it.
    broken: bool,
    /// Running maximum of timestamps over the whole partition.
    running_max: i64,
}

#[derive(Debug)]
struct Segment {
    base: u64,
    path: PathBuf,
    file: Arc<File>,
    size: u64,
    max_ts: i64,
    batches: Vec<BatchMeta>,
}

#[derive(Debug, Clone, Copy)]
struct BatchMeta {
    base: u64,
    count: u32,
    /// File position of the batch header.
    pos: u64,
    payload_len: u32,
    crc: u32,
    /// Written with [`MAGIC_SEALED`]: the payload opens with a key.
    sealed: bool,
    /// Maximum timestamp up to and including this batch (over the partition),
    /// which makes `offset_for_time` a binary search even when records are out
    /// of time order.
    running_max: i64,
}

impl Segment {
    fn end_offset(&self) -> u64 {
        self.batches
            .last()
            .map_or(self.base, |b| b.base + u64::from(b.count))
    }
}

struct Header {
    magic: u32,
    payload_len: u32,
    crc: u32,
    base: u64,
    count: u32,
    max_ts: i64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&self.magic.to_le_bytes());
        h[4..8].copy_from_slice(&self.payload_len.to_le_bytes());
        h[8..12].copy_from_slice(&self.crc.to_le_bytes());
        h[12..20].copy_from_slice(&self.base.to_le_bytes());
        h[20..24].copy_from_slice(&self.count.to_le_bytes());
        h[24..32].copy_from_slice(&self.max_ts.to_le_bytes());
        h
    }

    fn decode(h: &[u8; HEADER_LEN]) -> Header {
        let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let mut b8 = [0u8; 8];
        b8.copy_from_slice(&h[12..20]);
        let base = u64::from_le_bytes(b8);
        b8.copy_from_slice(&h[24..32]);
        let max_ts = i64::from_le_bytes(b8);
        Header {
            magic: u32_at(0),
            payload_len: u32_at(4),
            crc: u32_at(8),
            base,
            count: u32_at(20),
            max_ts,
        }
    }
}

thread_local! {
    static ENCODER: RefCell<Option<(Vec<u8>, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock leaves no half-updated invariant we rely on
    // (the index is only changed after I/O succeeded), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn corrupt(path: &Path, detail: impl Into<String>) -> LogError {
    LogError::Corrupt {
        path: path.display().to_string(),
        detail: detail.into(),
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// Encodes and compresses `records` into one framed batch (header base offset
/// left at 0; it is filled in under the write lock). Returns the frame.
fn encode_batch(records: &[&Record], sealed: bool) -> Result<(Vec<u8>, i64), LogError> {
    let max_ts = records
        .iter()
        .map(|r| r.timestamp.0)
        .max()
        .unwrap_or(i64::MIN);
    ENCODER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some((Vec::new(), zstd::bulk::Compressor::new(ZSTD_LEVEL)?));
        }
        let Some((raw, compressor)) = slot.as_mut() else {
            return Err(LogError::Unavailable("zstd encoder missing".into()));
        };
        raw.clear();
        for r in records {
            raw.extend_from_slice(&r.timestamp.0.to_le_bytes());
            put_varint(raw, r.key.len() as u64);
            raw.extend_from_slice(&r.key);
            put_varint(raw, r.value.len() as u64);
            raw.extend_from_slice(&r.value);
        }
        let head = if sealed {
            SEALED_HEADER_LEN
        } else {
            HEADER_LEN
        };
        let mut frame = Vec::with_capacity(
            head + zstd::zstd_safe::compress_bound(raw.len()) + tidemark_model::keyring::TAG_LEN,
        );
        frame.resize(head, 0);
        let payload = compressor.compress(raw)?;
        frame.extend_from_slice(&payload);
        Ok((frame, max_ts))
    })
}

/// One record inside a decompressed payload: its offset, timestamp and the
/// byte ranges of its key and value.
struct RecordSpan {
    offset: u64,
    timestamp: EventTime,
    key: std::ops::Range<usize>,
    value: std::ops::Range<usize>,
}

/// Walks the records of a decompressed payload; `visit` returns `false` to stop.
fn walk_records(
    buf: &[u8],
    base: u64,
    count: u32,
    path: &Path,
    mut visit: impl FnMut(RecordSpan) -> bool,
) -> Result<(), LogError> {
    let bad = || corrupt(path, format!("malformed records in batch at offset {base}"));
    let mut pos = 0usize;
    for i in 0..u64::from(count) {
        let ts_bytes = buf.get(pos..pos + 8).ok_or_else(bad)?;
        let mut b8 = [0u8; 8];
        b8.copy_from_slice(ts_bytes);
        pos += 8;
        let klen = get_varint(buf, &mut pos).ok_or_else(bad)? as usize;
        let kend = pos
            .checked_add(klen)
            .filter(|&e| e <= buf.len())
            .ok_or_else(bad)?;
        let key = pos..kend;
        pos = kend;
        let vlen = get_varint(buf, &mut pos).ok_or_else(bad)? as usize;
        let vend = pos
            .checked_add(vlen)
            .filter(|&e| e <= buf.len())
            .ok_or_else(bad)?;
        let value = pos..vend;
        pos = vend;
        let more = visit(RecordSpan {
            offset: base + i,
            timestamp: EventTime(i64::from_le_bytes(b8)),
            key,
            value,
        });
        if !more {
            return Ok(());
        }
    }
    if pos != buf.len() {
        return Err(bad());
    }
    Ok(())
}

fn decompress(payload: &[u8], path: &Path, base: u64) -> Result<Vec<u8>, LogError> {
    let size = match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) if n <= MAX_DECOMPRESSED => n as usize,
        _ => {
            return Err(corrupt(
                path,
                format!("bad zstd frame in batch at offset {base}"),
            ))
        }
    };
    zstd::bulk::decompress(payload, size).map_err(|e| {
        corrupt(
            path,
            format!("batch at offset {base} does not decompress: {e}"),
        )
    })
}

fn batch_aad(base: u64, count: u32) -> [u8; AAD_PREFIX.len() + 12] {
    let mut aad = [0u8; AAD_PREFIX.len() + 12];
    aad[..AAD_PREFIX.len()].copy_from_slice(AAD_PREFIX);
    aad[AAD_PREFIX.len()..AAD_PREFIX.len() + 8].copy_from_slice(&base.to_le_bytes());
    aad[AAD_PREFIX.len() + 8..].copy_from_slice(&count.to_le_bytes());
    aad
}

fn no_key(path: &Path, id: u32) -> LogError {
    LogError::Encryption(format!(
        "{} holds batches encrypted with key id {id}, and no encryption key file was given \
         (--encryption-key-file)",
        path.display()
    ))
}

/// The plaintext payload of a batch read from disk (CRC already checked).
fn open_payload<'a>(
    payload: &'a mut [u8],
    meta: &BatchMeta,
    keys: Option<&KeyRing>,
    path: &Path,
) -> Result<&'a [u8], LogError> {
    if !meta.sealed {
        return Ok(payload);
    }
    let id = sealed_key_id(payload).unwrap_or_default();
    let Some(keys) = keys else {
        return Err(no_key(path, id));
    };
    keys.open_in_place(payload, &batch_aad(meta.base, meta.count))
        .map_err(|e| match e {
            OpenError::UnknownKey(id) => LogError::Encryption(format!(
                "{} holds batches encrypted with key id {id}, which the key file {} does not hold",
                path.display(),
                keys.source().display()
            )),
            e => corrupt(path, format!("batch at offset {}: {e}", meta.base)),
        })
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.{SEGMENT_EXT}"))
}

fn open_segment_file(path: &Path) -> Result<File, LogError> {
    Ok(OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?)
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

fn validate_topic_name(topic: &str) -> Result<(), LogError> {
    let ok = !topic.is_empty()
        && topic.len() <= 200
        && !topic.starts_with('.')
        && topic
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(LogError::Config(format!("invalid topic name `{topic}`")))
    }
}

struct Scan {
    batches: Vec<BatchMeta>,
    valid_len: u64,
    max_ts: i64,
    problem: Option<String>,
}

/// Reads batch headers from `file` starting at 0. With `verify`, payloads are
/// read and checked too, and the first bad batch ends the scan instead of
/// failing it. Returns the batches and the length of the valid prefix.
fn scan_segment(
    file: &File,
    path: &Path,
    base: u64,
    verify: bool,
    running_max: &mut i64,
    check: &mut KeyCheck<'_>,
) -> Result<Scan, LogError> {
    let len = file.metadata()?.len();
    let mut seg_max = i64::MIN;
    let mut pos = 0u64;
    let mut expected = base;
    let mut batches = Vec::new();
    let mut payload = Vec::new();
    let problem = loop {
        if pos == len {
            break None;
        }
        if len - pos < HEADER_LEN as u64 {
            break Some(format!("short header at byte {pos}"));
        }
        // A sealed batch's key id comes in the same read as its header.
        let mut hb = [0u8; SEALED_HEADER_LEN];
        let got = (len - pos).min(SEALED_HEADER_LEN as u64) as usize;
        file.read_exact_at(&mut hb[..got], pos)?;
        let h = Header::decode(hb[..HEADER_LEN].try_into().expect("header length"));
        let sealed = h.magic == MAGIC_SEALED;
        if h.magic != MAGIC && !sealed {
            break Some(format!("bad magic at byte {pos}"));
        }
        if h.base != expected || h.count == 0 {
            break Some(format!(
                "batch at byte {pos} has base offset {} and {} records, expected base {expected}",
                h.base, h.count
            ));
        }
        let end = pos + HEADER_LEN as u64 + u64::from(h.payload_len);
        if end > len {
            break Some(format!("batch at byte {pos} runs past the end of the file"));
        }
        if verify {
            payload.resize(h.payload_len as usize, 0);
            file.read_exact_at(&mut payload, pos + HEADER_LEN as u64)?;
            if crc32fast::hash(&payload) != h.crc {
                break Some(format!("CRC mismatch in batch at byte {pos}"));
            }
        }
        if sealed && h.payload_len as usize >= SEAL_PREFIX {
            let id =
                u32::from_le_bytes(hb[HEADER_LEN..HEADER_LEN + 4].try_into().expect("4 bytes"));
            prove_key(file, path, pos, &h, id, check)?;
        }
        *running_max = (*running_max).max(h.max_ts);
        seg_max = seg_max.max(h.max_ts);
        batches.push(BatchMeta {
            base: h.base,
            count: h.count,
            pos,
            payload_len: h.payload_len,
            crc: h.crc,
            sealed,
            running_max: *running_max,
        });
        expected = h.base + u64::from(h.count);
        pos = end;
    };
    match problem {
        Some(p) if !verify => Err(corrupt(path, p)),
        problem => Ok(Scan {
            batches,
            valid_len: pos,
            max_ts: seg_max,
            problem,
        }),
    }
}

/// Refuses to open a log whose sealed batches no key of the ring opens:
/// an id the ring lacks, or (shown by one batch per id whose CRC holds but
/// which fails authentication) a wrong key under a known id.
fn prove_key(
    file: &File,
    path: &Path,
    pos: u64,
    h: &Header,
    id: u32,
    check: &mut KeyCheck<'_>,
) -> Result<(), LogError> {
    let Some(keys) = check.keys else {
        return Err(no_key(path, id));
    };
    if !keys.has(id) {
        return Err(LogError::Encryption(format!(
            "{} holds batches encrypted with key id {id}, which the key file {} does not hold",
            path.display(),
            keys.source().display()
        )));
    }
    if check.proven.contains(&id) {
        return Ok(());
    }
    let mut payload = vec![0u8; h.payload_len as usize];
    file.read_exact_at(&mut payload, pos + HEADER_LEN as u64)?;
    if crc32fast::hash(&payload) != h.crc {
        // Damaged, not a key question: reading it reports it, or the tail is cut.
        return Ok(());
    }
    match keys.open_in_place(&mut payload, &batch_aad(h.base, h.count)) {
        Ok(_) => {
            check.proven.insert(id);
            Ok(())
        }
        Err(_) => Err(LogError::Encryption(format!(
            "key id {id} of the key file {} does not decrypt {} (a wrong key for that id)",
            keys.source().display(),
            path.display()
        ))),
    }
}

impl Partition {
    /// Loads a partition folder, creating it (with an empty first segment) if needed.
    fn load(
        dir: PathBuf,
        name: String,
        sync: SyncPolicy,
        read_only: bool,
        check: &mut KeyCheck<'_>,
    ) -> Result<Partition, LogError> {
        if !read_only {
            fs::create_dir_all(&dir)?;
        }
        let mut bases = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some(SEGMENT_EXT) {
                continue;
            }
            let base = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| corrupt(&path, "segment file name is not an offset"))?;
            bases.push(base);
        }
        bases.sort_unstable();
        if bases.is_empty() {
            bases.push(0);
        }
        let mut segments = Vec::with_capacity(bases.len());
        let mut running_max = i64::MIN;
        let last = bases.len() - 1;
        for (i, &base) in bases.iter().enumerate() {
            let path = segment_path(&dir, base);
            let file = if read_only {
                match File::open(&path) {
                    Ok(f) => f,
                    // A partition folder the writer has not created yet is empty.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && bases.len() == 1 => {
                        segments.push(Segment {
                            base,
                            path,
                            // Never read: the segment has no batches.
                            file: Arc::new(File::open(&dir)?),
                            size: 0,
                            max_ts: i64::MIN,
                            batches: Vec::new(),
                        });
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                open_segment_file(&path)?
            };
            if let Some(prev) = segments.last() {
                let prev: &Segment = prev;
                if prev.end_offset() != base {
                    return Err(corrupt(
                        &path,
                        format!(
                            "segment starts at {base} but the previous one ends at {}",
                            prev.end_offset()
                        ),
                    ));
                }
            }
            let Scan {
                batches,
                valid_len,
                max_ts,
                problem,
            } = scan_segment(&file, &path, base, i == last, &mut running_max, check)?;
            if let (Some(problem), true) = (&problem, read_only) {
                // The writer may be in the middle of this batch: stop before it.
                tracing::debug!(path = %path.display(), problem = %problem, "Reading up to an incomplete batch");
            } else if let Some(problem) = problem {
                tracing::warn!(
                    path = %path.display(),
                    problem = %problem,
                    kept_bytes = valid_len,
                    "Truncating torn tail of log segment"
                );
                file.set_len(valid_len)?;
                file.sync_all()?;
            }
            segments.push(Segment {
                base,
                path,
                file: Arc::new(file),
                size: valid_len,
                max_ts,
                batches,
            });
        }
        if sync == SyncPolicy::Always && !read_only {
            sync_dir(&dir)?;
        }
        let next_offset = segments.last().map_or(0, Segment::end_offset);
        Ok(Partition {
            name,
            dir,
            state: Mutex::new(PartState {
                segments,
                next_offset,
                visible_offset: next_offset,
                write_seq: 0,
                broken: false,
                running_max,
            }),
            synced_seq: Mutex::new(0),
            read_cache: Mutex::new(None),
        })
    }

    fn append(
        &self,
        records: &[&Record],
        config: &SegmentLogConfig,
        keys: Option<&KeyRing>,
    ) -> Result<(u64, u64), LogError> {
        let (mut frame, max_ts) = encode_batch(records, keys.is_some())?;
        let count = u32::try_from(records.len())
            .map_err(|_| LogError::Config("too many records in one append".into()))?;
        let tag = keys.map_or(0, |_| tidemark_model::keyring::TAG_LEN);
        let payload_len = u32::try_from(frame.len() + tag - HEADER_LEN)
            .map_err(|_| LogError::Config("batch larger than 4 GiB".into()))?;
        let mut crc = if keys.is_none() {
            crc32fast::hash(&frame[HEADER_LEN..])
        } else {
            0
        };

        let mut st = lock(&self.state);
        if st.broken {
            return Err(LogError::Unavailable(format!(
                "partition {} failed an earlier write",
                self.name
            )));
        }
        let needs_roll = st
            .segments
            .last()
            .is_some_and(|s| s.size >= config.segment_bytes && !s.batches.is_empty());
        if needs_roll {
            self.roll(&mut st, config)?;
        }
        let base = st.next_offset;
        if let Some(keys) = keys {
            // The base offset is known only here, and the seal binds it.
            keys.seal_tail(&mut frame, HEADER_LEN, &batch_aad(base, count));
            crc = crc32fast::hash(&frame[HEADER_LEN..]);
        }
        let header = Header {
            magic: if keys.is_some() { MAGIC_SEALED } else { MAGIC },
            payload_len,
            crc,
            base,
            count,
            max_ts,
        };
        frame[..HEADER_LEN].copy_from_slice(&header.encode());
        let running_max = st.running_max.max(max_ts);
        let seg = st
            .segments
            .last_mut()
            .ok_or_else(|| LogError::Unavailable("partition has no segment".into()))?;
        let pos = seg.size;
        // Armed for the kill matrix, the frame goes out in two halves with
        // the crash point between them: a torn tail on disk.
        let torn_at = if crash::is_armed(Place::Append) {
            frame.len() / 2
        } else {
            0
        };
        let written = (&*seg.file).write_all(&frame[..torn_at]).and_then(|()| {
            crash::point(Place::Append);
            (&*seg.file).write_all(&frame[torn_at..])
        });
        if let Err(e) = written {
            // Cut a partial write off so the next batch does not land after garbage.
            if seg.file.set_len(pos).is_err() {
                st.broken = true;
            }
            return Err(e.into());
        }
        seg.size += frame.len() as u64;
        seg.max_ts = seg.max_ts.max(max_ts);
        seg.batches.push(BatchMeta {
            base,
            count,
            pos,
            payload_len,
            crc,
            sealed: keys.is_some(),
            running_max,
        });
        st.running_max = running_max;
        st.next_offset = base + u64::from(count);
        st.write_seq += frame.len() as u64;
        if config.sync == SyncPolicy::Never {
            st.visible_offset = st.next_offset;
        }
        Ok((base, st.write_seq))
    }

    /// Seals the active segment and starts a new one at the next offset.
    fn roll(&self, st: &mut PartState, config: &SegmentLogConfig) -> Result<(), LogError> {
        if config.sync == SyncPolicy::Always {
            // Writers that wrote into the old segment may still be waiting for a
            // sync, which from now on only touches the new file.
            if let Some(old) = st.segments.last() {
                old.file.sync_data()?;
            }
            st.visible_offset = st.next_offset;
        }
        let path = segment_path(&self.dir, st.next_offset);
        let file = open_segment_file(&path)?;
        if config.sync == SyncPolicy::Always {
            sync_dir(&self.dir)?;
        }
        st.segments.push(Segment {
            base: st.next_offset,
            path,
            file: Arc::new(file),
            size: 0,
            max_ts: i64::MIN,
            batches: Vec::new(),
        });
        Ok(())
    }

    /// For a read-only reader: takes in the whole batches the writer appended
    /// since the last look, and the segments it rolled over to.
    fn refresh(&self) -> Result<(), LogError> {
        let mut st = lock(&self.state);
        loop {
            let mut running_max = st.running_max;
            let Some(seg) = st.segments.last_mut() else {
                return Ok(());
            };
            if seg.batches.is_empty() && seg.size == 0 {
                // Opened before the writer created the file (a placeholder).
                match File::open(&seg.path) {
                    Ok(f) => seg.file = Arc::new(f),
                    Err(_) => return Ok(()),
                }
            }
            let len = seg.file.metadata()?.len();
            let mut pos = seg.size;
            let mut expected = seg.end_offset();
            let mut payload = Vec::new();
            while len.saturating_sub(pos) >= HEADER_LEN as u64 {
                let mut hb = [0u8; HEADER_LEN];
                seg.file.read_exact_at(&mut hb, pos)?;
                let h = Header::decode(&hb);
                let end = pos + HEADER_LEN as u64 + u64::from(h.payload_len);
                let sealed = h.magic == MAGIC_SEALED;
                if (h.magic != MAGIC && !sealed) || h.base != expected || h.count == 0 || end > len
                {
                    break;
                }
                payload.resize(h.payload_len as usize, 0);
                seg.file
                    .read_exact_at(&mut payload, pos + HEADER_LEN as u64)?;
                if crc32fast::hash(&payload) != h.crc {
                    // Still being written.
                    break;
                }
                running_max = running_max.max(h.max_ts);
                seg.max_ts = seg.max_ts.max(h.max_ts);
                seg.batches.push(BatchMeta {
                    base: h.base,
                    count: h.count,
                    pos,
                    payload_len: h.payload_len,
                    crc: h.crc,
                    sealed,
                    running_max,
                });
                expected = h.base + u64::from(h.count);
                pos = end;
            }
            seg.size = pos;
            let rolled = !seg.batches.is_empty() && pos == len;
            st.running_max = running_max;
            st.next_offset = expected;
            st.visible_offset = expected;
            let next = segment_path(&self.dir, expected);
            if !rolled {
                return Ok(());
            }
            let Ok(file) = File::open(&next) else {
                return Ok(());
            };
            st.segments.push(Segment {
                base: expected,
                path: next,
                file: Arc::new(file),
                size: 0,
                max_ts: i64::MIN,
                batches: Vec::new(),
            });
        }
    }

    /// Returns once every byte up to write sequence `seq` is on stable storage.
    fn wait_durable(&self, seq: u64) -> Result<(), LogError> {
        let mut synced = lock(&self.synced_seq);
        if *synced >= seq {
            return Ok(());
        }
        let (target, target_offset, file) = {
            let st = lock(&self.state);
            let file = st.segments.last().map(|s| Arc::clone(&s.file));
            (st.write_seq, st.next_offset, file)
        };
        if let Some(file) = file {
            file.sync_data()?;
        }
        *synced = target;
        let mut st = lock(&self.state);
        st.visible_offset = st.visible_offset.max(target_offset);
        Ok(())
    }

    fn bounds(&self) -> (u64, u64) {
        let st = lock(&self.state);
        (st.segments.first().map_or(0, |s| s.base), st.next_offset)
    }
}

/// A batch to read, copied out of the index so no lock is held during I/O.
struct BatchRef {
    file: Arc<File>,
    path: PathBuf,
    meta: BatchMeta,
}

impl SegmentLog {
    /// Opens (creating if needed) the log under `dir`, reloading every topic
    /// and partition found there and truncating torn tails.
    pub fn open(dir: impl AsRef<Path>, config: SegmentLogConfig) -> Result<SegmentLog, LogError> {
        Self::open_with(dir.as_ref(), config, false, None)
    }

    /// [`SegmentLog::open`] sealing new batches with the current key of
    /// `keys` and opening sealed ones by their key id. A sealed batch whose id
    /// the ring lacks, or (one trial per id) whose key is wrong, fails the open.
    pub fn open_with_keys(
        dir: impl AsRef<Path>,
        config: SegmentLogConfig,
        keys: Option<Arc<KeyRing>>,
    ) -> Result<SegmentLog, LogError> {
        Self::open_with(dir.as_ref(), config, false, keys)
    }

    /// Opens an existing log for reading beside the process that writes it
    /// (replay, archive): nothing is created, written or truncated, and a
    /// batch the writer is still writing ends the readable range. Appends
    /// made later show up when a read reaches the end or the end offset is
    /// asked for; topics created later do not.
    pub fn open_read_only(dir: impl AsRef<Path>) -> Result<SegmentLog, LogError> {
        Self::open_read_only_with_keys(dir, None)
    }

    /// [`SegmentLog::open_read_only`] of a log whose batches may be sealed
    /// with keys of `keys`.
    pub fn open_read_only_with_keys(
        dir: impl AsRef<Path>,
        keys: Option<Arc<KeyRing>>,
    ) -> Result<SegmentLog, LogError> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(LogError::Config(format!("no log in {}", dir.display())));
        }
        Self::open_with(dir, SegmentLogConfig::default(), true, keys)
    }

    fn open_with(
        dir: &Path,
        config: SegmentLogConfig,
        read_only: bool,
        keys: Option<Arc<KeyRing>>,
    ) -> Result<SegmentLog, LogError> {
        if config.segment_bytes == 0 {
            return Err(LogError::Config("segment_bytes must be positive".into()));
        }
        let dir = dir.to_path_buf();
        if !read_only {
            fs::create_dir_all(&dir)?;
        }
        let mut topics = HashMap::new();
        let mut check = KeyCheck {
            keys: keys.as_deref(),
            proven: HashSet::new(),
        };
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let tdir = entry.path();
            let meta = tdir.join(META_FILE);
            if !entry.file_type()?.is_dir() || !meta.exists() {
                continue;
            }
            let text = fs::read_to_string(&meta)?;
            let partitions = text
                .trim()
                .strip_prefix("partitions=")
                .and_then(|n| n.parse::<u32>().ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| corrupt(&meta, "unreadable partition count"))?;
            let topic =
                Self::load_topic(&tdir, &name, partitions, config.sync, read_only, &mut check)?;
            topics.insert(name, Arc::new(topic));
        }
        Ok(SegmentLog {
            inner: Arc::new(Inner {
                dir,
                config,
                topics: RwLock::new(topics),
                read_only,
                keys,
            }),
        })
    }

    fn load_topic(
        tdir: &Path,
        name: &str,
        partitions: u32,
        sync: SyncPolicy,
        read_only: bool,
        check: &mut KeyCheck<'_>,
    ) -> Result<Topic, LogError> {
        let partitions = (0..partitions)
            .map(|p| {
                Partition::load(
                    tdir.join(p.to_string()),
                    format!("{name}/{p}"),
                    sync,
                    read_only,
                    check,
                )
                .map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Topic { partitions })
    }

    fn writable(&self) -> Result<(), LogError> {
        if self.inner.read_only {
            return Err(LogError::Config(format!(
                "the log in {} is open read-only",
                self.inner.dir.display()
            )));
        }
        Ok(())
    }

    /// The directory the log lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn topic(&self, topic: &str) -> Result<Arc<Topic>, LogError> {
        let topics = self.inner.topics.read().unwrap_or_else(|e| e.into_inner());
        topics
            .get(topic)
            .cloned()
            .ok_or_else(|| LogError::UnknownTopic(topic.to_string()))
    }

    fn partition(&self, topic: &str, partition: u32) -> Result<Arc<Partition>, LogError> {
        let t = self.topic(topic)?;
        t.partitions
            .get(partition as usize)
            .cloned()
            .ok_or_else(|| LogError::UnknownPartition {
                topic: topic.to_string(),
                partition,
            })
    }

    /// Blocking form of [`Log::ensure_topic`].
    pub fn ensure_topic_blocking(&self, topic: &str, partitions: u32) -> Result<(), LogError> {
        validate_topic_name(topic)?;
        if partitions == 0 {
            return Err(LogError::Config(format!(
                "topic `{topic}` needs at least one partition"
            )));
        }
        let mut topics = self.inner.topics.write().unwrap_or_else(|e| e.into_inner());
        if topics.contains_key(topic) {
            return Ok(());
        }
        self.writable()?;
        let tdir = self.inner.dir.join(topic);
        fs::create_dir_all(&tdir)?;
        let mut check = KeyCheck {
            keys: self.inner.keys.as_deref(),
            proven: HashSet::new(),
        };
        let loaded = Self::load_topic(
            &tdir,
            topic,
            partitions,
            self.inner.config.sync,
            false,
            &mut check,
        )?;
        // The meta file goes last and atomically: a topic folder without it is
        // ignored on open, so a crash here leaves no half-made topic.
        let tmp = tdir.join("meta.tmp");
        {
            let mut f = File::create(&tmp)?;
            writeln!(f, "partitions={partitions}")?;
            f.sync_all()?;
        }
        fs::rename(&tmp, tdir.join(META_FILE))?;
        sync_dir(&tdir)?;
        sync_dir(&self.inner.dir)?;
        topics.insert(topic.to_string(), Arc::new(loaded));
        Ok(())
    }

    /// Blocking form of [`Log::append`]: appends `records` (one batch per
    /// partition touched) and returns each record's position in input order,
    /// after the bytes are durable under [`SyncPolicy::Always`].
    pub fn append_blocking(
        &self,
        topic: &str,
        records: &[Record],
    ) -> Result<Vec<Position>, LogError> {
        self.writable()?;
        let t = self.topic(topic)?;
        let n = t.partitions.len() as u32;
        let mut groups: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, r) in records.iter().enumerate() {
            groups
                .entry(partition_for_key(&r.key, n))
                .or_default()
                .push(i);
        }
        let mut positions = vec![
            Position {
                partition: 0,
                offset: 0
            };
            records.len()
        ];
        let mut pending = Vec::with_capacity(groups.len());
        for (p, idx) in &groups {
            let part = t
                .partitions
                .get(*p as usize)
                .ok_or_else(|| LogError::UnknownPartition {
                    topic: topic.to_string(),
                    partition: *p,
                })?;
            let batch: Vec<&Record> = idx.iter().map(|&i| &records[i]).collect();
            let (base, seq) =
                part.append(&batch, &self.inner.config, self.inner.keys.as_deref())?;
            for (k, &i) in idx.iter().enumerate() {
                positions[i] = Position {
                    partition: *p,
                    offset: base + k as u64,
                };
            }
            pending.push((Arc::clone(part), seq));
        }
        if self.inner.config.sync == SyncPolicy::Always {
            for (part, seq) in pending {
                part.wait_durable(seq)?;
            }
        }
        Ok(positions)
    }

    /// Blocking form of [`Log::read`]. Only durable records are returned:
    /// under [`SyncPolicy::Always`] a record written but not yet synced is
    /// invisible until its append is acknowledged.
    pub fn read_blocking(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        let mut out = Vec::new();
        self.scan(topic, partition, offset, max_records, |buf, span| {
            out.push(StoredRecord {
                offset: span.offset,
                key: buf.slice(span.key),
                value: buf.slice(span.value),
                timestamp: span.timestamp,
            });
        })?;
        Ok(out)
    }

    /// Like [`SegmentLog::read_blocking`], handing each record's offset and
    /// value to `visit` in place instead of collecting owned records: the
    /// processor's bounded runs read this way. Returns how many were visited.
    pub fn visit_blocking(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
        mut visit: impl FnMut(u64, &[u8]),
    ) -> Result<usize, LogError> {
        self.scan(topic, partition, offset, max_records, |buf, span| {
            visit(span.offset, &buf[span.value]);
        })
    }

    /// Hands up to `max_records` visible records from `offset` to `each`,
    /// with the batch buffer they lie in; returns how many.
    fn scan(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
        mut each: impl FnMut(&Bytes, RecordSpan),
    ) -> Result<usize, LogError> {
        let (part, refs) = self.batches_from(topic, partition, offset, max_records)?;
        let mut taken = 0usize;
        for r in refs {
            let buf = self.load_batch(&part, &r)?;
            walk_records(&buf, r.meta.base, r.meta.count, &r.path, |span| {
                if span.offset >= offset {
                    each(&buf, span);
                    taken += 1;
                }
                taken < max_records
            })?;
            if taken >= max_records {
                break;
            }
        }
        Ok(taken)
    }

    /// The visible batches holding up to `max_records` records from `offset`.
    fn batches_from(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
    ) -> Result<(Arc<Partition>, Vec<BatchRef>), LogError> {
        let part = self.partition(topic, partition)?;
        if self.inner.read_only && offset >= lock(&part.state).visible_offset {
            part.refresh()?;
        }
        let refs = {
            let st = lock(&part.state);
            let start = st.segments.first().map_or(0, |s| s.base);
            if offset < start {
                return Err(LogError::OffsetOutOfRange {
                    topic: topic.to_string(),
                    partition,
                    offset,
                    earliest: start,
                });
            }
            let visible = st.visible_offset;
            let mut refs = Vec::new();
            if offset >= visible || max_records == 0 {
                drop(st);
                return Ok((part, refs));
            }
            let si = st
                .segments
                .partition_point(|s| s.base <= offset)
                .saturating_sub(1);
            let mut covered = 0usize;
            'outer: for seg in &st.segments[si..] {
                let bi = seg
                    .batches
                    .partition_point(|b| b.base <= offset)
                    .saturating_sub(1);
                for b in &seg.batches[bi..] {
                    if b.base >= visible {
                        break 'outer;
                    }
                    let first = b.base.max(offset);
                    covered += (b.base + u64::from(b.count) - first) as usize;
                    refs.push(BatchRef {
                        file: Arc::clone(&seg.file),
                        path: seg.path.clone(),
                        meta: *b,
                    });
                    if covered >= max_records {
                        break 'outer;
                    }
                }
            }
            refs
        };
        Ok((part, refs))
    }

    /// The decompressed payload of a batch, from the per-partition cache if it
    /// is the one last read.
    fn load_batch(&self, part: &Partition, r: &BatchRef) -> Result<Bytes, LogError> {
        if let Some((base, buf)) = lock(&part.read_cache).as_ref() {
            if *base == r.meta.base {
                return Ok(buf.clone());
            }
        }
        let mut payload = vec![0u8; r.meta.payload_len as usize];
        r.file
            .read_exact_at(&mut payload, r.meta.pos + HEADER_LEN as u64)?;
        if crc32fast::hash(&payload) != r.meta.crc {
            return Err(corrupt(
                &r.path,
                format!("CRC mismatch in batch at offset {}", r.meta.base),
            ));
        }
        let plain = open_payload(&mut payload, &r.meta, self.inner.keys.as_deref(), &r.path)?;
        let buf = Bytes::from(decompress(plain, &r.path, r.meta.base)?);
        *lock(&part.read_cache) = Some((r.meta.base, buf.clone()));
        Ok(buf)
    }

    /// Blocking form of [`Log::offset_for_time`]. Records need not be in time
    /// order, so this returns the first offset at which the partition's running
    /// maximum timestamp reaches `time` (for in-order data: the first record at
    /// or after `time`); the end offset if none does.
    pub fn offset_for_time_blocking(
        &self,
        topic: &str,
        partition: u32,
        time: EventTime,
    ) -> Result<u64, LogError> {
        let part = self.partition(topic, partition)?;
        let r = {
            let st = lock(&part.state);
            let t = time.0;
            let si = st
                .segments
                .partition_point(|s| s.batches.last().is_none_or(|b| b.running_max < t));
            let Some(seg) = st.segments.get(si) else {
                return Ok(st.next_offset);
            };
            let bi = seg.batches.partition_point(|b| b.running_max < t);
            let Some(meta) = seg.batches.get(bi) else {
                return Ok(st.next_offset);
            };
            BatchRef {
                file: Arc::clone(&seg.file),
                path: seg.path.clone(),
                meta: *meta,
            }
        };
        let buf = self.load_batch(&part, &r)?;
        // Earlier batches all stay below `time`, so the first record reaching it is the answer.
        let mut found = None;
        walk_records(&buf, r.meta.base, r.meta.count, &r.path, |span| {
            if span.timestamp >= time {
                found = Some(span.offset);
            }
            found.is_none()
        })?;
        Ok(found.unwrap_or(r.meta.base + u64::from(r.meta.count)))
    }

    /// The earliest retained offset of a partition.
    pub fn start_offset_blocking(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        Ok(self.partition(topic, partition)?.bounds().0)
    }

    /// The offset the next record appended to a partition will get.
    pub fn end_offset_blocking(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        let part = self.partition(topic, partition)?;
        if self.inner.read_only {
            part.refresh()?;
        }
        Ok(part.bounds().1)
    }

    /// Partition count of `topic`.
    pub fn partition_count_blocking(&self, topic: &str) -> Result<u32, LogError> {
        Ok(self.topic(topic)?.partitions.len() as u32)
    }

    /// Deletes, oldest first, whole sealed segments whose newest record is older
    /// than `retention_age` before `now`, or while a partition exceeds
    /// `retention_bytes`. The active segment is never deleted, and only a
    /// prefix of a partition's segments goes, so offsets stay contiguous.
    /// Returns the number of segments deleted.
    pub fn enforce_retention(&self, now: EventTime) -> Result<usize, LogError> {
        self.writable()?;
        let cfg = &self.inner.config;
        let cutoff = cfg.retention_age.map(|age| {
            now.0
                .saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
        });
        let topics: Vec<Arc<Topic>> = self
            .inner
            .topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        let mut deleted = 0;
        for t in topics {
            for part in &t.partitions {
                let mut st = lock(&part.state);
                let mut total: u64 = st.segments.iter().map(|s| s.size).sum();
                while st.segments.len() > 1 {
                    let seg = &st.segments[0];
                    let too_old = cutoff.is_some_and(|c| seg.max_ts < c);
                    let too_big = cfg.retention_bytes.is_some_and(|b| total > b);
                    if !too_old && !too_big {
                        break;
                    }
                    fs::remove_file(&seg.path)?;
                    total -= seg.size;
                    st.segments.remove(0);
                    deleted += 1;
                }
            }
        }
        Ok(deleted)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, LogError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LogError::Unavailable(format!("log worker failed: {e}")))?
}

#[async_trait]
impl Log for SegmentLog {
    async fn ensure_topic(&self, topic: &str, partitions: u32) -> Result<(), LogError> {
        let (log, topic) = (self.clone(), topic.to_string());
        blocking(move || log.ensure_topic_blocking(&topic, partitions)).await
    }

    async fn partition_count(&self, topic: &str) -> Result<u32, LogError> {
        self.partition_count_blocking(topic)
    }

    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        let (log, topic) = (self.clone(), topic.to_string());
        blocking(move || log.append_blocking(&topic, &records)).await
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        let (log, topic) = (self.clone(), topic.to_string());
        blocking(move || log.read_blocking(&topic, partition, offset, max_records)).await
    }

    fn read_now(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
    ) -> Option<Result<Vec<StoredRecord>, LogError>> {
        Some(self.read_blocking(topic, partition, offset, max_records))
    }

    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        time: EventTime,
    ) -> Result<u64, LogError> {
        let (log, topic) = (self.clone(), topic.to_string());
        blocking(move || log.offset_for_time_blocking(&topic, partition, time)).await
    }

    async fn start_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.start_offset_blocking(topic, partition)
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.end_offset_blocking(topic, partition)
    }
}

#[cfg(test)]
mod tests;
