//! What the admin API shows: plain serializable views built from the agent's state.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::SystemTime,
};

use crate::{
    identity::SpiffeId,
    node::NodeAgent,
    pods::PodSummary,
    state::policy::{AuthorizationPolicy, Decision, Mode, ModeDecision, Request, Transport},
    state::{
        MeshState, OutboundTrafficPolicy, Route, RouteInputs, RouteOutcome, Store, WorkloadInfo,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    #[error("--to {0:?} must be <pod>:<port> (pod: namespace/name, a uid or an IP; [v6]:port) or svc/<namespace>/<name>:<port>")]
    To(String),
    #[error("no workload {0:?} in the mesh (try `meshlet workloads`)")]
    UnknownWorkload(String),
    #[error("no service {0:?} in the mesh (try `meshlet services`)")]
    UnknownService(String),
    #[error("service {0:?} is headless (no cluster IP): check one of its endpoints, <pod>:<port>")]
    Headless(String),
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
    pub action: crate::state::policy::Action,
    pub dry_run: bool,
    pub rules: usize,
    pub policy: AuthorizationPolicy,
}

pub fn policies(agent: &NodeAgent, pods: &[PodSummary]) -> PoliciesView {
    let set = agent.state.policy();
    let mut workloads = Vec::new();
    for pod in pods {
        let Some(w) = agent.state.by_uid(&pod.uid) else {
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
            .any(|p| p.action == crate::state::policy::Action::Allow && !p.dry_run);
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
        version: agent.state.version(),
        mesh_mode: set.mesh_mode,
        default_deny: set.default_deny,
        workloads,
    }
}

/// `meshlet check`: where a connection would go and how it would be decided there, without
/// sending it.
#[derive(Debug, serde::Serialize)]
pub struct CheckView {
    pub from: String,
    pub source_identity: Option<String>,
    pub source_ip: Option<IpAddr>,
    /// The route the source's agent would take: the same decision the outbound path makes.
    pub route: Route,
    /// The destination workload of the route's pick (empty outside the mesh).
    pub to: String,
    /// The port at the destination (a Service port mapped to its endpoint's target port).
    pub port: u16,
    pub transport: Transport,
    /// The destination's decision (mode and authorization), when the pick is a mesh workload.
    pub decision: Option<Decision>,
}

fn find_workload(state: &MeshState, name: &str) -> Option<Arc<WorkloadInfo>> {
    state
        .by_name(name)
        .or_else(|| state.by_uid(name))
        .or_else(|| name.parse().ok().and_then(|ip| state.by_ip(ip)))
        .cloned()
}

/// Where `--to` points: `svc/<ns>/<name>:<port>` (the Service's first cluster IP), `<ip>:<port>`
/// (a workload, a cluster IP or an address outside the mesh) or `<pod>:<port>`.
fn check_destination(state: &MeshState, to: &str) -> Result<SocketAddr, ViewError> {
    if let Ok(address) = to.parse::<SocketAddr>() {
        return Ok(address);
    }
    let (target, port) = to
        .rsplit_once(':')
        .ok_or_else(|| ViewError::To(to.into()))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ViewError::To(to.into()))?;
    if let Some(name) = target.strip_prefix("svc/") {
        let service = state
            .service(name)
            .ok_or_else(|| ViewError::UnknownService(name.into()))?;
        let vip = service
            .vips
            .first()
            .ok_or_else(|| ViewError::Headless(name.into()))?;
        return Ok(SocketAddr::new(*vip, port));
    }
    if let Ok(ip) = target.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let workload =
        find_workload(state, target).ok_or_else(|| ViewError::UnknownWorkload(target.into()))?;
    let ip = workload
        .ips
        .first()
        .ok_or_else(|| ViewError::UnknownWorkload(target.into()))?;
    Ok(SocketAddr::new(*ip, port))
}

/// Explains a connection against `store` (the agent's, or a config dump's): the route the
/// outbound path would take ([`MeshState::route`], the same call), then the destination's
/// decision ([`PolicySet::decide`](crate::state::policy::PolicySet::decide), the same call
/// the inbound path makes).
pub fn check(
    store: &Store,
    outbound_override: Option<OutboundTrafficPolicy>,
    from: &str,
    to: &str,
) -> Result<CheckView, ViewError> {
    let state = store.current();
    let destination = check_destination(&state, to)?;
    let set = state.policy.clone();
    // The source: a mesh workload (its identity and address), a bare identity, or an address
    // (a mesh workload's, or one outside the mesh: plaintext).
    let (label, identity, ip): (String, Option<SpiffeId>, Option<IpAddr>) =
        if from.starts_with("spiffe://") {
            let id = SpiffeId::parse(from).map_err(|source| ViewError::Identity {
                value: from.into(),
                source,
            })?;
            (from.to_string(), Some(id), None)
        } else if let Some(w) = find_workload(&state, from) {
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
    // No load: an explanation shows the candidates, not today's pick.
    let route = state.route(
        destination,
        &RouteInputs {
            outbound_override,
            load: &|_| 0,
            explain: true,
        },
        &mut rand::thread_rng(),
    );
    let pick = match &route.outcome {
        RouteOutcome::Upstreams(upstreams) => upstreams.first().cloned(),
        RouteOutcome::Refuse { .. } => None,
    };
    let port = pick
        .as_ref()
        .map(|u| u.address.port())
        .unwrap_or(destination.port());
    let (to, transport, decision) = match pick
        .as_ref()
        .and_then(|u| u.workload.clone().map(|w| (u, w)))
    {
        Some((upstream, workload)) => {
            // A mesh source's agent tunnels unless the route says plaintext (DISABLE); a
            // source outside the mesh arrives in plaintext.
            let transport = if identity.is_some() {
                upstream.transport()
            } else {
                Transport::Plaintext
            };
            let source_identity = (transport == Transport::Mtls)
                .then_some(identity.as_ref())
                .flatten();
            let decision = set.decide(&Request {
                transport,
                source_identity,
                source_ip: ip,
                destination: &workload,
                port,
            });
            (workload.display_name(), transport, Some(decision))
        }
        None => (
            pick.as_ref()
                .map(|u| u.address.to_string())
                .unwrap_or_default(),
            Transport::Plaintext,
            None,
        ),
    };
    let source_identity = (transport == Transport::Mtls)
        .then(|| identity.map(|i| i.to_string()))
        .flatten();
    Ok(CheckView {
        from: label,
        source_identity,
        source_ip: ip,
        route,
        to,
        port,
        transport,
        decision,
    })
}

/// `meshlet services`: each Service with its cluster IPs, ports and endpoints.
#[derive(Debug, serde::Serialize)]
pub struct ServiceView {
    pub service: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<crate::state::ServicePort>,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, serde::Serialize)]
pub struct EndpointView {
    /// `namespace/name` of the workload, or the address of an endpoint outside the mesh.
    pub endpoint: String,
    pub addresses: Vec<IpAddr>,
    pub health: crate::state::Health,
    /// The workload's node; empty outside the mesh.
    pub node: String,
    pub in_mesh: bool,
    pub ports: std::collections::BTreeMap<String, u16>,
}

pub fn services(store: &Store) -> Vec<ServiceView> {
    store
        .services()
        .iter()
        .map(|s| ServiceView {
            service: s.display_name(),
            vips: s.vips.clone(),
            ports: s.ports.clone(),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| EndpointView {
                    endpoint: e.display_name(),
                    addresses: e.addresses.clone(),
                    health: e.health(),
                    node: e
                        .workload
                        .as_ref()
                        .map(|w| w.node.clone())
                        .unwrap_or_default(),
                    in_mesh: e.workload.is_some(),
                    ports: e.ports.clone(),
                })
                .collect(),
        })
        .collect()
}

