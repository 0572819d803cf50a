//! The compact binary form of an [`Event`] in the log.
//!
//! Layout (little-endian, strings as varint length + bytes): a version byte,
//! then the fields in a fixed order with a presence bitmap for the optional
//! ones. Decoding is strict: a truncated or corrupt record is an error, never a panic.
//!
//! Record layout, version 1:
//!
//! ```text
//! version u8 | type u8 (255: custom, then its name as a string) | event_id str | user_id str
//! | timestamp i64 | received_at i64 | schema_version varint | device u8 | country [u8; 2]
//! | presence u16 | present optionals in bit order
//! ```

use crate::event::{Country, Device, Event, EventType};
use crate::time::EventTime;

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

impl WireError {
    /// Never: the bytes of a record do not change on a second read.
    pub fn is_retryable(&self) -> bool {
        false
    }
}

const CUSTOM_CODE: u8 = 255;

const P_POST_ID: u16 = 1 << 0;
const P_HASHTAGS: u16 = 1 << 1;
const P_CAMPAIGN_ID: u16 = 1 << 2;
const P_AD_ID: u16 = 1 << 3;
const P_IMPRESSION_ID: u16 = 1 << 4;
const P_COST: u16 = 1 << 5;
const P_REVENUE: u16 = 1 << 6;
const P_SESSION_ID: u16 = 1 << 7;
const P_PAGE: u16 = 1 << 8;
const P_DURATION_MS: u16 = 1 << 9;
const P_AGE_BAND: u16 = 1 << 10;
const P_SEGMENT: u16 = 1 << 11;
const P_EXTRA: u16 = 1 << 12;
const P_ALL: u16 = (1 << 13) - 1;

fn type_code(t: &EventType) -> u8 {
    t.built_in_code().unwrap_or(CUSTOM_CODE)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// Appends the binary form of `ev` to `out`.
pub fn encode(ev: &Event, out: &mut Vec<u8>) {
    out.reserve(
        64 + ev.event_id.len() + ev.user_id.len() + ev.extra.as_ref().map_or(0, |e| e.len()),
    );
    out.push(VERSION);
    let code = type_code(&ev.event_type);
    out.push(code);
    if code == CUSTOM_CODE {
        put_str(out, ev.event_type.as_str());
    }
    put_str(out, &ev.event_id);
    put_str(out, &ev.user_id);
    out.extend_from_slice(&ev.timestamp.0.to_le_bytes());
    out.extend_from_slice(&ev.received_at.0.to_le_bytes());
    put_varint(out, u64::from(ev.schema_version));
    out.push(ev.device.code());
    out.extend_from_slice(&ev.country.0);

    let flags = [
        (P_POST_ID, ev.post_id.is_some()),
        (P_HASHTAGS, !ev.hashtags.is_empty()),
        (P_CAMPAIGN_ID, ev.campaign_id.is_some()),
        (P_AD_ID, ev.ad_id.is_some()),
        (P_IMPRESSION_ID, ev.impression_id.is_some()),
        (P_COST, ev.cost.is_some()),
        (P_REVENUE, ev.revenue.is_some()),
        (P_SESSION_ID, ev.session_id.is_some()),
        (P_PAGE, ev.page.is_some()),
        (P_DURATION_MS, ev.duration_ms.is_some()),
        (P_AGE_BAND, ev.age_band.is_some()),
        (P_SEGMENT, ev.segment.is_some()),
        (P_EXTRA, ev.extra.is_some()),
    ];
    let presence = flags
        .iter()
        .filter(|(_, on)| *on)
        .fold(0u16, |acc, (bit, _)| acc | bit);
    out.extend_from_slice(&presence.to_le_bytes());

    if let Some(s) = &ev.post_id {
        put_str(out, s);
    }
    if !ev.hashtags.is_empty() {
        put_varint(out, ev.hashtags.len() as u64);
        for tag in &ev.hashtags {
            put_str(out, tag);
        }
    }
    for s in [&ev.campaign_id, &ev.ad_id, &ev.impression_id]
        .into_iter()
        .flatten()
    {
        put_str(out, s);
    }
    for v in [ev.cost, ev.revenue].into_iter().flatten() {
        out.extend_from_slice(&v.to_bits().to_le_bytes());
    }
    for s in [&ev.session_id, &ev.page].into_iter().flatten() {
        put_str(out, s);
    }
    if let Some(ms) = ev.duration_ms {
        put_varint(out, ms);
    }
    for s in [&ev.age_band, &ev.segment, &ev.extra].into_iter().flatten() {
        put_str(out, s);
    }
}

/// A cursor over one record.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        let (&b, rest) = self.buf.split_first().ok_or(WireError::Truncated)?;
        self.buf = rest;
        Ok(b)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn i64(&mut self) -> Result<i64, WireError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(WireError::Corrupt("varint overflows 64 bits"));
            }
            v |= bits << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(WireError::Corrupt("varint too long"))
    }

    fn str(&mut self) -> Result<&'a str, WireError> {
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| WireError::Truncated)?;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| WireError::Corrupt("string is not UTF-8"))
    }

    /// Reads a string into `into`, reusing its allocation.
    fn string_into(&mut self, into: &mut String) -> Result<(), WireError> {
        let s = self.str()?;
        into.clear();
        into.push_str(s);
        Ok(())
    }

    /// Reads an optional string into `into`, reusing its allocation when present.
    fn opt_string_into(
        &mut self,
        presence: u16,
        bit: u16,
        into: &mut Option<String>,
    ) -> Result<(), WireError> {
        if presence & bit == 0 {
            *into = None;
            return Ok(());
        }
        let s = self.str()?;
        match into {
            Some(held) => {
                held.clear();
                held.push_str(s);
            }
            None => *into = Some(s.to_owned()),
        }
        Ok(())
    }

    fn opt_f64(&mut self, presence: u16, bit: u16) -> Result<Option<f64>, WireError> {
        if presence & bit == 0 {
            return Ok(None);
        }
        Ok(Some(f64::from_bits(u64::from_le_bytes(self.array()?))))
    }
}

