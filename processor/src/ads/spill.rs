//! Cold ads join state on disk, so that a day of attributed clicks and half
//! an hour of impressions do not have to sit in memory.
//!
//! An impression id whose newest impression (or attributed click) is older
//! than the watermark minus the lateness and a minute is moved, whole, into
//! an immutable *run* file: fixed 28-byte records (id hash, time, campaign)
//! sorted by id, in blocks of about 4 KiB, each with a CRC (or sealed with
//! AES-256-GCM under the checkpoint key ring). Memory keeps per run only its
//! block index and a blocked Bloom filter (about 10 bits an id), and the
//! campaign names its records refer to.
//!
//! Lookups try memory first, then the runs, newest first. An id is held in
//! one place at a time: when an impression (or click) is added to an id that
//! sits in a run, the id is taken back into memory and its run entry is
//! marked dead (a tombstone). Touches the watermark has expired are invisible
//! wherever they are, by the same per-second rule as in memory, so whether
//! an id was spilled never changes an outcome.
//!
//! Checkpoints refer to runs by number, with the tombstones. A run whose
//! touches have all expired is dropped from the live set at once, but its
//! file is deleted only after a checkpoint that no longer refers to it is
//! durable (see [`Spill::checkpoint_saved`]); files no checkpoint refers to
//! (left by a crash) are deleted on start.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use tidemark_model::KeyRing;

use super::join::{Campaigns, ImpKey, Touch, Touches};
use crate::error::ProcessorError;

const MAGIC: &[u8; 4] = b"TDS1";
/// Bytes of one record: id hash (16), time (8), campaign number (4).
const RECORD: usize = 28;
/// Target plaintext size of a block; an id's records never straddle two.
const BLOCK_TARGET: usize = 4096;
/// Bits of the Bloom filter per id, and probes per lookup (about 1 % false
/// positives).
const BLOOM_BITS_PER_KEY: usize = 10;
const BLOOM_PROBES: u32 = 7;
/// A filter block: one cache line, so a lookup costs one miss per run.
const BLOOM_BLOCK_BITS: u64 = 512;
/// Trailer: footer offset (8), footer length (4), magic (4).
const TRAILER: usize = 16;

/// Which join a run holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Side {
    Impressions,
    Clicks,
}

/// What a checkpoint keeps of the spilled state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct SpillState {
    /// Live runs, oldest first.
    runs: Vec<u64>,
    /// (run, id) entries taken back into memory.
    tombstones: Vec<(u64, ImpKey)>,
    next_run: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Footer {
    side: Side,
    /// The newest touch time: the run expires with it.
    newest: i64,
    records: u64,
    campaigns: Vec<String>,
    /// (first id, offset, stored length) of each block.
    blocks: Vec<(ImpKey, u64, u32)>,
    bloom: Vec<u64>,
}

/// One run file, opened.
#[derive(Debug)]
struct Run {
    id: u64,
    side: Side,
    path: PathBuf,
    file: File,
    newest: i64,
    records: u64,
    campaigns: Vec<String>,
    blocks: Vec<(ImpKey, u64, u32)>,
    bloom: Vec<u64>,
}

/// Blocked Bloom filter over id hashes (already uniform: no rehash needed).
fn bloom_positions(key: ImpKey, words: usize) -> (usize, impl Iterator<Item = u64>) {
    let blocks = (words as u64 * 64 / BLOOM_BLOCK_BITS).max(1);
    let block = (key.0 % blocks) as usize * (BLOOM_BLOCK_BITS as usize / 64);
    let h = key.1;
    (
        block,
        (0..BLOOM_PROBES).map(move |i| (h >> (i * 9)) % BLOOM_BLOCK_BITS),
    )
}

fn bloom_build(keys: &[ImpKey]) -> Vec<u64> {
    let bits = (keys.len() * BLOOM_BITS_PER_KEY).max(BLOOM_BLOCK_BITS as usize);
    let blocks = bits.div_ceil(BLOOM_BLOCK_BITS as usize);
    let mut words = vec![0u64; blocks * (BLOOM_BLOCK_BITS as usize / 64)];
    for &k in keys {
        let (block, bits) = bloom_positions(k, words.len());
        for b in bits {
            words[block + (b / 64) as usize] |= 1 << (b % 64);
        }
    }
    words
}

