//! `POST /api/v1/query`: the analysts' ad-hoc SQL over the measurements.
//!
//! One table per measurement ([`TABLES`]), with the columns `time` (epoch
//! milliseconds), `tier`, the measurement's tags and its fields. A query is
//! parsed first ([`sqlparser`]) and must be one `SELECT` whose every
//! `SELECT` reading a table carries a time filter among its top-level `AND`
//! terms; that filter is the range read from the store, so the answer is
//! the same whichever store serves: the store's points of that range (and
//! tiers) are copied into a private in-memory SQLite database and the query
//! runs there. SQLite is already in the binary for the embedded store,
//! which is why it is the engine here rather than DataFusion (see
//! `docs/api.md`).
//!
//! Limits: a row limit (the answer says `truncated`), a timeout (408
//! `query_timeout`, held by a timer that interrupts SQLite, so it holds on a
//! busy machine), a cap on the points a query may read (its memory) and on
//! how many queries run at once.

use std::collections::BTreeSet;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Request, State};
use axum::http::StatusCode;
use axum::Json;
use rusqlite::types::ValueRef;
use serde::Deserialize;
use serde_json::{json, Value};
use sqlparser::ast::{
    BinaryOperator, Expr, InTarget, ObjectNamePart, Query, Select, SetExpr, Statement, TableFactor,
    Value as SqlValue, VisitMut, VisitorMut,
};
use sqlparser::dialect::SQLiteDialect;
use sqlparser::parser::Parser;
use tidemark_model::{EventTime, FieldValue, Point, Tier};
use tidemark_tsdb_writer::Store;

use crate::auth::Principal;
use crate::{json_number, ServerError, ServerState};

/// A measurement as a table: its tags and fields, in column order after
/// `time` and `tier`.
#[derive(Debug, Clone, Copy)]
pub struct Table {
    pub name: &'static str,
    pub tags: &'static [&'static str],
    pub fields: &'static [&'static str],
}

/// Every table a query may read: the measurements the pipelines write.
pub const TABLES: [Table; 5] = [
    Table {
        name: "traffic",
        tags: &["country", "device", "event_type"],
        fields: &["events"],
    },
    Table {
        name: "active_users",
        tags: &[],
        fields: &["users"],
    },
    Table {
        name: "engagement",
        tags: &["country", "segment"],
        fields: &[
            "sessions_started",
            "sessions_ended",
            "active_sessions",
            "engagement_score",
            "avg_session_seconds",
            "events_per_session",
        ],
    },
    Table {
        name: "trending",
        tags: &["tag", "window"],
        fields: &["rank", "score", "users", "events"],
    },
    Table {
        name: "ads",
        tags: &["campaign_id", "country", "device"],
        fields: &[
            "impressions",
            "clicks",
            "clicks_unattributed",
            "conversions",
            "spend",
            "revenue",
        ],
    },
];

/// Rows answered unless the request asks for fewer.
pub const DEFAULT_ROW_LIMIT: usize = 10_000;
/// The most rows a request may ask for.
pub const MAX_ROW_LIMIT: usize = 100_000;
/// How long a query may run unless the request asks for less.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The most points one query may copy from the store (about 100 bytes
/// each in SQLite): its memory cap.
pub const MAX_POINTS: usize = 2_000_000;
/// Queries running at once; more wait for a turn within their timeout.
pub const CONCURRENT_QUERIES: usize = 2;

/// How deep a query's expressions may nest.
const RECURSION_LIMIT: usize = 50;
/// SQLite's in-memory database stops growing here (pages of 4 KiB: 1 GiB).
const MAX_PAGES: u32 = 262_144;
/// The upper end of a range that names none: points lie in the past.
const OPEN_END: Duration = Duration::from_secs(24 * 3600);

/// Why a query was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("only one read-only SELECT is accepted: {0}")]
    NotReadOnly(String),
    #[error("{0}")]
    NoTimeFilter(String),
    #[error("unknown table {0:?}; tables are traffic, active_users, engagement, trending and ads")]
    UnknownTable(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the query ran longer than its {} ms timeout", .0.as_millis())]
    Timeout(Duration),
    #[error("{0}")]
    TooLarge(String),
}

