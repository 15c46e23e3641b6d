//! Everything the agent on one node shares between its tasks.
use std::sync::Arc;

use crate::{
    connections::LiveConnections,
    discovery::Workloads,
    identity::IdentityStore,
    limits::{ConnectionLimiter, TunnelLimits},
    redirect::Redirect,
    tls::{TlsSettings, TrustBundle},
    tunnel::Pool,
};

/// What to do with a connection to an address that is no known workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum UnknownDestination {
    /// Refuse it (fail closed): nothing leaves a mesh pod unauthenticated.
    Refuse,
    /// Connect directly, in plaintext, from the pod (for destinations outside the mesh).
    Passthrough,
}

/// The node agent's shared state.
pub struct NodeAgent {
    pub node: String,
    pub redirect: Arc<Redirect>,
    pub workloads: Arc<Workloads>,
    pub identities: Arc<IdentityStore>,
    pub bundle: Arc<TrustBundle>,
    pub tls: Arc<TlsSettings>,
    pub pool: Pool,
    pub unknown_destination: UnknownDestination,
    /// Live inbound connections, re-checked when the policy changes.
    pub connections: Arc<LiveConnections>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Timeouts and limits of tunnel connections, both sides.
    pub limits: TunnelLimits,
    /// Caps on the connections peers hold open to this node's pods (tunnel and plaintext).
    pub inbound_connections: Arc<ConnectionLimiter>,
    /// Node addresses kubelet probes come from (`--capture-exempt-source`).
    pub capture_exempt_sources: Vec<std::net::IpAddr>,
}
