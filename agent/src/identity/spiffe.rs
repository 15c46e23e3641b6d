//! SPIFFE IDs of workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
use std::fmt;

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
        let td_ok = !trust_domain.is_empty()
            && trust_domain.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'_'
            });
        if !td_ok {
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

fn segment_ok(s: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
