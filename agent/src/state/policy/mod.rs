//! What may reach a workload: its mTLS mode per port ([`mode`]) and the L4 authorization
//! policies ([`authz`]), as the control plane pushed them. An update is validated whole (a bad
//! one is NACKed and the policy in force stays); decisions are made at the destination, for
//! tunneled and plaintext traffic alike, and each one can explain itself step by step.
use std::{collections::BTreeMap, net::IpAddr};

use meshlet_proto::v1;

use crate::{identity::SpiffeId, state::WorkloadInfo};

pub mod authz;
pub mod mode;

pub use authz::{Action, AuthorizationPolicy};
pub use mode::{Mode, ModeDecision, ModeRule};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("mesh mode {0:?} is not STRICT, PERMISSIVE or DISABLE")]
    MeshMode(String),
    #[error(
        "mode rule {rule:?}: mode {value:?} is not STRICT, PERMISSIVE, DISABLE or empty (inherit)"
    )]
    UnknownMode { rule: String, value: String },
    #[error("mode rule {rule:?}: port {port} is not a TCP port (1-65535)")]
    ModePort { rule: String, port: u32 },
    #[error("{kind} {name:?}: a name is required and must be unique in its namespace")]
    Name { kind: &'static str, name: String },
    #[error("authorization policy {policy:?}: action {value:?} is not ALLOW, DENY or AUDIT")]
    UnknownAction { policy: String, value: String },
    #[error(
        "authorization policy {policy:?}, rule {rule}: port {port} is not a TCP port (1-65535)"
    )]
    Port {
        policy: String,
        rule: usize,
        port: u32,
    },
    #[error("authorization policy {policy:?}, rule {rule}: IP block {value:?} is not a CIDR (like 10.0.0.0/8 or fd00::/64): {reason}")]
    Cidr {
        policy: String,
        rule: usize,
        value: String,
        reason: &'static str,
    },
    #[error("authorization policy {policy:?}, rule {rule}: principal {value:?} may only use '*' alone, as a prefix or as a suffix")]
    Principal {
        policy: String,
        rule: usize,
        value: String,
    },
    #[error("{kind} {name:?}: selector or namespace is not a valid label value ({value:?})")]
    Selector {
        kind: &'static str,
        name: String,
        value: String,
    },
}

/// How the connection reached the destination agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Through a peer agent's mTLS tunnel: the source identity is proven.
    Mtls,
    /// Plaintext from outside the mesh: no identity.
    Plaintext,
}

/// A connection to be decided on (or explained).
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub transport: Transport,
    /// Proven by mTLS; `None` for plaintext.
    pub source_identity: Option<&'a SpiffeId>,
    /// `None` when unknown (an explanation asked for an identity only).
    pub source_ip: Option<IpAddr>,
    pub destination: &'a WorkloadInfo,
    pub port: u16,
}

/// Allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Deny,
}

/// The policy (namespace/name) and rule that a decision rests on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PolicyRef {
    pub policy: String,
    /// Index of the matching rule, when a rule matched.
    pub rule: Option<usize>,
}

impl std::fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.rule {
            Some(rule) => write!(f, "{} rule {rule}", self.policy),
            None => f.write_str(&self.policy),
        }
    }
}

/// A decision, with everything needed to log it and to explain it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Decision {
    pub verdict: Verdict,
    pub mode: ModeDecision,
    /// The policy that decided, if one did (none for defaults and mode refusals).
    pub policy: Option<PolicyRef>,
    pub reason: String,
    /// Dry-run policies that would have changed the verdict.
    pub dry_run: Vec<PolicyRef>,
    /// AUDIT policies that matched.
    pub audited: Vec<PolicyRef>,
    /// Each step of the evaluation, for `meshlet check`.
    pub steps: Vec<String>,
}

/// The validated policy of the mesh.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PolicySet {
    pub mesh_mode: Mode,
    pub default_deny: bool,
    pub modes: Vec<ModeRule>,
    pub policies: Vec<AuthorizationPolicy>,
}

