//! Policies as Kubernetes resources, in Istio's shape: `PeerAuthentication` and
//! `AuthorizationPolicy` of `security.meshlet.dev/v1` (and, with `--istio-policies`, of
//! `security.istio.io/v1`), translated field for field into the discovery stream's mTLS modes
//! and L4 authorization policies.
//!
//! What meshlet cannot enforce at L4 never weakens a policy: an ALLOW rule that needs request
//! attributes (methods, paths, hosts, request principals, `when`) matches nothing; a DENY or
//! AUDIT rule keeps only its L4 conditions (it denies or audits more). Every resource gets a
//! status condition: `Accepted`, with what was left out, or the validation error naming the
//! field; an invalid new version leaves the last accepted one in force.
use std::collections::{BTreeMap, HashMap};

use meshlet_proto::v1;
use serde::Deserialize;
use serde_json::Value;

/// `selector.matchLabels`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mtls {
    #[serde(default)]
    pub mode: String,
}

/// The spec of a PeerAuthentication (Istio `security/v1`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    pub selector: Option<Selector>,
    pub mtls: Option<Mtls>,
    #[serde(default)]
    pub port_level_mtls: BTreeMap<String, Mtls>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// The spec of an AuthorizationPolicy (Istio `security/v1`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    pub selector: Option<Selector>,
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleSpec {
    #[serde(default)]
    pub from: Vec<FromSpec>,
    #[serde(default)]
    pub to: Vec<ToSpec>,
    #[serde(default)]
    pub when: Vec<Value>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct FromSpec {
    #[serde(default)]
    pub source: SourceSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
    #[serde(default)]
    pub ip_blocks: Vec<String>,
    #[serde(default)]
    pub not_ip_blocks: Vec<String>,
    /// Everything else (request principals, remote IP blocks): request attributes.
    #[serde(flatten)]
    pub l7: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ToSpec {
    #[serde(default)]
    pub operation: OperationSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperationSpec {
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
    /// Everything else (hosts, methods, paths and their `not` forms): request attributes.
    #[serde(flatten)]
    pub l7: BTreeMap<String, Value>,
}

/// The outcome of translating one resource: what goes into the stream, and the status
/// condition the resource gets.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted<T> {
    pub value: T,
    /// What was left out or narrowed, for the status message; empty when nothing was.
    pub notes: Vec<String>,
}

/// A PeerAuthentication in its namespace: the mesh default (root namespace, no selector),
/// or a mode rule.
#[derive(Debug, Clone, PartialEq)]
pub enum PeerAuthentication {
    MeshDefault(String),
    Rule(v1::ModeRule),
}

const MODES: &[&str] = &["STRICT", "PERMISSIVE", "DISABLE"];

/// Translates a PeerAuthentication's spec.
pub fn peer_authentication(
    namespace: &str,
    name: &str,
    root_namespace: &str,
    spec: &Value,
) -> Result<Accepted<PeerAuthentication>, String> {
    let spec: PeerAuthenticationSpec =
        serde_json::from_value(spec.clone()).map_err(|e| format!("spec: {e}"))?;
    let mut notes = Vec::new();
    if let Some(field) = spec.other.keys().next() {
        return Err(format!("spec.{field}: not a field meshlet knows"));
    }
    let mode = |field: &str, m: &Mtls| -> Result<String, String> {
        match m.mode.as_str() {
            "" | "UNSET" => Ok(String::new()),
            m if MODES.contains(&m) => Ok(m.to_string()),
            other => Err(format!(
                "{field}.mode: {other:?} is not STRICT, PERMISSIVE, DISABLE or UNSET"
            )),
        }
    };
    let own = match &spec.mtls {
        Some(m) => mode("spec.mtls", m)?,
        None => String::new(),
    };
    let selector = selector(spec.selector.as_ref(), "spec.selector")?;
    let mut port_modes = HashMap::new();
    for (port, m) in &spec.port_level_mtls {
        let number = parse_port(port).map_err(|e| format!("spec.portLevelMtls.{port}: {e}"))?;
        let value = mode(&format!("spec.portLevelMtls.{port}"), m)?;
        if !value.is_empty() {
            port_modes.insert(u32::from(number), value);
        }
    }
    if namespace == root_namespace && selector.is_empty() {
        if !port_modes.is_empty() {
            notes.push("portLevelMtls needs a selector (as in Istio): ignored".into());
        }
        return Ok(Accepted {
            value: PeerAuthentication::MeshDefault(own),
            notes,
        });
    }
    Ok(Accepted {
        value: PeerAuthentication::Rule(v1::ModeRule {
            name: name.to_string(),
            namespace: namespace.to_string(),
            selector,
            workload: String::new(),
            mode: own,
            port_modes,
        }),
        notes,
    })
}

/// Translates an AuthorizationPolicy's spec. A root-namespace policy applies mesh-wide.
pub fn authorization_policy(
    namespace: &str,
    name: &str,
    root_namespace: &str,
    spec: &Value,
) -> Result<Accepted<v1::AuthorizationPolicy>, String> {
    let spec: AuthorizationPolicySpec =
        serde_json::from_value(spec.clone()).map_err(|e| format!("spec: {e}"))?;
    if let Some(field) = spec.other.keys().next() {
        return Err(format!(
            "spec.{field}: not supported by meshlet (L4 policies only)"
        ));
    }
    let action = match spec.action.as_str() {
        "" => "ALLOW",
        a @ ("ALLOW" | "DENY" | "AUDIT") => a,
        other => {
            return Err(format!(
                "spec.action: {other:?} is not ALLOW, DENY or AUDIT (CUSTOM needs an external authorizer meshlet does not have)"
            ))
        }
    };
    let mut notes = Vec::new();
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if let Some(field) = rule.other.keys().next() {
            return Err(format!("{at}.{field}: not a field of a rule"));
        }
        // Request attributes this rule needs: meshlet cannot see them at L4.
        let mut l7: Vec<String> = Vec::new();
        if !rule.when.is_empty() {
            l7.push("when".into());
        }
        let mut from = Vec::new();
        for (j, f) in rule.from.iter().enumerate() {
            let s = &f.source;
            l7.extend(s.l7.keys().map(|k| format!("from[{j}].source.{k}")));
            for (field, values) in [
                ("principals", &s.principals),
                ("notPrincipals", &s.not_principals),
            ] {
                for p in values {
                    check_principal(p)
                        .map_err(|e| format!("{at}.from[{j}].source.{field}: {p:?} {e}"))?;
                }
            }
            for (field, values) in [
                ("ipBlocks", &s.ip_blocks),
                ("notIpBlocks", &s.not_ip_blocks),
            ] {
                for b in values {
                    check_cidr(b)
                        .map_err(|e| format!("{at}.from[{j}].source.{field}: {b:?} {e}"))?;
                }
            }
            from.push(v1::Source {
                principals: s.principals.clone(),
                not_principals: s.not_principals.clone(),
                namespaces: s.namespaces.clone(),
                not_namespaces: s.not_namespaces.clone(),
                ip_blocks: s.ip_blocks.clone(),
                not_ip_blocks: s.not_ip_blocks.clone(),
            });
        }
        let mut to = Vec::new();
        for (j, t) in rule.to.iter().enumerate() {
            let o = &t.operation;
            l7.extend(o.l7.keys().map(|k| format!("to[{j}].operation.{k}")));
            let ports = |field: &str, values: &[String]| -> Result<Vec<u32>, String> {
                values
                    .iter()
                    .map(|p| {
                        parse_port(p)
                            .map(u32::from)
                            .map_err(|e| format!("{at}.to[{j}].operation.{field}: {p:?} {e}"))
                    })
                    .collect()
            };
            to.push(v1::Destination {
                ports: ports("ports", &o.ports)?,
                not_ports: ports("notPorts", &o.not_ports)?,
            });
        }
        if !l7.is_empty() {
            if action == "ALLOW" {
                notes.push(format!(
                    "rule {i} uses request attributes ({}) that meshlet cannot check at L4: it matches nothing",
                    l7.join(", ")
                ));
                continue;
            }
            notes.push(format!(
                "rule {i} uses request attributes ({}) that meshlet cannot check at L4: only its L4 conditions apply ({} more)",
                l7.join(", "),
                if action == "DENY" { "denies" } else { "audits" }
            ));
        }
        rules.push(v1::Rule { from, to });
    }
    Ok(Accepted {
        value: v1::AuthorizationPolicy {
            name: name.to_string(),
            namespace: if namespace == root_namespace {
                String::new()
            } else {
                namespace.to_string()
            },
            selector: selector(spec.selector.as_ref(), "spec.selector")?,
            action: action.to_string(),
            rules,
            dry_run: false,
        },
        notes,
    })
}

fn selector(selector: Option<&Selector>, field: &str) -> Result<HashMap<String, String>, String> {
    let Some(selector) = selector else {
        return Ok(HashMap::new());
    };
    if let Some(other) = selector.other.keys().next() {
        return Err(format!("{field}.{other}: only matchLabels is supported"));
    }
    for (k, v) in &selector.match_labels {
        let bad = |s: &str| s.chars().any(|c| c.is_control() || c.is_whitespace());
        if k.is_empty() || bad(k) || bad(v) {
            return Err(format!("{field}.matchLabels: {k:?}: {v:?} is not a label"));
        }
    }
    Ok(selector.match_labels.clone().into_iter().collect())
}

fn parse_port(p: &str) -> Result<u16, String> {
    p.parse::<u16>()
        .ok()
        .filter(|n| *n != 0)
        .ok_or_else(|| "is not a port (1-65535)".to_string())
}

/// Principals: exact, `prefix*`, `*suffix` or `*` (as Istio and the agents read them).
fn check_principal(p: &str) -> Result<(), String> {
    let stars = p.matches('*').count();
    let ok = !p.is_empty()
        && (stars == 0 || p == "*" || (stars == 1 && (p.starts_with('*') || p.ends_with('*'))));
    if ok {
        Ok(())
    } else {
        Err("may only use '*' alone, as a prefix or as a suffix".into())
    }
}

/// `a.b.c.d/n`, `x::y/n` or an address, host bits clear.
fn check_cidr(b: &str) -> Result<(), String> {
    let (addr, prefix) = match b.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (b, None),
    };
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|_| "is not an IP address or CIDR".to_string())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix: u32 = match prefix {
        None => max,
        Some(p) => p
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| "has a prefix length beyond the address size".to_string())?,
    };
    let bits: u128 = match ip {
        std::net::IpAddr::V4(v4) => u128::from(u32::from(v4)),
        std::net::IpAddr::V6(v6) => u128::from(v6),
    };
    let host = max - prefix;
    if host > 0 && host < 128 && bits & ((1u128 << host) - 1) != 0 {
        return Err("has host bits set beyond the prefix length".into());
    }
    Ok(())
}

