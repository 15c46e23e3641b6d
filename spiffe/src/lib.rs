//! SPIFFE IDs in meshlet, and the one place that reads them: the agent and the control plane
//! both parse with this crate, so there is one rule for what an ID is.
//!
//! - workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>` ([`SpiffeId`]);
//! - nodes: `spiffe://<trust-domain>/meshlet/node/<name>` ([`node_id`], [`node_of`]);
//! - the control plane: `spiffe://<trust-domain>/meshlet/controlplane` ([`control_plane_id`]);
//! - a certificate names its ID in exactly one URI SAN ([`single_uri_san`]).
use std::fmt;

use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

/// Why a string is not a workload SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("{0:?} does not start with spiffe://")]
    Scheme(String),
    #[error("{0:?} has an invalid trust domain (lowercase letters, digits, '.', '-', '_' only)")]
    TrustDomain(String),
    #[error(
        "{0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Path(String),
}

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds the identity of a service account, checking each part.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!(
            "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// Parses a workload SPIFFE ID strictly: lowercase trust domain, exactly the
    /// `/ns/<ns>/sa/<sa>` path, no empty, `.` or `..` segments, no query or fragment.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::Scheme(s.to_string()))?;
        let (trust_domain, path) = rest
            .split_once('/')
            .ok_or_else(|| SpiffeIdError::Path(s.to_string()))?;
        if !trust_domain_ok(trust_domain) {
            return Err(SpiffeIdError::TrustDomain(s.to_string()));
        }
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["ns", ns, "sa", sa] if segment_ok(ns) && segment_ok(sa) => Ok(Self {
                trust_domain: trust_domain.to_string(),
                namespace: ns.to_string(),
                service_account: sa.to_string(),
            }),
            _ => Err(SpiffeIdError::Path(s.to_string())),
        }
    }

    /// Whether this ID belongs to `trust_domain`.
    pub fn is_in(&self, trust_domain: &str) -> bool {
        self.trust_domain == trust_domain
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

fn trust_domain_ok(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
        })
}

/// Whether `s` may be a path segment (namespace, service account, node name): not empty, not
/// `.` or `..`, letters, digits, `-`, `.`, `_` only.
pub fn segment_ok(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A node's ID: `spiffe://<trust-domain>/meshlet/node/<name>`.
pub fn node_id(trust_domain: &str, node: &str) -> String {
    format!("spiffe://{trust_domain}/meshlet/node/{node}")
}

/// The node a URI names, when it is a node ID of `trust_domain` with a valid name.
pub fn node_of<'a>(uri: &'a str, trust_domain: &str) -> Option<&'a str> {
    let node = uri
        .strip_prefix("spiffe://")?
        .strip_prefix(trust_domain)?
        .strip_prefix("/meshlet/node/")?;
    (node.len() <= 253 && segment_ok(node)).then_some(node)
}

/// The control plane's ID: `spiffe://<trust-domain>/meshlet/controlplane`.
pub fn control_plane_id(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/meshlet/controlplane")
}

/// Why a certificate does not name exactly one URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SanError {
    #[error("the certificate does not parse: {0}")]
    Certificate(String),
    #[error("unreadable subject alternative names: {0}")]
    Unreadable(String),
    #[error("none")]
    None,
    #[error("no URI SAN")]
    NoUri,
    #[error("{0} URI SANs")]
    Many(usize),
}

/// The one URI SAN of a certificate: meshlet certificates name their SPIFFE ID there, and
/// nothing else may be a URI.
pub fn single_uri_san<'a>(cert: &X509Certificate<'a>) -> Result<&'a str, SanError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SanError::Unreadable(e.to_string()))?
        .ok_or(SanError::None)?;
    let uris: Vec<&'a str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => Ok(one),
        [] => Err(SanError::NoUri),
        many => Err(SanError::Many(many.len())),
    }
}

/// [`single_uri_san`] of a DER certificate, owned.
pub fn single_uri_san_of_der(der: &[u8]) -> Result<String, SanError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| SanError::Certificate(e.to_string()))?;
    single_uri_san(&cert).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_and_control_plane_ids() {
        let id = node_id("cluster.local", "node-1");
        assert_eq!(id, "spiffe://cluster.local/meshlet/node/node-1");
        assert_eq!(node_of(&id, "cluster.local"), Some("node-1"));
        assert_eq!(node_of(&id, "other.domain"), None);
        for bad in [
            "spiffe://cluster.local/meshlet/node/",
            "spiffe://cluster.local/meshlet/node/..",
            "spiffe://cluster.local/meshlet/node/a/b",
            "spiffe://cluster.localx/meshlet/node/a",
            "spiffe://cluster.local/ns/default/sa/web",
        ] {
            assert_eq!(node_of(bad, "cluster.local"), None, "{bad}");
        }
        assert_eq!(control_plane_id("td"), "spiffe://td/meshlet/controlplane");
    }

    #[test]
    fn parses_workload_ids() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").expect("valid");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(SpiffeId::new("cluster.local", "default", "web"), Ok(id));
    }

    #[test]
    fn refuses_malformed_ids() {
        for bad in [
            "http://cluster.local/ns/default/sa/web",
            "spiffe://Cluster.Local/ns/default/sa/web",
            "spiffe://cluster.local",
            "spiffe://cluster.local/",
            "spiffe:///ns/default/sa/web",
            "spiffe://cluster.local/ns/../sa/web",
            "spiffe://cluster.local/ns/./sa/web",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/ns/default/sa/web/extra",
            "spiffe://cluster.local/ns/default/sa/web?x=1",
            "spiffe://cluster.local/sa/web/ns/default",
            "spiffe://user@cluster.local/ns/default/sa/web",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} must be refused");
        }
    }
}