impl QueryError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            QueryError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    pub(crate) fn code(&self) -> &'static str {
        match self {
            QueryError::NotReadOnly(_) => "not_read_only",
            QueryError::NoTimeFilter(_) => "time_filter_required",
            QueryError::UnknownTable(_) => "unknown_table",
            QueryError::Invalid(_) => "invalid_query",
            QueryError::Timeout(_) => "query_timeout",
            QueryError::TooLarge(_) => "query_too_large",
        }
    }
}

/// The body of `POST /api/v1/query`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct QueryRequest {
    sql: String,
    limit: Option<usize>,
    timeout_ms: Option<u64>,
}

/// A checked query: the SQL SQLite runs (time literals as epoch
/// milliseconds), the tables it reads and the range and tiers to copy.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub sql: String,
    pub tables: Vec<Table>,
    pub from: EventTime,
    pub to: EventTime,
    pub tiers: Vec<Tier>,
}

impl PartialEq for Table {
    fn eq(&self, other: &Table) -> bool {
        self.name == other.name
    }
}

fn table(name: &str) -> Option<Table> {
    TABLES
        .iter()
        .find(|t| t.name.eq_ignore_ascii_case(name))
        .copied()
}

/// Parses and checks `sql` (see the module documentation).
pub fn plan(sql: &str, now: EventTime) -> Result<Plan, QueryError> {
    let dialect = SQLiteDialect {};
    let mut statements = Parser::new(&dialect)
        .with_recursion_limit(RECURSION_LIMIT)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| QueryError::Invalid(format!("cannot parse the query: {e}")))?;
    let statement = match statements.len() {
        1 => statements.remove(0),
        0 => return Err(QueryError::Invalid("the query is empty".into())),
        n => return Err(QueryError::NotReadOnly(format!("{n} statements"))),
    };
    let Statement::Query(mut query) = statement else {
        let keyword = statement.to_string();
        let keyword = keyword
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_uppercase();
        return Err(QueryError::NotReadOnly(format!(
            "{keyword} is not a SELECT"
        )));
    };
    let mut checker = Checker::default();
    if let ControlFlow::Break(e) = query.visit(&mut checker) {
        return Err(e);
    }
    let Checker {
        tables,
        from,
        to,
        tiers,
        open_ended,
        ..
    } = checker;
    let (Some(from), false) = (from, tables.is_empty()) else {
        return Err(QueryError::Invalid(
            "the query reads no table; tables are traffic, active_users, engagement, trending and ads"
                .into(),
        ));
    };
    let to = match to {
        Some(to) if !open_ended => to,
        _ => now.plus(OPEN_END),
    };
    Ok(Plan {
        sql: query.to_string(),
        tables: tables.into_iter().filter_map(table).collect(),
        from,
        to,
        tiers: if tiers.is_empty() {
            vec![Tier::Rt]
        } else {
            tiers.into_iter().collect()
        },
    })
}

/// Walks a query: names the tables read, requires each `SELECT` reading
/// one to bound `time`, rewrites those bounds' literals to epoch
/// milliseconds and collects the range and tiers over all of them.
#[derive(Default)]
struct Checker {
    ctes: BTreeSet<String>,
    tables: BTreeSet<&'static str>,
    from: Option<EventTime>,
    to: Option<EventTime>,
    tiers: BTreeSet<Tier>,
    open_ended: bool,
}

