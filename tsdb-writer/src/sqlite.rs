//! The embedded store: SQLite, with the same tiers as InfluxDB.
