//! Who may call what: every route with every kind of credential, login and
//! refresh, the failed-login limit and the audit log's chain.

use std::sync::Arc;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{json, Value};
use tidemark_model::{EventTime, Point, Tier};
use tidemark_tsdb_writer::{MetricQuery, Series, Store, StoreError};
use tidemark_ws_server::audit::{self, ChainError};
use tidemark_ws_server::{router, Access, AccessConfig, Permission, Role, ServerState};
use tokio::sync::broadcast;
use tower::ServiceExt;

/// A store with nothing in it: these tests are about who may ask.
#[derive(Debug)]
struct EmptyStore;

#[async_trait]
impl Store for EmptyStore {
    async fn ensure_schema(&self) -> Result<(), StoreError> {
        Ok(())
    }
    async fn write(&self, _: &[Point]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn query(&self, _: &MetricQuery) -> Result<Vec<Series>, StoreError> {
        Ok(Vec::new())
    }
    async fn points(
        &self,
        _: Tier,
        _: &str,
        _: EventTime,
        _: EventTime,
    ) -> Result<Vec<Point>, StoreError> {
        Ok(Vec::new())
    }
    fn kind(&self) -> &'static str {
        "empty"
    }
}

struct Server {
    state: Arc<ServerState>,
    dir: tempfile::TempDir,
    rules: Arc<tidemark_ws_server::alerting::RulesBook>,
}

fn rule(name: &str) -> tidemark_processor::alerts::Rule {
    tidemark_processor::alerts::Rule::from_json(&rule_json(), Some(name)).unwrap()
}

fn rule_json() -> Value {
    json!({"kind": "threshold", "measurement": "traffic", "field": "events",
        "where": {"event_type": "like"}, "op": "<", "value": 100, "for": 3})
}

const PASSWORD: &str = "a long password";

fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let access = Access::open(AccessConfig {
        users_file: dir.path().join("users.toml"),
        jwt_secret: vec![42; 32],
        ingest_keys: vec!["ingest-key".into()],
        audit_log: dir.path().join("audit.ndjson"),
    })
    .unwrap();
    for role in Role::ALL {
        access
            .users()
            .put_user(role.name(), role, PASSWORD)
            .unwrap();
    }
    let (updates, _) = broadcast::channel(4);
    let state = Arc::new(ServerState::new(
        Arc::new(EmptyStore),
        updates,
        prometheus::Registry::new(),
        None,
        access,
    ));
    state.set_serving_dir(dir.path().to_path_buf());
    let rules = Arc::new(
        tidemark_ws_server::alerting::RulesBook::open(dir.path().join("alert-rules.toml")).unwrap(),
    );
    state.set_alert_rules(rules.clone());
    Server { state, dir, rules }
}