impl VisitorMut for Checker {
    type Break = QueryError;

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<QueryError> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                self.ctes.insert(cte.alias.name.value.to_lowercase());
            }
        }
        if !matches!(
            *query.body,
            SetExpr::Select(_)
                | SetExpr::Query(_)
                | SetExpr::SetOperation { .. }
                | SetExpr::Values(_)
        ) {
            return ControlFlow::Break(QueryError::NotReadOnly("the query modifies data".into()));
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(
        &mut self,
        relation: &mut sqlparser::ast::ObjectName,
    ) -> ControlFlow<QueryError> {
        let name = relation_name(relation);
        if self.ctes.contains(&name) {
            return ControlFlow::Continue(());
        }
        match table(&name) {
            Some(t) if relation.0.len() == 1 => {
                self.tables.insert(t.name);
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Break(QueryError::UnknownTable(relation.to_string())),
        }
    }

    fn pre_visit_select(&mut self, select: &mut Select) -> ControlFlow<QueryError> {
        let reads: Vec<String> = select
            .from
            .iter()
            .flat_map(|t| std::iter::once(&t.relation).chain(t.joins.iter().map(|j| &j.relation)))
            .filter_map(|factor| match factor {
                TableFactor::Table { name, .. } => Some(relation_name(name)),
                _ => None,
            })
            .filter(|name| !self.ctes.contains(name) && table(name).is_some())
            .collect();
        if reads.is_empty() {
            return ControlFlow::Continue(());
        }
        let mut bounds = Bounds::default();
        if let Some(selection) = &mut select.selection {
            if let Err(e) = bounds.collect(selection) {
                return ControlFlow::Break(e);
            }
        }
        let Some(from) = bounds.from else {
            return ControlFlow::Break(QueryError::NoTimeFilter(format!(
                "a query of {} needs a time filter such as time >= '2026-01-01T00:00:00Z' \
                 (RFC 3339 or epoch milliseconds) joined to its WHERE with AND",
                reads.join(", ")
            )));
        };
        if let Some(to) = bounds.to {
            if to <= from {
                return ControlFlow::Break(QueryError::Invalid(format!(
                    "the time filter selects nothing: from {} to {}",
                    from.to_rfc3339(),
                    to.to_rfc3339()
                )));
            }
        }
        self.from = Some(self.from.map_or(from, |f| f.min(from)));
        match bounds.to {
            Some(to) => self.to = Some(self.to.map_or(to, |t| t.max(to))),
            // One open-ended SELECT leaves the whole range open.
            None => self.open_ended = true,
        }
        match bounds.tiers {
            Some(tiers) => self.tiers.extend(tiers),
            None => {
                self.tiers.insert(Tier::Rt);
            }
        }
        ControlFlow::Continue(())
    }
}

fn relation_name(name: &sqlparser::ast::ObjectName) -> String {
    match name.0.last() {
        Some(ObjectNamePart::Identifier(ident)) => ident.value.to_lowercase(),
        _ => name.to_string().to_lowercase(),
    }
}

/// The time range and tiers of one `SELECT`'s top-level `AND` terms.
#[derive(Default)]
struct Bounds {
    from: Option<EventTime>,
    to: Option<EventTime>,
    tiers: Option<BTreeSet<Tier>>,
}

impl Bounds {
    fn collect(&mut self, expr: &mut Expr) -> Result<(), QueryError> {
        match expr {
            Expr::Nested(inner) => self.collect(inner),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                self.collect(left)?;
                self.collect(right)
            }
            Expr::BinaryOp { left, op, right } => {
                let (op, literal) = if is_column(left, "time") {
                    (op.clone(), right)
                } else if is_column(right, "time") {
                    (mirrored(op), left)
                } else if is_column(left, "tier") && *op == BinaryOperator::Eq {
                    let tier = tier_literal(right)?;
                    self.tiers = Some(BTreeSet::from([tier]));
                    return Ok(());
                } else {
                    return Ok(());
                };
                let Some(t) = time_literal(literal)? else {
                    return Ok(());
                };
                match op {
                    BinaryOperator::GtEq => self.lower(t),
                    BinaryOperator::Gt => self.lower(t.plus(Duration::from_millis(1))),
                    BinaryOperator::Lt => self.upper(t),
                    BinaryOperator::LtEq => self.upper(t.plus(Duration::from_millis(1))),
                    BinaryOperator::Eq => {
                        self.lower(t);
                        self.upper(t.plus(Duration::from_millis(1)));
                    }
                    _ => {}
                }
                Ok(())
            }
            Expr::Between {
                expr: column,
                negated: false,
                low,
                high,
            } if is_column(column, "time") => {
                if let (Some(low), Some(high)) = (time_literal(low)?, time_literal(high)?) {
                    self.lower(low);
                    self.upper(high.plus(Duration::from_millis(1)));
                }
                Ok(())
            }
            Expr::In {
                expr: column,
                target: InTarget::List(list),
                negated: false,
                ..
            } if is_column(column, "tier") => {
                let tiers = list
                    .iter()
                    .map(tier_literal)
                    .collect::<Result<BTreeSet<_>, _>>()?;
                self.tiers = Some(tiers);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn lower(&mut self, t: EventTime) {
        self.from = Some(self.from.map_or(t, |f| f.max(t)));
    }

    fn upper(&mut self, t: EventTime) {
        self.to = Some(self.to.map_or(t, |f| f.min(t)));
    }
}

fn is_column(expr: &Expr, column: &str) -> bool {
    match expr {
        Expr::Identifier(ident) => ident.value.eq_ignore_ascii_case(column),
        Expr::CompoundIdentifier(parts) => parts
            .last()
            .is_some_and(|ident| ident.value.eq_ignore_ascii_case(column)),
        Expr::Nested(inner) => is_column(inner, column),
        _ => false,
    }
}

fn mirrored(op: &BinaryOperator) -> BinaryOperator {
    match op {
        BinaryOperator::Gt => BinaryOperator::Lt,
        BinaryOperator::GtEq => BinaryOperator::LtEq,
        BinaryOperator::Lt => BinaryOperator::Gt,
        BinaryOperator::LtEq => BinaryOperator::GtEq,
        other => other.clone(),
    }
}

/// A time literal (RFC 3339 string or epoch milliseconds), rewritten in
/// place to epoch milliseconds, which is what the `time` column holds.
fn time_literal(expr: &mut Expr) -> Result<Option<EventTime>, QueryError> {
    let Expr::Value(value) = expr else {
        return Ok(None);
    };
    let time = match &value.value {
        SqlValue::Number(n, _) => n.parse::<i64>().ok().map(EventTime),
        SqlValue::SingleQuotedString(s) | SqlValue::DoubleQuotedString(s) => {
            Some(EventTime::parse(s).ok_or_else(|| {
                QueryError::Invalid(format!(
                    "time is compared with {s:?}, which is neither RFC 3339 nor epoch milliseconds"
                ))
            })?)
        }
        _ => None,
    };
    if let Some(t) = time {
        *expr = Expr::value(SqlValue::Number(t.millis().to_string(), false));
    }
    Ok(time)
}

fn tier_literal(expr: &Expr) -> Result<Tier, QueryError> {
    let name = match expr {
        Expr::Value(v) => match &v.value {
            SqlValue::SingleQuotedString(s) => Some(s.as_str()),
            _ => None,
        },
        _ => None,
    };
    name.and_then(|n| Tier::ALL.into_iter().find(|t| t.name() == n))
        .ok_or_else(|| {
            QueryError::Invalid(format!(
                "tier is compared with {expr}; tiers are 'rt', 'hourly' and 'daily'"
            ))
        })
}

/// An answer: column names, rows and whether rows were left out.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
    pub truncated: bool,
    pub points_read: usize,
}

/// Runs a planned query over `store` with at most `limit` rows, within
/// `timeout` (reading included).
pub async fn run(
    store: Arc<dyn Store>,
    plan: Plan,
    limit: usize,
    timeout: Duration,
) -> Result<Answer, ServerError> {
    let cancelled = Arc::new(AtomicBool::new(false));
    let (interrupt_tx, interrupt_rx) = tokio::sync::oneshot::channel();
    let work = {
        let cancelled = Arc::clone(&cancelled);
        async move {
            let mut points = Vec::new();
            for t in &plan.tables {
                for &tier in &plan.tiers {
                    let mut read = store.points(tier, t.name, plan.from, plan.to).await?;
                    if points.len() + read.len() > MAX_POINTS {
                        return Err(QueryError::TooLarge(format!(
                            "the query would read more than {MAX_POINTS} points; \
                             narrow its time filter or read a coarser tier"
                        ))
                        .into());
                    }
                    points.append(&mut read);
                }
            }
            let answer = tokio::task::spawn_blocking(move || {
                execute(&plan, &points, limit, &cancelled, interrupt_tx)
            })
            .await
            .map_err(|e| ServerError::Internal(format!("query task failed: {e}")))??;
            Ok::<Answer, ServerError>(answer)
        }
    };
    tokio::pin!(work);
    tokio::select! {
        answer = &mut work => answer,
        () = tokio::time::sleep(timeout) => {
            cancelled.store(true, Ordering::Relaxed);
            if let Ok(handle) = interrupt_rx.await {
                handle.interrupt();
            }
            Err(QueryError::Timeout(timeout).into())
        }
    }
}

fn execute(
    plan: &Plan,
    points: &[Point],
    limit: usize,
    cancelled: &AtomicBool,
    interrupt: tokio::sync::oneshot::Sender<rusqlite::InterruptHandle>,
) -> Result<Answer, ServerError> {
    let timed_out = || ServerError::from(QueryError::Timeout(Duration::ZERO));
    let sqlite = |e: rusqlite::Error| ServerError::Internal(format!("query engine: {e}"));
    let mut conn = rusqlite::Connection::open_in_memory().map_err(sqlite)?;
    let _ = interrupt.send(conn.get_interrupt_handle());
    conn.execute_batch(&format!(
        "PRAGMA max_page_count = {MAX_PAGES}; PRAGMA temp_store = MEMORY;"
    ))
    .map_err(sqlite)?;
    let tx = conn.transaction().map_err(sqlite)?;
    for t in &plan.tables {
        let columns: Vec<&str> = ["time", "tier"]
            .into_iter()
            .chain(t.tags.iter().copied())
            .chain(t.fields.iter().copied())
            .collect();
        let types: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let kind = match i {
                    0 => "INTEGER NOT NULL",
                    _ if i < 2 + t.tags.len() => "TEXT",
                    _ => "REAL",
                };
                format!("\"{c}\" {kind}")
            })
            .collect();
        tx.execute_batch(&format!("CREATE TABLE {} ({});", t.name, types.join(", ")))
            .map_err(sqlite)?;
        let placeholders = vec!["?"; columns.len()].join(", ");
        let mut insert = tx
            .prepare(&format!("INSERT INTO {} VALUES ({placeholders})", t.name))
            .map_err(sqlite)?;
        let mut row: Vec<rusqlite::types::Value> = Vec::with_capacity(columns.len());
        for (n, point) in points
            .iter()
            .filter(|p| p.measurement == t.name)
            .enumerate()
        {
            if n % 4096 == 0 && cancelled.load(Ordering::Relaxed) {
                return Err(timed_out());
            }
            row.clear();
            row.push(point.time.millis().into());
            row.push(point.tier.name().to_string().into());
            for tag in t.tags {
                row.push(
                    point
                        .tag(tag)
                        .map_or(rusqlite::types::Value::Null, |v| v.to_string().into()),
                );
            }
            for field in t.fields {
                let value = point
                    .fields
                    .iter()
                    .find(|(k, _)| k == field)
                    .map(|(_, v)| v);
                row.push(match value {
                    Some(FieldValue::Int(i)) => (*i as f64).into(),
                    Some(FieldValue::Float(f)) => (*f).into(),
                    None => rusqlite::types::Value::Null,
                });
            }
            insert
                .execute(rusqlite::params_from_iter(row.iter()))
                .map_err(|e| interrupted_or(e, cancelled))?;
        }
    }
    tx.commit().map_err(sqlite)?;
    let mut statement = conn
        .prepare(&plan.sql)
        .map_err(|e| QueryError::Invalid(sqlite_message(&e)))?;
    if !statement.readonly() {
        return Err(QueryError::NotReadOnly("the query modifies data".into()).into());
    }
    let columns: Vec<String> = statement
        .column_names()
        .into_iter()
        .map(str::to_string)
        .collect();
    let mut rows = statement
        .query([])
        .map_err(|e| interrupted_or(e, cancelled))?;
    let mut answer = Vec::new();
    let mut truncated = false;
    while let Some(row) = rows.next().map_err(|e| interrupted_or(e, cancelled))? {
        if answer.len() == limit {
            truncated = true;
            break;
        }
        let values = (0..columns.len())
            .map(|i| match row.get_ref(i) {
                Ok(ValueRef::Null) | Err(_) => Value::Null,
                Ok(ValueRef::Integer(i)) => Value::from(i),
                Ok(ValueRef::Real(f)) => json_number(f),
                Ok(ValueRef::Text(t)) => Value::from(String::from_utf8_lossy(t).into_owned()),
                Ok(ValueRef::Blob(b)) => Value::from(
                    b.iter()
                        .map(|byte| format!("{byte:02x}"))
                        .collect::<String>(),
                ),
            })
            .collect();
        answer.push(values);
    }
    Ok(Answer {
        columns,
        rows: answer,
        truncated,
        points_read: points.len(),
    })
}

