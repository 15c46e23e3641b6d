//! What the control plane said, as plain data: workloads, Services and their endpoints,
//! policies and modes, the mesh's egress settings; with the lookups the data path needs and
//! the one decision of where an outbound connection goes ([`route`]). No sockets and no
//! tasks: [`crate::discovery`] fills it, the data path and the admin API read it.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
};

use meshlet_proto::v1::DiscoveryResponse;
use meshlet_spiffe::{SpiffeId, SpiffeIdError};

pub mod egress;
pub mod policy;
pub mod route;
pub mod scope;
pub mod service;
mod store;
pub mod workload;

pub use egress::{ExternalService, OutboundTrafficPolicy};
pub use route::{Route, RouteInputs, RouteOutcome, Upstream, UpstreamKind};
pub use scope::{Membership, Scope};
pub use service::{Endpoint, Health, Protocol, Service, ServicePort, TargetPort};
pub use store::{Link, Store, StreamPosition, MAX_UPDATE_BYTES};
pub use workload::{Labels, WorkloadInfo};

use policy::{authz::Cidr, PolicySet};

/// Why an update was refused. Each names the thing that is wrong and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("workload {workload} (uid {uid}): IP {ip:?} is not an IP address; fix the workload's ips in the control plane")]
    BadIp {
        workload: String,
        uid: String,
        ip: String,
    },
    #[error("workload {workload} (uid {uid}): {source}")]
    BadIdentity {
        workload: String,
        uid: String,
        source: SpiffeIdError,
    },
    #[error("workload with uid {uid:?} has an empty uid, namespace, name or node")]
    MissingField { uid: String },
    #[error(
        "IP {ip} belongs to both {first} and {second}; each IP must name one workload or Service"
    )]
    DuplicateIp {
        ip: IpAddr,
        first: String,
        second: String,
    },
    #[error("workload {workload}: probe port {port} is not a port a kubelet probe can use (1-65535, not one of the agent's own ports); fix its probe_ports")]
    BadProbePort { workload: String, port: u32 },
    #[error("uid {0} appears twice")]
    DuplicateUid(String),
    #[error("service {service}: {problem}")]
    Service { service: String, problem: String },
    #[error("external service {name:?}: {problem}")]
    ExternalService { name: String, problem: String },
    #[error("mesh outbound_traffic_policy {0:?} is not ALLOW_ANY or REGISTRY_ONLY")]
    OutboundTrafficPolicy(String),
    #[error("trust bundle refused: {0}")]
    TrustBundle(#[from] crate::tls::TlsError),
    #[error("policy refused: {0}")]
    Policy(#[from] policy::PolicyError),
    #[error("version {got} is not newer than the applied version {applied} of this stream")]
    OldVersion { got: u64, applied: u64 },
    #[error(
        "an incremental update cannot start a stream: the first update must be the full state"
    )]
    IncrementalFirst,
    #[error("incremental update refused ({0}); send the full state")]
    Incremental(String),
}

/// One accepted version of the mesh.
#[derive(Debug, Default)]
pub struct MeshState {
    pub version: u64,
    by_uid: HashMap<String, Arc<WorkloadInfo>>,
    by_ip: HashMap<IpAddr, Arc<WorkloadInfo>>,
    services: Vec<Arc<Service>>,
    by_vip: HashMap<IpAddr, Arc<Service>>,
    pub policy: Arc<PolicySet>,
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    pub external_services: Vec<ExternalService>,
    /// Which new pods join the mesh.
    pub scope: Scope,
    /// The update as applied, for config dumps: protobuf-encoded, a tenth of its decoded size
    /// (labels maps and strings of every workload), decoded only when a dump asks.
    update: Option<Vec<u8>>,
}

