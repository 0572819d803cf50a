//! Harness for tidemark's end-to-end tests: starts the `tidemark` binary and
//! real services (InfluxDB) on free loopback ports, and stops them afterwards.
