//! L4 authorization at the destination: ALLOW / DENY / AUDIT policies over the source's
//! identity, namespace and address and the destination port.
//!
//! Order: AUDIT policies are noted; any matching DENY denies; if any ALLOW policy selects the
//! workload, one of them must match; otherwise the mesh default (allow, or deny when the mesh
//! is default-deny). Dry-run policies are evaluated and reported, never enforced.
//!
//! A source without a proven identity (plaintext) never matches an identity condition of an
//! ALLOW rule, and always matches one of a DENY rule: it cannot prove it is not the caller a
//! DENY names, so it does not slip past one (fail closed). An unknown source address is
//! treated the same way for IP blocks.
use std::{collections::BTreeMap, net::IpAddr};

use meshlet_proto::v1;

use super::{
    check_selector, selects, Decision, ModeDecision, PolicyError, PolicyRef, PolicySet, Request,
    Verdict,
};

/// What a policy does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// One validated authorization policy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuthorizationPolicy {
    pub name: String,
    /// `None`: mesh-wide.
    pub namespace: Option<String>,
    pub selector: BTreeMap<String, String>,
    pub action: Action,
    pub rules: Vec<Rule>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Destination>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Source {
    pub principals: Vec<Principal>,
    pub not_principals: Vec<Principal>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub ip_blocks: Vec<Cidr>,
    pub not_ip_blocks: Vec<Cidr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Destination {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
}

/// A principal pattern, compared with the SPIFFE ID without its `spiffe://` scheme.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Principal {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Principal {
    fn parse(s: &str) -> Option<Self> {
        let s = s.strip_prefix("spiffe://").unwrap_or(s);
        if s == "*" {
            return Some(Self::Any);
        }
        let stars = s.matches('*').count();
        match stars {
            0 => Some(Self::Exact(s.into())),
            1 if s.ends_with('*') => Some(Self::Prefix(s.trim_end_matches('*').into())),
            1 if s.starts_with('*') => Some(Self::Suffix(s.trim_start_matches('*').into())),
            _ => None,
        }
    }

    fn matches(&self, id: &str) -> bool {
        let id = id.strip_prefix("spiffe://").unwrap_or(id);
        match self {
            Self::Any => true,
            Self::Exact(p) => id == p,
            Self::Prefix(p) => id.starts_with(p.as_str()),
            Self::Suffix(p) => id.ends_with(p.as_str()),
        }
    }
}

/// An address block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}/{}", self.addr, self.prefix))
    }
}

impl Cidr {
    /// `a.b.c.d/n`, `x::y/n`, or a bare address (a single host).
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| "not an IP address")?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or("the prefix length is not a number within the address size")?,
        };
        let cidr = Self { addr, prefix };
        if cidr.network_bits(addr) != bits(addr) {
            return Err("host bits are set beyond the prefix length");
        }
        Ok(cidr)
    }

    fn network_bits(&self, ip: IpAddr) -> u128 {
        let width = if ip.is_ipv4() { 32 } else { 128 };
        let host_bits = width - u32::from(self.prefix);
        if host_bits >= 128 {
            return 0;
        }
        bits(ip) & !((1u128 << host_bits) - 1)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        ip.is_ipv4() == self.addr.is_ipv4() && self.network_bits(ip) == bits(self.addr)
    }
}

fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