impl MeshState {
    /// Validates a whole update: every field of every workload, Service and policy, or
    /// nothing.
    pub fn from_update(update: &DiscoveryResponse) -> Result<Self, StateError> {
        let mesh = update.mesh.as_ref();
        let outbound = mesh
            .map(|m| m.outbound_traffic_policy.as_str())
            .unwrap_or("");
        let mut state = MeshState {
            version: update.version,
            policy: Arc::new(PolicySet::from_proto(
                mesh,
                &update.modes,
                &update.policies,
            )?),
            outbound_traffic_policy: OutboundTrafficPolicy::parse(outbound)
                .ok_or_else(|| StateError::OutboundTrafficPolicy(outbound.into()))?,
            scope: Scope::from_proto(update.scope.as_ref()),
            ..Default::default()
        };
        // Label strings shared across the update's workloads.
        let mut strings = HashSet::new();
        for w in &update.workloads {
            let info = Arc::new(workload_from_proto(w, &update.trust_domain, &mut strings)?);
            for ip in &info.ips {
                if let Some(other) = state.by_ip.insert(*ip, info.clone()) {
                    return Err(StateError::DuplicateIp {
                        ip: *ip,
                        first: other.display_name(),
                        second: info.display_name(),
                    });
                }
            }
            if state
                .by_uid
                .insert(info.uid.clone(), info.clone())
                .is_some()
            {
                return Err(StateError::DuplicateUid(info.uid.clone()));
            }
        }
        let mut names = HashSet::new();
        for s in &update.services {
            let service = Arc::new(state.service_from_proto(s)?);
            if !names.insert(service.display_name()) {
                return Err(StateError::Service {
                    service: service.display_name(),
                    problem: "listed twice; each Service once".into(),
                });
            }
            for vip in &service.vips {
                if let Some(w) = state.by_ip.get(vip) {
                    return Err(StateError::DuplicateIp {
                        ip: *vip,
                        first: w.display_name(),
                        second: format!("service {}", service.display_name()),
                    });
                }
                if let Some(other) = state.by_vip.insert(*vip, service.clone()) {
                    return Err(StateError::DuplicateIp {
                        ip: *vip,
                        first: format!("service {}", other.display_name()),
                        second: format!("service {}", service.display_name()),
                    });
                }
            }
            state.services.push(service);
        }
        state
            .services
            .sort_by_key(|s| (s.namespace.clone(), s.name.clone()));
        for e in &update.external_services {
            state.external_services.push(external_from_proto(e)?);
        }
        Ok(state)
    }

    pub fn by_uid(&self, uid: &str) -> Option<&Arc<WorkloadInfo>> {
        self.by_uid.get(uid)
    }

    /// Whether a pod starting on this node joins the mesh; `None` while no update has come
    /// (the agent cannot decide, so the pod waits: CNI ADD fails and is retried).
    pub fn membership(&self, uid: &str, namespace: &str) -> Option<Membership> {
        self.update.is_some().then(|| {
            self.scope
                .membership(uid, namespace, self.by_uid.contains_key(uid))
        })
    }

    /// The workload an address belongs to (IPv4-mapped IPv6 addresses are their IPv4).
    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<WorkloadInfo>> {
        self.by_ip.get(&ip.to_canonical())
    }

    /// A workload by `namespace/name`.
    pub fn by_name(&self, name: &str) -> Option<&Arc<WorkloadInfo>> {
        let (namespace, name) = name.split_once('/')?;
        self.by_uid
            .values()
            .find(|w| w.namespace == namespace && w.name == name)
    }