/// One live connection.
#[derive(Debug, serde::Serialize)]
pub struct ConnectionView {
    pub id: u64,
    pub direction: crate::connections::Direction,
    pub pod: String,
    pub transport: Transport,
    pub source_identity: Option<String>,
    pub destination_identity: Option<String>,
    /// Bytes from the source so far, and back to it.
    pub bytes_sent: u64,
    pub bytes_received: u64,
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
            direction: c.direction,
            destination_identity: c.destination_identity.as_ref().map(ToString::to_string),
            bytes_sent: c
                .bytes
                .from_source
                .load(std::sync::atomic::Ordering::Relaxed),
            bytes_received: c.bytes.to_source.load(std::sync::atomic::Ordering::Relaxed),
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

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One identity this node holds.
#[derive(Debug, serde::Serialize)]
pub struct CertView {
    pub identity: String,
    pub pods: usize,
    /// `valid`, `pending` (no answer from the CA yet) or `expired`.
    pub state: &'static str,
    pub serial: Option<String>,
    pub not_before: Option<u64>,
    pub not_after: Option<u64>,
    /// Seconds until the agent asks for the next certificate (negative: overdue).
    pub rotation_in_seconds: Option<i64>,
    pub issuer_chain: Vec<String>,
}

pub fn certs(agent: &NodeAgent) -> Vec<CertView> {
    let now = SystemTime::now();
    agent
        .identities
        .list()
        .into_iter()
        .map(|(identity, pods, cert)| match cert {
            None => CertView {
                identity: identity.to_string(),
                pods,
                state: "pending",
                serial: None,
                not_before: None,
                not_after: None,
                rotation_in_seconds: None,
                issuer_chain: vec![],
            },
            Some(c) => CertView {
                identity: identity.to_string(),
                pods,
                state: if c.is_valid_at(now) {
                    "valid"
                } else {
                    "expired"
                },
                serial: Some(c.serial.clone()),
                not_before: Some(unix(c.not_before)),
                not_after: Some(unix(c.not_after)),
                rotation_in_seconds: Some(unix(c.renew_at) as i64 - unix(now) as i64),
                issuer_chain: c.issuer_chain.clone(),
            },
        })
        .collect()
}

/// One workload of the mesh, as this node knows it.
#[derive(Debug, serde::Serialize)]
pub struct WorkloadView {
    pub workload: String,
    pub uid: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub identity: String,
    /// Enrolled on this node.
    pub local: bool,
    pub mode: Mode,
}

pub fn workloads(agent: &NodeAgent, pods: &[PodSummary]) -> Vec<WorkloadView> {
    let set = agent.state.policy();
    agent
        .state
        .list()
        .into_iter()
        .map(|w| WorkloadView {
            workload: w.display_name(),
            uid: w.uid.clone(),
            node: w.node.clone(),
            ips: w.ips.clone(),
            identity: w.identity.to_string(),
            local: pods.iter().any(|p| p.uid == w.uid),
            mode: set.mode_for(&w, 0).mode,
        })
        .collect()
}

/// Whether the agent can serve its pods: programs attached (always, once the API is up), a
/// control-plane update applied, every local pod described and holding a valid certificate.
#[derive(Debug, serde::Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub reasons: Vec<String>,
}

