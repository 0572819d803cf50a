//! Cold archive: log records older than a time, kept in zstd files past the
//! log's retention, and read back as a [`Log`] so replay can use them.
//!
//! Layout under the archive folder, per topic:
//!
//! ```text
//! <topic>/index.json                       partitions and every file, in offset order
//! <topic>/<partition>/<first>-<end>.zst    offsets first..end (exclusive), zero-padded
//! ```
//!
//! A file is one zstd stream of records, each `offset u64 | timestamp i64 |
//! key_len u32 | key | value_len u32 | value` (little endian), at most
//! [`MAX_RECORDS_PER_FILE`] records; the index gives its offsets and event
//! time range. Archiving again continues after the last archived offset of
//! each partition, so runs are incremental. Files and the index are written
//! to a temporary name, synced and renamed.
//!
//! With a key ring a file is `TDE1 | crc32 of the rest | key id | nonce |
//! AES-256-GCM(zstd stream) | tag`, authenticated with its name in the
//! topic's folder, so files cannot be swapped. The index (offsets, times and
//! counts, no record) stays plain JSON.
//!
//! [`Stitched`] reads an archive and the live log as one log: offsets below
//! the archive's end from the archive, the rest from the log (offsets are
//! the log's own, so they agree).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tidemark_log::{Log, LogError, Position, Record, StoredRecord};
use tidemark_model::crash::{self, Place};
use tidemark_model::keyring::{sealed_key_id, OpenError};
use tidemark_model::{EventTime, KeyRing};

use crate::ReplayError;

/// Records per archive file, so reading one back stays bounded.
pub const MAX_RECORDS_PER_FILE: usize = 500_000;
const INDEX: &str = "index.json";
const ZSTD_LEVEL: i32 = 3;
const READ_BATCH: usize = 10_000;
const MAGIC_SEALED: &[u8; 4] = b"TDE1";
const AAD_PREFIX: &[u8] = b"tidemark archive ";

fn file_aad(name: &str) -> Vec<u8> {
    [AAD_PREFIX, name.as_bytes()].concat()
}

/// `compressed` sealed into the bytes of an archive file named `name`.
fn seal_file(compressed: &[u8], name: &str, keys: &KeyRing) -> Vec<u8> {
    let sealed = keys.seal(compressed, &file_aad(name));
    let mut out = Vec::with_capacity(8 + sealed.len());
    out.extend_from_slice(MAGIC_SEALED);
    out.extend_from_slice(&crc32fast::hash(&sealed).to_le_bytes());
    out.extend_from_slice(&sealed);
    out
}

fn key_error(path: &Path, id: u32, keys: Option<&KeyRing>) -> LogError {
    LogError::Encryption(match keys {
        None => format!(
            "{} is encrypted with key id {id}, and no encryption key file was given \
             (--encryption-key-file)",
            path.display()
        ),
        Some(keys) => format!(
            "{} is encrypted with key id {id}, which the key file {} does not hold",
            path.display(),
            keys.source().display()
        ),
    })
}

/// The zstd stream of a sealed archive file (after its magic).
fn open_file(
    rest: &[u8],
    path: &Path,
    name: &str,
    keys: Option<&KeyRing>,
) -> Result<Vec<u8>, LogError> {
    let corrupt = |detail: &str| LogError::Corrupt {
        path: path.display().to_string(),
        detail: detail.to_string(),
    };
    let (crc, sealed) = rest
        .split_at_checked(4)
        .ok_or_else(|| corrupt("truncated header"))?;
    if crc32fast::hash(sealed).to_le_bytes() != crc {
        return Err(corrupt("checksum mismatch"));
    }
    let id = sealed_key_id(sealed).unwrap_or_default();
    let ring = keys.ok_or_else(|| key_error(path, id, None))?;
    ring.open(sealed, &file_aad(name)).map_err(|e| match e {
        OpenError::Truncated => corrupt("truncated"),
        OpenError::UnknownKey(id) => key_error(path, id, keys),
        OpenError::Authentication(id) => LogError::Encryption(format!(
            "key id {id} of the key file {} does not decrypt {} (a wrong key for that id)",
            ring.source().display(),
            path.display()
        )),
    })
}

/// One archive file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveFile {
    pub partition: u32,
    pub first_offset: u64,
    /// Exclusive.
    pub end_offset: u64,
    /// Event time range of its records (ms).
    pub min_time: i64,
    pub max_time: i64,
    pub records: u64,
    /// Relative to the topic's folder.
    pub file: String,
}

