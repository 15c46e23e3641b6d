//! Inbound: connections that reach a local pod from elsewhere. Tunneled ones arrive on the
//! agent's mTLS listener ([`tunnel`]); everything else from outside the pod is captured by the
//! kernel into the agent's plaintext listener ([`plaintext`]). Both are admitted here, against
//! the destination's mTLS mode and authorization policies, with one audit line per decision,
//! and re-checked whenever the policy changes.
use std::{net::SocketAddr, sync::Arc};

use crate::{
    connections::{CloseSignal, Direction, NewConnection, Registration},
    identity::SpiffeId,
    node::NodeAgent,
    pods::PodHandle,
    state::policy::{Decision, Request, Transport, Verdict},
    state::WorkloadInfo,
};

pub mod plaintext;
pub mod tunnel;

/// A slot under the inbound connection caps for a connection from `peer`, or `None` (counted
/// and logged) when the connection must be shed: the newest connection is the one refused,
/// so the ones already working keep working.
pub(crate) fn slot(
    agent: &NodeAgent,
    pod: &PodHandle,
    peer: SocketAddr,
    listener: &'static str,
) -> Option<crate::limits::Permit> {
    match agent.inbound_connections.try_acquire(peer.ip()) {
        Ok(permit) => Some(permit),
        Err(shed) => {
            agent
                .metrics
                .connections_shed
                .get_or_create(&crate::metrics::ReasonLabels {
                    reason: shed.reason().into(),
                })
                .inc();
            tracing::warn!(target: "access", direction = "inbound", listener, pod = %pod.uid,
                %peer, outcome = "refused", reason = %shed, "connection shed");
            None
        }
    }
}

/// Whether `port` is one of the agent's own ports in the pod: no tunnel stream and no
/// plaintext connection may be delivered there (it would come back to the agent).
pub(crate) fn is_agent_port(port: u16) -> bool {
    meshlet_common::AGENT_PORTS.contains(&port)
}

/// An admitted connection: listed while it lives, closed when told to.
pub(crate) struct Admission {
    pub registration: Registration,
    pub close: CloseSignal,
}

/// Decides on a new inbound connection; logs the decision; registers it when allowed.
pub(crate) fn admit(
    agent: &Arc<NodeAgent>,
    pod: &PodHandle,
    destination: &WorkloadInfo,
    transport: Transport,
    source_identity: Option<&SpiffeId>,
    source: SocketAddr,
    target: SocketAddr,
) -> Option<Admission> {
    let policy = agent.state.policy();
    let decision = policy.decide(&Request {
        transport,
        source_identity,
        source_ip: Some(source.ip()),
        destination,
        port: target.port(),
    });
    audit(
        &decision,
        "connection",
        transport,
        source_identity,
        source,
        destination,
        target,
    );
    if decision.verdict == Verdict::Deny {
        let reason = if decision.policy.is_some() {
            "deny_policy"
        } else if decision.reason.starts_with("plaintext refused") {
            "plaintext_in_strict_mode"
        } else if decision.reason.starts_with("no ALLOW policy matched") {
            "no_allow_policy_matched"
        } else {
            "default_deny"
        };
        agent
            .metrics
            .policy_denials
            .get_or_create(&crate::metrics::ReasonLabels {
                reason: reason.into(),
            })
            .inc();
        return None;
    }
    let (registration, close) = agent.connections.register(NewConnection {
        direction: Direction::Inbound,
        pod: pod.uid.clone(),
        transport,
        source_identity: source_identity.cloned(),
        destination_identity: Some(destination.identity.clone()),
        source,
        destination: target,
    });
    Some(Admission {
        registration,
        close,
    })
}

/// One audit line per decision, plus one per dry-run policy that would have changed it and
/// one per AUDIT policy that matched.
fn audit(
    decision: &Decision,
    event: &'static str,
    transport: Transport,
    source_identity: Option<&SpiffeId>,
    source: SocketAddr,
    destination: &WorkloadInfo,
    target: SocketAddr,
) {
    let src_identity = source_identity.map(ToString::to_string).unwrap_or_default();
    let policy = decision
        .policy
        .as_ref()
        .map(|p| p.policy.clone())
        .unwrap_or_default();
    let rule = decision
        .policy
        .as_ref()
        .and_then(|p| p.rule)
        .map(|r| r as i64)
        .unwrap_or(-1);
    let transport = match transport {
        Transport::Mtls => "mtls",
        Transport::Plaintext => "plaintext",
    };
    let verdict = match decision.verdict {
        Verdict::Allow => "allowed",
        Verdict::Deny => "denied",
    };
    tracing::info!(target: "audit", event, decision = verdict, transport,
        src_identity = %src_identity, src_ip = %source.ip(),
        dst_workload = %destination.display_name(), dst_port = target.port(),
        mode = %decision.mode.mode, mode_source = %decision.mode.source,
        policy = %policy, rule, reason = %decision.reason, "authorization decision");
    let extra = [
        (
            &decision.dry_run,
            "dry_run",
            "a dry-run policy would have denied this connection",
        ),
        (&decision.audited, "audit", "matched an AUDIT policy"),
    ];
    for (hits, kind, reason) in extra {
        for hit in hits {
            tracing::info!(target: "audit", event, decision = kind, transport,
                src_identity = %src_identity, src_ip = %source.ip(),
                dst_workload = %destination.display_name(), dst_port = target.port(),
                policy = %hit.policy, rule = hit.rule.map(|r| r as i64).unwrap_or(-1),
                reason, "authorization decision");
        }
    }
}

/// Re-checks every live inbound connection against the policy now in force and closes the
/// ones it denies (or whose destination the control plane no longer describes).
pub fn reevaluate(agent: &NodeAgent) {
    let policy = agent.state.policy();
    for connection in agent.connections.list() {
        if connection.direction != Direction::Inbound {
            continue;
        }
        let Some(destination) = agent.state.by_uid(&connection.pod) else {
            connection.close("the destination workload is no longer in the mesh".into());
            continue;
        };
        let decision = policy.decide(&Request {
            transport: connection.transport,
            source_identity: connection.source_identity.as_ref(),
            source_ip: Some(connection.source.ip()),
            destination: &destination,
            port: connection.destination.port(),
        });
        if decision.verdict == Verdict::Deny {
            let source = connection.source;
            audit(
                &decision,
                "connection_closed_by_policy_change",
                connection.transport,
                connection.source_identity.as_ref(),
                source,
                &destination,
                connection.destination,
            );
            connection.close(format!("closed by policy change: {}", decision.reason));
        }
    }
}
