//! `tidemark user`, `tidemark token` and `tidemark audit verify` on a data
//! folder, as an operator runs them.

use std::process::{Command, Output, Stdio};

use tidemark_tests::tidemark_bin;

fn tidemark(dir: &std::path::Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(tidemark_bin())
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tidemark runs");
    if let Some(text) = stdin {
        use std::io::Write as _;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().expect("tidemark exits")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn users_tokens_and_the_audit_chain_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path();
    let added = tidemark(path, &["user", "add", "alice", "--role", "analyst"], None);
    assert!(added.status.success(), "{}", text(&added));
    assert!(
        text(&added).contains("password: "),
        "a made-up password is printed"
    );
    let chosen = tidemark(
        path,
        &["user", "add", "bob", "--role", "admin", "--password-stdin"],
        Some("bob's long password\n"),
    );
    assert!(chosen.status.success(), "{}", text(&chosen));
    assert!(!text(&chosen).contains("password: "));
    let bad_role = tidemark(path, &["user", "add", "eve", "--role", "owner"], None);
    assert!(!bad_role.status.success());
    assert!(
        text(&bad_role).contains("not a role"),
        "{}",
        text(&bad_role)
    );

    let token = tidemark(
        path,
        &["token", "create", "--role", "analyst", "--name", "grafana"],
        None,
    );
    assert!(token.status.success(), "{}", text(&token));
    let secret = String::from_utf8_lossy(&token.stdout).trim().to_string();
    assert!(secret.starts_with("tmk_"), "{secret}");
    let users_file = std::fs::read_to_string(path.join("users.toml")).unwrap();
    assert!(users_file.contains("$argon2id$"));
    assert!(
        !users_file.contains(&secret[4..]),
        "only the token's hash is kept"
    );

    let listed = tidemark(path, &["user", "list"], None);
    assert_eq!(
        String::from_utf8_lossy(&listed.stdout),
        "alice\tanalyst\nbob\tadmin\n"
    );

    let verified = tidemark(path, &["audit", "verify"], None);
    assert!(verified.status.success(), "{}", text(&verified));
    assert!(
        text(&verified).contains("3 entries, chain intact"),
        "{}",
        text(&verified)
    );

    let log = path.join("audit.ndjson");
    let original = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, original.replacen("alice", "mallory", 1)).unwrap();
    let broken = tidemark(path, &["audit", "verify"], None);
    assert!(!broken.status.success());
    assert!(text(&broken).contains("line 2"), "{}", text(&broken));
}
