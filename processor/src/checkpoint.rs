//! Checkpoints: input offsets, watermarks, dedup state and pipeline states,
//! bincode-encoded, zstd-compressed and replaced atomically on disk.
//!
//! File: `TDC1` | crc32 of the rest (u32, little endian) | zstd(bincode). A
//! file without the magic is read as the bare zstd frame earlier versions
//! wrote. The checksum makes any damaged byte an error: zstd frames carry no
//! checksum of their own by default, so a damaged one could decode to
//! another, plausible state.
//!
//! With a key ring: `TDE1` | crc32 of the rest | key id u32 | nonce [12] |
//! AES-256-GCM(zstd(bincode)) | tag [16]. The CRC tells a damaged file from a
//! wrong key: a file whose CRC holds but which fails authentication was
//! sealed under another key with the same id.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use tidemark_model::crash::{self, Place};
use tidemark_model::keyring::{sealed_key_id, OpenError, SEAL_PREFIX};
use tidemark_model::{KeyRing, Watermark};

use crate::dedup::DedupSnapshot;
use crate::error::ProcessorError;
use crate::watermark::{PartitionKey, WatermarkState};

/// File name of the checkpoint inside its directory.
pub const FILE_NAME: &str = "checkpoint.bin.zst";
const TMP_NAME: &str = "checkpoint.bin.zst.tmp";
// Most of the state is hashes, which do not compress: the fastest level.
const ZSTD_LEVEL: i32 = 1;
const MAGIC: &[u8; 4] = b"TDC1";
const MAGIC_SEALED: &[u8; 4] = b"TDE1";
const AAD: &[u8] = b"tidemark checkpoint";

/// The next offset to read of each partition.
pub type NextOffsets = BTreeMap<PartitionKey, u64>;

/// Everything needed to resume processing exactly where it stopped.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Next offset to read, per (topic, partition).
    pub offsets: NextOffsets,
    pub watermarks: WatermarkState,
    pub dedup: BTreeMap<PartitionKey, DedupSnapshot>,
    /// The worker's watermark when the checkpoint was taken.
    pub last_watermark: Watermark,
    /// (pipeline name, [`crate::pipeline::Pipeline::snapshot`]).
    pub pipelines: Vec<(String, Vec<u8>)>,
}

/// Path of the checkpoint file in `dir`.
pub fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Writes `cp` to `dir` atomically: a temporary file, fsync, rename, fsync of
/// the directory. A crash leaves either the old or the new checkpoint.
/// Returns the state's size before compression.
pub fn save<T: Serialize>(dir: &Path, cp: &T) -> Result<u64, ProcessorError> {
    save_keyed(dir, cp, None)
}

/// [`save`], sealed with the current key of `keys` when given.
///
/// The state streams through the encoder into the file: no copy of it is
/// built in memory, only of its compressed form when it is sealed (the seal
/// covers the whole file).
pub fn save_keyed<T: Serialize>(
    dir: &Path,
    cp: &T,
    keys: Option<&KeyRing>,
) -> Result<u64, ProcessorError> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(TMP_NAME);
    let raw_len = match keys {
        None => {
            let mut f = File::create(&tmp)?;
            // The CRC is known at the end: written into its place then.
            f.write_all(MAGIC)?;
            f.write_all(&[0; 4])?;
            crash::point(Place::Checkpoint);
            let checksummed = Checksummed::new(BufWriter::with_capacity(1 << 20, f));
            let (raw_len, checksummed) = encode_compressed(cp, checksummed)?;
            let crc = checksummed.crc.finalize();
            let mut f = checksummed.inner.into_inner().map_err(|e| e.into_error())?;
            f.seek(SeekFrom::Start(MAGIC.len() as u64))?;
            f.write_all(&crc.to_le_bytes())?;
            f.sync_all()?;
            raw_len
        }
        Some(keys) => {
            let (raw_len, mut sealed) = encode_compressed(cp, vec![0; SEAL_PREFIX])?;
            keys.seal_tail(&mut sealed, 0, AAD);
            let mut f = File::create(&tmp)?;
            f.write_all(MAGIC_SEALED)?;
            f.write_all(&crc32fast::hash(&sealed).to_le_bytes())?;
            crash::point(Place::Checkpoint);
            f.write_all(&sealed)?;
            f.sync_all()?;
            raw_len
        }
    };
    fs::rename(&tmp, path(dir))?;
    File::open(dir)?.sync_all()?;
    Ok(raw_len)
}