/// A status condition (`metav1.Condition`).
pub fn condition(accepted: Result<&[String], &str>, generation: Option<i64>) -> Value {
    let now = time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let (status, reason, message) = match accepted {
        Ok([]) => ("True", "Accepted", "in force".to_string()),
        Ok(notes) => ("True", "AcceptedWithNarrowing", notes.join("; ")),
        Err(e) => ("False", "Invalid", e.to_string()),
    };
    serde_json::json!({
        "type": "Accepted", "status": status, "reason": reason, "message": message,
        "observedGeneration": generation.unwrap_or(0), "lastTransitionTime": now,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn istio_docs_peer_authentications_translate() {
        // istio.io: "Mutual TLS Migration" and "Authentication Policy".
        let mesh = peer_authentication(
            "meshlet-system",
            "default",
            "meshlet-system",
            &json!({"mtls": {"mode": "STRICT"}}),
        )
        .expect("mesh");
        assert_eq!(mesh.value, PeerAuthentication::MeshDefault("STRICT".into()));
        let ns = peer_authentication(
            "foo",
            "default",
            "meshlet-system",
            &json!({"mtls": {"mode": "PERMISSIVE"}}),
        )
        .expect("namespace");
        let PeerAuthentication::Rule(rule) = ns.value else {
            panic!("a rule")
        };
        assert_eq!(
            (rule.namespace.as_str(), rule.mode.as_str()),
            ("foo", "PERMISSIVE")
        );
        assert!(rule.selector.is_empty());
        let workload = peer_authentication(
            "foo",
            "finance",
            "meshlet-system",
            &json!({"selector": {"matchLabels": {"app": "finance"}}, "mtls": {"mode": "STRICT"},
                    "portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
        )
        .expect("workload");
        let PeerAuthentication::Rule(rule) = workload.value else {
            panic!("a rule")
        };
        assert_eq!(
            rule.selector.get("app").map(String::as_str),
            Some("finance")
        );
        assert_eq!(
            rule.port_modes.get(&8080).map(String::as_str),
            Some("DISABLE")
        );
        let bad = peer_authentication(
            "foo",
            "x",
            "meshlet-system",
            &json!({"mtls": {"mode": "STRICTER"}}),
        );
        assert!(bad.expect_err("bad mode").contains("spec.mtls.mode"));
        let bad = peer_authentication(
            "foo",
            "x",
            "meshlet-system",
            &json!({"portLevelMtls": {"http": {"mode": "DISABLE"}}}),
        );
        assert!(bad
            .expect_err("bad port")
            .contains("spec.portLevelMtls.http"));
    }

    #[test]
    fn l7_fields_never_weaken_a_policy() {
        let allow = authorization_policy(
            "foo",
            "httpbin",
            "meshlet-system",
            &json!({"selector": {"matchLabels": {"app": "httpbin"}}, "action": "ALLOW",
                    "rules": [
                        {"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}}],
                         "to": [{"operation": {"methods": ["GET"]}}]},
                        {"from": [{"source": {"namespaces": ["test"]}}], "to": [{"operation": {"ports": ["8080"]}}]}]}),
        )
        .expect("allow");
        assert_eq!(allow.value.rules.len(), 1, "the GET rule matches nothing");
        assert_eq!(allow.value.rules[0].to[0].ports, [8080]);
        assert!(
            allow.notes[0].contains("to[0].operation.methods")
                && allow.notes[0].contains("matches nothing")
        );
        let deny = authorization_policy(
            "foo",
            "deny",
            "meshlet-system",
            &json!({"action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": ["foo"]}}],
                     "to": [{"operation": {"paths": ["/admin"]}}]}]}),
        )
        .expect("deny");
        assert_eq!(deny.value.rules.len(), 1, "the DENY keeps its L4 part");
        assert!(deny.value.rules[0].to[0].ports.is_empty());
        assert!(deny.notes[0].contains("denies more"));
        let root = authorization_policy(
            "meshlet-system",
            "all",
            "meshlet-system",
            &json!({"action": "ALLOW", "rules": [{}]}),
        )
        .expect("root");
        assert_eq!(root.value.namespace, "", "root namespace: mesh-wide");
        for (spec, field) in [
            (json!({"action": "CUSTOM"}), "spec.action"),
            (
                json!({"rules": [{"to": [{"operation": {"ports": ["0"]}}]}]}),
                "spec.rules[0].to[0].operation.ports",
            ),
            (
                json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.1/8"]}}]}]}),
                "ipBlocks",
            ),
            (
                json!({"rules": [{"from": [{"source": {"principals": ["a*b*"]}}]}]}),
                "principals",
            ),
            (
                json!({"targetRefs": [{"kind": "Gateway"}]}),
                "spec.targetRefs",
            ),
        ] {
            let e = authorization_policy("foo", "x", "meshlet-system", &spec).expect_err("invalid");
            assert!(e.contains(field), "{e:?} should name {field}");
        }
    }
}

