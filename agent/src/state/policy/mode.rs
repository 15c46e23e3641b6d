//! mTLS modes: STRICT (mTLS only), PERMISSIVE (mTLS, or plaintext subject to authorization),
//! DISABLE (no capture; peers send plaintext). Set mesh-wide, per namespace, per workload
//! (selector or name) and per port; the most specific rule that says something wins.
use std::collections::BTreeMap;

use meshlet_proto::v1;

use super::{check_selector, selects, PolicyError, PolicySet};
use crate::state::WorkloadInfo;

/// An mTLS mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Mode {
    #[default]
    Strict,
    Permissive,
    Disable,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "STRICT" => Some(Self::Strict),
            "PERMISSIVE" => Some(Self::Permissive),
            "DISABLE" => Some(Self::Disable),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "STRICT",
            Self::Permissive => "PERMISSIVE",
            Self::Disable => "DISABLE",
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One validated mode rule.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModeRule {
    pub name: String,
    /// `None`: mesh-wide.
    pub namespace: Option<String>,
    pub selector: BTreeMap<String, String>,
    /// One workload by name, in `namespace`.
    pub workload: Option<String>,
    /// `None`: inherit (only the port overrides apply).
    pub mode: Option<Mode>,
    pub port_modes: BTreeMap<u16, Mode>,
}

/// A resolved mode and the rule it came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModeDecision {
    pub mode: Mode,
    /// "mesh default" or `rule <namespace>/<name>[ port N]`.
    pub source: String,
}

impl ModeRule {
    pub(super) fn from_proto(rule: &v1::ModeRule) -> Result<Self, PolicyError> {
        let mode = match rule.mode.as_str() {
            "" => None,
            other => Some(Mode::parse(other).ok_or_else(|| PolicyError::UnknownMode {
                rule: rule.name.clone(),
                value: other.into(),
            })?),
        };
        let mut port_modes = BTreeMap::new();
        for (&port, value) in &rule.port_modes {
            let port16 = u16::try_from(port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| PolicyError::ModePort {
                    rule: rule.name.clone(),
                    port,
                })?;
            let mode = Mode::parse(value).ok_or_else(|| PolicyError::UnknownMode {
                rule: rule.name.clone(),
                value: value.clone(),
            })?;
            port_modes.insert(port16, mode);
        }
        let namespace = (!rule.namespace.is_empty()).then(|| rule.namespace.clone());
        let workload = (!rule.workload.is_empty()).then(|| rule.workload.clone());
        if namespace.is_none() && (workload.is_some() || !rule.selector.is_empty()) {
            // A selector or workload name without a namespace would reach across namespaces.
            return Err(PolicyError::Selector {
                kind: "mode rule",
                name: rule.name.clone(),
                value: "a workload or selector needs a namespace".into(),
            });
        }
        Ok(Self {
            name: rule.name.clone(),
            selector: check_selector("mode rule", &rule.name, &rule.selector)?,
            namespace,
            workload,
            mode,
            port_modes,
        })
    }

    /// How specifically this rule names `workload`, or `None` if it does not apply.
    fn specificity(&self, workload: &WorkloadInfo) -> Option<u8> {
        let Some(namespace) = &self.namespace else {
            return Some(0);
        };
        if *namespace != workload.namespace {
            return None;
        }
        if let Some(name) = &self.workload {
            return (*name == workload.name && selects(&self.selector, &workload.labels))
                .then_some(3);
        }
        if !self.selector.is_empty() {
            return selects(&self.selector, &workload.labels).then_some(2);
        }
        Some(1)
    }

    fn label(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("rule {ns}/{}", self.name),
            None => format!("rule {}", self.name),
        }
    }
}

/// The rules that apply to `workload`, most specific first (ties broken by name, so that the
/// answer never depends on the order the control plane sent them in).
fn applicable<'a>(set: &'a PolicySet, workload: &WorkloadInfo) -> Vec<&'a ModeRule> {
    let mut rules: Vec<(u8, &ModeRule)> = set
        .modes
        .iter()
        .filter_map(|r| r.specificity(workload).map(|s| (s, r)))
        .collect();
    rules.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    rules.into_iter().map(|(_, r)| r).collect()
}

