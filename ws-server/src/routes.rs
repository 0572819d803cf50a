//! The route table: every HTTP route is registered here once, with its
//! method, permission, summary and query parameters, so the router, the
//! guards and `GET /api/v1/openapi.json` cannot disagree.

use std::sync::Arc;

use axum::handler::Handler;
use axum::routing::{on, MethodFilter};
use axum::Router;
use serde_json::{json, Map, Value};

use crate::auth::{self, Permission};
use crate::ServerState;

/// An HTTP method of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Put,
    Delete,
}

impl Verb {
    /// Lower case, as OpenAPI names it.
    pub fn name(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::Post => "post",
            Verb::Put => "put",
            Verb::Delete => "delete",
        }
    }

    fn filter(self) -> MethodFilter {
        match self {
            Verb::Get => MethodFilter::GET,
            Verb::Post => MethodFilter::POST,
            Verb::Put => MethodFilter::PUT,
            Verb::Delete => MethodFilter::DELETE,
        }
    }
}

/// One route of the table.
#[derive(Debug, Clone)]
pub struct Route {
    pub verb: Verb,
    /// With `{name}` for path parameters, as axum writes them.
    pub path: &'static str,
    /// `None` for the open routes.
    pub permission: Option<Permission>,
    pub summary: &'static str,
    /// Query parameters.
    pub query: &'static [&'static str],
}

/// Builds the router and the table together.
pub(crate) struct Table {
    state: Arc<ServerState>,
    router: Router<Arc<ServerState>>,
    routes: Vec<Route>,
}

impl Table {
    pub fn new(state: Arc<ServerState>) -> Table {
        Table {
            state,
            router: Router::new(),
            routes: Vec::new(),
        }
    }

    /// Registers a route; with a permission, behind the guard.
    pub fn add<H, T>(mut self, route: Route, handler: H) -> Table
    where
        H: Handler<T, Arc<ServerState>>,
        T: 'static,
    {
        let mut method = on(route.verb.filter(), handler);
        if let Some(permission) = route.permission {
            method = method.route_layer(axum::middleware::from_fn_with_state(
                (self.state.clone(), permission),
                auth::guard,
            ));
        }
        self.router = self.router.route(route.path, method);
        self.routes.push(route);
        self
    }

    pub fn finish(self) -> (Router<Arc<ServerState>>, Vec<Route>) {
        (self.router, self.routes)
    }
}

/// A route with its parts.
pub(crate) const fn route(
    verb: Verb,
    path: &'static str,
    permission: Option<Permission>,
    summary: &'static str,
    query: &'static [&'static str],
) -> Route {
    Route {
        verb,
        path,
        permission,
        summary,
        query,
    }
}

/// The OpenAPI 3 description of `routes`.
pub fn openapi(routes: &[Route]) -> Value {
    let mut paths: Map<String, Value> = Map::new();
    for r in routes {
        let mut parameters: Vec<Value> = path_parameters(r.path)
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        parameters.extend(r.query.iter().map(|name| {
            json!({"name": name, "in": "query", "required": false, "schema": {"type": "string"}})
        }));
        let mut responses = Map::new();
        responses.insert("200".into(), json!({"description": "success"}));
        responses.insert(
            "400".into(),
            json!({"description": "bad input: {\"error\", \"code\"}"}),
        );
        let mut operation = json!({
            "summary": r.summary,
            "parameters": parameters,
        });
        match r.permission {
            Some(p) => {
                operation["security"] = json!([{"bearer": []}]);
                operation["x-permission"] = json!(p.name());
                responses.insert("401".into(), json!({"description": "no valid credential"}));
                responses.insert(
                    "403".into(),
                    json!({"description": format!("the role lacks {}", p.name())}),
                );
            }
            None => operation["security"] = json!([]),
        }
        operation["responses"] = Value::Object(responses);
        let item = paths.entry(r.path.to_string()).or_insert_with(|| json!({}));
        item[r.verb.name()] = operation;
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "tidemark",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Real-time analytics of a social network: see docs/api.md.",
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    })
}

fn path_parameters(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
}
