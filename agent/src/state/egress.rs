//! Destinations outside the mesh: what pods may dial beyond the mesh's workloads and
//! Services (Istio's `outboundTrafficPolicy`), and the external services REGISTRY_ONLY lets
//! through.
use std::net::IpAddr;

use super::policy::authz::Cidr;

/// What happens to a connection to an address that is neither a mesh workload nor a
/// Service, named as in Istio.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundTrafficPolicy {
    /// Connect directly, in plaintext, from the pod's own address (Istio's default).
    #[default]
    AllowAny,
    /// Refuse, unless an external service lists the destination.
    RegistryOnly,
}

impl OutboundTrafficPolicy {
    /// `ALLOW_ANY` (or empty: the default) or `REGISTRY_ONLY`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "" | "ALLOW_ANY" => Some(Self::AllowAny),
            "REGISTRY_ONLY" => Some(Self::RegistryOnly),
            _ => None,
        }
    }
}

impl std::fmt::Display for OutboundTrafficPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::AllowAny => "ALLOW_ANY",
            Self::RegistryOnly => "REGISTRY_ONLY",
        })
    }
}

/// A destination outside the mesh that pods may reach under REGISTRY_ONLY.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExternalService {
    pub name: String,
    pub addresses: Vec<Cidr>,
    /// Empty: every port.
    pub ports: Vec<u16>,
}

impl ExternalService {
    pub fn matches(&self, ip: IpAddr, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port))
            && self.addresses.iter().any(|c| c.contains(ip))
    }
}