/// Which policy resource kind an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    PeerAuthentication,
    AuthorizationPolicy,
}

/// One policy object as read from the API.
pub struct PolicyObject<'a> {
    pub kind: PolicyKind,
    /// Index of the API it came from (meshlet's or Istio's group), to write its status back.
    pub api: usize,
    pub uid: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub generation: Option<i64>,
    pub spec: &'a Value,
}

/// A status to write back to one resource.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusUpdate {
    pub api: usize,
    pub namespace: String,
    pub name: String,
    pub condition: Value,
}

#[derive(Debug, Clone)]
enum Translated {
    Peer(PeerAuthentication),
    Authz(v1::AuthorizationPolicy),
}

/// The policies in force, translated; remembers each resource's last accepted version (an
/// invalid edit leaves it in force) and the status last written.
#[derive(Debug, Default)]
pub struct PolicyBook {
    last_good: HashMap<String, Translated>,
    /// uid → (generation, status, reason, message) last written.
    written: HashMap<String, (Option<i64>, String)>,
}

/// The policy part of a snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyPart {
    /// The root namespace's selector-less PeerAuthentication (empty: STRICT).
    pub mesh_mode: String,
    pub modes: Vec<v1::ModeRule>,
    pub policies: Vec<v1::AuthorizationPolicy>,
}

