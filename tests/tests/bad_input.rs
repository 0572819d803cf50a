//! Bad input gets a 4xx with reasons, the process stays up, and `/metrics`
//! counts each rejection by reason.

use std::io::Write as _;

use serde_json::{json, Value};
use tidemark_tests::{metric_value, Tidemark, API_KEY};

async fn post_raw(t: &Tidemark, body: Vec<u8>, key: Option<&str>, gzip: bool) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/v1/events", t.base))
        .body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    if gzip {
        request = request.header("content-encoding", "gzip");
    }
    let reply = request.send().await.expect("ingest answers");
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

/// Sends only the headers of a request announcing a body of `len` bytes (with
/// `Expect: 100-continue`, as large uploads do) and returns the status: the
/// server must refuse before reading the body.
async fn post_announcing_body(t: &Tidemark, len: usize) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", t.port))
        .await
        .expect("connect");
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {len}\r\nExpect: 100-continue\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .await
        .expect("headers sent");
    let mut reply = vec![0u8; 1024];
    let n = stream.read(&mut reply).await.expect("an answer");
    let text = String::from_utf8_lossy(&reply[..n]);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn reasons(reply: &Value) -> Vec<String> {
    reply["rejected"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["reason"].as_str().map(String::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_reasons_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Tidemark::start(dir.path(), &[]).await;
    let now = tidemark_model::EventTime::now().millis();

    let (status, _) = post_raw(&t, b"[{\"event_id\": ".to_vec(), Some(API_KEY), false).await;
    assert_eq!(status, 400, "malformed JSON");

    let wrong_type = json!([{"event_id": "w1", "event_type": "like", "user_id": 42, "post_id": "p", "timestamp": now}]);
    let (status, reply) = t.post(wrong_type.as_array().unwrap()).await;
    assert_eq!(
        (status, reasons(&reply)),
        (400, vec!["wrong_type".to_string()])
    );

    let unknown =
        json!([{"event_id": "x1", "event_type": "teleport", "user_id": "u", "timestamp": now}]);
    let (status, reply) = t.post(unknown.as_array().unwrap()).await;
    assert_eq!(
        (status, reasons(&reply)),
        (400, vec!["unknown_event_type".to_string()])
    );

    let future = json!([{"event_id": "f1", "event_type": "login", "user_id": "u", "timestamp": now + 86_400_000}]);
    let (status, reply) = t.post(future.as_array().unwrap()).await;
    assert_eq!(
        (status, reasons(&reply)),
        (400, vec!["timestamp_out_of_range".to_string()])
    );

    let mut ndjson = format!(
        "{{\"event_id\":\"ok1\",\"event_type\":\"login\",\"user_id\":\"u\",\"timestamp\":{now}}}\n"
    )
    .into_bytes();
    ndjson.extend_from_slice(
        b"{\"event_id\":\"\xff\xfe\",\"event_type\":\"login\",\"user_id\":\"u\",\"timestamp\":1}\n",
    );
    let (status, reply) = post_raw(&t, ndjson, Some(API_KEY), false).await;
    assert_eq!(status, 202, "the valid line is accepted: {reply}");
    assert_eq!(reply["accepted"], 1);
    assert_eq!(reasons(&reply), vec!["invalid_utf8".to_string()]);

    assert_eq!(
        post_announcing_body(&t, 10 * 1024 * 1024).await,
        413,
        "10 MiB body"
    );

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&vec![b' '; 20 * 1024 * 1024]).unwrap();
    let (status, _) = post_raw(&t, gz.finish().unwrap(), Some(API_KEY), true).await;
    assert_eq!(status, 413, "a gzip body that inflates past the limit");

    let (status, _) = post_raw(&t, b"[]".to_vec(), None, false).await;
    assert_eq!(status, 401, "missing API key");
    let (status, _) = post_raw(&t, b"[]".to_vec(), Some("wrong"), false).await;
    assert_eq!(status, 401, "wrong API key");

    assert!(t.is_running(), "the process stays up");
    let health = t.get_json("/api/v1/health").await;
    assert_eq!(health["status"], "ok");

    let metrics = t.metrics_text().await;
    for (reason, count) in [
        ("invalid_json", 1.0),
        ("wrong_type", 1.0),
        ("unknown_event_type", 1.0),
        ("timestamp_out_of_range", 1.0),
        ("invalid_utf8", 1.0),
        ("body_too_large", 2.0),
        ("unauthorized", 2.0),
    ] {
        let label = format!("reason=\"{reason}\"");
        assert_eq!(
            metric_value(&metrics, "tidemark_ingest_events_rejected_total", &label),
            count,
            "rejections counted for {reason}"
        );
    }
}

fn login(id: &str) -> Value {
    json!({"event_id": id, "event_type": "login", "user_id": "u1",
           "timestamp": tidemark_model::EventTime::now().millis()})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_limit_is_told_when_to_retry_and_nothing_is_appended() {
    let dir = tempfile::tempdir().unwrap();
    // A token every 100 s: none comes back while the test runs.
    let t = Tidemark::start(
        dir.path(),
        &["--rate-limit", "0.01", "--rate-limit-burst", "2"],
    )
    .await;
    let (status, reply) = t.post(&[login("a"), login("b")]).await;
    assert_eq!(status, 202, "{reply}");
    let reply = reqwest::Client::new()
        .post(format!("{}/v1/events", t.base))
        .bearer_auth(API_KEY)
        .json(&[login("c")])
        .send()
        .await
        .expect("ingest answers");
    assert_eq!(reply.status().as_u16(), 429);
    let retry_after = reply.headers()["retry-after"].to_str().unwrap().to_string();
    assert_eq!(retry_after, "100");
    let (status, _) = t.post(&[login("d"), login("e"), login("f")]).await;
    assert_eq!(status, 413, "more than the burst");
    let metrics = t.metrics_text().await;
    assert_eq!(
        metric_value(&metrics, "tidemark_ingest_events_accepted_total", ""),
        2.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "tidemark_ingest_events_rejected_total",
            "rate_limited"
        ),
        1.0
    );
}

#[test]
fn a_rate_limit_that_is_not_positive_is_a_clear_error_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(tidemark_tests::tidemark_bin())
        .args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--rate-limit",
            "0",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .expect("tidemark runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--rate-limit"), "{stderr}");
    assert!(stderr.contains("positive"), "{stderr}");
}