    /// Every workload.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<WorkloadInfo>> {
        self.by_uid.values()
    }

    /// The Service whose cluster IP is `ip`.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&ip.to_canonical())
    }

    /// A Service by `namespace/name`.
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        let (namespace, name) = name.split_once('/')?;
        self.services
            .iter()
            .find(|s| s.namespace == namespace && s.name == name)
    }

    /// Every Service, by namespace and name.
    pub fn services(&self) -> &[Arc<Service>] {
        &self.services
    }

    /// The update as the control plane sent it.
    pub fn last_update(&self) -> Option<DiscoveryResponse> {
        let bytes = self.update.as_deref()?;
        // Encoded by us from a message that decoded; cannot fail but for a bug.
        prost::Message::decode(bytes).ok()
    }

    fn service_from_proto(&self, s: &meshlet_proto::v1::Service) -> Result<Service, StateError> {
        let service = format!("{}/{}", s.namespace, s.name);
        let bad = |problem: String| StateError::Service {
            service: service.clone(),
            problem,
        };
        if s.namespace.is_empty() || s.name.is_empty() {
            return Err(bad("a Service needs a namespace and a name".into()));
        }
        let mut vips: Vec<IpAddr> = Vec::with_capacity(s.cluster_ips.len());
        for ip in &s.cluster_ips {
            let vip: IpAddr = ip.parse().map_err(|_| {
                bad(format!(
                    "cluster IP {ip:?} is not an IP address; fix its cluster_ips"
                ))
            })?;
            let vip = vip.to_canonical();
            if vip.is_unspecified() || vip.is_loopback() || vip.is_multicast() {
                return Err(bad(format!("cluster IP {vip} cannot be a Service address")));
            }
            if vips.iter().any(|v| v.is_ipv4() == vip.is_ipv4()) {
                return Err(bad(format!(
                    "cluster IP {vip}: at most one cluster IP per family"
                )));
            }
            vips.push(vip);
        }
        let mut ports: Vec<ServicePort> = Vec::with_capacity(s.ports.len());
        for p in &s.ports {
            let port = u16::try_from(p.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(format!("port {} is not a TCP/UDP port (1-65535)", p.port)))?;
            let protocol = Protocol::parse(&p.protocol).ok_or_else(|| {
                bad(format!(
                    "port {port}: protocol {:?} is not TCP, UDP or SCTP",
                    p.protocol
                ))
            })?;
            let target = match (p.target_port, p.target_port_name.as_str()) {
                (0, "") => TargetPort::Number(port),
                (0, name) if valid_port_name(name) => TargetPort::Name(name.into()),
                (0, name) => {
                    return Err(bad(format!(
                        "port {port}: target port name {name:?} is not a port name (1-15 lowercase letters, digits and '-')"
                    )))
                }
                (n, "") => TargetPort::Number(u16::try_from(n).ok().ok_or_else(|| {
                    bad(format!("port {port}: target port {n} is not a port (1-65535)"))
                })?),
                (n, name) => {
                    return Err(bad(format!(
                        "port {port}: target port is both {n} and {name:?}; give a number or a name"
                    )))
                }
            };
            if ports
                .iter()
                .any(|q| q.port == port && q.protocol == protocol)
            {
                return Err(bad(format!("port {port} is listed twice")));
            }
            ports.push(ServicePort {
                name: p.name.clone(),
                port,
                target,
                protocol,
            });
        }
        let mut endpoints = Vec::with_capacity(s.endpoints.len());
        for e in &s.endpoints {
            let mut addresses = Vec::with_capacity(e.addresses.len());
            for a in &e.addresses {
                let ip: IpAddr = a.parse().map_err(|_| {
                    bad(format!(
                        "endpoint address {a:?} is not an IP address; fix the endpoints"
                    ))
                })?;
                addresses.push(ip.to_canonical());
            }
            let mut named = std::collections::BTreeMap::new();
            for (name, port) in &e.ports {
                let port = u16::try_from(*port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| {
                        bad(format!(
                            "endpoint {}: named port {name:?} = {port} is not a port (1-65535)",
                            e.addresses.join(",")
                        ))
                    })?;
                named.insert(name.clone(), port);
            }
            // The workload behind the endpoint: the one it names, else the one whose address
            // it has (a mesh workload is never reached in plaintext because its slice left
            // out the reference).
            let (workload, unknown_workload) = if e.workload_uid.is_empty() {
                (addresses.iter().find_map(|a| self.by_ip(*a)).cloned(), None)
            } else {
                match self.by_uid(&e.workload_uid) {
                    Some(w) => (Some(w.clone()), None),
                    None => (None, Some(e.workload_uid.clone())),
                }
            };
            if let Some(w) = &workload {
                if let Some(a) = addresses.iter().find(|a| !w.ips.contains(a)) {
                    return Err(bad(format!(
                        "endpoint address {a} is not an address of workload {}",
                        w.display_name()
                    )));
                }
                if addresses.is_empty() {
                    addresses.clone_from(&w.ips);
                }
            } else if addresses.is_empty() && unknown_workload.is_none() {
                return Err(bad("an endpoint needs an address or a workload_uid".into()));
            }
            endpoints.push(Endpoint {
                workload,
                unknown_workload,
                addresses,
                ready: e.ready,
                serving: e.serving,
                terminating: e.terminating,
                ports: named,
            });
        }
        Ok(Service {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            vips,
            ports,
            endpoints,
        })
    }
}