fn bloom_may_hold(words: &[u64], key: ImpKey) -> bool {
    if words.is_empty() {
        return false;
    }
    let (block, mut bits) = bloom_positions(key, words.len());
    bits.all(|b| words[block + (b / 64) as usize] & (1 << (b % 64)) != 0)
}

fn block_aad(run: u64, offset: u64) -> Vec<u8> {
    let mut aad = b"tidemark spill block".to_vec();
    aad.extend_from_slice(&run.to_le_bytes());
    aad.extend_from_slice(&offset.to_le_bytes());
    aad
}

fn footer_aad(run: u64) -> Vec<u8> {
    let mut aad = b"tidemark spill footer".to_vec();
    aad.extend_from_slice(&run.to_le_bytes());
    aad
}

fn run_name(id: u64) -> String {
    format!("run-{id:010}.tds")
}

fn run_number(name: &str) -> Option<u64> {
    name.strip_prefix("run-")?
        .strip_suffix(".tds")?
        .parse()
        .ok()
}

/// `body` as stored: with its CRC, or sealed.
fn protect(body: Vec<u8>, keys: Option<&KeyRing>, aad: &[u8]) -> Vec<u8> {
    match keys {
        Some(keys) => keys.seal(&body, aad),
        None => {
            let mut out = body;
            let crc = crc32fast::hash(&out);
            out.extend_from_slice(&crc.to_le_bytes());
            out
        }
    }
}

fn corrupt(path: &Path, what: impl std::fmt::Display) -> ProcessorError {
    ProcessorError::CorruptCheckpoint(format!("spilled ads state {}: {what}", path.display()))
}

/// The plaintext of a stored block or footer.
fn unprotect(
    stored: Vec<u8>,
    keys: Option<&KeyRing>,
    aad: &[u8],
    path: &Path,
) -> Result<Vec<u8>, ProcessorError> {
    match keys {
        Some(keys) => keys.open(&stored, aad).map_err(|e| {
            ProcessorError::Encryption(format!("spilled ads state {}: {e}", path.display()))
        }),
        None => {
            let mut body = stored;
            let split = body
                .len()
                .checked_sub(4)
                .ok_or_else(|| corrupt(path, "truncated"))?;
            let crc = u32::from_le_bytes(body[split..].try_into().expect("4 bytes"));
            body.truncate(split);
            if crc32fast::hash(&body) != crc {
                return Err(corrupt(path, "checksum mismatch"));
            }
            Ok(body)
        }
    }
}

fn decode_record(r: &[u8]) -> (ImpKey, i64, u32) {
    let word = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().expect("8 bytes"));
    (
        ImpKey(word(0), word(8)),
        word(16) as i64,
        u32::from_le_bytes(r[24..28].try_into().expect("4 bytes")),
    )
}

