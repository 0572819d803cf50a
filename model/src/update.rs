//! Live updates: window results pushed to dashboards as they change, and
//! their messages on the updates topic that carries them from `process` to
//! every `serve`.

use std::collections::BTreeMap;

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

/// Points of one measurement per message at most, so a message stays well
/// below the brokers' size limit.
pub const POINTS_PER_MESSAGE: usize = 2_000;

/// One message of the updates topic: its key and JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateMessage {
    /// The window start in epoch milliseconds, so a window's messages stay
    /// in order in one partition.
    pub key: String,
    pub value: Vec<u8>,
}

impl Update {
    /// The update as messages: one per measurement (a measurement's points
    /// replace its earlier value on the dashboard, so they stay together),
    /// split at [`POINTS_PER_MESSAGE`].
    pub fn to_messages(&self) -> Vec<UpdateMessage> {
        let mut by_measurement: BTreeMap<&str, Vec<&Point>> = BTreeMap::new();
        for p in &self.points {
            by_measurement
                .entry(p.measurement.as_str())
                .or_default()
                .push(p);
        }
        let mut out = Vec::new();
        for points in by_measurement.values() {
            for chunk in points.chunks(POINTS_PER_MESSAGE) {
                let part = Update {
                    window_start: self.window_start,
                    is_final: self.is_final,
                    newest_received_at: self.newest_received_at,
                    points: chunk.iter().map(|p| (*p).clone()).collect(),
                };
                out.push(UpdateMessage {
                    key: self.window_start.millis().to_string(),
                    value: serde_json::to_vec(&part).expect("an update always serialises"),
                });
            }
        }
        out
    }

    /// Reads one message of the updates topic.
    pub fn from_message(value: &[u8]) -> Result<Update, serde_json::Error> {
        serde_json::from_slice(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FieldValue, Tier};

    fn point(measurement: &str, i: i64) -> Point {
        Point::new(
            measurement,
            Tier::Rt,
            EventTime(60_000),
            vec![("tag".into(), format!("t{i}"))],
            vec![("n".into(), FieldValue::Int(i))],
        )
    }

    #[test]
    fn messages_keep_a_measurement_together_and_read_back_as_the_update() {
        let mut points: Vec<Point> = (0..POINTS_PER_MESSAGE as i64 + 1)
            .map(|i| point("traffic", i))
            .collect();
        points.push(point("ads", 0));
        let update = Update {
            window_start: EventTime(60_000),
            is_final: true,
            newest_received_at: EventTime(61_000),
            points,
        };
        let messages = update.to_messages();
        assert_eq!(messages.len(), 3, "ads, and traffic in two");
        assert!(messages.iter().all(|m| m.key == "60000"));
        let back: Vec<Update> = messages
            .iter()
            .map(|m| Update::from_message(&m.value).unwrap())
            .collect();
        assert_eq!(back[0].points, vec![point("ads", 0)]);
        assert_eq!(back[1].points.len(), POINTS_PER_MESSAGE);
        let all: Vec<Point> = back.iter().flat_map(|u| u.points.clone()).collect();
        assert_eq!(all.len(), update.points.len());
        assert!(back
            .iter()
            .all(|u| u.is_final && u.newest_received_at == EventTime(61_000)));
        assert!(Update::from_message(b"{").is_err());
    }
}