fn sqlite_message(e: &rusqlite::Error) -> String {
    match e {
        rusqlite::Error::SqliteFailure(_, Some(message)) => message.clone(),
        other => other.to_string(),
    }
}

/// A run-time error of SQLite: the timeout when it was interrupted, else
/// the query's own fault (a type error, a full database).
fn interrupted_or(e: rusqlite::Error, cancelled: &AtomicBool) -> ServerError {
    let code = e.sqlite_error_code();
    if cancelled.load(Ordering::Relaxed) || code == Some(rusqlite::ErrorCode::OperationInterrupted)
    {
        QueryError::Timeout(Duration::ZERO).into()
    } else if code == Some(rusqlite::ErrorCode::DiskFull) {
        QueryError::TooLarge("the query needs more memory than a query may use".into()).into()
    } else {
        QueryError::Invalid(sqlite_message(&e)).into()
    }
}

/// `POST /api/v1/query`.
pub(crate) async fn query(
    State(state): State<Arc<ServerState>>,
    Extension(principal): Extension<Principal>,
    request: Request,
) -> Result<Json<Value>, ServerError> {
    let client = crate::auth::client_ip(request.extensions());
    let payload: Result<Json<QueryRequest>, JsonRejection> =
        <Json<QueryRequest> as axum::extract::FromRequest<()>>::from_request(request, &()).await;
    let Json(body) = payload.map_err(|e| ServerError::BadRequest(e.body_text()))?;
    let started = Instant::now();
    let outcome = answer(&state, &body).await;
    let elapsed = started.elapsed();
    let detail = match &outcome {
        Ok(a) => json!({
            "sql": body.sql,
            "rows": a.rows.len(),
            "truncated": a.truncated,
            "duration_ms": elapsed.as_secs_f64() * 1000.0,
        }),
        Err(e) => json!({
            "sql": body.sql,
            "error": e.code(),
            "duration_ms": elapsed.as_secs_f64() * 1000.0,
        }),
    };
    state
        .access
        .audit()
        .record(&principal.actor(), "query", client, detail);
    let a = outcome?;
    Ok(Json(json!({
        "columns": a.columns,
        "rows": a.rows,
        "row_count": a.rows.len(),
        "truncated": a.truncated,
        "points_read": a.points_read,
        "elapsed_ms": elapsed.as_secs_f64() * 1000.0,
    })))
}