/// A topic's archive index.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicIndex {
    pub partitions: u32,
    pub files: Vec<ArchiveFile>,
}

impl TopicIndex {
    fn load(dir: &Path) -> Result<Option<TopicIndex>, LogError> {
        match std::fs::read(dir.join(INDEX)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| LogError::Corrupt {
                    path: dir.join(INDEX).display().to_string(),
                    detail: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn files_of(&self, partition: u32) -> impl Iterator<Item = &ArchiveFile> {
        self.files.iter().filter(move |f| f.partition == partition)
    }

    fn end_of(&self, partition: u32) -> Option<u64> {
        self.files_of(partition).map(|f| f.end_offset).max()
    }
}

/// What one `archive` run wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ArchiveReport {
    pub topic: String,
    pub files: usize,
    pub records: u64,
    pub bytes: u64,
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        let (head, tail) = bytes.split_at(bytes.len() / 2);
        f.write_all(head)?;
        crash::point(Place::Archive);
        f.write_all(tail)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

fn encode(records: &[StoredRecord]) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    for r in records {
        raw.extend_from_slice(&r.offset.to_le_bytes());
        raw.extend_from_slice(&r.timestamp.0.to_le_bytes());
        raw.extend_from_slice(&(r.key.len() as u32).to_le_bytes());
        raw.extend_from_slice(&r.key);
        raw.extend_from_slice(&(r.value.len() as u32).to_le_bytes());
        raw.extend_from_slice(&r.value);
    }
    zstd::stream::encode_all(raw.as_slice(), ZSTD_LEVEL)
}

fn decode(path: &Path, name: &str, keys: Option<&KeyRing>) -> Result<Vec<StoredRecord>, LogError> {
    let mut raw = Vec::new();
    let mut file = std::fs::File::open(path)?;
    let mut magic = [0u8; 4];
    let sealed = file.read(&mut magic)? == 4 && &magic == MAGIC_SEALED;
    if sealed {
        let mut rest = Vec::new();
        file.read_to_end(&mut rest)?;
        let stream = open_file(&rest, path, name, keys)?;
        zstd::stream::Decoder::new(stream.as_slice())?.read_to_end(&mut raw)?;
    } else {
        drop(file);
        zstd::stream::Decoder::new(std::fs::File::open(path)?)?.read_to_end(&mut raw)?;
    }
    let buf = Bytes::from(raw);
    let bad = || LogError::Corrupt {
        path: path.display().to_string(),
        detail: "malformed archive record".into(),
    };
    let mut out = Vec::new();
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> Result<Bytes, LogError> {
        let end = pos
            .checked_add(n)
            .filter(|&e| e <= buf.len())
            .ok_or_else(bad)?;
        let b = buf.slice(*pos..end);
        *pos = end;
        Ok(b)
    };
    while pos < buf.len() {
        let head = take(&mut pos, 20)?;
        let offset = u64::from_le_bytes(head[0..8].try_into().map_err(|_| bad())?);
        let ts = i64::from_le_bytes(head[8..16].try_into().map_err(|_| bad())?);
        let klen = u32::from_le_bytes(head[16..20].try_into().map_err(|_| bad())?) as usize;
        let key = take(&mut pos, klen)?;
        let vlen_bytes = take(&mut pos, 4)?;
        let vlen = u32::from_le_bytes(vlen_bytes[..].try_into().map_err(|_| bad())?) as usize;
        let value = take(&mut pos, vlen)?;
        out.push(StoredRecord {
            offset,
            key,
            value,
            timestamp: EventTime(ts),
        });
    }
    Ok(out)
}

/// Archives the records of `topic` in `log` whose place is before the first
/// record at or after `before` (by the log's timestamp index) and after what
/// `dir` already holds.
pub async fn archive_topic(
    log: &dyn Log,
    topic: &str,
    before: EventTime,
    dir: &Path,
) -> Result<ArchiveReport, ReplayError> {
    archive_topic_with_keys(log, topic, before, dir, None).await
}

/// [`archive_topic`], sealing the files with the current key of `keys`.
pub async fn archive_topic_with_keys(
    log: &dyn Log,
    topic: &str,
    before: EventTime,
    dir: &Path,
    keys: Option<&KeyRing>,
) -> Result<ArchiveReport, ReplayError> {
    let tdir = dir.join(topic);
    std::fs::create_dir_all(&tdir)?;
    let partitions = log.partition_count(topic).await?;
    let mut index = TopicIndex::load(&tdir)?.unwrap_or_default();
    if index.partitions != 0 && index.partitions != partitions {
        return Err(ReplayError::Invalid(format!(
            "the archive of {topic} has {} partitions, the log {partitions}",
            index.partitions
        )));
    }
    index.partitions = partitions;
    let mut report = ArchiveReport {
        topic: topic.to_string(),
        ..ArchiveReport::default()
    };
    for partition in 0..partitions {
        let start = log.start_offset(topic, partition).await?;
        let mut next = index.end_of(partition).unwrap_or(start);
        if next < start {
            tracing::warn!(
                topic,
                partition,
                archived_to = next,
                log_starts_at = start,
                "Records between the archive and the log were deleted before being archived"
            );
            next = start;
        }
        let end = log.offset_for_time(topic, partition, before).await?;
        while next < end {
            let mut records = Vec::new();
            while next < end && records.len() < MAX_RECORDS_PER_FILE {
                let want = ((end - next) as usize).min(READ_BATCH);
                let batch = log.read(topic, partition, next, want).await?;
                let Some(last) = batch.last() else { break };
                next = last.offset + 1;
                records.extend(batch.into_iter().filter(|r| r.offset < end));
            }
            let (Some(first), Some(last)) = (records.first(), records.last()) else {
                break;
            };
            let name = format!(
                "{partition}/{:020}-{:020}.zst",
                first.offset,
                last.offset + 1
            );
            let path = tdir.join(&name);
            std::fs::create_dir_all(tdir.join(partition.to_string()))?;
            let mut bytes = encode(&records)?;
            if let Some(keys) = keys {
                bytes = seal_file(&bytes, &name, keys);
            }
            write_atomically(&path, &bytes)?;
            report.files += 1;
            report.records += records.len() as u64;
            report.bytes += bytes.len() as u64;
            index.files.push(ArchiveFile {
                partition,
                first_offset: first.offset,
                end_offset: last.offset + 1,
                min_time: records.iter().map(|r| r.timestamp.0).min().unwrap_or(0),
                max_time: records.iter().map(|r| r.timestamp.0).max().unwrap_or(0),
                records: records.len() as u64,
                file: name,
            });
        }
    }
    index.files.sort_by_key(|f| (f.partition, f.first_offset));
    let json = serde_json::to_vec_pretty(&index).map_err(std::io::Error::other)?;
    write_atomically(&tdir.join(INDEX), &json)?;
    Ok(report)
}

/// Refuses a sealed file whose key id the ring does not hold (a file that is
/// gone or unreadable is reported when it is read).
fn check_key(path: &Path, keys: Option<&KeyRing>) -> Result<(), LogError> {
    let mut head = [0u8; 12];
    let Ok(mut f) = std::fs::File::open(path) else {
        return Ok(());
    };
    if f.read_exact(&mut head).is_err() || &head[..4] != MAGIC_SEALED {
        return Ok(());
    }
    let id = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    match keys {
        Some(k) if k.has(id) => Ok(()),
        _ => Err(key_error(path, id, keys)),
    }
}

/// A decoded archive file: its first offset and its records.
type DecodedFile = (u64, Arc<Vec<StoredRecord>>);

/// An archive folder as a read-only [`Log`].
#[derive(Debug)]
pub struct ArchiveLog {
    dir: PathBuf,
    topics: BTreeMap<String, TopicIndex>,
    /// The last file decoded, per (topic, partition).
    cache: Mutex<BTreeMap<(String, u32), DecodedFile>>,
    keys: Option<Arc<KeyRing>>,
}

impl ArchiveLog {
    /// Opens the archive in `dir` (every topic with an index).
    pub fn open(dir: impl AsRef<Path>) -> Result<ArchiveLog, LogError> {
        Self::open_with_keys(dir, None)
    }

    /// [`ArchiveLog::open`] of an archive whose files may be sealed with keys
    /// of `keys`. Every file's key id is checked here, so a missing key is
    /// an error before anything is read.
    pub fn open_with_keys(
        dir: impl AsRef<Path>,
        keys: Option<Arc<KeyRing>>,
    ) -> Result<ArchiveLog, LogError> {
        let dir = dir.as_ref().to_path_buf();
        let mut topics = BTreeMap::new();
        let entries = std::fs::read_dir(&dir)
            .map_err(|e| LogError::Config(format!("no archive in {}: {e}", dir.display())))?;
        for entry in entries {
            let entry = entry?;
            if let Some(index) = TopicIndex::load(&entry.path())? {
                for f in &index.files {
                    check_key(&entry.path().join(&f.file), keys.as_deref())?;
                }
                topics.insert(entry.file_name().to_string_lossy().into_owned(), index);
            }
        }
        Ok(ArchiveLog {
            dir,
            topics,
            cache: Mutex::new(BTreeMap::new()),
            keys,
        })
    }

    fn index(&self, topic: &str) -> Result<&TopicIndex, LogError> {
        self.topics
            .get(topic)
            .ok_or_else(|| LogError::UnknownTopic(topic.to_string()))
    }

    /// The offset after the archive's last record of a partition (0 if none).
    pub fn end(&self, topic: &str, partition: u32) -> u64 {
        self.topics
            .get(topic)
            .and_then(|i| i.end_of(partition))
            .unwrap_or(0)
    }

    fn records(&self, topic: &str, file: &ArchiveFile) -> Result<Arc<Vec<StoredRecord>>, LogError> {
        let key = (topic.to_string(), file.partition);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((first, records)) = cache.get(&key) {
            if *first == file.first_offset {
                return Ok(records.clone());
            }
        }
        let records = Arc::new(decode(
            &self.dir.join(topic).join(&file.file),
            &file.file,
            self.keys.as_deref(),
        )?);
        cache.insert(key, (file.first_offset, records.clone()));
        Ok(records)
    }

    fn read_sync(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        let index = self.index(topic)?;
        let mut out = Vec::new();
        for file in index.files_of(partition).filter(|f| f.end_offset > offset) {
            if out.len() >= max {
                break;
            }
            let records = self.records(topic, file)?;
            let from = records.partition_point(|r| r.offset < offset);
            out.extend(records[from..].iter().take(max - out.len()).cloned());
        }
        Ok(out)
    }

    fn offset_for_time_sync(
        &self,
        topic: &str,
        partition: u32,
        time: EventTime,
    ) -> Result<Option<u64>, LogError> {
        let index = self.index(topic)?;
        // Running maximum, as the log's own timestamp index.
        let mut running = i64::MIN;
        for file in index.files_of(partition) {
            if running.max(file.max_time) < time.0 {
                running = running.max(file.max_time);
                continue;
            }
            for r in self.records(topic, file)?.iter() {
                running = running.max(r.timestamp.0);
                if running >= time.0 {
                    return Ok(Some(r.offset));
                }
            }
        }
        Ok(None)
    }
}

fn read_only() -> LogError {
    LogError::Config("an archive is read-only".into())
}

#[async_trait]
impl Log for ArchiveLog {
    async fn ensure_topic(&self, _topic: &str, _partitions: u32) -> Result<(), LogError> {
        Err(read_only())
    }

    async fn partition_count(&self, topic: &str) -> Result<u32, LogError> {
        Ok(self.index(topic)?.partitions)
    }

    async fn append(&self, _topic: &str, _records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        Err(read_only())
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        self.read_sync(topic, partition, offset, max_records)
    }

    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        time: EventTime,
    ) -> Result<u64, LogError> {
        Ok(self
            .offset_for_time_sync(topic, partition, time)?
            .unwrap_or_else(|| self.end(topic, partition)))
    }

    async fn start_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        Ok(self
            .index(topic)?
            .files_of(partition)
            .map(|f| f.first_offset)
            .min()
            .unwrap_or(0))
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        Ok(self.end(topic, partition))
    }
}