impl Run {
    /// Writes the `entries` (sorted by id, touches ascending) as run `id` in
    /// `dir`, durably, and opens it.
    fn write(
        dir: &Path,
        id: u64,
        side: Side,
        entries: &[(ImpKey, &[Touch])],
        names: &Campaigns,
        keys: Option<&KeyRing>,
    ) -> Result<Run, ProcessorError> {
        let mut numbers: FxHashMap<u32, u32> = FxHashMap::default();
        let mut campaigns = Vec::new();
        let mut out = MAGIC.to_vec();
        let mut blocks = Vec::new();
        let mut block = Vec::with_capacity(BLOCK_TARGET + RECORD * 16);
        let mut first = None;
        let (mut newest, mut records) = (i64::MIN, 0u64);
        let mut flush = |block: &mut Vec<u8>, first: &mut Option<ImpKey>, out: &mut Vec<u8>| {
            if let Some(key) = first.take() {
                let offset = out.len() as u64;
                let stored = protect(std::mem::take(block), keys, &block_aad(id, offset));
                blocks.push((key, offset, stored.len() as u32));
                out.extend_from_slice(&stored);
            }
        };
        for &(key, touches) in entries {
            if block.len() >= BLOCK_TARGET {
                flush(&mut block, &mut first, &mut out);
            }
            first.get_or_insert(key);
            for t in touches {
                let n = *numbers.entry(t.campaign).or_insert_with(|| {
                    campaigns.push(names.name(t.campaign).to_string());
                    campaigns.len() as u32 - 1
                });
                block.extend_from_slice(&key.0.to_le_bytes());
                block.extend_from_slice(&key.1.to_le_bytes());
                block.extend_from_slice(&t.time.to_le_bytes());
                block.extend_from_slice(&n.to_le_bytes());
                newest = newest.max(t.time);
                records += 1;
            }
        }
        flush(&mut block, &mut first, &mut out);
        let keys_only: Vec<ImpKey> = entries.iter().map(|e| e.0).collect();
        let footer = Footer {
            side,
            newest,
            records,
            campaigns,
            blocks,
            bloom: bloom_build(&keys_only),
        };
        let body = bincode::serialize(&footer)
            .map_err(|e| ProcessorError::Snapshot(format!("spill footer: {e}")))?;
        let footer_offset = out.len() as u64;
        let stored = protect(body, keys, &footer_aad(id));
        let footer_len = stored.len() as u32;
        out.extend_from_slice(&stored);
        out.extend_from_slice(&footer_offset.to_le_bytes());
        out.extend_from_slice(&footer_len.to_le_bytes());
        out.extend_from_slice(MAGIC);

        let path = dir.join(run_name(id));
        let tmp = dir.join(format!("{}.tmp", run_name(id)));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&out)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()?;
        let file = File::open(&path)?;
        Ok(Run::from_footer(id, path, file, footer))
    }

    fn from_footer(id: u64, path: PathBuf, file: File, footer: Footer) -> Run {
        Run {
            id,
            side: footer.side,
            file,
            path,
            newest: footer.newest,
            records: footer.records,
            campaigns: footer.campaigns,
            blocks: footer.blocks,
            bloom: footer.bloom,
        }
    }

    /// Opens run `id` in `dir`, checking its trailer and footer.
    fn open(dir: &Path, id: u64, keys: Option<&KeyRing>) -> Result<Run, ProcessorError> {
        let path = dir.join(run_name(id));
        let file = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                corrupt(&path, "the checkpoint refers to it, but it is missing")
            }
            _ => e.into(),
        })?;
        let len = file.metadata()?.len();
        if len < (MAGIC.len() + TRAILER) as u64 {
            return Err(corrupt(&path, "truncated"));
        }
        let mut trailer = [0u8; TRAILER];
        file.read_exact_at(&mut trailer, len - TRAILER as u64)?;
        if &trailer[12..] != MAGIC {
            return Err(corrupt(&path, "not a run file"));
        }
        let offset = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
        let stored_len = u32::from_le_bytes(trailer[8..12].try_into().expect("4 bytes")) as u64;
        if offset.checked_add(stored_len) != Some(len - TRAILER as u64) {
            return Err(corrupt(&path, "footer out of place"));
        }
        let mut stored = vec![0u8; stored_len as usize];
        file.read_exact_at(&mut stored, offset)?;
        let body = unprotect(stored, keys, &footer_aad(id), &path)?;
        let footer: Footer =
            bincode::deserialize(&body).map_err(|e| corrupt(&path, format!("footer: {e}")))?;
        if !footer
            .bloom
            .len()
            .is_multiple_of(BLOOM_BLOCK_BITS as usize / 64)
        {
            return Err(corrupt(&path, "Bloom filter size"));
        }
        Ok(Run::from_footer(id, path, file, footer))
    }

    /// The records of `key`, as (time, campaign name index).
    fn find(&self, key: ImpKey, keys: Option<&KeyRing>) -> Result<Vec<(i64, u32)>, ProcessorError> {
        if !bloom_may_hold(&self.bloom, key) {
            return Ok(Vec::new());
        }
        let at = self.blocks.partition_point(|b| b.0 <= key);
        let Some(&(_, offset, stored_len)) = at.checked_sub(1).and_then(|i| self.blocks.get(i))
        else {
            return Ok(Vec::new());
        };
        let mut stored = vec![0u8; stored_len as usize];
        self.file.read_exact_at(&mut stored, offset)?;
        let body = unprotect(stored, keys, &block_aad(self.id, offset), &self.path)?;
        if !body.len().is_multiple_of(RECORD) {
            return Err(corrupt(&self.path, "block size"));
        }
        let records: Vec<&[u8]> = body.chunks_exact(RECORD).collect();
        let start = records.partition_point(|r| decode_record(r).0 < key);
        let found = records[start..]
            .iter()
            .map(|r| decode_record(r))
            .take_while(|r| r.0 == key)
            .map(|(_, time, campaign)| (time, campaign))
            .collect();
        Ok(found)
    }
}

