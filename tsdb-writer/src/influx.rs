//! InfluxDB 1.x over HTTP.