/// What readiness is decided from.
pub struct ReadinessInputs<'a> {
    /// The control-plane version applied (0: none yet).
    pub version: u64,
    /// Why the control plane's last update could not be applied, if it could not.
    pub control_plane_problem: Option<String>,
    /// Workloads (uids) the control plane places on this node.
    pub placed_here: Vec<String>,
    /// The pods the agent has enrolled.
    pub pods: &'a [PodSummary],
}

impl<'a> ReadinessInputs<'a> {
    pub fn of(agent: &NodeAgent, pods: &'a [PodSummary]) -> Self {
        Self {
            version: agent.state.version(),
            control_plane_problem: agent.state.problem(),
            placed_here: agent
                .state
                .on_node(&agent.node)
                .iter()
                .map(|w| w.uid.clone())
                .collect(),
            pods,
        }
    }
}

pub fn readiness(inputs: &ReadinessInputs<'_>) -> Readiness {
    let (version, pods) = (inputs.version, inputs.pods);
    let mut reasons = Vec::new();
    if version == 0 {
        reasons.push("no control-plane update applied yet".to_string());
    }
    if let Some(problem) = &inputs.control_plane_problem {
        reasons.push(format!("control plane: {problem}"));
    }
    // A pod the node runs but the agent has not enrolled (after a restart, before the CNI
    // side replays it) is refused by the pinned programs: the node cannot serve it.
    for uid in &inputs.placed_here {
        if !pods.iter().any(|p| &p.uid == uid) {
            reasons.push(format!(
                "pod {uid} runs on this node but is not enrolled (its traffic is refused until the CNI side announces it)"
            ));
        }
    }
    for pod in pods {
        match &pod.workload {
            None => reasons.push(format!(
                "pod {} is not described by the control plane",
                pod.uid
            )),
            Some(w) if !pod.certificate_ready => reasons.push(format!(
                "pod {} ({w}) has no valid certificate yet",
                pod.uid
            )),
            Some(_) => {}
        }
    }
    Readiness {
        ready: reasons.is_empty(),
        reasons,
    }
}

