//! Encryption at rest end to end: `tidemark run --encryption-key-file`
//! leaves no event id in plaintext anywhere in its data folder (log,
//! checkpoints, audit log, and the archive `tidemark archive` writes); after
//! a rotation (a key ring holding the old key and a new current one) every
//! old record still reads: the restarted run restores its checkpoint, the
//! audit API answers the old entries, replay reads the old segments and
//! archive files. A wrong or missing key stops `run` at start naming the
//! file and the key id; a flipped byte in the middle of a checkpoint or an
//! archive file is an error naming the file; a torn segment tail is cut.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use tidemark_tests::{
    create_token, free_port, replay, replay_summary, tidemark_bin, wait_until, API_KEY,
};

const HOUR: i64 = 3_600_000;
const ID_MARK: &str = "enc-secret-id";

fn write_ring(path: &Path, keys: &[(u32, u8)]) {
    let text: String = keys
        .iter()
        .map(|(id, b)| format!("{id}:{}\n", format!("{b:02x}").repeat(32)))
        .collect();
    std::fs::write(path, text).expect("key file");
}

/// `tidemark run` on a free port; killed on drop.
struct Run {
    child: Option<Child>,
    base: String,
}

impl Run {
    fn command(data_dir: &Path, key_file: Option<&Path>, port: u16) -> Command {
        let mut cmd = Command::new(tidemark_bin());
        cmd.arg("run")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--api-key")
            .arg(API_KEY)
            .env("RUST_LOG", "warn")
            .env_remove("TIDEMARK_ENCRYPTION_KEY_FILE");
        if let Some(k) = key_file {
            cmd.arg("--encryption-key-file").arg(k);
        }
        cmd
    }

    async fn start(data_dir: &Path, key_file: &Path) -> Run {
        let port = free_port();
        let child = Run::command(data_dir, Some(key_file), port)
            .stdout(Stdio::null())
            .spawn()
            .expect("tidemark starts");
        let run = Run {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
        };
        let client = reqwest::Client::new();
        let health = format!("{}/api/v1/health", run.base);
        wait_until(
            "tidemark to become healthy",
            Duration::from_secs(60),
            || {
                let request = client.get(&health).send();
                async move { matches!(request.await, Ok(r) if r.status().is_success()) }
            },
        )
        .await;
        run
    }

    /// `run` that must refuse to start: its stderr.
    fn refused(data_dir: &Path, key_file: Option<&Path>) -> String {
        let mut child = Run::command(data_dir, key_file, free_port())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tidemark starts");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(!status.success());
                break;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("tidemark run started despite a bad key");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("output");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    async fn post(&self, events: &[Value]) {
        let reply = reqwest::Client::new()
            .post(format!("{}/v1/events", self.base))
            .bearer_auth(API_KEY)
            .json(events)
            .send()
            .await
            .expect("ingest reachable");
        assert_eq!(reply.status().as_u16(), 202);
    }

    /// Stops with SIGTERM (the last checkpoint is written) and waits.
    fn terminate(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        assert!(child.wait().expect("exit").success());
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn events(hour: i64, round: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({
                "event_id": format!("{ID_MARK}-{round}-{i:05}"),
                "event_type": if i % 2 == 0 { "view" } else { "page_view" },
                "user_id": format!("u{}", i % 37),
                "post_id": format!("p{}", i % 11),
                "page": "/home",
                "timestamp": hour + 60_000 + (i as i64) * 100,
            })
        })
        .collect()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Every file under `dir` holding `needle` in plaintext.
fn holding(dir: &Path, needle: &str) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| {
            let bytes = std::fs::read(p).unwrap_or_default();
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        })
        .collect()
}

fn archive(data_dir: &Path, key_file: &Path, topic: &str) -> Output {
    Command::new(tidemark_bin())
        .args(["archive", "--topic", topic, "--before", "9999999999999"])
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--encryption-key-file")
        .arg(key_file)
        .env("RUST_LOG", "warn")
        .output()
        .expect("tidemark archive runs")
}

