//! Encryption at rest: the key ring read from `--encryption-key-file` and the
//! AES-256-GCM sealing shared by every file tidemark writes under its data
//! directory (log segments, checkpoints, the archive, the audit log).
//!
//! Key file: either exactly 32 raw bytes (key id 0), or text lines
//! `<id>:<64 hex digits>` with a decimal id; blank lines and lines starting
//! with `#` are ignored. New data is written with the key of the last line, so
//! a rotation appends a line with a new id and keeps the old ones for reading.
//!
//! A sealed blob is `key id (u32 LE) | nonce (12 bytes) | ciphertext | tag
//! (16 bytes)`. The key id names the key that reads it, so data written before
//! a rotation stays readable. Nonces are random 96-bit values from a
//! cryptographic generator, one per sealed blob.

use std::fmt;
use std::path::{Path, PathBuf};

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce, Tag};
use rand::RngCore;

/// Bytes in front of the ciphertext: key id and nonce.
pub const SEAL_PREFIX: usize = 4 + NONCE_LEN;
/// The authentication tag after the ciphertext.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed blob adds to its plaintext.
pub const SEAL_OVERHEAD: usize = SEAL_PREFIX + TAG_LEN;
const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error("cannot read encryption key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("encryption key file {path}, line {line}: {detail}")]
    Parse {
        path: String,
        line: usize,
        detail: String,
    },
    #[error("encryption key file {path} holds no key")]
    Empty { path: String },
}

/// Why a sealed blob does not open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("sealed data is shorter than its key id, nonce and tag")]
    Truncated,
    #[error("encrypted with key id {0}, which the encryption key file does not hold")]
    UnknownKey(u32),
    #[error("authentication with key id {0} failed (damaged data or a wrong key)")]
    Authentication(u32),
}

/// The keys of an encryption key file: every key reads what it wrote, the
/// current one writes. Ciphers are built once and shared.
#[derive(Clone)]
pub struct KeyRing {
    keys: Vec<(u32, Aes256Gcm)>,
    current: usize,
    source: PathBuf,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key bytes.
        f.debug_struct("KeyRing")
            .field("ids", &self.ids())
            .field("current", &self.current_id())
            .field("source", &self.source)
            .finish()
    }
}

impl PartialEq for KeyRing {
    fn eq(&self, other: &Self) -> bool {
        self.ids() == other.ids() && self.current == other.current && self.source == other.source
    }
}

impl Eq for KeyRing {}

