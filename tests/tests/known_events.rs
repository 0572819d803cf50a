//! A known event set through the whole single-process path, read back through
//! the REST API, from the embedded store and from a real InfluxDB server.

use tidemark_tests::{InfluxServer, KnownEvents, Tidemark};

async fn post_all(t: &Tidemark, known: &KnownEvents) {
    let mut rejected = 0;
    for batch in &known.batches {
        let (status, reply) = t.post(batch).await;
        assert_eq!(status, 202, "batch accepted: {reply}");
        rejected += reply["rejected"].as_array().map_or(0, Vec::len);
    }
    assert_eq!(
        rejected, known.invalid,
        "every invalid event rejected with a reason"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_counts_from_the_embedded_store() {
    let dir = tempfile::tempdir().unwrap();
    let t = Tidemark::start(dir.path(), &[]).await;
    let known = KnownEvents::new(30);
    post_all(&t, &known).await;
    known.assert_results(&t).await;
    let health = t.get_json("/api/v1/health").await;
    assert_eq!(health["store"], "sqlite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_counts_from_influxdb() {
    let influx = InfluxServer::start().expect("influxd starts");
    let dir = tempfile::tempdir().unwrap();
    let t = Tidemark::start(
        dir.path(),
        &["--influx-url", &influx.url, "--influx-db", "tidemark"],
    )
    .await;
    let known = KnownEvents::new(30);
    post_all(&t, &known).await;
    known.assert_results(&t).await;
    let health = t.get_json("/api/v1/health").await;
    assert_eq!(health["store"], "influxdb");
}