async fn answer(state: &ServerState, body: &QueryRequest) -> Result<Answer, ServerError> {
    let limit = body.limit.unwrap_or(DEFAULT_ROW_LIMIT);
    if limit == 0 || limit > MAX_ROW_LIMIT {
        return Err(ServerError::BadRequest(format!(
            "limit must be 1 to {MAX_ROW_LIMIT}, got {limit}"
        )));
    }
    let timeout = match body.timeout_ms {
        None => DEFAULT_TIMEOUT,
        Some(ms) if ms > 0 && ms <= DEFAULT_TIMEOUT.as_millis() as u64 => Duration::from_millis(ms),
        Some(ms) => {
            return Err(ServerError::BadRequest(format!(
                "timeout_ms must be 1 to {}, got {ms}",
                DEFAULT_TIMEOUT.as_millis()
            )))
        }
    };
    let plan = plan(&body.sql, EventTime::now())?;
    let deadline = Instant::now() + timeout;
    let _turn = tokio::time::timeout(timeout, state.query_turns.acquire())
        .await
        .map_err(|_| QueryError::Timeout(timeout))?
        .map_err(|_| ServerError::Internal("query turns closed".into()))?;
    let left = deadline.saturating_duration_since(Instant::now());
    run(state.reader(), plan, limit, left)
        .await
        .map_err(|e| match e {
            ServerError::Query(QueryError::Timeout(_)) => QueryError::Timeout(timeout).into(),
            other => other,
        })
}