impl KeyRing {
    /// Reads a key file (see the module documentation for its format).
    pub fn load(path: impl AsRef<Path>) -> Result<KeyRing, KeyRingError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| KeyRingError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&bytes, path)
    }

    /// Parses the contents of a key file; `source` names it in errors.
    pub fn parse(bytes: &[u8], source: &Path) -> Result<KeyRing, KeyRingError> {
        let name = source.display().to_string();
        if bytes.len() == KEY_LEN {
            let mut key = [0u8; KEY_LEN];
            key.copy_from_slice(bytes);
            return Ok(Self::from_keys(&[(0, key)], source));
        }
        let parse_err = |line: usize, detail: String| KeyRingError::Parse {
            path: name.clone(),
            line,
            detail,
        };
        let text = std::str::from_utf8(bytes).map_err(|_| {
            parse_err(
                1,
                format!("neither {KEY_LEN} raw bytes nor lines of `id:<64 hex digits>`"),
            )
        })?;
        let mut keys: Vec<(u32, [u8; KEY_LEN])> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, hex) = line
                .split_once(':')
                .ok_or_else(|| parse_err(i + 1, "expected `id:<64 hex digits>`".into()))?;
            let id: u32 = id
                .trim()
                .parse()
                .map_err(|_| parse_err(i + 1, format!("key id `{id}` is not a number")))?;
            let key = decode_hex(hex.trim())
                .ok_or_else(|| parse_err(i + 1, "the key is not 64 hex digits".into()))?;
            if keys.iter().any(|(k, _)| *k == id) {
                return Err(parse_err(i + 1, format!("key id {id} appears twice")));
            }
            keys.push((id, key));
        }
        if keys.is_empty() {
            return Err(KeyRingError::Empty { path: name });
        }
        Ok(Self::from_keys(&keys, source))
    }

    /// A ring of `keys`; the last one writes.
    pub fn from_keys(keys: &[(u32, [u8; KEY_LEN])], source: &Path) -> KeyRing {
        assert!(!keys.is_empty(), "a key ring needs a key");
        KeyRing {
            keys: keys
                .iter()
                .map(|(id, k)| (*id, Aes256Gcm::new(k.into())))
                .collect(),
            current: keys.len() - 1,
            source: source.to_path_buf(),
        }
    }

    /// The key file this ring was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// The id new data is written with.
    pub fn current_id(&self) -> u32 {
        self.keys[self.current].0
    }

    /// Every key id the ring holds, in file order.
    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|(id, _)| *id).collect()
    }

    /// Whether the ring holds key `id`.
    pub fn has(&self, id: u32) -> bool {
        self.keys.iter().any(|(k, _)| *k == id)
    }

    fn cipher(&self, id: u32) -> Option<&Aes256Gcm> {
        self.keys.iter().find(|(k, _)| *k == id).map(|(_, c)| c)
    }

    /// Seals `buf[start..]` in place: `buf[start..start + SEAL_PREFIX]` must
    /// be reserved (it receives key id and nonce), the rest is the plaintext;
    /// the tag is appended. `aad` is authenticated, not stored.
    pub fn seal_tail(&self, buf: &mut Vec<u8>, start: usize, aad: &[u8]) {
        let (id, cipher) = &self.keys[self.current];
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        buf[start..start + 4].copy_from_slice(&id.to_le_bytes());
        buf[start + 4..start + SEAL_PREFIX].copy_from_slice(&nonce);
        let tag = cipher
            .encrypt_in_place_detached(
                Nonce::from_slice(&nonce),
                aad,
                &mut buf[start + SEAL_PREFIX..],
            )
            // Only a plaintext beyond 64 GiB is refused; callers seal far less.
            .expect("AES-GCM seals any buffer below 64 GiB");
        buf.extend_from_slice(&tag);
    }

    /// `plaintext` sealed with the current key.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut buf = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        buf.resize(SEAL_PREFIX, 0);
        buf.extend_from_slice(plaintext);
        self.seal_tail(&mut buf, 0, aad);
        buf
    }

    /// Opens a sealed blob in place; returns the plaintext, a slice of `sealed`.
    pub fn open_in_place<'a>(
        &self,
        sealed: &'a mut [u8],
        aad: &[u8],
    ) -> Result<&'a [u8], OpenError> {
        let id = sealed_key_id(sealed).ok_or(OpenError::Truncated)?;
        if sealed.len() < SEAL_OVERHEAD {
            return Err(OpenError::Truncated);
        }
        let cipher = self.cipher(id).ok_or(OpenError::UnknownKey(id))?;
        let (head, rest) = sealed.split_at_mut(SEAL_PREFIX);
        let (body, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
        cipher
            .decrypt_in_place_detached(
                Nonce::from_slice(&head[4..]),
                aad,
                body,
                Tag::from_slice(tag),
            )
            .map_err(|_| OpenError::Authentication(id))?;
        Ok(body)
    }

    /// Opens a sealed blob into a new buffer.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Vec<u8>, OpenError> {
        let mut buf = sealed.to_vec();
        let len = self.open_in_place(&mut buf, aad)?.len();
        buf.copy_within(SEAL_PREFIX..SEAL_PREFIX + len, 0);
        buf.truncate(len);
        Ok(buf)
    }
}

/// The `--encryption-key-file` flag, flattened by every command that writes
/// or reads the files it seals.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EncryptionArgs {
    /// Seal the embedded log, checkpoints, archive and audit log with
    /// AES-256-GCM: a file of 32 raw bytes, or lines `ID:<64 hex digits>`
    /// whose last line writes (docs/operations.md, "Encryption at rest").
    #[arg(long = "encryption-key-file", env = "TIDEMARK_ENCRYPTION_KEY_FILE")]
    pub encryption_key_file: Option<PathBuf>,
}

