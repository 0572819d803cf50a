//! Serving: the REST query API, WebSocket fan-out of live updates, the web
//! dashboard and `/metrics`, at the end of the data flow.
