//! Services: the virtual IPs and ports apps dial, and the endpoints behind them, as the
//! Service and its EndpointSlices describe them.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use super::workload::WorkloadInfo;

/// A Service.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Cluster IPs, at most one per family; empty for a headless Service.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    /// `namespace/name`.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The port apps dial as `port` on a cluster IP, if the Service has it (TCP only: the
    /// mesh carries TCP).
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports
            .iter()
            .find(|p| p.port == port && p.protocol == Protocol::Tcp)
    }
}

/// The transport protocol of a Service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// `TCP` (or empty), `UDP`, `SCTP`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "" | "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }
}

/// One port of a Service.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target: TargetPort,
    pub protocol: Protocol,
}

/// Where a Service port leads on each endpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetPort {
    Number(u16),
    /// A port name, resolved per endpoint (two endpoints may serve `http` on different
    /// numbers, as during a rollout that renumbers it).
    Name(String),
}

impl std::fmt::Display for TargetPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Name(name) => f.write_str(name),
        }
    }
}

/// One endpoint: a mesh workload, or an address outside the mesh.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Endpoint {
    /// The mesh workload behind it, when it is one.
    #[serde(serialize_with = "super::workload::serialize_name")]
    pub workload: Option<Arc<WorkloadInfo>>,
    /// A workload uid the update named but did not describe: such an endpoint gets no
    /// connection (its identity is unknown, so neither mTLS nor plaintext is right).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown_workload: Option<String>,
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub ports: BTreeMap<String, u16>,
}

/// Whether an endpoint takes new connections, and if not why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Ready: new connections go to it.
    Ready,
    /// Terminating: its live connections run on, new ones go elsewhere.
    Terminating,
    /// Not ready (starting, failing its readiness probe).
    NotReady,
    /// It names a workload the control plane did not describe.
    UnknownWorkload,
}

impl Endpoint {
    pub fn health(&self) -> Health {
        if self.unknown_workload.is_some() {
            Health::UnknownWorkload
        } else if self.terminating {
            Health::Terminating
        } else if self.ready {
            Health::Ready
        } else {
            Health::NotReady
        }
    }

    /// The endpoint's port for `target`, if it has one.
    pub fn target_port(&self, target: &TargetPort) -> Option<u16> {
        match target {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Name(name) => self.ports.get(name).copied(),
        }
    }

    /// The endpoint's address to dial for a caller that dialled `family`'s cluster IP: one of
    /// the same family, else any (a v4 caller of a dual-stack Service may land on a v6-only
    /// endpoint only if it has no v4 address).
    pub fn address_for(&self, family: IpAddr) -> Option<IpAddr> {
        self.addresses
            .iter()
            .find(|a| a.is_ipv4() == family.is_ipv4())
            .or(self.addresses.first())
            .copied()
    }

    /// `namespace/name` of its workload, or its first address.
    pub fn display_name(&self) -> String {
        match &self.workload {
            Some(w) => w.display_name(),
            None => self
                .addresses
                .first()
                .map(ToString::to_string)
                .unwrap_or_default(),
        }
    }
}