impl EncryptionArgs {
    /// The key ring of the file given, if any.
    pub fn keys(&self) -> Result<Option<std::sync::Arc<KeyRing>>, KeyRingError> {
        self.encryption_key_file
            .as_deref()
            .map(|p| KeyRing::load(p).map(std::sync::Arc::new))
            .transpose()
    }
}

/// The key id a sealed blob names, if it is long enough to hold one.
pub fn sealed_key_id(sealed: &[u8]) -> Option<u32> {
    let b: [u8; 4] = sealed.get(..4)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

fn decode_hex(s: &str) -> Option<[u8; KEY_LEN]> {
    let s = s.as_bytes();
    if s.len() != 2 * KEY_LEN {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; KEY_LEN];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(s[2 * i])? << 4 | digit(s[2 * i + 1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(k: &[u8; 32]) -> String {
        k.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn raw_and_ring_files_parse_and_the_last_line_writes() {
        let raw = KeyRing::parse(&[7u8; 32], Path::new("k")).unwrap();
        assert_eq!((raw.ids(), raw.current_id()), (vec![0], 0));
        let text = format!(
            "# old\n1:{}\n\n2:{}\n",
            hex(&[1; 32]),
            hex(&[2; 32]).to_uppercase()
        );
        let ring = KeyRing::parse(text.as_bytes(), Path::new("k")).unwrap();
        assert_eq!((ring.ids(), ring.current_id()), (vec![1, 2], 2));
        assert!(!format!("{ring:?}").contains("0101"));
    }

    #[test]
    fn bad_key_files_are_errors_naming_the_file_and_line() {
        for (text, want) in [
            ("1:abc\n".to_string(), "line 1"),
            (format!("x:{}\n", hex(&[1; 32])), "not a number"),
            (format!("1:{0}\n1:{0}\n", hex(&[1; 32])), "appears twice"),
            ("# nothing\n".to_string(), "holds no key"),
        ] {
            let err = KeyRing::parse(text.as_bytes(), Path::new("keys.txt")).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("keys.txt") && msg.contains(want), "{msg}");
        }
    }

    #[test]
    fn sealed_data_opens_after_a_rotation_and_not_with_a_wrong_key() {
        let old = KeyRing::from_keys(&[(1, [1; 32])], Path::new("k"));
        let sealed = old.seal(b"event e-42", b"aad");
        assert_eq!(sealed.len(), 10 + SEAL_OVERHEAD);
        assert!(!sealed.windows(4).any(|w| w == b"e-42"));
        let rotated = KeyRing::from_keys(&[(1, [1; 32]), (2, [2; 32])], Path::new("k"));
        assert_eq!(rotated.open(&sealed, b"aad").unwrap(), b"event e-42");
        let newer = rotated.seal(b"x", b"");
        assert_eq!(sealed_key_id(&newer), Some(2));
        assert_eq!(old.open(&newer, b""), Err(OpenError::UnknownKey(2)));

        let wrong = KeyRing::from_keys(&[(1, [9; 32])], Path::new("k"));
        assert_eq!(
            wrong.open(&sealed, b"aad"),
            Err(OpenError::Authentication(1))
        );
        assert_eq!(
            old.open(&sealed, b"other"),
            Err(OpenError::Authentication(1))
        );
        let mut flipped = sealed.clone();
        flipped[SEAL_PREFIX + 3] ^= 1;
        assert_eq!(
            old.open(&flipped, b"aad"),
            Err(OpenError::Authentication(1))
        );
        assert_eq!(old.open(&sealed[..20], b"aad"), Err(OpenError::Truncated));
    }

    #[test]
    fn nonces_differ_per_seal() {
        let ring = KeyRing::from_keys(&[(1, [1; 32])], Path::new("k"));
        let (a, b) = (ring.seal(b"same", b""), ring.seal(b"same", b""));
        assert_ne!(a[4..SEAL_PREFIX], b[4..SEAL_PREFIX]);
        assert_ne!(a, b);
    }
}