fn event_type_from_code(code: u8) -> Option<EventType> {
    EventType::BUILT_IN.get(usize::from(code)).cloned()
}

/// Decodes one event from exactly the bytes of one record.
pub fn decode(buf: &[u8]) -> Result<Event, WireError> {
    let mut ev = Event::default();
    decode_into(buf, &mut ev)?;
    Ok(ev)
}

/// Like [`decode`], into an existing event whose string allocations are
/// reused: a reader decoding record after record into one `Event` allocates
/// only when a string outgrows its buffer. On error `ev` holds a mix of old
/// and new fields and must not be used.
pub fn decode_into(buf: &[u8], ev: &mut Event) -> Result<(), WireError> {
    let mut r = Reader { buf };
    let version = r.u8()?;
    if version != VERSION {
        return Err(WireError::Version(version));
    }
    let code = r.u8()?;
    ev.event_type = if code == CUSTOM_CODE {
        let name = r.str()?;
        if !name.starts_with("custom.") {
            return Err(WireError::Corrupt(
                "custom event type without `custom.` prefix",
            ));
        }
        EventType::Custom(name.into())
    } else {
        event_type_from_code(code).ok_or(WireError::Corrupt("unknown event type code"))?
    };
    r.string_into(&mut ev.event_id)?;
    r.string_into(&mut ev.user_id)?;
    ev.timestamp = EventTime(r.i64()?);
    ev.received_at = EventTime(r.i64()?);
    ev.schema_version = u32::try_from(r.varint()?)
        .map_err(|_| WireError::Corrupt("schema_version out of range"))?;
    ev.device = Device::from_code(r.u8()?).ok_or(WireError::Corrupt("unknown device code"))?;
    let country = Country(r.array()?);
    if country != Country::UNKNOWN && !country.0.iter().all(u8::is_ascii_uppercase) {
        return Err(WireError::Corrupt("country is not two upper-case letters"));
    }
    ev.country = country;
    let presence = u16::from_le_bytes(r.array()?);
    if presence & !P_ALL != 0 {
        return Err(WireError::Corrupt("unknown presence bits"));
    }

    r.opt_string_into(presence, P_POST_ID, &mut ev.post_id)?;
    if presence & P_HASHTAGS != 0 {
        let n = r.varint()?;
        // Every tag takes at least its length byte, which bounds the allocation.
        if n > r.buf.len() as u64 {
            return Err(WireError::Truncated);
        }
        let n = n as usize;
        ev.hashtags.truncate(n);
        for i in 0..n {
            match ev.hashtags.get_mut(i) {
                Some(tag) => r.string_into(tag)?,
                None => ev.hashtags.push(r.str()?.to_owned()),
            }
        }
    } else {
        ev.hashtags.clear();
    }
    r.opt_string_into(presence, P_CAMPAIGN_ID, &mut ev.campaign_id)?;
    r.opt_string_into(presence, P_AD_ID, &mut ev.ad_id)?;
    r.opt_string_into(presence, P_IMPRESSION_ID, &mut ev.impression_id)?;
    ev.cost = r.opt_f64(presence, P_COST)?;
    ev.revenue = r.opt_f64(presence, P_REVENUE)?;
    r.opt_string_into(presence, P_SESSION_ID, &mut ev.session_id)?;
    r.opt_string_into(presence, P_PAGE, &mut ev.page)?;
    ev.duration_ms = if presence & P_DURATION_MS != 0 {
        Some(r.varint()?)
    } else {
        None
    };
    r.opt_string_into(presence, P_AGE_BAND, &mut ev.age_band)?;
    r.opt_string_into(presence, P_SEGMENT, &mut ev.segment)?;
    r.opt_string_into(presence, P_EXTRA, &mut ev.extra)?;
    if !r.buf.is_empty() {
        return Err(WireError::Corrupt("trailing bytes after record"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::test_support;

    fn sample() -> Event {
        Event {
            event_id: "e1".into(),
            event_type: EventType::AdClick,
            user_id: "u1".into(),
            timestamp: EventTime(1_795_420_800_000),
            received_at: EventTime(1_795_420_800_250),
            schema_version: 1,
            campaign_id: Some("c1".into()),
            impression_id: Some("i1".into()),
            hashtags: vec!["rust".into(), "tide".into()],
            cost: Some(0.25),
            device: Device::Ios,
            country: Country(*b"DE"),
            extra: Some(r#"{"properties":{"k":1}}"#.into()),
            ..Event::default()
        }
    }

    #[test]
    fn round_trips_a_sample() {
        let ev = sample();
        let mut buf = Vec::new();
        encode(&ev, &mut buf);
        assert_eq!(buf[0], VERSION);
        assert_eq!(decode(&buf), Ok(ev));
    }

    #[test]
    fn round_trips_a_custom_type() {
        let ev = Event {
            event_type: EventType::Custom("custom.poll_vote".into()),
            ..sample()
        };
        let mut buf = Vec::new();
        encode(&ev, &mut buf);
        assert_eq!(decode(&buf), Ok(ev));
    }

    #[test]
    fn rejects_truncation_at_every_length() {
        let mut buf = Vec::new();
        encode(&sample(), &mut buf);
        for len in 0..buf.len() {
            assert_eq!(
                decode(&buf[..len]),
                Err(WireError::Truncated),
                "length {len}"
            );
        }
    }

    #[test]
    fn rejects_bad_version_trailing_bytes_and_codes() {
        let mut buf = Vec::new();
        encode(&sample(), &mut buf);
        let mut v = buf.clone();
        v[0] = 9;
        assert_eq!(decode(&v), Err(WireError::Version(9)));
        let mut t = buf.clone();
        t.push(0);
        assert!(matches!(decode(&t), Err(WireError::Corrupt(_))));
        let mut c = buf.clone();
        c[1] = 13;
        assert_eq!(
            decode(&c),
            Err(WireError::Corrupt("unknown event type code"))
        );
    }

    #[test]
    fn rejects_overlong_varint() {
        let mut buf = vec![VERSION, 0];
        buf.extend_from_slice(&[0xff; 11]);
        assert!(matches!(decode(&buf), Err(WireError::Corrupt(_))));
    }

    proptest! {
        #[test]
        fn encode_decode_round_trips(ev in test_support::event()) {
            let mut buf = vec![7u8];
            encode(&ev, &mut buf);
            prop_assert_eq!(decode(&buf[1..]), Ok(ev));
        }

        #[test]
        fn decode_into_a_used_event_equals_a_fresh_decode(
            first in test_support::event(),
            second in test_support::event(),
        ) {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            encode(&first, &mut a);
            encode(&second, &mut b);
            let mut reused = Event::default();
            decode_into(&a, &mut reused).unwrap();
            decode_into(&b, &mut reused).unwrap();
            prop_assert_eq!(reused, second);
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decode_survives_corrupted_records(ev in test_support::event(), pos in any::<usize>(), byte in any::<u8>()) {
            let mut buf = Vec::new();
            encode(&ev, &mut buf);
            let i = pos % buf.len();
            buf[i] = byte;
            let _ = decode(&buf);
            let _ = decode(&buf[..i]);
        }
    }
}
