//! Ingest: the HTTP collector at the front of the data flow.
//!
//! `POST /v1/events` takes a JSON array or NDJSON (optionally gzip), checks the
//! API key, validates and enriches each event, drops duplicates by `event_id`,
//! and appends the accepted ones to the log; rejected ones go to the
//! dead-letter topic with their reason.