/// `meshlet status`.
#[derive(Debug, serde::Serialize)]
pub struct StatusView {
    pub node: String,
    pub version: &'static str,
    pub ready: Readiness,
    pub control_plane_version: u64,
    /// The discovery stream: connected or not, since when (traffic between known workloads
    /// goes on on the last good state while it is down).
    pub control_plane: crate::state::Link,
    pub pods: usize,
    pub identities: usize,
    pub connections: usize,
    pub redirect: crate::redirect::RedirectStats,
}

pub fn status(agent: &NodeAgent, pods: &[PodSummary]) -> StatusView {
    StatusView {
        node: agent.node.clone(),
        version: env!("CARGO_PKG_VERSION"),
        ready: readiness(&ReadinessInputs::of(agent, pods)),
        control_plane_version: agent.state.version(),
        control_plane: agent.state.link(),
        pods: pods.len(),
        identities: agent.identities.list().len(),
        connections: agent.connections.list().len(),
        redirect: agent.redirect.stats(),
    }
}

/// Everything at once; `meshlet --file` answers from a saved one.
#[derive(Debug, serde::Serialize)]
pub struct ConfigDump {
    pub status: StatusView,
    pub workloads: Vec<WorkloadView>,
    pub certs: Vec<CertView>,
    pub connections: Vec<ConnectionView>,
    pub policies: PoliciesView,
    pub services: Vec<ServiceView>,
    pub pods: Vec<PodSummary>,
    /// The control-plane update in force, as received.
    pub discovery: Option<meshlet_proto::v1::DiscoveryResponse>,
}

pub fn config_dump(agent: &NodeAgent, pods: Vec<PodSummary>) -> ConfigDump {
    ConfigDump {
        status: status(agent, &pods),
        workloads: workloads(agent, &pods),
        certs: certs(agent),
        connections: connections(agent),
        policies: policies(agent, &pods),
        services: services(&agent.state),
        discovery: agent.state.last_update(),
        pods,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(workload: Option<&str>, certificate_ready: bool) -> PodSummary {
        PodSummary {
            uid: "uid-web".into(),
            netns_path: "/run/netns/web".into(),
            netns_cookie: 1,
            workload: workload.map(Into::into),
            identity: None,
            certificate_ready,
        }
    }

    #[test]
    fn ready_only_after_the_first_update_and_with_every_certificate() {
        let inputs = |version, pods: &'static [PodSummary]| ReadinessInputs {
            version,
            control_plane_problem: None,
            placed_here: vec![],
            pods,
        };
        let before = readiness(&inputs(0, &[]));
        assert!(!before.ready);
        assert!(readiness(&inputs(1, &[])).ready);
        let none: &'static [PodSummary] = Box::leak(Box::new([pod(None, false)]));
        assert!(!readiness(&inputs(1, none)).ready);
        let waiting: &'static [PodSummary] = Box::leak(Box::new([pod(Some("default/web"), false)]));
        assert!(!readiness(&inputs(1, waiting)).ready);
        let good: &'static [PodSummary] = Box::leak(Box::new([pod(Some("default/web"), true)]));
        assert!(readiness(&inputs(1, good)).ready);
        // A pod placed here that the agent has not enrolled (e.g. after a restart).
        let mut missing = inputs(1, good);
        missing.placed_here = vec![good[0].uid.clone(), "uid-other".into()];
        let r = readiness(&missing);
        assert!(
            !r.ready && r.reasons.iter().any(|r| r.contains("uid-other")),
            "{r:?}"
        );
        // An update the control plane sent but the agent could not take.
        let mut refused = inputs(1, good);
        refused.control_plane_problem = Some("update too large".into());
        let r = readiness(&refused);
        assert!(
            !r.ready && r.reasons == ["control plane: update too large"],
            "{r:?}"
        );
    }
}