impl PolicySet {
    /// The mode of `workload` on `port`.
    pub fn mode_for(&self, workload: &WorkloadInfo, port: u16) -> ModeDecision {
        for rule in applicable(self, workload) {
            if let Some(mode) = rule.port_modes.get(&port) {
                return ModeDecision {
                    mode: *mode,
                    source: format!("{} port {port}", rule.label()),
                };
            }
            if let Some(mode) = rule.mode {
                return ModeDecision {
                    mode,
                    source: rule.label(),
                };
            }
        }
        ModeDecision {
            mode: self.mesh_mode,
            source: "mesh default".into(),
        }
    }
}

pub(super) fn needs_capture(set: &PolicySet, workload: &WorkloadInfo) -> bool {
    // Port 0 is never a real port: it resolves the workload-wide mode.
    if set.mode_for(workload, 0).mode != Mode::Disable {
        return true;
    }
    applicable(set, workload)
        .iter()
        .flat_map(|r| r.port_modes.keys())
        .any(|&port| set.mode_for(workload, port).mode != Mode::Disable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::policy::test_support::workload;

    fn rule(name: &str, namespace: &str, mode: &str, ports: &[(u32, &str)]) -> v1::ModeRule {
        v1::ModeRule {
            name: name.into(),
            namespace: namespace.into(),
            mode: mode.into(),
            port_modes: ports.iter().map(|(p, m)| (*p, m.to_string())).collect(),
            ..Default::default()
        }
    }

    fn set(rules: Vec<v1::ModeRule>) -> PolicySet {
        PolicySet::from_proto(None, &rules, &[]).expect("valid")
    }

    #[test]
    fn most_specific_rule_wins() {
        let web = workload("shop", "web", "web", "10.0.0.1");
        let db = workload("shop", "db", "db", "10.0.0.2");
        let mut by_label = rule("web-permissive", "shop", "PERMISSIVE", &[(9090, "DISABLE")]);
        by_label.selector = [("app".into(), "web".into())].into();
        let set = set(vec![rule("shop", "shop", "STRICT", &[]), by_label]);
        assert_eq!(set.mode_for(&web, 80).mode, Mode::Permissive);
        assert_eq!(set.mode_for(&web, 9090).mode, Mode::Disable);
        assert_eq!(
            set.mode_for(&web, 9090).source,
            "rule shop/web-permissive port 9090"
        );
        assert_eq!(set.mode_for(&db, 80).mode, Mode::Strict);
        let other = workload("other", "x", "x", "10.0.0.3");
        assert_eq!(set.mode_for(&other, 80).source, "mesh default");
    }

    #[test]
    fn emergency_switch_by_workload_name_beats_selectors() {
        let web = workload("shop", "web", "web", "10.0.0.1");
        let mut by_label = rule("strict-web", "shop", "STRICT", &[]);
        by_label.selector = [("app".into(), "web".into())].into();
        let mut emergency = rule("emergency", "shop", "DISABLE", &[]);
        emergency.workload = "web".into();
        let set = set(vec![by_label, emergency]);
        assert_eq!(set.mode_for(&web, 80).mode, Mode::Disable);
        assert!(!set.needs_capture(&web));
    }

    #[test]
    fn capture_unless_wholly_disabled() {
        let web = workload("shop", "web", "web", "10.0.0.1");
        assert!(set(vec![]).needs_capture(&web));
        assert!(!set(vec![rule("off", "shop", "DISABLE", &[])]).needs_capture(&web));
        assert!(set(vec![rule("off", "shop", "DISABLE", &[(8080, "STRICT")])]).needs_capture(&web));
    }

    #[test]
    fn bad_modes_and_ports_are_named() {
        let err = PolicySet::from_proto(None, &[rule("r", "shop", "STRCT", &[])], &[]);
        assert_eq!(
            err.err().map(|e| e.to_string()),
            Some("mode rule \"r\": mode \"STRCT\" is not STRICT, PERMISSIVE, DISABLE or empty (inherit)".into())
        );
        for port in [0, 70_000] {
            let err =
                PolicySet::from_proto(None, &[rule("r", "shop", "", &[(port, "STRICT")])], &[]);
            assert!(matches!(err, Err(PolicyError::ModePort { .. })), "{port}");
        }
        let bad_mesh = v1::MeshPolicy {
            mode: "OFF".into(),
            default_deny: false,
            ..Default::default()
        };
        assert!(PolicySet::from_proto(Some(&bad_mesh), &[], &[]).is_err());
    }
}