/// An archive in front of the log it was taken from: one log whose old
/// offsets come from the archive and the rest from the log.
#[derive(Debug)]
pub struct Stitched {
    pub archive: ArchiveLog,
    /// `None`: the archive alone (the log is gone).
    pub log: Option<Arc<dyn Log>>,
}

#[async_trait]
impl Log for Stitched {
    async fn ensure_topic(&self, _topic: &str, _partitions: u32) -> Result<(), LogError> {
        Err(read_only())
    }

    async fn partition_count(&self, topic: &str) -> Result<u32, LogError> {
        match (self.archive.partition_count(topic).await, &self.log) {
            (Ok(n), _) => Ok(n),
            (Err(_), Some(log)) => log.partition_count(topic).await,
            (Err(e), None) => Err(e),
        }
    }

    async fn append(&self, _topic: &str, _records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        Err(read_only())
    }

    async fn read(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_records: usize,
    ) -> Result<Vec<StoredRecord>, LogError> {
        if offset < self.archive.end(topic, partition) {
            return self
                .archive
                .read_sync(topic, partition, offset, max_records);
        }
        match &self.log {
            Some(log) => log.read(topic, partition, offset, max_records).await,
            None => Ok(Vec::new()),
        }
    }

    async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        time: EventTime,
    ) -> Result<u64, LogError> {
        if self.archive.topics.contains_key(topic) {
            if let Some(o) = self.archive.offset_for_time_sync(topic, partition, time)? {
                return Ok(o);
            }
        }
        match &self.log {
            Some(log) => {
                let o = log.offset_for_time(topic, partition, time).await?;
                Ok(o.max(self.archive.end(topic, partition)))
            }
            None => Ok(self.archive.end(topic, partition)),
        }
    }

    async fn start_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        if self.archive.topics.contains_key(topic) {
            return self.archive.start_offset(topic, partition).await;
        }
        match &self.log {
            Some(log) => log.start_offset(topic, partition).await,
            None => Err(LogError::UnknownTopic(topic.to_string())),
        }
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        let archived = self.archive.end(topic, partition);
        match &self.log {
            Some(log) => Ok(log.end_offset(topic, partition).await?.max(archived)),
            None => Ok(archived),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark_log::segment::{SegmentLog, SegmentLogConfig};

    fn ring(keys: &[(u32, u8)]) -> Arc<KeyRing> {
        let keys: Vec<(u32, [u8; 32])> = keys.iter().map(|&(id, b)| (id, [b; 32])).collect();
        Arc::new(KeyRing::from_keys(&keys, Path::new("keys")))
    }

    #[tokio::test]
    async fn sealed_archive_files_read_after_a_rotation_and_refuse_bad_keys() {
        let dir = tempfile::tempdir().unwrap();
        let log = SegmentLog::open(dir.path().join("log"), SegmentLogConfig::default()).unwrap();
        log.ensure_topic_blocking("t", 1).unwrap();
        let records: Vec<Record> = (0..50)
            .map(|i| Record {
                key: Bytes::from("k"),
                value: Bytes::from(format!("secret-{i}")),
                timestamp: EventTime(1_000 + i),
            })
            .collect();
        log.append_blocking("t", &records).unwrap();
        let archive = dir.path().join("archive");
        let k1 = ring(&[(1, 1)]);
        archive_topic_with_keys(&log, "t", EventTime(i64::MAX), &archive, Some(&k1))
            .await
            .unwrap();
        let index = TopicIndex::load(&archive.join("t")).unwrap().unwrap();
        let file = archive.join("t").join(&index.files[0].file);
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(&bytes[..4], MAGIC_SEALED);
        assert!(!bytes.windows(6).any(|w| w == b"secret"));

        let rotated = ArchiveLog::open_with_keys(&archive, Some(ring(&[(1, 1), (2, 2)]))).unwrap();
        let back = rotated.read("t", 0, 0, 100).await.unwrap();
        assert_eq!(back.len(), 50);
        assert_eq!(back[49].value, Bytes::from("secret-49"));

        let name = file.display().to_string();
        for keys in [None, Some(ring(&[(2, 2)]))] {
            let err = ArchiveLog::open_with_keys(&archive, keys).unwrap_err();
            assert!(err.to_string().contains(&name) && err.to_string().contains("key id 1"));
        }
        let wrong = ArchiveLog::open_with_keys(&archive, Some(ring(&[(1, 9)]))).unwrap();
        let err = wrong.read("t", 0, 0, 100).await.unwrap_err();
        assert!(err.to_string().contains("wrong key"), "{err}");

        let mut flipped = bytes.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x08;
        std::fs::write(&file, flipped).unwrap();
        let damaged = ArchiveLog::open_with_keys(&archive, Some(k1)).unwrap();
        let err = damaged.read("t", 0, 0, 100).await.unwrap_err();
        assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&name), "{err}");
    }
}
