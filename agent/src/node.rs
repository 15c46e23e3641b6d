//! Everything the agent on one node shares between its tasks.
use std::sync::Arc;

use crate::{
    connections::LiveConnections,
    identity::IdentityStore,
    limits::{ConnectionLimiter, TunnelLimits},
    outbound::UpstreamLoad,
    redirect::Redirect,
    state::{OutboundTrafficPolicy, Store},
    tls::{TlsSettings, TrustBundle},
    tunnel::Pool,
};

/// The node agent's shared state.
pub struct NodeAgent {
    pub node: String,
    pub redirect: Arc<Redirect>,
    pub state: Arc<Store>,
    pub identities: Arc<IdentityStore>,
    pub bundle: Arc<TrustBundle>,
    pub tls: Arc<TlsSettings>,
    pub pool: Pool,
    /// This node's override of the mesh's outbound traffic policy.
    pub outbound_override: Option<OutboundTrafficPolicy>,
    /// Open outbound connections per upstream address, for load balancing.
    pub upstream_load: UpstreamLoad,
    /// Live inbound connections, re-checked when the policy changes.
    pub connections: Arc<LiveConnections>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Timeouts and limits of tunnel connections, both sides.
    pub limits: TunnelLimits,
    /// Caps on the connections peers hold open to this node's pods (tunnel and plaintext).
    pub inbound_connections: Arc<ConnectionLimiter>,
    /// Node addresses kubelet probes come from (`--capture-exempt-source`).
    pub capture_exempt_sources: Vec<std::net::IpAddr>,
    /// Set once a successor has taken the node over.
    pub drain: crate::drain::Drain,
}
