//! The control plane's health, on a plain HTTP port for kubelet probes (which speak no TLS):
//! `/healthz` (the process answers) and `/ready` (it has a state to serve and, in Kubernetes
//! mode, its watches of the API are working). Not ready says why, e.g. "kubernetes:
//! disconnected since 2026-11-30T02:10:00Z (…)"; it keeps serving its last state meanwhile.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use axum::{extract::State, http::StatusCode, routing::get, Router};

/// What readiness depends on.
#[derive(Debug, Default)]
pub struct Health {
    /// Since when, and why, a watch of the Kubernetes API has been failing.
    kubernetes_down: Mutex<Option<(SystemTime, String)>>,
    /// What is wrong with the mesh settings in force, if anything.
    settings: Mutex<Option<String>>,
}

impl Health {
    /// A watch failed (the API away, a watch refused). Answers whether this is news (the
    /// first failure since the watches last worked).
    pub fn kubernetes_failed(&self, error: &str) -> bool {
        let mut down = self
            .kubernetes_down
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if down.is_some() {
            return false;
        }
        tracing::warn!("kubernetes: disconnected ({error}); serving the last state");
        *down = Some((SystemTime::now(), error.to_string()));
        true
    }

    /// A watch delivered an event again.
    pub fn kubernetes_ok(&self) {
        let mut down = self
            .kubernetes_down
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((since, _)) = down.take() {
            tracing::info!(
                down_for = ?since.elapsed().unwrap_or_default(),
                "kubernetes: connected again"
            );
        }
    }

    /// The mesh settings are wrong (`Some`, saying how) or fine again.
    pub fn settings(&self, problem: Option<String>) {
        let mut settings = self.settings.lock().unwrap_or_else(|e| e.into_inner());
        if *settings != problem {
            if let Some(p) = &problem {
                tracing::error!("mesh settings: {p}");
            }
            *settings = problem;
        }
    }

    /// Why the control plane is not ready, if it is not.
    pub fn problem(&self) -> Option<String> {
        if let Some(p) = self
            .settings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Some(format!("mesh settings: {p}"));
        }
        let down = self
            .kubernetes_down
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        down.as_ref().map(|(since, error)| {
            format!(
                "kubernetes: disconnected since {} ({error})",
                humantime::format_rfc3339_seconds(*since)
            )
        })
    }
}

/// Serves `/healthz` and `/ready` on `addr` until the process ends (connections capped and
/// timed out: the port is reachable from the pod network).
pub async fn serve(addr: SocketAddr, health: Arc<Health>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "health endpoint listening");
    let router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .with_state(health);
    tokio::spawn(meshlet_plainhttp::serve(
        listener,
        router,
        meshlet_plainhttp::Limits::default(),
    ));
    Ok(())
}

async fn ready(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    match health.problem() {
        None => (StatusCode::OK, "ready\n".into()),
        Some(problem) => (StatusCode::SERVICE_UNAVAILABLE, format!("{problem}\n")),
    }
}