impl AuthorizationPolicy {
    pub(super) fn from_proto(p: &v1::AuthorizationPolicy) -> Result<Self, PolicyError> {
        let action = match p.action.as_str() {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "AUDIT" => Action::Audit,
            other => {
                return Err(PolicyError::UnknownAction {
                    policy: p.name.clone(),
                    value: other.into(),
                })
            }
        };
        let mut rules = Vec::with_capacity(p.rules.len());
        for (index, rule) in p.rules.iter().enumerate() {
            let port = |port: &u32| {
                u16::try_from(*port)
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| PolicyError::Port {
                        policy: p.name.clone(),
                        rule: index,
                        port: *port,
                    })
            };
            let cidr = |value: &String| {
                Cidr::parse(value).map_err(|reason| PolicyError::Cidr {
                    policy: p.name.clone(),
                    rule: index,
                    value: value.clone(),
                    reason,
                })
            };
            let principal = |value: &String| {
                Principal::parse(value).ok_or_else(|| PolicyError::Principal {
                    policy: p.name.clone(),
                    rule: index,
                    value: value.clone(),
                })
            };
            let mut from = Vec::new();
            for s in &rule.from {
                from.push(Source {
                    principals: s
                        .principals
                        .iter()
                        .map(principal)
                        .collect::<Result<_, _>>()?,
                    not_principals: s
                        .not_principals
                        .iter()
                        .map(principal)
                        .collect::<Result<_, _>>()?,
                    namespaces: s.namespaces.clone(),
                    not_namespaces: s.not_namespaces.clone(),
                    ip_blocks: s.ip_blocks.iter().map(cidr).collect::<Result<_, _>>()?,
                    not_ip_blocks: s.not_ip_blocks.iter().map(cidr).collect::<Result<_, _>>()?,
                });
            }
            let mut to = Vec::new();
            for d in &rule.to {
                to.push(Destination {
                    ports: d.ports.iter().map(port).collect::<Result<_, _>>()?,
                    not_ports: d.not_ports.iter().map(port).collect::<Result<_, _>>()?,
                });
            }
            rules.push(Rule { from, to });
        }
        Ok(Self {
            name: p.name.clone(),
            namespace: (!p.namespace.is_empty()).then(|| p.namespace.clone()),
            selector: check_selector("authorization policy", &p.name, &p.selector)?,
            action,
            rules,
            dry_run: p.dry_run,
        })
    }

    /// `namespace/name`, or the bare name for a mesh-wide policy.
    pub fn display_name(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }

    /// Whether the policy applies to the request's destination workload.
    pub fn selects(&self, request: &Request<'_>) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|ns| *ns == request.destination.namespace)
            && selects(&self.selector, &request.destination.labels)
    }

    /// The index of the first rule that matches, if any.
    fn matching_rule(&self, request: &Request<'_>) -> Option<usize> {
        let deny = self.action == Action::Deny;
        self.rules.iter().position(|rule| {
            (rule.from.is_empty() || rule.from.iter().any(|s| s.matches(request, deny)))
                && (rule.to.is_empty() || rule.to.iter().any(|d| d.matches(request.port)))
        })
    }
}

impl Source {
    /// `unknown_matches`: how an unknown identity or address answers a condition (true for
    /// DENY rules, false for ALLOW and AUDIT rules; see the module docs).
    fn matches(&self, request: &Request<'_>, unknown_matches: bool) -> bool {
        let id = request.source_identity.map(|id| id.to_string());
        let namespace = request.source_identity.map(|id| id.namespace());
        let check = |present: bool, known: Option<bool>| -> bool {
            !present || known.unwrap_or(unknown_matches)
        };
        check(
            !self.principals.is_empty(),
            id.as_deref()
                .map(|id| self.principals.iter().any(|p| p.matches(id))),
        ) && check(
            !self.not_principals.is_empty(),
            id.as_deref()
                .map(|id| !self.not_principals.iter().any(|p| p.matches(id))),
        ) && check(
            !self.namespaces.is_empty(),
            namespace.map(|ns| self.namespaces.iter().any(|n| n == ns)),
        ) && check(
            !self.not_namespaces.is_empty(),
            namespace.map(|ns| !self.not_namespaces.iter().any(|n| n == ns)),
        ) && check(
            !self.ip_blocks.is_empty(),
            request
                .source_ip
                .map(|ip| self.ip_blocks.iter().any(|c| c.contains(ip))),
        ) && check(
            !self.not_ip_blocks.is_empty(),
            request
                .source_ip
                .map(|ip| !self.not_ip_blocks.iter().any(|c| c.contains(ip))),
        )
    }
}