/// Runs no checkpoint may need any more, waiting for their files to go.
#[derive(Debug, Default)]
struct Retiring {
    /// Dropped since the last snapshot: that snapshot still refers to them.
    since_snapshot: Vec<Arc<Run>>,
    /// Dropped before the last snapshot: gone once it is durable.
    before_snapshot: Vec<Arc<Run>>,
}

/// The spilled join state of one ads pipeline.
#[derive(Debug)]
pub(super) struct Spill {
    dir: PathBuf,
    keys: Option<Arc<KeyRing>>,
    runs: Vec<Arc<Run>>,
    tombstones: FxHashSet<(u64, ImpKey)>,
    next_run: u64,
    /// The watermark of the last spill.
    pub(super) last_spill: i64,
    /// Whether files no checkpoint refers to were deleted.
    swept: bool,
    retiring: Mutex<Retiring>,
    /// A run that could not be read: the state is no longer exact, so no
    /// checkpoint may be taken of it.
    pub(super) failure: Option<String>,
}

impl Clone for Spill {
    fn clone(&self) -> Self {
        let retiring = self.retiring.lock().unwrap_or_else(|e| e.into_inner());
        Spill {
            dir: self.dir.clone(),
            keys: self.keys.clone(),
            runs: self.runs.clone(),
            tombstones: self.tombstones.clone(),
            next_run: self.next_run,
            last_spill: self.last_spill,
            swept: self.swept,
            retiring: Mutex::new(Retiring {
                since_snapshot: retiring.since_snapshot.clone(),
                before_snapshot: retiring.before_snapshot.clone(),
            }),
            failure: self.failure.clone(),
        }
    }
}

impl Spill {
    pub(super) fn new(dir: &Path, keys: Option<Arc<KeyRing>>) -> Result<Spill, ProcessorError> {
        fs::create_dir_all(dir)?;
        Ok(Spill {
            dir: dir.to_path_buf(),
            keys,
            runs: Vec::new(),
            tombstones: FxHashSet::default(),
            next_run: 0,
            last_spill: i64::MIN,
            swept: false,
            retiring: Mutex::new(Retiring::default()),
            failure: None,
        })
    }

    /// The same directory and keys, with nothing spilled.
    pub(super) fn empty_like(&self) -> Result<Spill, ProcessorError> {
        Spill::new(&self.dir, self.keys.clone())
    }

    /// Records held in runs, tombstoned ones included.
    pub(super) fn records(&self) -> u64 {
        self.runs.iter().map(|r| r.records).sum()
    }

    /// Writes `entries` (sorted by id) as a new run of `side`.
    pub(super) fn write(
        &mut self,
        side: Side,
        entries: &[(ImpKey, &[Touch])],
        names: &Campaigns,
    ) -> Result<(), ProcessorError> {
        self.sweep();
        if entries.is_empty() {
            return Ok(());
        }
        let run = Run::write(
            &self.dir,
            self.next_run,
            side,
            entries,
            names,
            self.keys.as_deref(),
        )?;
        self.next_run += 1;
        self.runs.push(Arc::new(run));
        Ok(())
    }