impl PolicyBook {
    /// Translates every policy object; returns what is in force and the statuses to write.
    pub fn apply(
        &mut self,
        objects: &[PolicyObject<'_>],
        root_namespace: &str,
    ) -> (PolicyPart, Vec<StatusUpdate>) {
        let mut part = PolicyPart::default();
        let mut updates = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for o in objects {
            seen.insert(o.uid.to_string());
            let translated = match o.kind {
                PolicyKind::PeerAuthentication => {
                    peer_authentication(o.namespace, o.name, root_namespace, o.spec)
                        .map(|a| (Translated::Peer(a.value), a.notes))
                }
                PolicyKind::AuthorizationPolicy => {
                    authorization_policy(o.namespace, o.name, root_namespace, o.spec)
                        .map(|a| (Translated::Authz(a.value), a.notes))
                }
            };
            let condition = match translated {
                Ok((t, notes)) => {
                    self.last_good.insert(o.uid.to_string(), t);
                    condition(Ok(&notes), o.generation)
                }
                Err(e) => {
                    let e = if self.last_good.contains_key(o.uid) {
                        format!("{e}; the last accepted version stays in force")
                    } else {
                        e
                    };
                    condition(Err(&e), o.generation)
                }
            };
            let key = format!(
                "{}|{}|{}",
                condition["status"], condition["reason"], condition["message"]
            );
            if self.written.get(o.uid) != Some(&(o.generation, key.clone())) {
                self.written.insert(o.uid.to_string(), (o.generation, key));
                updates.push(StatusUpdate {
                    api: o.api,
                    namespace: o.namespace.to_string(),
                    name: o.name.to_string(),
                    condition,
                });
            }
            match self.last_good.get(o.uid) {
                Some(Translated::Peer(PeerAuthentication::MeshDefault(mode))) => {
                    part.mesh_mode = mode.clone()
                }
                Some(Translated::Peer(PeerAuthentication::Rule(rule))) => {
                    part.modes.push(rule.clone())
                }
                Some(Translated::Authz(policy)) => part.policies.push(policy.clone()),
                None => {}
            }
        }
        self.last_good.retain(|uid, _| seen.contains(uid));
        self.written.retain(|uid, _| seen.contains(uid));
        // Names must be unique per namespace in the stream: the same name from meshlet's and
        // Istio's group is told apart.
        let mut names = std::collections::HashSet::new();
        for rule in &mut part.modes {
            while !names.insert(("mode", rule.namespace.clone(), rule.name.clone())) {
                rule.name.push_str("-istio");
            }
        }
        for policy in &mut part.policies {
            while !names.insert(("authz", policy.namespace.clone(), policy.name.clone())) {
                policy.name.push_str("-istio");
            }
        }
        part.modes
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        part.policies
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        (part, updates)
    }
}