impl Destination {
    fn matches(&self, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port)
    }
}

/// The authorization part of [`PolicySet::decide`], after the mode let the connection in.
pub(super) fn evaluate(
    set: &PolicySet,
    request: &Request<'_>,
    mode: ModeDecision,
    mut steps: Vec<String>,
) -> Decision {
    let selected: Vec<&AuthorizationPolicy> =
        set.policies.iter().filter(|p| p.selects(request)).collect();
    if selected.is_empty() {
        steps.push("no authorization policy selects this workload".into());
    }
    let mut audited = Vec::new();
    let mut dry_run = Vec::new();
    let hit = |p: &AuthorizationPolicy, rule: Option<usize>| PolicyRef {
        policy: p.display_name(),
        rule,
    };
    let done = |verdict, policy, reason: String, steps: Vec<String>, audited, dry_run| Decision {
        verdict,
        mode: mode.clone(),
        policy,
        reason,
        dry_run,
        audited,
        steps,
    };
    for p in selected.iter().filter(|p| p.action == Action::Audit) {
        if let Some(rule) = p.matching_rule(request) {
            steps.push(format!(
                "AUDIT {} rule {rule} matches (logged)",
                p.display_name()
            ));
            audited.push(hit(p, Some(rule)));
        }
    }
    for p in selected.iter().filter(|p| p.action == Action::Deny) {
        match p.matching_rule(request) {
            Some(rule) if p.dry_run => {
                steps.push(format!(
                    "DENY {} rule {rule} matches, but it is a dry run: not enforced",
                    p.display_name()
                ));
                dry_run.push(hit(p, Some(rule)));
            }
            Some(rule) => {
                steps.push(format!(
                    "DENY {} rule {rule} matches: denied",
                    p.display_name()
                ));
                let reason = format!("denied by {} rule {rule}", p.display_name());
                return done(
                    Verdict::Deny,
                    Some(hit(p, Some(rule))),
                    reason,
                    steps,
                    audited,
                    dry_run,
                );
            }
            None => steps.push(format!("DENY {}: no rule matches", p.display_name())),
        }
    }
    let allows: Vec<&&AuthorizationPolicy> = selected
        .iter()
        .filter(|p| p.action == Action::Allow)
        .collect();
    let enforced: Vec<_> = allows.iter().filter(|p| !p.dry_run).collect();
    let dry: Vec<_> = allows.iter().filter(|p| p.dry_run).collect();
    if !dry.is_empty() && !dry.iter().any(|p| p.matching_rule(request).is_some()) {
        steps.push(
            "dry-run ALLOW policies select this workload and none matches: would deny".into(),
        );
        dry_run.extend(dry.iter().map(|p| hit(p, None)));
    }
    for p in &enforced {
        if let Some(rule) = p.matching_rule(request) {
            steps.push(format!(
                "ALLOW {} rule {rule} matches: allowed",
                p.display_name()
            ));
            let reason = format!("allowed by {} rule {rule}", p.display_name());
            return done(
                Verdict::Allow,
                Some(hit(p, Some(rule))),
                reason,
                steps,
                audited,
                dry_run,
            );
        }
        steps.push(format!("ALLOW {}: no rule matches", p.display_name()));
    }
    if !enforced.is_empty() {
        let names: Vec<String> = enforced.iter().map(|p| p.display_name()).collect();
        let reason = format!("no ALLOW policy matched ({})", names.join(", "));
        steps.push(format!("{reason}: denied"));
        return done(Verdict::Deny, None, reason, steps, audited, dry_run);
    }
    if set.default_deny {
        let reason = "mesh is default-deny and no ALLOW policy selects this workload".to_string();
        steps.push(format!("{reason}: denied"));
        return done(Verdict::Deny, None, reason, steps, audited, dry_run);
    }
    let reason = "no ALLOW policy selects this workload: allowed by default".to_string();
    steps.push(reason.clone());
    done(Verdict::Allow, None, reason, steps, audited, dry_run)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        identity::SpiffeId,
        state::policy::{test_support::workload, Transport},
    };

    fn policy(name: &str, action: &str, rules: Vec<v1::Rule>) -> v1::AuthorizationPolicy {
        v1::AuthorizationPolicy {
            name: name.into(),
            namespace: "shop".into(),
            selector: [("app".into(), "db".into())].into(),
            action: action.into(),
            rules,
            dry_run: false,
        }
    }

    fn from(source: v1::Source) -> v1::Rule {
        v1::Rule {
            from: vec![source],
            to: vec![],
        }
    }

    fn principals(p: &[&str]) -> v1::Source {
        v1::Source {
            principals: p.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn decide(set: &PolicySet, from: Option<&SpiffeId>, ip: &str, port: u16) -> Decision {
        let db = workload("shop", "db", "db", "10.0.0.2");
        set.decide(&Request {
            transport: if from.is_some() {
                Transport::Mtls
            } else {
                Transport::Plaintext
            },
            source_identity: from,
            source_ip: Some(ip.parse().expect("ip")),
            destination: &db,
            port,
        })
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa).expect("id")
    }

    fn set(policies: Vec<v1::AuthorizationPolicy>) -> PolicySet {
        PolicySet::from_proto(None, &[], &policies).expect("valid")
    }

    #[test]
    fn allow_by_principal_lets_only_that_principal_in() {
        let set = set(vec![policy(
            "web-only",
            "ALLOW",
            vec![from(principals(&["cluster.local/ns/shop/sa/web"]))],
        )]);
        let web = decide(&set, Some(&id("shop", "web")), "10.0.0.1", 5432);
        assert_eq!(web.verdict, Verdict::Allow);
        assert_eq!(web.reason, "allowed by shop/web-only rule 0");
        let intruder = decide(&set, Some(&id("shop", "intruder")), "10.0.0.9", 5432);
        assert_eq!(intruder.verdict, Verdict::Deny);
        assert_eq!(intruder.reason, "no ALLOW policy matched (shop/web-only)");
    }

    #[test]
    fn deny_beats_allow_and_dry_run_does_not_deny() {
        let deny_ns = policy(
            "no-dev",
            "DENY",
            vec![from(v1::Source {
                namespaces: vec!["dev".into()],
                ..Default::default()
            })],
        );
        let allow_all = policy("all", "ALLOW", vec![v1::Rule::default()]);
        let set1 = set(vec![allow_all.clone(), deny_ns.clone()]);
        let d = decide(&set1, Some(&id("dev", "web")), "10.0.0.1", 80);
        assert_eq!(d.verdict, Verdict::Deny);
        assert_eq!(
            d.policy.map(|p| p.to_string()),
            Some("shop/no-dev rule 0".into())
        );
        let mut dry = deny_ns;
        dry.dry_run = true;
        let set2 = set(vec![allow_all, dry]);
        let d = decide(&set2, Some(&id("dev", "web")), "10.0.0.1", 80);
        assert_eq!(d.verdict, Verdict::Allow);
        assert_eq!(d.dry_run.len(), 1);
    }

    #[test]
    fn plaintext_never_matches_identity_allows_and_cannot_escape_identity_denies() {
        let allow = policy(
            "not-intruder",
            "ALLOW",
            vec![from(v1::Source {
                not_principals: vec!["*/sa/intruder".into()],
                ..Default::default()
            })],
        );
        let plain = decide(&set(vec![allow]), None, "10.0.0.1", 80);
        assert_eq!(plain.verdict, Verdict::Deny);
        let deny = policy(
            "no-intruder",
            "DENY",
            vec![from(principals(&["*/sa/intruder"]))],
        );
        let plain = decide(&set(vec![deny]), None, "10.0.0.1", 80);
        assert_eq!(plain.verdict, Verdict::Deny);
    }

    #[test]
    fn ports_ip_blocks_and_defaults() {
        let rule = v1::Rule {
            from: vec![v1::Source {
                ip_blocks: vec!["10.0.0.0/24".into()],
                not_ip_blocks: vec!["10.0.0.9".into()],
                ..Default::default()
            }],
            to: vec![v1::Destination {
                ports: vec![5432],
                not_ports: vec![],
            }],
        };
        let set1 = set(vec![policy("lan", "ALLOW", vec![rule])]);
        assert_eq!(
            decide(&set1, None, "10.0.0.1", 5432).verdict,
            Verdict::Deny,
            "plaintext in STRICT"
        );
        assert_eq!(
            decide(&set1, Some(&id("a", "b")), "10.0.0.1", 5432).verdict,
            Verdict::Allow
        );
        assert_eq!(
            decide(&set1, Some(&id("a", "b")), "10.0.0.9", 5432).verdict,
            Verdict::Deny
        );
        assert_eq!(
            decide(&set1, Some(&id("a", "b")), "10.0.1.1", 5432).verdict,
            Verdict::Deny
        );
        assert_eq!(
            decide(&set1, Some(&id("a", "b")), "10.0.0.1", 80).verdict,
            Verdict::Deny
        );
        let open = set(vec![]);
        assert_eq!(
            decide(&open, Some(&id("a", "b")), "10.0.0.1", 80).verdict,
            Verdict::Allow
        );
        let closed = PolicySet::from_proto(
            Some(&v1::MeshPolicy {
                mode: String::new(),
                default_deny: true,
                ..Default::default()
            }),
            &[],
            &[],
        )
        .expect("valid");
        assert_eq!(
            decide(&closed, Some(&id("a", "b")), "10.0.0.1", 80).verdict,
            Verdict::Deny
        );
    }

    #[test]
    fn invalid_policies_are_named() {
        let bad = |rule: v1::Rule, action: &str| {
            PolicySet::from_proto(None, &[], &[policy("p", action, vec![rule])])
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let cidr = bad(
            from(v1::Source {
                ip_blocks: vec!["10.0.0.0/33".into()],
                ..Default::default()
            }),
            "ALLOW",
        );
        assert!(
            cidr.contains("IP block \"10.0.0.0/33\" is not a CIDR"),
            "{cidr}"
        );
        let action = bad(v1::Rule::default(), "PERMIT");
        assert!(
            action.contains("action \"PERMIT\" is not ALLOW, DENY or AUDIT"),
            "{action}"
        );
        for port in [0, 65_536] {
            let msg = bad(
                v1::Rule {
                    from: vec![],
                    to: vec![v1::Destination {
                        ports: vec![port],
                        not_ports: vec![],
                    }],
                },
                "ALLOW",
            );
            assert!(
                msg.contains(&format!("port {port} is not a TCP port")),
                "{msg}"
            );
        }
        assert!(bad(from(principals(&["a*b*"])), "DENY").contains("principal"));
    }

    #[test]
    fn cidr_contains() {
        let c = Cidr::parse("10.244.0.0/16").expect("cidr");
        assert!(c.contains("10.244.2.3".parse().expect("ip")));
        assert!(c.contains("::ffff:10.244.2.3".parse().expect("ip")));
        assert!(!c.contains("10.245.0.1".parse().expect("ip")));
        assert!(Cidr::parse("0.0.0.0/0")
            .expect("any")
            .contains("1.2.3.4".parse().expect("ip")));
        assert!(Cidr::parse("10.0.0.1/8").is_err());
        assert!(Cidr::parse("fd00::/64")
            .expect("v6")
            .contains("fd00::1".parse().expect("ip")));
    }
}
