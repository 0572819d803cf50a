//! Live updates: window results pushed to dashboards as they change.

use serde::{Deserialize, Serialize};

use crate::point::Point;
use crate::time::EventTime;

/// Results for one window, early (window still open) or final.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// Start of the window the points belong to.
    pub window_start: EventTime,
    /// `false` for an early firing of an open window, `true` once it closed.
    pub is_final: bool,
    /// The newest `received_at` among the events in this update's windows,
    /// so the server can measure event-to-update latency.
    pub newest_received_at: EventTime,
    pub points: Vec<Point>,
}