fn columns(t: &Table) -> Vec<&'static str> {
    ["time", "tier"]
        .into_iter()
        .chain(t.tags.iter().copied())
        .chain(t.fields.iter().copied())
        .collect()
}

/// `GET /api/v1/query/tables`: what a query may read.
pub(crate) async fn tables() -> Json<Value> {
    let tables: Vec<Value> = TABLES
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "columns": columns(t),
                "tags": t.tags,
                "fields": t.fields,
            })
        })
        .collect();
    Json(json!({ "tables": tables, "tiers": ["rt", "hourly", "daily"] }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: EventTime = EventTime(1_800_000_000_000);

    fn refused(sql: &str) -> String {
        plan(sql, NOW).unwrap_err().code().to_string()
    }

    #[test]
    fn a_select_with_a_time_filter_is_planned_with_its_range_in_milliseconds() {
        let p = plan(
            "SELECT event_type, sum(events) FROM traffic \
             WHERE time >= '2026-12-03T00:00:00Z' AND time < 1796342400000 GROUP BY event_type",
            NOW,
        )
        .unwrap();
        assert_eq!(p.from, EventTime::parse("2026-12-03T00:00:00Z").unwrap());
        assert_eq!(p.to, EventTime(1_796_342_400_000));
        assert_eq!(p.tiers, vec![Tier::Rt]);
        assert_eq!(p.tables.len(), 1);
        assert!(p.sql.contains(&p.from.millis().to_string()), "{}", p.sql);
    }

    #[test]
    fn anything_but_one_select_is_refused_as_not_read_only() {
        for sql in [
            "DELETE FROM traffic WHERE time > 0",
            "INSERT INTO traffic (time) VALUES (1)",
            "DROP TABLE traffic",
            "ATTACH DATABASE 'x.db' AS x",
            "PRAGMA writable_schema = 1",
            "SELECT 1 FROM traffic WHERE time > 0; SELECT 2 FROM traffic WHERE time > 0",
        ] {
            assert_eq!(refused(sql), "not_read_only", "{sql}");
        }
    }

    #[test]
    fn a_time_filter_is_required_in_every_select_that_reads_a_table() {
        for sql in [
            "SELECT * FROM traffic",
            "SELECT * FROM traffic WHERE event_type = 'view'",
            "SELECT * FROM traffic WHERE time > 0 OR event_type = 'view'",
            "SELECT * FROM traffic WHERE time > 0 UNION ALL SELECT * FROM traffic",
            "SELECT * FROM ads WHERE time > 0 AND campaign_id IN (SELECT campaign_id FROM ads)",
        ] {
            assert_eq!(refused(sql), "time_filter_required", "{sql}");
        }
        assert_eq!(
            refused("SELECT * FROM users WHERE time > 0"),
            "unknown_table"
        );
        assert_eq!(
            refused("SELECT * FROM main.traffic WHERE time > 0"),
            "unknown_table"
        );
    }

    #[test]
    fn tiers_come_from_a_filter_on_tier_and_default_to_rt() {
        let p = plan(
            "SELECT * FROM ads WHERE tier IN ('hourly', 'daily') AND time BETWEEN 0 AND 10",
            NOW,
        )
        .unwrap();
        assert_eq!(p.tiers, vec![Tier::Hourly, Tier::Daily]);
        assert_eq!((p.from, p.to), (EventTime(0), EventTime(11)));
        let open = plan(
            "WITH t AS (SELECT * FROM trending WHERE time > 5) SELECT * FROM t",
            NOW,
        )
        .unwrap();
        assert_eq!((open.from, open.to), (EventTime(6), NOW.plus(OPEN_END)));
    }
}