/// Writes `cp`'s bincode, zstd-compressed, into `out`; the bincode length
/// and `out` back.
fn encode_compressed<T: Serialize, W: Write>(cp: &T, out: W) -> Result<(u64, W), ProcessorError> {
    let encoder = zstd::Encoder::new(out, ZSTD_LEVEL)?;
    let mut counted = BufWriter::with_capacity(
        1 << 20,
        Counted {
            inner: encoder,
            len: 0,
        },
    );
    bincode::serialize_into(&mut counted, cp)
        .map_err(|e| ProcessorError::Io(std::io::Error::other(e)))?;
    let counted = counted.into_inner().map_err(|e| e.into_error())?;
    Ok((counted.len, counted.inner.finish()?))
}

/// Counts what is written through it.
struct Counted<W> {
    inner: W,
    len: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Keeps the CRC of what is written through it.
struct Checksummed<W> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W> Checksummed<W> {
    fn new(inner: W) -> Self {
        Checksummed {
            inner,
            crc: crc32fast::Hasher::new(),
        }
    }
}

impl<W: Write> Write for Checksummed<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads the checkpoint in `dir`; `None` when there is none.
pub fn load<T: serde::de::DeserializeOwned>(dir: &Path) -> Result<Option<T>, ProcessorError> {
    load_keyed(dir, None)
}

/// [`load`] of a checkpoint that may be sealed with a key of `keys`.
pub fn load_keyed<T: serde::de::DeserializeOwned>(
    dir: &Path,
    keys: Option<&KeyRing>,
) -> Result<Option<T>, ProcessorError> {
    let Some(raw) = read_state(dir, keys)? else {
        return Ok(None);
    };
    let cp = bincode::deserialize(&raw)
        .map_err(|e| ProcessorError::CorruptCheckpoint(format!("decode: {e}")))?;
    Ok(Some(cp))
}

/// Whether the checkpoint in `dir`, if any, opens with `keys` and
/// decompresses: a process checks this before it starts serving, so a
/// missing key or a damaged file stops it at once.
pub fn check_keyed(dir: &Path, keys: Option<&KeyRing>) -> Result<(), ProcessorError> {
    read_state(dir, keys).map(|_| ())
}

/// The checkpoint's bincode bytes, checked and decompressed.
fn read_state(dir: &Path, keys: Option<&KeyRing>) -> Result<Option<Vec<u8>>, ProcessorError> {
    let bytes = match fs::read(path(dir)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let opened;
    let compressed = if let Some(rest) = bytes.strip_prefix(MAGIC_SEALED) {
        opened = open_sealed(&path(dir), rest, keys)?;
        opened.as_slice()
    } else {
        match bytes.strip_prefix(MAGIC) {
            Some(rest) => {
                let (crc, payload) = rest
                    .split_at_checked(4)
                    .ok_or_else(|| ProcessorError::CorruptCheckpoint("truncated header".into()))?;
                let crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
                if crc32fast::hash(payload) != crc {
                    return Err(ProcessorError::CorruptCheckpoint(format!(
                        "{}: checksum mismatch",
                        path(dir).display()
                    )));
                }
                payload
            }
            None => bytes.as_slice(),
        }
    };
    let raw = zstd::stream::decode_all(compressed)
        .map_err(|e| ProcessorError::CorruptCheckpoint(format!("decompress: {e}")))?;
    Ok(Some(raw))
}

fn open_sealed(
    file: &Path,
    rest: &[u8],
    keys: Option<&KeyRing>,
) -> Result<Vec<u8>, ProcessorError> {
    let (crc, sealed) = rest
        .split_at_checked(4)
        .ok_or_else(|| ProcessorError::CorruptCheckpoint("truncated header".into()))?;
    let crc = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    if crc32fast::hash(sealed) != crc {
        return Err(ProcessorError::CorruptCheckpoint(format!(
            "{}: checksum mismatch",
            file.display()
        )));
    }
    let id = sealed_key_id(sealed).unwrap_or_default();
    let Some(keys) = keys else {
        return Err(ProcessorError::Encryption(format!(
            "{} is encrypted with key id {id}, and no encryption key file was given \
             (--encryption-key-file)",
            file.display()
        )));
    };
    keys.open(sealed, AAD).map_err(|e| match e {
        OpenError::Truncated => {
            ProcessorError::CorruptCheckpoint(format!("{}: truncated", file.display()))
        }
        OpenError::UnknownKey(id) => ProcessorError::Encryption(format!(
            "{} is encrypted with key id {id}, which the key file {} does not hold",
            file.display(),
            keys.source().display()
        )),
        OpenError::Authentication(id) => ProcessorError::Encryption(format!(
            "key id {id} of the key file {} does not decrypt {} (a wrong key for that id)",
            keys.source().display(),
            file.display()
        )),
    })
}

/// Refuses a checkpoint taken with another worker count: partitions, and so
/// keyed state, would belong to other workers.
pub(crate) fn check_worker_count(taken_with: usize, runs: usize) -> Result<(), ProcessorError> {
    if taken_with == runs {
        return Ok(());
    }
    Err(ProcessorError::WorkerCount { taken_with, runs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::PartitionDedup;
    use tidemark_model::EventTime;

    #[test]
    fn save_load_round_trip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load::<Checkpoint>(dir.path()).unwrap(), None);
        let mut cp = Checkpoint::default();
        cp.offsets.insert(("user-events".into(), 3), 42);
        cp.watermarks
            .insert(("user-events".into(), 3), EventTime(1_000));
        let mut d = PartitionDedup::new();
        d.check_and_insert("e1", EventTime(1_000));
        cp.dedup.insert(("user-events".into(), 3), d.snapshot());
        cp.pipelines.push(("traffic".into(), vec![1, 2, 3]));
        save(dir.path(), &cp).unwrap();
        let back: Checkpoint = load(dir.path()).unwrap().unwrap();
        assert_eq!(back, cp);
        let mut d = PartitionDedup::from(back.dedup[&("user-events".to_string(), 3)].clone());
        assert!(!d.check_and_insert("e1", EventTime(1_000)));

        cp.offsets.insert(("user-events".into(), 3), 43);
        save(dir.path(), &cp).unwrap();
        assert_eq!(
            load::<Checkpoint>(dir.path()).unwrap().unwrap().offsets
                [&("user-events".to_string(), 3)],
            43
        );
        assert!(!dir.path().join(TMP_NAME).exists());
    }

    #[test]
    fn sealed_checkpoints_survive_a_rotation_and_refuse_wrong_keys() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = KeyRing::from_keys(&[(1, [1; 32])], Path::new("keys"));
        let mut cp = Checkpoint::default();
        let mut d = PartitionDedup::new();
        d.check_and_insert("event-id-secret", EventTime(1_000));
        cp.dedup.insert(("user-events".into(), 0), d.snapshot());
        save_keyed(dir.path(), &cp, Some(&k1)).unwrap();
        let bytes = fs::read(path(dir.path())).unwrap();
        assert_eq!(&bytes[..4], MAGIC_SEALED);
        assert!(!bytes.windows(6).any(|w| w == b"secret"));

        let rotated = KeyRing::from_keys(&[(1, [1; 32]), (2, [2; 32])], Path::new("keys"));
        let back: Checkpoint = load_keyed(dir.path(), Some(&rotated)).unwrap().unwrap();
        assert_eq!(back, cp);

        let msg = |keys: Option<&KeyRing>| {
            load_keyed::<Checkpoint>(dir.path(), keys)
                .unwrap_err()
                .to_string()
        };
        let file = path(dir.path()).display().to_string();
        let none = msg(None);
        assert!(none.contains(&file) && none.contains("key id 1"), "{none}");
        let other = KeyRing::from_keys(&[(2, [2; 32])], Path::new("keys"));
        assert!(msg(Some(&other)).contains("key id 1"));
        let wrong = KeyRing::from_keys(&[(1, [9; 32])], Path::new("keys"));
        assert!(msg(Some(&wrong)).contains("wrong key"));

        let mut flipped = bytes.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x10;
        fs::write(path(dir.path()), flipped).unwrap();
        let err = load_keyed::<Checkpoint>(dir.path(), Some(&k1)).unwrap_err();
        assert!(matches!(err, ProcessorError::CorruptCheckpoint(ref m) if m.contains(&file)));
    }

    #[test]
    fn corrupt_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(path(dir.path()), b"not zstd").unwrap();
        let err = load::<Checkpoint>(dir.path()).unwrap_err();
        assert!(matches!(err, ProcessorError::CorruptCheckpoint(_)));
        assert!(!err.is_retryable());
        let junk = zstd::bulk::compress(&[0xff; 7], 1).unwrap();
        fs::write(path(dir.path()), junk).unwrap();
        assert!(matches!(
            load::<Checkpoint>(dir.path()),
            Err(ProcessorError::CorruptCheckpoint(_))
        ));
    }

    #[test]
    fn a_flipped_byte_anywhere_is_an_error_and_old_files_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let mut cp = Checkpoint::default();
        cp.offsets.insert(("user-events".into(), 0), 7);
        save(dir.path(), &cp).unwrap();
        let good = fs::read(path(dir.path())).unwrap();
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            fs::write(path(dir.path()), &bad).unwrap();
            assert!(
                matches!(
                    load::<Checkpoint>(dir.path()),
                    Err(ProcessorError::CorruptCheckpoint(_))
                ),
                "byte {at}"
            );
        }
        // As written before the header: the bare zstd frame.
        fs::write(path(dir.path()), &good[8..]).unwrap();
        assert_eq!(load::<Checkpoint>(dir.path()).unwrap(), Some(cp));
    }
}