/// One certificate of a chain under `meshlet certs verify`.
#[derive(Debug, serde::Serialize)]
pub struct ChainCertView {
    pub subject: String,
    pub issuer: String,
    pub serial: String,
    /// The SPIFFE ID, when the certificate carries exactly one valid one.
    pub identity: Option<String>,
    pub not_before: u64,
    pub not_after: u64,
}

/// One reason a chain fails.
#[derive(Debug, serde::Serialize, PartialEq, Eq)]
pub struct ReasonView {
    pub reason: &'static str,
    pub message: String,
}

/// A PEM chain checked against the agent's current trust bundle, as a peer's would be.
#[derive(Debug, serde::Serialize)]
pub struct ChainVerdict {
    pub certificates: Vec<ChainCertView>,
    pub trust_domains: Vec<String>,
    pub crls: usize,
    pub trusted: bool,
    pub identity: Option<String>,
    /// Every reason, for a client and for a server certificate alike.
    pub reasons: Vec<ReasonView>,
}

/// Checks `pem` (leaf first) with the same verifier the tunnels use, in both directions.
pub fn verify_chain(agent: &NodeAgent, pem: &str) -> Result<ChainVerdict, String> {
    use rustls_pki_types::{pem::PemObject, CertificateDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not a PEM certificate chain: {e}"))?;
    if chain.is_empty() {
        return Err(
            "no PEM certificate in the input (expected -----BEGIN CERTIFICATE-----, leaf first)"
                .into(),
        );
    }
    let mut certificates = Vec::new();
    for der in &chain {
        let info = crate::tls::leaf_info(der).map_err(|e| e.to_string())?;
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        certificates.push(ChainCertView {
            subject: cert.subject().to_string(),
            issuer: info.issuer,
            serial: info.serial,
            identity: info.identity.map(|i| i.to_string()),
            not_before: unix(info.not_before),
            not_after: unix(info.not_after),
        });
    }
    let bundle = agent.bundle.current();
    let mut reasons: Vec<ReasonView> = Vec::new();
    let mut identity = None;
    for purpose in [
        crate::tls::Purpose::ClientAuth,
        crate::tls::Purpose::ServerAuth,
    ] {
        match crate::tls::verify::check_chain(
            &agent.tls.provider,
            &bundle,
            &chain,
            SystemTime::now(),
            purpose,
        ) {
            Ok(id) => identity = Some(id.to_string()),
            Err(found) => {
                for r in found {
                    let view = ReasonView {
                        reason: r.reason(),
                        message: r.to_string(),
                    };
                    if !reasons.contains(&view) {
                        reasons.push(view);
                    }
                }
            }
        }
    }
    Ok(ChainVerdict {
        certificates,
        trust_domains: bundle.domains.keys().cloned().collect(),
        crls: bundle.crls.len(),
        trusted: reasons.is_empty(),
        identity: if reasons.is_empty() { identity } else { None },
        reasons,
    })
}
