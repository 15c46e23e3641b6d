//! Prometheus metrics of one agent: connections and bytes by direction and identities,
//! handshake failures, policy denials, certificates, the control plane, and the kernel's own
//! redirect counters. Identity labels are bounded: past [`MAX_IDENTITY_LABELS`] distinct values,
//! new identities count under `other`, so a churning mesh cannot blow up the series count.
use std::{
    collections::HashSet,
    sync::{atomic::AtomicI64, Mutex},
    time::SystemTime,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::redirect::RedirectStats;

/// Every reason `tls::handshake_failure_reason` answers.
pub const HANDSHAKE_FAILURE_REASONS: &[&str] = &[
    "io",
    "certificate_expired",
    "certificate_not_yet_valid",
    "unknown_issuer",
    "revoked",
    "bad_certificate",
    "no_certificate",
    "tls_version",
    "peer_incompatible",
    "alert_received",
    "protocol",
    "general",
    "other",
    // tls::Rejection::REASONS not above
    "bad_san",
    "bad_spiffe_id",
    "unknown_trust_domain",
    "ca_leaf",
    "leaf_key_usage",
    "extended_key_usage",
    "weak_key",
    "crl_expired",
    "bad_chain",
    "identity_mismatch",
];
/// Every reason a certificate request fails for, as counted.
pub const CA_FAILURE_REASONS: &[&str] = &[
    "unavailable",
    "permission_denied",
    "unauthenticated",
    "invalid_argument",
    "deadline_exceeded",
    "ca_error",
    "bad_chain",
    "csr",
    "other",
];
/// Every reason an inbound connection is denied for, as counted.
pub const DENIAL_REASONS: &[&str] = &[
    "plaintext_in_strict_mode",
    "deny_policy",
    "no_allow_policy_matched",
    "default_deny",
];

/// Distinct identity label values before new ones become `other`.
pub const MAX_IDENTITY_LABELS: usize = 256;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub direction: &'static str,
    pub source_identity: String,
    pub destination_identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub direction: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabels {
    pub identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    pub event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboundLabels {
    pub outcome: &'static str,
    pub reason: &'static str,
}

/// Outcomes and reasons of outbound connections, all exported from zero.
pub const OUTBOUND_OUTCOMES: &[(&str, &str)] = &[
    ("mtls", "mesh_workload"),
    ("plaintext", "destination_mode_disable"),
    ("plaintext", "endpoint_outside_mesh"),
    ("passthrough", "external_service"),
    ("passthrough", "allow_any"),
    ("refused", "no_healthy_endpoint"),
    ("refused", "unknown_service_port"),
    ("refused", "registry_only"),
    ("refused", "no_own_certificate"),
    ("failed", "unreachable"),
];

/// Everything the agent counts.
pub struct Metrics {
    registry: Registry,
    pub connections_opened: Family<ConnectionLabels, Counter>,
    pub connections_closed: Family<ConnectionLabels, Counter>,
    pub bytes_sent: Family<ConnectionLabels, Counter>,
    pub bytes_received: Family<ConnectionLabels, Counter>,
    pub connections_active: Family<DirectionLabels, Gauge>,
    pub handshake_failures: Family<FailureLabels, Counter>,
    pub policy_denials: Family<ReasonLabels, Counter>,
    /// Inbound connections refused at accept because a connection cap was reached.
    pub connections_shed: Family<ReasonLabels, Counter>,
    /// Tunnel connections dropped because of a timeout (handshake, idle, keepalive).
    pub tunnel_timeouts: Family<ReasonLabels, Counter>,
    pub certificate_expiry: Family<IdentityLabels, Gauge<i64, AtomicI64>>,
    pub certificate_not_before: Family<IdentityLabels, Gauge<i64, AtomicI64>>,
    pub certificate_rotations: Family<IdentityLabels, Counter>,
    pub ca_failures: Family<ReasonLabels, Counter>,
    pub control_plane_connected: Gauge,
    pub control_plane_version: Gauge,
    pub control_plane_rejected: Counter,
    /// Workloads and Services of the mesh in the state in force.
    pub mesh_workloads: Gauge,
    pub mesh_services: Gauge,
    /// Outbound connections by how they left (or why they did not).
    pub outbound: Family<OutboundLabels, Counter>,
    /// Service endpoints that refused or could not be reached, after which another was tried.
    pub endpoint_retries: Counter,
    redirect_events: Family<EventLabels, Counter>,
    redirect_seen: Mutex<RedirectStats>,
    identities: Mutex<HashSet<String>>,
}

impl Metrics {
    /// Counts one outbound connection.
    pub fn outbound(&self, outcome: &'static str, reason: &'static str) {
        self.outbound
            .get_or_create(&OutboundLabels { outcome, reason })
            .inc();
    }

    /// Counts one tunnel timeout of kind `reason`.
    pub fn tunnel_timeout(&self, reason: &str) {
        self.tunnel_timeouts
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    pub fn new(node: &str) -> Self {
        let mut registry = Registry::with_prefix("meshlet");
        let m = Self {
            connections_opened: Family::default(),
            connections_closed: Family::default(),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            connections_active: Family::default(),
            handshake_failures: Family::default(),
            policy_denials: Family::default(),
            connections_shed: Family::default(),
            tunnel_timeouts: Family::default(),
            certificate_expiry: Family::default(),
            certificate_not_before: Family::default(),
            certificate_rotations: Family::default(),
            ca_failures: Family::default(),
            control_plane_connected: Gauge::default(),
            control_plane_version: Gauge::default(),
            control_plane_rejected: Counter::default(),
            mesh_workloads: Gauge::default(),
            mesh_services: Gauge::default(),
            outbound: Family::default(),
            endpoint_retries: Counter::default(),
            redirect_events: Family::default(),
            redirect_seen: Mutex::new(RedirectStats::default()),
            identities: Mutex::new(HashSet::new()),
            registry: Registry::default(),
        };
        registry.register(
            "connections_opened",
            "Connections opened, by direction and source and destination identity",
            m.connections_opened.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections closed, by direction and source and destination identity",
            m.connections_closed.clone(),
        );
        registry.register(
            "sent_bytes",
            "Bytes sent by the app side of a connection (outbound: from the local app; inbound: from the remote)",
            m.bytes_sent.clone(),
        );
        registry.register(
            "received_bytes",
            "Bytes received by the app side of a connection",
            m.bytes_received.clone(),
        );
        registry.register(
            "connections_active",
            "Connections open now, by direction",
            m.connections_active.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by direction and reason",
            m.handshake_failures.clone(),
        );
        registry.register(
            "connections_shed",
            "Inbound connections refused at once because a connection cap was reached, by reason",
            m.connections_shed.clone(),
        );
        registry.register(
            "tunnel_timeouts",
            "Tunnel connections dropped by a timeout, by reason (handshake, idle, keepalive, connect_response)",
            m.tunnel_timeouts.clone(),
        );
        registry.register(
            "policy_denials",
            "Inbound connections refused by mTLS mode or authorization policy, by reason",
            m.policy_denials.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When the current certificate of each local identity expires (unix seconds)",
            m.certificate_expiry.clone(),
        );
        registry.register(
            "certificate_not_before_timestamp_seconds",
            "When the current certificate of each local identity became valid (unix seconds)",
            m.certificate_not_before.clone(),
        );
        registry.register(
            "certificate_rotations",
            "Certificates obtained from the CA (first issue and every rotation), per identity",
            m.certificate_rotations.clone(),
        );
        registry.register(
            "ca_request_failures",
            "Certificate requests that failed, by reason",
            m.ca_failures.clone(),
        );
        registry.register(
            "control_plane_connected",
            "1 while the discovery stream to the control plane is up",
            m.control_plane_connected.clone(),
        );
        registry.register(
            "control_plane_applied_version",
            "The last control-plane version this agent applied",
            m.control_plane_version.clone(),
        );
        registry.register(
            "control_plane_rejected_updates",
            "Control-plane versions refused (NACK)",
            m.control_plane_rejected.clone(),
        );
        registry.register(
            "mesh_workloads",
            "Workloads of the mesh in the control-plane state in force",
            m.mesh_workloads.clone(),
        );
        registry.register(
            "mesh_services",
            "Services of the mesh in the control-plane state in force",
            m.mesh_services.clone(),
        );
        registry.register(
            "outbound_connections",
            "Outbound connections by outcome (mtls, plaintext, passthrough, refused, failed) and reason",
            m.outbound.clone(),
        );
        registry.register(
            "endpoint_retries",
            "Service endpoints that refused or were unreachable, after which another endpoint was tried",
            m.endpoint_retries.clone(),
        );
        registry.register(
            "redirect_events",
            "The kernel programs' counters (per-CPU BPF map, summed), by event",
            m.redirect_events.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                node: node.to_string(),
            })
            .set(1);
        registry.register("build_info", "The agent's version and node", build);
        // Known label values start at zero, so that rates and alerts see the series before
        // the first event (and `absent()` never fires for a healthy agent).
        for direction in ["inbound", "outbound"] {
            m.connections_active
                .get_or_create(&DirectionLabels { direction })
                .set(0);
            for &reason in HANDSHAKE_FAILURE_REASONS {
                m.handshake_failures
                    .get_or_create(&FailureLabels { direction, reason })
                    .inc_by(0);
            }
        }
        for &reason in DENIAL_REASONS {
            m.policy_denials
                .get_or_create(&ReasonLabels {
                    reason: reason.into(),
                })
                .inc_by(0);
        }
        for &(outcome, reason) in OUTBOUND_OUTCOMES {
            m.outbound
                .get_or_create(&OutboundLabels { outcome, reason })
                .inc_by(0);
        }
        for &reason in CA_FAILURE_REASONS {
            m.ca_failures
                .get_or_create(&ReasonLabels {
                    reason: reason.into(),
                })
                .inc_by(0);
        }
        Self { registry, ..m }
    }

    /// An identity as a label value, bounded (see [`MAX_IDENTITY_LABELS`]).
    pub fn identity_label(&self, identity: Option<&str>) -> String {
        let Some(identity) = identity else {
            return "none".into();
        };
        let mut seen = self.identities.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(identity) {
            return identity.to_string();
        }
        if seen.len() >= MAX_IDENTITY_LABELS {
            return "other".into();
        }
        seen.insert(identity.to_string());
        identity.to_string()
    }

    /// Labels for a connection between two identities (`None`: no identity, plaintext).
    pub fn connection_labels(
        &self,
        direction: &'static str,
        source: Option<&str>,
        destination: Option<&str>,
    ) -> ConnectionLabels {
        ConnectionLabels {
            direction,
            source_identity: self.identity_label(source),
            destination_identity: self.identity_label(destination),
        }
    }

    /// Records a certificate that was just installed.
    pub fn certificate_installed(
        &self,
        identity: &str,
        not_before: SystemTime,
        not_after: SystemTime,
    ) {
        let labels = IdentityLabels {
            identity: identity.to_string(),
        };
        self.certificate_expiry
            .get_or_create(&labels)
            .set(unix(not_after));
        self.certificate_not_before
            .get_or_create(&labels)
            .set(unix(not_before));
        self.certificate_rotations.get_or_create(&labels).inc();
    }

    /// Forgets an identity's certificate gauges (its last pod left).
    pub fn certificate_dropped(&self, identity: &str) {
        let labels = IdentityLabels {
            identity: identity.to_string(),
        };
        self.certificate_expiry.remove(&labels);
        self.certificate_not_before.remove(&labels);
    }

    /// The text exposition, with the kernel counters brought up to date first.
    pub fn encode(&self, redirect: Option<RedirectStats>) -> Result<String, std::fmt::Error> {
        if let Some(now) = redirect {
            let mut seen = self.redirect_seen.lock().unwrap_or_else(|e| e.into_inner());
            for (event, now, before) in [
                ("redirected", now.redirected, seen.redirected),
                ("skipped_agent", now.skipped_agent, seen.skipped_agent),
                (
                    "original_dst_recorded",
                    now.original_dst_recorded,
                    seen.original_dst_recorded,
                ),
                (
                    "refused_no_space",
                    now.refused_no_space,
                    seen.refused_no_space,
                ),
                (
                    "peername_rewritten",
                    now.peername_rewritten,
                    seen.peername_rewritten,
                ),
                (
                    "inbound_captured",
                    now.inbound_captured,
                    seen.inbound_captured,
                ),
                ("inbound_dropped", now.inbound_dropped, seen.inbound_dropped),
                ("bind_refused", now.bind_refused, seen.bind_refused),
                (
                    "original_dst_lost",
                    now.original_dst_lost,
                    seen.original_dst_lost,
                ),
                (
                    "inbound_unknown_address",
                    now.inbound_unknown_address,
                    seen.inbound_unknown_address,
                ),
            ] {
                // The maps are pinned and may predate this agent: count from what it first saw.
                self.redirect_events
                    .get_or_create(&EventLabels { event })
                    .inc_by(now.saturating_sub(before));
            }
            *seen = now;
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_labels_are_bounded_and_connections_counted() {
        let m = Metrics::new("node-1");
        for i in 0..MAX_IDENTITY_LABELS + 10 {
            m.identity_label(Some(&format!("spiffe://td/ns/n/sa/{i}")));
        }
        assert_eq!(m.identity_label(Some("spiffe://td/ns/n/sa/new")), "other");
        assert_eq!(
            m.identity_label(Some("spiffe://td/ns/n/sa/1")),
            "spiffe://td/ns/n/sa/1"
        );
        let labels = m.connection_labels("outbound", Some("spiffe://td/ns/n/sa/1"), None);
        m.connections_opened.get_or_create(&labels).inc();
        let text = m.encode(None).expect("encode");
        assert!(text.contains("meshlet_connections_opened_total{direction=\"outbound\",source_identity=\"spiffe://td/ns/n/sa/1\",destination_identity=\"none\"} 1"), "{text}");
        assert!(text.contains("meshlet_build_info{version=\""), "{text}");
    }
}