/// A Kubernetes port name (IANA_SVC_NAME): 1-15 characters, lowercase letters, digits and
/// '-', at least one letter, no leading, trailing or double '-'.
fn valid_port_name(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

fn workload_from_proto(
    w: &meshlet_proto::v1::Workload,
    trust_domain: &str,
    strings: &mut HashSet<Arc<str>>,
) -> Result<WorkloadInfo, StateError> {
    if w.uid.is_empty() || w.namespace.is_empty() || w.name.is_empty() || w.node.is_empty() {
        return Err(StateError::MissingField { uid: w.uid.clone() });
    }
    let workload = format!("{}/{}", w.namespace, w.name);
    let identity =
        SpiffeId::new(trust_domain, &w.namespace, &w.service_account).map_err(|source| {
            StateError::BadIdentity {
                workload: workload.clone(),
                uid: w.uid.clone(),
                source,
            }
        })?;
    let mut probe_ports = Vec::with_capacity(w.probe_ports.len());
    for port in &w.probe_ports {
        match u16::try_from(*port) {
            Ok(p) if p != 0 && !meshlet_common::AGENT_PORTS.contains(&p) => probe_ports.push(p),
            _ => {
                return Err(StateError::BadProbePort {
                    workload: workload.clone(),
                    port: *port,
                })
            }
        }
    }
    let mut ips = Vec::with_capacity(w.ips.len());
    for ip in &w.ips {
        let parsed = ip.parse::<IpAddr>().map_err(|_| StateError::BadIp {
            workload: workload.clone(),
            uid: w.uid.clone(),
            ip: ip.clone(),
        })?;
        ips.push(parsed.to_canonical());
    }
    Ok(WorkloadInfo {
        uid: w.uid.clone(),
        namespace: w.namespace.clone(),
        name: w.name.clone(),
        service_account: w.service_account.clone(),
        node: w.node.clone(),
        ips,
        labels: Labels::interned(w.labels.iter(), strings),
        probe_ports,
        identity,
    })
}

fn external_from_proto(
    e: &meshlet_proto::v1::ExternalService,
) -> Result<ExternalService, StateError> {
    let bad = |problem: String| StateError::ExternalService {
        name: e.name.clone(),
        problem,
    };
    if e.name.is_empty() {
        return Err(bad("a name is required".into()));
    }
    if e.addresses.is_empty() {
        return Err(bad(
            "at least one address (an IP or a CIDR) is required".into()
        ));
    }
    let addresses = e
        .addresses
        .iter()
        .map(|a| {
            Cidr::parse(a)
                .map_err(|reason| bad(format!("address {a:?} is not an IP or a CIDR: {reason}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ports = e
        .ports
        .iter()
        .map(|p| {
            u16::try_from(*p)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad(format!("port {p} is not a TCP port (1-65535)")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ExternalService {
        name: e.name.clone(),
        addresses,
        ports,
    })
}

#[cfg(test)]
pub(crate) mod tests;