impl Server {
    async fn call(
        &self,
        method: Method,
        uri: &str,
        credential: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(c) = credential {
            request = request.header("authorization", format!("Bearer {c}"));
        }
        let request = match body {
            Some(b) => request
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => request.body(Body::empty()),
        }
        .unwrap();
        let response = router(self.state.clone()).oneshot(request).await.unwrap();
        let (status, headers) = (response.status(), response.headers().clone());
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 22)
            .await
            .unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        (status, headers, value)
    }

    async fn login(&self, name: &str, password: &str) -> (StatusCode, Value) {
        let body = json!({ "name": name, "password": password });
        let (status, _, value) = self
            .call(Method::POST, "/api/v1/auth/login", None, Some(body))
            .await;
        (status, value)
    }

    fn audit_entries(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("audit.ndjson"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

/// A request a route takes, and the permission it needs.
struct Case {
    method: Method,
    path: &'static str,
    needs: Permission,
    body: Option<Value>,
}

fn case(method: Method, path: &'static str, needs: Permission, body: Option<Value>) -> Case {
    Case {
        method,
        path,
        needs,
        body,
    }
}

/// Whether a concrete path (with a query) is one of a route's template.
fn matches_template(path: &str, template: &str) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    let (a, b): (Vec<&str>, Vec<&str>) = (path.split('/').collect(), template.split('/').collect());
    a.len() == b.len() && a.iter().zip(&b).all(|(p, t)| p == t || t.starts_with('{'))
}

fn cases() -> Vec<Case> {
    use Permission::*;
    let range = "from=2026-12-01T00:00:00Z&to=2026-12-01T01:00:00Z";
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    vec![
        case(Method::GET, "/api/v1/auth/me", ReadMetrics, None),
        case(
            Method::GET,
            leak(format!("/api/v1/metrics?name=traffic&field=events&{range}")),
            ReadMetrics,
            None,
        ),
        case(Method::GET, "/api/v1/trending?window=5m", ReadMetrics, None),
        case(
            Method::GET,
            leak(format!("/api/v1/trending/rust?window=5m&{range}")),
            ReadMetrics,
            None,
        ),
        case(
            Method::GET,
            leak(format!("/api/v1/campaigns?{range}")),
            ReadMetrics,
            None,
        ),
        case(
            Method::GET,
            leak(format!(
                "/api/v1/campaigns/c7?{range}&step=1m&group_by=device"
            )),
            ReadMetrics,
            None,
        ),
        case(
            Method::GET,
            leak(format!(
                "/api/v1/engagement?{range}&step=1h&group_by=segment"
            )),
            ReadMetrics,
            None,
        ),
        case(
            Method::POST,
            "/api/v1/query",
            RunQueries,
            Some(
                json!({"sql": "SELECT count(*) FROM traffic WHERE time >= '2026-12-01T00:00:00Z'"}),
            ),
        ),
        case(Method::GET, "/api/v1/query/tables", RunQueries, None),
        case(Method::GET, "/metrics", ReadMetrics, None),
        case(
            Method::GET,
            leak(format!("/api/v1/alerts?{range}")),
            ReadMetrics,
            None,
        ),
        case(Method::GET, "/api/v1/alerts/rules", ReadMetrics, None),
        case(
            Method::PUT,
            "/api/v1/alerts/rules/likes_low",
            WriteAlerts,
            Some(rule_json()),
        ),
        case(
            Method::DELETE,
            "/api/v1/alerts/rules/doomed",
            WriteAlerts,
            None,
        ),
        case(Method::GET, "/api/v1/users", ManageUsers, None),
        case(
            Method::PUT,
            "/api/v1/users/newcomer",
            ManageUsers,
            Some(json!({"role": "analyst", "password": "another long one"})),
        ),
        case(Method::DELETE, "/api/v1/users/victim", ManageUsers, None),
        case(Method::GET, "/api/v1/tokens", ManageUsers, None),
        case(
            Method::POST,
            "/api/v1/tokens",
            ManageUsers,
            Some(json!({"role": "analyst", "name": "grafana"})),
        ),
        case(Method::DELETE, "/api/v1/tokens/{id}", ManageUsers, None),
        case(Method::GET, "/api/v1/audit", ReadAudit, None),
        case(Method::GET, "/api/v1/serving", ReadOperations, None),
        case(Method::GET, "/api/v1/serving/history", ReadOperations, None),
        case(Method::GET, "/api/v1/sdk", ReadMetrics, None),
    ]
}

#[tokio::test]
async fn the_cases_cover_every_guarded_route_and_openapi_describes_every_route() {
    let server = server();
    let (_, table) = tidemark_ws_server::router_and_routes(server.state.clone());
    let cases = cases();
    for route in table.iter().filter(|r| r.permission.is_some()) {
        let case = cases
            .iter()
            .find(|c| {
                c.method.as_str().eq_ignore_ascii_case(route.verb.name())
                    && matches_template(c.path, route.path)
            })
            .unwrap_or_else(|| panic!("no case for {:?} {}", route.verb, route.path));
        assert_eq!(Some(case.needs), route.permission, "{}", route.path);
    }
    let (status, _, doc) = server
        .call(Method::GET, "/api/v1/openapi.json", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.0.3");
    for route in &table {
        let operation = &doc["paths"][route.path][route.verb.name()];
        assert!(
            operation.is_object(),
            "{:?} {} is not described",
            route.verb,
            route.path
        );
        match route.permission {
            Some(p) => assert_eq!(operation["x-permission"], p.name()),
            None => assert_eq!(operation["security"], json!([])),
        }
    }
    let described: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert_eq!(
        described,
        table.len(),
        "nothing described that is not routed"
    );
    // Every route of the table is routed: none answers 404 or 405.
    for route in &table {
        let path = route
            .path
            .replace("{tag}", "t")
            .replace("{id}", "x")
            .replace("{name}", "n");
        let method = Method::from_bytes(route.verb.name().to_uppercase().as_bytes()).unwrap();
        let (status, _, _) = server.call(method, &path, None, None).await;
        assert!(
            status != StatusCode::NOT_FOUND && status != StatusCode::METHOD_NOT_ALLOWED,
            "{:?} {path}: {status}",
            route.verb
        );
    }
}

#[tokio::test]
async fn every_route_answers_each_credential_as_its_role_allows() {
    let server = server();
    let mut credentials: Vec<(&str, Option<Role>, Option<String>)> = vec![
        ("no credential", None, None),
        ("ingest key", None, Some("ingest-key".to_string())),
    ];
    for role in Role::ALL {
        let (status, tokens) = server.login(role.name(), PASSWORD).await;
        assert_eq!(status, StatusCode::OK, "{tokens}");
        let access = tokens["access_token"].as_str().unwrap().to_string();
        credentials.push((role.name(), Some(role), Some(access)));
    }
    let mut checked = 0;
    for case in cases() {
        for (who, role, credential) in &credentials {
            // What DELETE names must exist, or the answer is a 404.
            server
                .state
                .access()
                .users()
                .put_user("victim", Role::Analyst, PASSWORD)
                .unwrap();
            let (_, id) = server
                .state
                .access()
                .users()
                .create_token(Role::Analyst, "doomed")
                .unwrap();
            server.rules.put(rule("doomed")).unwrap();
            let path = case.path.replace("{id}", &id);
            let (status, _, body) = server
                .call(
                    case.method.clone(),
                    &path,
                    credential.as_deref(),
                    case.body.clone(),
                )
                .await;
            let allowed = role.is_some_and(|r| r.allows(case.needs));
            let what = format!("{} {path} as {who}: {status} {body}", case.method);
            match credential {
                None => {
                    assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
                    assert_eq!(body["code"], "unauthorized", "{what}");
                }
                Some(_) if allowed => assert!(status.is_success(), "{what}"),
                Some(_) => {
                    assert_eq!(status, StatusCode::FORBIDDEN, "{what}");
                    assert_eq!(body["permission"], case.needs.name(), "{what}");
                }
            }
            checked += 1;
        }
    }
    assert_eq!(checked, cases().len() * 5);

    // Open routes answer without a credential.
    let (status, _, _) = server.call(Method::GET, "/api/v1/health", None, None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, body) = server
        .call(Method::GET, "/api/v1/nothing", None, None)
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );

    // Every 403 is in the audit log, naming who and what.
    let forbidden: Vec<Value> = server
        .audit_entries()
        .into_iter()
        .filter(|e| e["action"] == "forbidden")
        .collect();
    let expected_403 = cases()
        .iter()
        .map(|c| 1 + Role::ALL.iter().filter(|r| !r.allows(c.needs)).count())
        .sum::<usize>();
    assert_eq!(forbidden.len(), expected_403);
    assert!(forbidden
        .iter()
        .any(|e| e["actor"] == "user:analyst" && e["detail"]["permission"] == "audit:read"));
    assert!(forbidden.iter().any(|e| e["actor"] == "ingest-key"));
}

#[tokio::test]
async fn service_tokens_carry_their_role_until_revoked() {
    let server = server();
    let (token, id) = server
        .state
        .access()
        .users()
        .create_token(Role::Manager, "script")
        .unwrap();
    let (status, _, me) = server
        .call(Method::GET, "/api/v1/auth/me", Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (me["kind"].as_str(), me["role"].as_str()),
        (Some("service_token"), Some("manager"))
    );
    assert!(me["permissions"]
        .as_array()
        .unwrap()
        .contains(&json!("alerts:write")));
    let (status, _, _) = server
        .call(Method::GET, "/api/v1/audit", Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    server.state.access().users().revoke_token(&id).unwrap();
    let (status, _, _) = server
        .call(Method::GET, "/api/v1/auth/me", Some(&token), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let forged = format!("{}x", &token[..token.len() - 1]);
    let (status, _, _) = server
        .call(Method::GET, "/api/v1/auth/me", Some(&forged), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn refresh_gives_new_tokens_and_follows_the_users_file() {
    let server = server();
    let (_, tokens) = server.login("manager", PASSWORD).await;
    assert_eq!(tokens["expires_in"], 900);
    let refresh = tokens["refresh_token"].as_str().unwrap();
    let access = tokens["access_token"].as_str().unwrap();
    // A refresh token is not an access token, nor the other way round.
    let (status, _, _) = server
        .call(Method::GET, "/api/v1/auth/me", Some(refresh), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = server
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": access })),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The role changes in the file: the refreshed tokens carry the new one,
    // and the old access token already answers with it.
    server
        .state
        .access()
        .users()
        .put_user("manager", Role::Analyst, PASSWORD)
        .unwrap();
    let (status, _, renewed) = server
        .call(
            Method::POST,
            "/api/v1/auth/refresh",
            None,
            Some(json!({ "refresh_token": refresh })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{renewed}");
    assert_eq!(renewed["role"], "analyst");
    let (_, _, me) = server
        .call(Method::GET, "/api/v1/auth/me", Some(access), None)
        .await;
    assert_eq!(me["role"], "analyst");

    server
        .state
        .access()
        .users()
        .remove_user("manager")
        .unwrap();
    let (status, _, _) = server
        .call(Method::GET, "/api/v1/auth/me", Some(access), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn failed_logins_are_limited_and_bad_bodies_are_400() {
    let server = server();
    for _ in 0..5 {
        let (status, body) = server.login("analyst", "wrong password").await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("invalid_credentials"))
        );
    }
    let body = json!({ "name": "analyst", "password": PASSWORD });
    let (status, headers, answer) = server
        .call(Method::POST, "/api/v1/auth/login", None, Some(body))
        .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // Another name is not held back by the first one's failures.
    assert_eq!(server.login("admin", PASSWORD).await.0, StatusCode::OK);
    // Unknown names fail like wrong passwords.
    assert_eq!(
        server.login("nobody", PASSWORD).await.0,
        StatusCode::UNAUTHORIZED
    );

    for bad in [json!({"name": "x"}), json!("just a string")] {
        let (status, _, answer) = server
            .call(Method::POST, "/api/v1/auth/login", None, Some(bad))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()));
    }

    let actions: Vec<String> = server
        .audit_entries()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(actions.iter().filter(|a| *a == "login_failed").count(), 6);
    assert!(actions.contains(&"login_refused".to_string()));
    assert!(actions.contains(&"login".to_string()));
}

#[tokio::test]
async fn admin_actions_are_audited_and_an_edited_line_breaks_the_chain() {
    let server = server();
    let (_, tokens) = server.login("admin", PASSWORD).await;
    let admin = tokens["access_token"].as_str().unwrap();
    let (status, _, created) = server
        .call(
            Method::POST,
            "/api/v1/tokens",
            Some(admin),
            Some(json!({"role": "analyst", "name": "grafana"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let token = created["token"].as_str().unwrap();
    assert!(token.starts_with("tmk_"));
    let (status, _, _) = server
        .call(
            Method::PUT,
            "/api/v1/users/carol",
            Some(admin),
            Some(json!({"role": "manager", "password": "short"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, audit) = server
        .call(Method::GET, "/api/v1/audit", Some(admin), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let entries = audit["entries"].as_array().unwrap();
    let create = entries
        .iter()
        .find(|e| e["action"] == "token_create")
        .expect("the token's creation is audited");
    assert_eq!(create["actor"], "user:admin");
    assert_eq!(create["detail"]["name"], "grafana");
    assert!(
        !audit.to_string().contains(token),
        "the token itself is never logged"
    );
    assert!(entries.iter().any(|e| e["action"] == "audit_read"));

    let path = server.dir.path().join("audit.ndjson");
    let count = audit::verify(&path).unwrap().unwrap();
    assert!(count >= 3, "{count}");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("grafana", "nothing", 1)).unwrap();
    assert!(matches!(
        audit::verify(&path).unwrap(),
        Err(ChainError::Broken { .. })
    ));
}

#[tokio::test]
async fn the_serving_history_lists_promotes_and_rollbacks_newest_first() {
    use tidemark_ws_server::serving_file::{
        write_serving, Serving, ServingAction, ServingChange, SERVING_FILE,
    };
    let server = server();
    let (_, tokens) = server.login("admin", PASSWORD).await;
    let admin = tokens["access_token"].as_str().unwrap();
    let history = || server.call(Method::GET, "/api/v1/serving/history", Some(admin), None);

    let (status, _, answer) = history().await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["history"], json!([]), "nothing promoted yet");
    assert_eq!(answer["database"], "tidemark");

    let change = |time: &str, action, database: &str, previous: &str| ServingChange {
        time: time.into(),
        action,
        database: database.into(),
        previous: previous.into(),
        by: "cli:alice".into(),
    };
    let promoted = Serving::switched(
        None,
        change(
            "2026-12-03T10:00:00Z",
            ServingAction::Promote,
            "v2",
            "tidemark",
        ),
    );
    let rolled_back = Serving::switched(
        Some(promoted),
        change(
            "2026-12-03T11:00:00Z",
            ServingAction::Rollback,
            "tidemark",
            "v2",
        ),
    );
    write_serving(server.dir.path(), &rolled_back).unwrap();
    let (status, _, answer) = history().await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["history"],
        json!([
            {"time": "2026-12-03T11:00:00Z", "action": "rollback", "database": "tidemark", "previous": "v2", "by": "cli:alice"},
            {"time": "2026-12-03T10:00:00Z", "action": "promote", "database": "v2", "previous": "tidemark", "by": "cli:alice"},
        ])
    );
    assert!(server
        .audit_entries()
        .iter()
        .any(|e| e["action"] == "serving_history_read" && e["actor"] == "user:admin"));

    // A damaged file is the server's trouble, said plainly, never a crash.
    std::fs::write(server.dir.path().join(SERVING_FILE), "{not json").unwrap();
    let (status, _, answer) = history().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("serving file")),
        "{answer}"
    );
}

#[tokio::test]
async fn managers_change_alert_rules_checked_written_and_audited() {
    let server = server();
    let (_, tokens) = server.login("manager", PASSWORD).await;
    let manager = tokens["access_token"].as_str().unwrap().to_string();
    let call = |method: Method, path: &'static str, body: Option<Value>| {
        let (server, manager) = (&server, manager.clone());
        async move { server.call(method, path, Some(&manager), body).await }
    };
    let path = "/api/v1/alerts/rules/likes_low";

    let (status, _, body) = call(Method::PUT, path, Some(json!({"kind": "threshold"}))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        body["error"],
        "alert rule `likes_low`: `measurement` is missing"
    );
    let (status, _, body) = call(Method::PUT, path, Some(rule_json())).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["name"], "likes_low");
    let mut changed = rule_json();
    changed["value"] = json!(50);
    let (status, _, _) = call(Method::PUT, path, Some(changed)).await;
    assert_eq!(status, StatusCode::OK, "replaced");
    let (status, _, body) = call(Method::GET, "/api/v1/alerts/rules", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["rules"][0]["value"], 50.0);
    assert_eq!(body["rules"][0]["for"], 3);
    // The file holds what the API answers.
    let file =
        tidemark_ws_server::alerting::RulesBook::open(server.dir.path().join("alert-rules.toml"))
            .unwrap();
    assert_eq!(file.rules().rules().len(), 1);

    let (status, _, _) = call(Method::DELETE, path, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, body) = call(Method::DELETE, path, None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let actions: Vec<(String, String)> = server
        .audit_entries()
        .iter()
        .filter(|e| e["action"].as_str().unwrap_or("").starts_with("alert_rule"))
        .map(|e| (e["action"].as_str().unwrap().into(), e["actor"].to_string()))
        .collect();
    assert_eq!(
        actions.iter().map(|(a, _)| a.as_str()).collect::<Vec<_>>(),
        ["alert_rule_put", "alert_rule_put", "alert_rule_delete"]
    );
    assert!(
        actions.iter().all(|(_, actor)| actor.contains("manager")),
        "{actions:?}"
    );
}
