//! The agent's admin API: read-only JSON views of what the agent knows and decides, on the
//! host's loopback (127.0.0.1:15000 by default, never a pod address). The `meshlet` CLI reads
//! it; so can an operator with curl.
use std::{net::SocketAddr, sync::Arc};

use axum::{
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};

use crate::{node::NodeAgent, pods::PodRegistry};

pub mod views;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on {addr} for the admin API: {source} (is another agent using it? set --admin-addr)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct AdminState {
    agent: Arc<NodeAgent>,
    pods: Arc<PodRegistry>,
}

/// Binds `addr` for the admin API or the metrics listener (non-blocking, for the runtime).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, AdminError> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| AdminError::Bind { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| AdminError::Bind { addr, source })?;
    Ok(listener)
}

/// Serves the admin API on `listener` (see [`bind`]) until the agent drains; serving starts
/// when the returned future is polled.
pub fn serve(
    listener: std::net::TcpListener,
    agent: Arc<NodeAgent>,
    pods: Arc<PodRegistry>,
) -> Result<impl std::future::Future<Output = std::io::Result<()>>, AdminError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the admin API is not on loopback: anyone who reaches it can read the mesh's configuration");
    }
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|source| AdminError::Bind { addr, source })?;
    let drain = agent.drain.clone();
    let router = Router::new()
        .route("/", get(index))
        .route("/status", get(status))
        .route("/config_dump", get(config_dump))
        .route("/workloads", get(workloads))
        .route("/certs", get(certs))
        .route("/certs/verify", post(verify_chain))
        .route("/policies", get(policies))
        .route("/check", get(check))
        .route("/services", get(services))
        .route("/connections", get(connections))
        .route("/healthz/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/logging", post(logging))
        .with_state(AdminState { agent, pods });
    tracing::info!(%addr, "admin API listening");
    Ok(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { drain.signaled().await })
            .await
    })
}

/// Binds the metrics listener: `/metrics` and `/healthz/ready` only, for Prometheus and the
/// kubelet's readiness probe on the node's address (a hostNetwork pod's probe and scrape go
/// to the node's IP, which the admin API must never be on). Nothing here reads keys or the
/// mesh's configuration; connections are capped and timed out ([`meshlet_plainhttp`]).
/// Stops with the drain (a successor serves them then).
pub fn serve_metrics(
    listener: std::net::TcpListener,
    agent: Arc<NodeAgent>,
    pods: Arc<PodRegistry>,
) -> Result<impl std::future::Future<Output = ()>, AdminError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|source| AdminError::Bind { addr, source })?;
    let drain = agent.drain.clone();
    let router = Router::new()
        .route("/healthz/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(AdminState { agent, pods });
    tracing::info!(%addr, "metrics and readiness listening");
    let serve = meshlet_plainhttp::serve(listener, router, meshlet_plainhttp::Limits::default());
    Ok(async move {
        tokio::select! {
            () = serve => {}
            () = drain.signaled() => {}
        }
    })
}

/// An error answer: the status and a message that says what to do.
fn problem(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn policies(State(state): State<AdminState>) -> Json<views::PoliciesView> {
    Json(views::policies(&state.agent, &state.pods.list()))
}

#[derive(serde::Deserialize)]
struct CheckQuery {
    from: String,
    to: String,
}

async fn check(State(state): State<AdminState>, Query(q): Query<CheckQuery>) -> Response {
    match views::check(
        &state.agent.state,
        state.agent.outbound_override,
        &q.from,
        &q.to,
    ) {
        Ok(view) => Json(view).into_response(),
        Err(e) => problem(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn services(State(state): State<AdminState>) -> Json<Vec<views::ServiceView>> {
    Json(views::services(&state.agent.state))
}

async fn connections(State(state): State<AdminState>) -> Json<Vec<views::ConnectionView>> {
    Json(views::connections(&state.agent))
}

const ENDPOINTS: &[&str] = &[
    "/status",
    "/config_dump",
    "/workloads",
    "/certs",
    "POST /certs/verify (body: a PEM chain, leaf first)",
    "/connections",
    "/policies",
    "/services",
    "/check?from=<pod|spiffe-id|ip>&to=<pod|ip|svc/ns/name>:<port>",
    "/healthz/ready",
    "/metrics",
    "POST /logging?level=<filter>",
];

async fn index() -> Json<&'static [&'static str]> {
    Json(ENDPOINTS)
}

async fn status(State(state): State<AdminState>) -> Json<views::StatusView> {
    Json(views::status(&state.agent, &state.pods.list()))
}

async fn config_dump(State(state): State<AdminState>) -> Json<views::ConfigDump> {
    Json(views::config_dump(&state.agent, state.pods.list()))
}

async fn workloads(State(state): State<AdminState>) -> Json<Vec<views::WorkloadView>> {
    Json(views::workloads(&state.agent, &state.pods.list()))
}

async fn certs(State(state): State<AdminState>) -> Json<Vec<views::CertView>> {
    Json(views::certs(&state.agent))
}

async fn verify_chain(State(state): State<AdminState>, body: String) -> Response {
    match views::verify_chain(&state.agent, &body) {
        Ok(verdict) => Json(verdict).into_response(),
        Err(e) => problem(StatusCode::BAD_REQUEST, e),
    }
}

/// 200 when ready, 503 with the reasons otherwise.
async fn ready(State(state): State<AdminState>) -> Response {
    let pods = state.pods.list();
    let readiness = views::readiness(&views::ReadinessInputs::of(&state.agent, &pods));
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match state
        .agent
        .metrics
        .encode(Some(state.agent.redirect.stats()))
    {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct LoggingQuery {
    level: String,
}

async fn logging(Query(q): Query<LoggingQuery>) -> Response {
    match crate::logging::set_filter(&q.level) {
        Ok(()) => Json(serde_json::json!({ "level": q.level })).into_response(),
        Err(e) => problem(StatusCode::BAD_REQUEST, e),
    }
}
