//! The event model of tidemark, shared by every stage of the data flow.
//!
//! Clients send JSON events ([`event`]); ingest validates them into [`Event`]s and
//! writes them to the log in a compact binary form ([`wire`]); processors turn them
//! into [`Point`]s ([`point`]) stamped with [`EventTime`] ([`time`]); the store and
//! the live updates channel carry points onwards.

pub mod crash;
pub mod dead_letter;
pub mod event;
pub mod keyring;
pub mod point;
pub mod time;
pub mod topic;
pub mod update;
pub mod wire;

#[cfg(test)]
mod test_support;

pub use dead_letter::DeadLetter;
pub use event::{Country, Device, Event, EventError, EventType, Limits};
pub use keyring::KeyRing;
pub use point::{FieldValue, Point, Tier};
pub use time::{EventTime, Watermark};
pub use update::Update;