impl PolicySet {
    /// Validates the policy part of a control-plane update, all of it or nothing.
    pub fn from_proto(
        mesh: Option<&v1::MeshPolicy>,
        modes: &[v1::ModeRule],
        policies: &[v1::AuthorizationPolicy],
    ) -> Result<Self, PolicyError> {
        let mesh_mode = match mesh.map(|m| m.mode.as_str()).unwrap_or("") {
            "" => Mode::Strict,
            other => Mode::parse(other).ok_or_else(|| PolicyError::MeshMode(other.into()))?,
        };
        let modes = modes
            .iter()
            .map(ModeRule::from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        unique_names("mode rule", modes.iter().map(|m| (&m.namespace, &m.name)))?;
        let policies = policies
            .iter()
            .map(AuthorizationPolicy::from_proto)
            .collect::<Result<Vec<_>, _>>()?;
        unique_names(
            "authorization policy",
            policies.iter().map(|p| (&p.namespace, &p.name)),
        )?;
        Ok(Self {
            mesh_mode,
            default_deny: mesh.is_some_and(|m| m.default_deny),
            modes,
            policies,
        })
    }

    /// The mode and the authorization verdict for one connection.
    pub fn decide(&self, request: &Request<'_>) -> Decision {
        let mode = self.mode_for(request.destination, request.port);
        let mut steps = vec![format!(
            "mode for {} port {}: {} ({})",
            request.destination.display_name(),
            request.port,
            mode.mode,
            mode.source
        )];
        if request.transport == Transport::Plaintext && mode.mode == Mode::Strict {
            steps.push("plaintext is refused in STRICT mode".into());
            return Decision {
                verdict: Verdict::Deny,
                reason: format!("plaintext refused: mode STRICT ({})", mode.source),
                mode,
                policy: None,
                dry_run: vec![],
                audited: vec![],
                steps,
            };
        }
        steps.push(match request.transport {
            Transport::Mtls => "transport mTLS: accepted in every mode".into(),
            Transport::Plaintext => format!("plaintext accepted in {} mode", mode.mode),
        });
        authz::evaluate(self, request, mode, steps)
    }

    /// Whether the agent must capture a workload's inbound traffic: every mode but a
    /// workload-wide DISABLE with no port that says otherwise needs the agent to decide.
    pub fn needs_capture(&self, workload: &WorkloadInfo) -> bool {
        mode::needs_capture(self, workload)
    }
}

fn unique_names<'a>(
    kind: &'static str,
    names: impl Iterator<Item = (&'a Option<String>, &'a String)>,
) -> Result<(), PolicyError> {
    let mut seen = std::collections::HashSet::new();
    for (namespace, name) in names {
        if name.is_empty() || !seen.insert((namespace.clone(), name.clone())) {
            return Err(PolicyError::Name {
                kind,
                name: name.clone(),
            });
        }
    }
    Ok(())
}

/// Whether a label selector (all of its pairs) matches a workload's labels.
fn selects(selector: &BTreeMap<String, String>, labels: &crate::state::Labels) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.get(k) == Some(v.as_str()))
}

/// Validates the keys and values of a selector: no empty keys, no control characters.
fn check_selector(
    kind: &'static str,
    name: &str,
    selector: &std::collections::HashMap<String, String>,
) -> Result<BTreeMap<String, String>, PolicyError> {
    let mut out = BTreeMap::new();
    for (k, v) in selector {
        let bad = |s: &str| s.chars().any(|c| c.is_control() || c.is_whitespace());
        if k.is_empty() || bad(k) || bad(v) {
            return Err(PolicyError::Selector {
                kind,
                name: name.into(),
                value: format!("{k}={v}"),
            });
        }
        out.insert(k.clone(), v.clone());
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;

    pub fn workload(namespace: &str, name: &str, sa: &str, ip: &str) -> WorkloadInfo {
        WorkloadInfo {
            uid: format!("{namespace}-{name}"),
            namespace: namespace.into(),
            name: name.into(),
            service_account: sa.into(),
            node: "node-1".into(),
            ips: vec![ip.parse().expect("ip")],
            labels: [("app".to_string(), name.to_string())].into(),
            probe_ports: vec![],
            identity: SpiffeId::new("cluster.local", namespace, sa).expect("id"),
        }
    }
}