    /// The visible touches of `key` on `side`, from the newest run holding
    /// it live, with the run's number; campaigns interned into `names`.
    fn lookup(
        &mut self,
        side: Side,
        key: ImpKey,
        visible: impl Fn(i64) -> bool,
        names: &mut Campaigns,
    ) -> Option<(u64, Touches)> {
        for run in self.runs.iter().rev() {
            if run.side != side || self.tombstones.contains(&(run.id, key)) {
                continue;
            }
            let found = match run.find(key, self.keys.as_deref()) {
                Ok(found) => found,
                Err(e) => {
                    tracing::error!(error = %e, "Reading spilled ads state failed");
                    self.failure.get_or_insert(e.to_string());
                    return None;
                }
            };
            if found.is_empty() {
                continue;
            }
            let mut touches: Option<Touches> = None;
            for (time, n) in found.into_iter().filter(|&(t, _)| visible(t)) {
                let name = run.campaigns.get(n as usize).map_or("", String::as_str);
                let touch = Touch {
                    time,
                    campaign: names.intern(name),
                };
                match &mut touches {
                    Some(t) => {
                        t.add(touch, usize::MAX);
                    }
                    None => touches = Some(Touches::one(touch)),
                }
            }
            return touches.map(|t| (run.id, t));
        }
        None
    }

    /// The visible touches of `key`, left where they are.
    pub(super) fn get(
        &mut self,
        side: Side,
        key: ImpKey,
        visible: impl Fn(i64) -> bool,
        names: &mut Campaigns,
    ) -> Option<Touches> {
        self.lookup(side, key, visible, names).map(|(_, t)| t)
    }

    /// The visible touches of `key`, taken out of their run (to go back into
    /// memory).
    pub(super) fn take(
        &mut self,
        side: Side,
        key: ImpKey,
        visible: impl Fn(i64) -> bool,
        names: &mut Campaigns,
    ) -> Option<Touches> {
        let (run, touches) = self.lookup(side, key, visible, names)?;
        self.tombstones.insert((run, key));
        Some(touches)
    }

