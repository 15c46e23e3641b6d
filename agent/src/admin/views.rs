//! What the admin API shows: plain serializable views built from the agent's state.
use std::{net::IpAddr, sync::Arc, time::SystemTime};

use crate::{
    discovery::WorkloadInfo,
    identity::SpiffeId,
    node::NodeAgent,
    pods::PodSummary,
    policy::{AuthorizationPolicy, Decision, Mode, ModeDecision, Request, Transport},
};

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("--to {0:?} must be <pod>:<port>, where pod is namespace/name, a pod uid or an IP")]
    To(String),
    #[error("no workload {0:?} in the mesh (try `meshlet workloads`)")]
    UnknownWorkload(String),
    #[error("--from {0:?} is not a pod (namespace/name or uid), a SPIFFE ID or an IP address")]
    From(String),
    #[error("--from {value:?}: {source}")]
    Identity {
        value: String,
        source: crate::identity::SpiffeIdError,
    },
}

/// The policy that applies to each local workload.
#[derive(Debug, serde::Serialize)]
pub struct PoliciesView {
    pub version: u64,
    pub mesh_mode: Mode,
    pub default_deny: bool,
    pub workloads: Vec<WorkloadPolicyView>,
}

#[derive(Debug, serde::Serialize)]
pub struct WorkloadPolicyView {
    pub pod: String,
    pub workload: String,
    pub identity: String,
    pub mode: ModeDecision,
    pub port_modes: Vec<PortModeView>,
    pub inbound_captured: bool,
    pub policies: Vec<PolicySummary>,
    /// What happens to a connection that no ALLOW policy matches.
    pub default: &'static str,
}

#[derive(Debug, serde::Serialize)]
pub struct PortModeView {
    pub port: u16,
    pub mode: ModeDecision,
}

#[derive(Debug, serde::Serialize)]
pub struct PolicySummary {
    pub name: String,
    pub action: crate::policy::Action,
    pub dry_run: bool,
    pub rules: usize,
    pub policy: AuthorizationPolicy,
}

pub fn policies(agent: &NodeAgent, pods: &[PodSummary]) -> PoliciesView {
    let set = agent.workloads.policy();
    let mut workloads = Vec::new();
    for pod in pods {
        let Some(w) = agent.workloads.by_uid(&pod.uid) else {
            continue;
        };
        let mut ports: Vec<u16> = set
            .modes
            .iter()
            .flat_map(|r| r.port_modes.keys().copied())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        let base = set.mode_for(&w, 0);
        let port_modes = ports
            .into_iter()
            .map(|port| PortModeView {
                port,
                mode: set.mode_for(&w, port),
            })
            .filter(|p| p.mode != base)
            .collect();
        let probe = Request {
            transport: Transport::Mtls,
            source_identity: None,
            source_ip: None,
            destination: &w,
            port: 0,
        };
        let selected: Vec<PolicySummary> = set
            .policies
            .iter()
            .filter(|p| p.selects(&probe))
            .map(|p| PolicySummary {
                name: p.display_name(),
                action: p.action,
                dry_run: p.dry_run,
                rules: p.rules.len(),
                policy: p.clone(),
            })
            .collect();
        let has_allow = selected
            .iter()
            .any(|p| p.action == crate::policy::Action::Allow && !p.dry_run);
        workloads.push(WorkloadPolicyView {
            pod: pod.uid.clone(),
            workload: w.display_name(),
            identity: w.identity.to_string(),
            mode: base,
            port_modes,
            inbound_captured: set.needs_capture(&w),
            default: if has_allow || set.default_deny {
                "deny"
            } else {
                "allow"
            },
            policies: selected,
        });
    }
    PoliciesView {
        version: agent.workloads.version(),
        mesh_mode: set.mesh_mode,
        default_deny: set.default_deny,
        workloads,
    }
}

/// `meshlet check`: how a connection would be decided, without sending it.
#[derive(Debug, serde::Serialize)]
pub struct CheckView {
    pub from: String,
    pub source_identity: Option<String>,
    pub source_ip: Option<IpAddr>,
    pub to: String,
    pub port: u16,
    pub transport: Transport,
    pub decision: Decision,
}

fn find_workload(agent: &NodeAgent, name: &str) -> Option<Arc<WorkloadInfo>> {
    agent
        .workloads
        .by_name(name)
        .or_else(|| agent.workloads.by_uid(name))
        .or_else(|| name.parse().ok().and_then(|ip| agent.workloads.by_ip(ip)))
}

pub fn check(agent: &NodeAgent, from: &str, to: &str) -> Result<CheckView, ViewError> {
    let (pod, port) = to
        .rsplit_once(':')
        .ok_or_else(|| ViewError::To(to.into()))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ViewError::To(to.into()))?;
    let destination =
        find_workload(agent, pod).ok_or_else(|| ViewError::UnknownWorkload(pod.into()))?;
    let set = agent.workloads.policy();
    // The source: a mesh workload (its identity and address), a bare identity, or an address
    // (a mesh workload's, or one outside the mesh: plaintext).
    let (label, identity, ip): (String, Option<SpiffeId>, Option<IpAddr>) =
        if from.starts_with("spiffe://") {
            let id = SpiffeId::parse(from).map_err(|source| ViewError::Identity {
                value: from.into(),
                source,
            })?;
            (from.to_string(), Some(id), None)
        } else if let Some(w) = find_workload(agent, from) {
            (
                w.display_name(),
                Some(w.identity.clone()),
                w.ips.first().copied(),
            )
        } else if let Ok(ip) = from.parse::<IpAddr>() {
            (format!("{ip} (outside the mesh)"), None, Some(ip))
        } else {
            return Err(ViewError::From(from.into()));
        };
    // A mesh source talks plaintext to a DISABLE destination: that is what would arrive.
    let disabled = set.mode_for(&destination, port).mode == Mode::Disable;
    let transport = if identity.is_some() && !disabled {
        Transport::Mtls
    } else {
        Transport::Plaintext
    };
    let source_identity = (transport == Transport::Mtls).then_some(identity).flatten();
    let decision = set.decide(&Request {
        transport,
        source_identity: source_identity.as_ref(),
        source_ip: ip,
        destination: &destination,
        port,
    });
    Ok(CheckView {
        from: label,
        source_identity: source_identity.map(|i| i.to_string()),
        source_ip: ip,
        to: destination.display_name(),
        port,
        transport,
        decision,
    })
}

/// One live inbound connection.
#[derive(Debug, serde::Serialize)]
pub struct ConnectionView {
    pub id: u64,
    pub pod: String,
    pub transport: Transport,
    pub source_identity: Option<String>,
    pub source: String,
    pub destination: String,
    pub age_seconds: u64,
}

pub fn connections(agent: &NodeAgent) -> Vec<ConnectionView> {
    let now = SystemTime::now();
    agent
        .connections
        .list()
        .into_iter()
        .map(|c| ConnectionView {
            id: c.id,
            pod: c.pod.clone(),
            transport: c.transport,
            source_identity: c.source_identity.as_ref().map(ToString::to_string),
            source: c.source.to_string(),
            destination: c.destination.to_string(),
            age_seconds: now
                .duration_since(c.started)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
        .collect()
}
