//! The compact binary form of an [`Event`] in the log.
//!
//! Layout (little-endian, strings as varint length + bytes): a version byte,
//! then the fields in a fixed order with a presence bitmap for the optional
//! ones. Decoding is strict: a truncated or corrupt record is an error, never a panic.

use crate::event::Event;

/// Current wire version byte.
pub const VERSION: u8 = 1;

/// A record that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unsupported wire version {0}")]
    Version(u8),
    #[error("record truncated")]
    Truncated,
    #[error("corrupt record: {0}")]
    Corrupt(&'static str),
}

/// Appends the binary form of `ev` to `out`.
pub fn encode(ev: &Event, out: &mut Vec<u8>) {
    todo!("encode {ev:?} into {} bytes", out.len())
}

/// Decodes one event from exactly the bytes of one record.
pub fn decode(buf: &[u8]) -> Result<Event, WireError> {
    todo!("decode {} bytes", buf.len())
}