    /// Drops the runs of `side` whose every touch is `expired`.
    pub(super) fn expire(&mut self, side: Side, expired: impl Fn(i64) -> bool) {
        let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.runs)
            .into_iter()
            .partition(|r| r.side == side && expired(r.newest));
        self.runs = kept;
        if gone.is_empty() {
            return;
        }
        let ids: FxHashSet<u64> = gone.iter().map(|r| r.id).collect();
        self.tombstones.retain(|(run, _)| !ids.contains(run));
        let mut retiring = self.retiring.lock().unwrap_or_else(|e| e.into_inner());
        retiring.since_snapshot.extend(gone);
    }

    /// What a checkpoint keeps; the runs dropped so far are no longer
    /// referred to from here on.
    pub(super) fn state(&self) -> Result<SpillState, ProcessorError> {
        if let Some(failure) = &self.failure {
            return Err(ProcessorError::Snapshot(format!(
                "spilled ads state could not be read: {failure}"
            )));
        }
        let mut retiring = self.retiring.lock().unwrap_or_else(|e| e.into_inner());
        let dropped = std::mem::take(&mut retiring.since_snapshot);
        retiring.before_snapshot.extend(dropped);
        let mut tombstones: Vec<(u64, ImpKey)> = self.tombstones.iter().copied().collect();
        tombstones.sort_unstable();
        Ok(SpillState {
            runs: self.runs.iter().map(|r| r.id).collect(),
            tombstones,
            next_run: self.next_run,
        })
    }

    /// The last snapshot is durable: the files of runs it does not refer to
    /// go.
    pub(super) fn checkpoint_saved(&mut self) {
        let gone = {
            let mut retiring = self.retiring.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut retiring.before_snapshot)
        };
        for run in gone {
            if let Err(e) = fs::remove_file(&run.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(file = %run.path.display(), error = %e, "Could not delete an expired spill run");
                }
            }
        }
    }

    /// Opens the runs `state` refers to; the other files are deleted at the
    /// next spill.
    pub(super) fn restore(&mut self, state: SpillState) -> Result<(), ProcessorError> {
        let mut runs = Vec::with_capacity(state.runs.len());
        for id in state.runs {
            runs.push(Arc::new(Run::open(&self.dir, id, self.keys.as_deref())?));
        }
        self.runs = runs;
        self.tombstones = state.tombstones.into_iter().collect();
        self.next_run = state.next_run;
        self.swept = false;
        Ok(())
    }

    /// Deletes the files in the directory no live run is: runs of a crashed
    /// process after its last checkpoint, or of one without a checkpoint.
    fn sweep(&mut self) {
        if self.swept {
            return;
        }
        self.swept = true;
        let live: FxHashSet<u64> = self.runs.iter().map(|r| r.id).collect();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let orphan = match run_number(&name) {
                Some(id) => !live.contains(&id),
                None => name.ends_with(".tds.tmp"),
            };
            if orphan {
                let _ = fs::remove_file(entry.path());
            }
        }
        // A number an orphan had is safe to reuse: its file is gone.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u64) -> ImpKey {
        let h = xxhash_rust::xxh3::xxh3_128(&n.to_le_bytes());
        ImpKey((h >> 64) as u64, h as u64)
    }

    #[test]
    fn bloom_holds_every_key_and_few_others() {
        let keys: Vec<ImpKey> = (0..10_000).map(key).collect();
        let bloom = bloom_build(&keys);
        assert!(keys.iter().all(|&k| bloom_may_hold(&bloom, k)));
        let false_positives = (10_000..110_000)
            .filter(|&n| bloom_may_hold(&bloom, key(n)))
            .count();
        assert!(false_positives < 3_000, "{false_positives} of 100,000");
    }

    fn entries(n: u64) -> Vec<(ImpKey, Vec<Touch>)> {
        let mut v: Vec<(ImpKey, Vec<Touch>)> = (0..n)
            .map(|i| {
                let touches = (0..1 + i % 3)
                    .map(|j| Touch {
                        time: (i * 10 + j) as i64,
                        campaign: (i % 2) as u32 + 1,
                    })
                    .collect();
                (key(i), touches)
            })
            .collect();
        v.sort_unstable_by_key(|e| e.0);
        v
    }

    /// A spill in a new folder holding `n` ids of `side` in one run, and the ids.
    fn spilled(
        n: u64,
        side: Side,
        keys: Option<Arc<KeyRing>>,
    ) -> (tempfile::TempDir, Vec<(ImpKey, Vec<Touch>)>, Spill) {
        let dir = tempfile::tempdir().unwrap();
        let all = entries(n);
        let refs: Vec<(ImpKey, &[Touch])> = all.iter().map(|(k, t)| (*k, &t[..])).collect();
        let mut spill = Spill::new(dir.path(), keys).unwrap();
        spill.write(side, &refs, &names()).unwrap();
        (dir, all, spill)
    }

    fn names() -> Campaigns {
        let mut c = Campaigns::default();
        c.intern("campaign-one");
        c.intern("campaign-two");
        c
    }

    fn write_and_find(keys: Option<Arc<KeyRing>>) {
        let (dir, all, spill) = spilled(2_000, Side::Impressions, keys.clone());
        let state = spill.state().unwrap();
        let mut reopened = Spill::new(dir.path(), keys).unwrap();
        reopened.restore(state).unwrap();
        let mut here = Campaigns::default();
        for (k, touches) in &all {
            let got = reopened
                .get(Side::Impressions, *k, |_| true, &mut here)
                .expect("spilled id found");
            let got: Vec<(i64, String)> = (got.as_slice().iter())
                .map(|t| (t.time, here.name(t.campaign).to_string()))
                .collect();
            let want: Vec<(i64, String)> = (touches.iter())
                .map(|t| (t.time, names().name(t.campaign).to_string()))
                .collect();
            assert_eq!(got, want);
        }
        assert!(reopened
            .get(Side::Impressions, key(999_999), |_| true, &mut here)
            .is_none());
        assert!(reopened
            .get(Side::Clicks, all[0].0, |_| true, &mut here)
            .is_none());
    }

    #[test]
    fn a_run_finds_what_was_written_after_a_reopen() {
        write_and_find(None);
    }

    #[test]
    fn a_sealed_run_finds_what_was_written_and_holds_no_plain_records() {
        let ring = Arc::new(KeyRing::from_keys(&[(1, [7; 32])], Path::new("keys")));
        write_and_find(Some(ring.clone()));
        let (dir, all, _spill) = spilled(10, Side::Clicks, Some(ring));
        let bytes = fs::read(dir.path().join(run_name(0))).unwrap();
        let needle = all[0].0 .0.to_le_bytes();
        assert!(!bytes.windows(8).any(|w| w == needle));
        assert!(!bytes.windows(12).any(|w| w == b"campaign-one"));
    }

    #[test]
    fn taken_ids_are_gone_from_their_run_and_the_tombstone_is_kept() {
        let (dir, all, mut spill) = spilled(100, Side::Clicks, None);
        let mut here = Campaigns::default();
        assert!(spill
            .take(Side::Clicks, all[5].0, |_| true, &mut here)
            .is_some());
        assert!(spill
            .get(Side::Clicks, all[5].0, |_| true, &mut here)
            .is_none());
        let mut reopened = Spill::new(dir.path(), None).unwrap();
        reopened.restore(spill.state().unwrap()).unwrap();
        assert!(reopened
            .get(Side::Clicks, all[5].0, |_| true, &mut here)
            .is_none());
        assert!(reopened
            .get(Side::Clicks, all[6].0, |_| true, &mut here)
            .is_some());
        // Invisible (expired) touches are not returned.
        assert!(reopened
            .get(Side::Clicks, all[6].0, |_| false, &mut here)
            .is_none());
    }

    #[test]
    fn an_expired_run_is_deleted_only_after_a_checkpoint_without_it_is_saved() {
        let (dir, _all, mut spill) = spilled(10, Side::Impressions, None);
        let file = dir.path().join(run_name(0));
        let before = spill.state().unwrap();
        spill.expire(Side::Impressions, |_| true);
        // The last checkpoint (`before`) still refers to it.
        spill.checkpoint_saved();
        assert!(file.exists());
        let after = spill.state().unwrap();
        assert!(after.runs.is_empty());
        assert!(file.exists());
        spill.checkpoint_saved();
        assert!(!file.exists());
        // Restoring the older checkpoint would now fail clearly, never silently.
        let mut stale = Spill::new(dir.path(), None).unwrap();
        let err = stale.restore(before).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn damage_is_an_error_naming_the_file_never_a_panic() {
        let (dir, all, spill) = spilled(500, Side::Impressions, None);
        let state = spill.state().unwrap();
        let path = dir.path().join(run_name(0));
        let mut bytes = fs::read(&path).unwrap();
        bytes[10] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let mut reopened = Spill::new(dir.path(), None).unwrap();
        reopened.restore(state.clone()).unwrap();
        let mut here = Campaigns::default();
        for (k, _) in &all {
            let _ = reopened.get(Side::Impressions, *k, |_| true, &mut here);
        }
        let err = reopened.state().unwrap_err().to_string();
        assert!(
            err.contains("checksum mismatch") && err.contains("run-"),
            "{err}"
        );
        fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = Spill::new(dir.path(), None)
            .unwrap()
            .restore(state)
            .unwrap_err()
            .to_string();
        assert!(err.contains("run-0000000000.tds"), "{err}");
    }

    #[test]
    fn files_no_live_run_is_are_swept_at_the_first_spill() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(run_name(3)), b"left by a crash").unwrap();
        fs::write(dir.path().join("run-0000000004.tds.tmp"), b"torn").unwrap();
        let all = entries(3);
        let refs: Vec<(ImpKey, &[Touch])> = all.iter().map(|(k, t)| (*k, &t[..])).collect();
        let mut spill = Spill::new(dir.path(), None).unwrap();
        spill.write(Side::Impressions, &refs, &names()).unwrap();
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![run_name(0)]);
    }
}
