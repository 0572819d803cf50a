//! Where a replay writes: a database by name, opened through the store's
//! [`StoreTarget`]; and the name it gets by default.

use tidemark_model::EventTime;
pub use tidemark_tsdb_writer::target::{check_name, sqlite_path, StoreTarget};

/// The database a replay started at `now` writes into by default:
/// `tidemark_replay_<UTC date>_<UTC time>`, e.g. `tidemark_replay_20261125_170501`.
pub fn default_database_name(now: EventTime) -> String {
    let t =
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(now.millis()).unwrap_or_default();
    format!("tidemark_replay_{}", t.format("%Y%m%d_%H%M%S"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_names_are_valid_database_names() {
        let name = default_database_name(EventTime(1_795_712_701_000));
        assert_eq!(name, "tidemark_replay_20261126_170501");
        assert!(check_name(&name).is_ok());
    }
}