fn err(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encrypted_data_folder_hides_event_ids_survives_rotation_and_refuses_bad_keys() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = tmp.path().join("data");
    let (k1, k12, wrong, other) = (
        tmp.path().join("k1"),
        tmp.path().join("k12"),
        tmp.path().join("wrong"),
        tmp.path().join("other"),
    );
    write_ring(&k1, &[(1, 0x11)]);
    write_ring(&k12, &[(1, 0x11), (2, 0x22)]);
    write_ring(&wrong, &[(1, 0x99)]);
    write_ring(&other, &[(3, 0x33)]);
    let hour = (tidemark_model::EventTime::now().millis() / HOUR - 3) * HOUR;
    let data_arg = data.display().to_string();
    let token = create_token(&[
        "--data-dir",
        &data_arg,
        "--encryption-key-file",
        &k1.display().to_string(),
    ]);

    // Key 1: events in, a clean stop writes the last checkpoint.
    let mut run = Run::start(&data, &k1).await;
    run.post(&events(hour, "first", 400)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    run.terminate();
    assert!(data
        .join("checkpoints")
        .read_dir()
        .expect("checkpoints")
        .next()
        .is_some());
    let out = archive(&data, &k1, "content-events");
    assert!(out.status.success(), "{}", err(&out));
    assert!(data.join("archive/content-events/index.json").exists());
    assert_eq!(holding(&data, ID_MARK), Vec::<PathBuf>::new());
    let audit = std::fs::read_to_string(data.join("audit.ndjson")).expect("audit log");
    assert!(
        audit.contains("\"sealed\"") && !audit.contains("token_create"),
        "{audit}"
    );

    // Bad keys refuse to start, naming the file and the key id.
    for (key, want) in [
        (Some(&wrong), "wrong key"),
        (Some(&other), "key id 1"),
        (None, "key id 1"),
    ] {
        let stderr = Run::refused(&data, key.map(PathBuf::as_path));
        assert!(
            stderr.contains("key id 1") && stderr.contains(want),
            "{stderr}"
        );
        assert!(stderr.contains(&data_arg), "{stderr}");
    }

    // Rotated: key 2 writes, key 1 still reads the checkpoint, log and audit log.
    let mut run = Run::start(&data, &k12).await;
    run.post(&events(hour, "second", 400)).await;
    let answer: Value = reqwest::Client::new()
        .get(format!("{}/api/v1/audit", run.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("audit API")
        .json()
        .await
        .expect("JSON");
    let actions: Vec<&str> = answer["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"token_create"), "{answer}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    run.terminate();
    assert_eq!(holding(&data, ID_MARK), Vec::<PathBuf>::new());
    let out = Command::new(tidemark_bin())
        .args(["audit", "verify", "--data-dir", &data_arg])
        .output()
        .expect("audit verify");
    assert!(out.status.success(), "{}", err(&out));

    // Replay reads segments of both keys, and the archive of key 1.
    let (from, to) = (hour.to_string(), (hour + HOUR).to_string());
    let key_arg = k12.display().to_string();
    for source in ["local", "archive"] {
        let out = replay(
            &data,
            &[
                "--from",
                &from,
                "--to",
                &to,
                "--source",
                source,
                "--into",
                &format!("r_{source}"),
                "--encryption-key-file",
                &key_arg,
                "--no-progress",
            ],
        );
        assert!(out.status.success(), "{source}: {}", err(&out));
        let summary = replay_summary(&out);
        assert!(
            summary["events"].as_u64().expect("events") >= 800,
            "{summary}"
        );
    }
    let out = replay(
        &data,
        &[
            "--from",
            &from,
            "--to",
            &to,
            "--into",
            "r_none",
            "--no-progress",
        ],
    );
    assert!(
        !out.status.success() && err(&out).contains("key id"),
        "{}",
        err(&out)
    );

    // A flipped byte in the middle of an archive file: an error naming it.
    let zst = files_under(&data.join("archive/content-events"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "zst"))
        .expect("an archive file");
    flip_middle(&zst);
    let out = replay(
        &data,
        &[
            "--from",
            &from,
            "--to",
            &to,
            "--source",
            "archive",
            "--into",
            "r_bad",
            "--encryption-key-file",
            &key_arg,
            "--no-progress",
        ],
    );
    assert!(!out.status.success(), "a damaged archive file replayed");
    assert!(
        err(&out).contains(&zst.display().to_string()),
        "{}",
        err(&out)
    );

    // A torn segment tail is cut at the next start.
    let seg = files_under(&data.join("log/content-events/0"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .expect("a segment");
    let len = std::fs::metadata(&seg).expect("meta").len();
    let mut bytes = std::fs::read(&seg).expect("segment");
    let head = bytes[..60].to_vec();
    bytes.extend_from_slice(&head);
    std::fs::write(&seg, &bytes).expect("torn tail");
    let mut run = Run::start(&data, &k12).await;
    assert_eq!(std::fs::metadata(&seg).expect("meta").len(), len);
    run.terminate();

    // A flipped byte in the middle of a checkpoint: run refuses, naming it.
    let checkpoint = files_under(&data.join("checkpoints"))
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "checkpoint.bin.zst"))
        .expect("a checkpoint");
    flip_middle(&checkpoint);
    let stderr = Run::refused(&data, Some(&k12));
    assert!(
        stderr.contains(&checkpoint.display().to_string()),
        "{stderr}"
    );
}

fn flip_middle(path: &Path) {
    let mut bytes = std::fs::read(path).expect("file");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(path, bytes).expect("write");
}
