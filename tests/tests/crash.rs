//! Crash safety: SIGKILL in the middle of a stream, restart, finish the stream:
//! every closed window equals the uninterrupted run (no loss, no double count).

use tidemark_tests::{KnownEvents, Tidemark};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_and_doubles_nothing() {
    let known = KnownEvents::new(40);

    let uninterrupted_dir = tempfile::tempdir().unwrap();
    let uninterrupted = Tidemark::start(uninterrupted_dir.path(), &[]).await;
    for batch in &known.batches {
        assert_eq!(uninterrupted.post(batch).await.0, 202);
    }
    known.assert_results(&uninterrupted).await;
    let reference = known.read_traffic(&uninterrupted).await;
    drop(uninterrupted);

    let dir = tempfile::tempdir().unwrap();
    let mut t = Tidemark::start(dir.path(), &[]).await;
    let half = known.batches.len() / 2;
    for batch in &known.batches[..half] {
        assert_eq!(t.post(batch).await.0, 202);
    }
    // The client's view: the next batch was sent but its answer never came.
    let in_flight = &known.batches[half];
    let _ = t.post(in_flight).await;
    t.kill();
    t.restart().await;
    // At-least-once from the client: resend the unanswered batch, then the rest.
    for batch in &known.batches[half..] {
        assert_eq!(t.post(batch).await.0, 202);
    }
    known.assert_results(&t).await;
    assert_eq!(
        known.read_traffic(&t).await,
        reference,
        "closed windows equal the uninterrupted run"
    );
}
