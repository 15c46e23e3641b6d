//! Workloads: the pods of the mesh as the control plane describes them.
use std::{collections::HashSet, net::IpAddr, sync::Arc};

use meshlet_spiffe::SpiffeId;

/// A workload as the agent uses it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
    pub labels: Labels,
    /// Ports the kubelet probes: the only ones a `--capture-exempt-source` address reaches
    /// without capture.
    pub probe_ports: Vec<u16>,
    /// The identity this workload presents.
    #[serde(serialize_with = "display")]
    pub identity: SpiffeId,
}

/// A workload's labels, compact: a sorted slice of shared strings. A mesh of 40 000 workloads
/// held each workload's two labels in a `BTreeMap` of its own (a 544-byte node) beside their
/// own copies of every key and value; label keys and values repeat across workloads, so one
/// update shares each distinct string once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(pub(super) Box<[(Arc<str>, Arc<str>)]>);

impl Labels {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| k.as_ref().cmp(key))
            .ok()
            .map(|i| self.0[i].1.as_ref())
    }

    /// Every pair, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_ref(), v.as_ref()))
    }

    /// Labels from pairs, their strings shared through `strings`.
    pub(crate) fn interned<'a>(
        pairs: impl Iterator<Item = (&'a String, &'a String)>,
        strings: &mut HashSet<Arc<str>>,
    ) -> Self {
        let mut intern = |s: &str| match strings.get(s) {
            Some(shared) => shared.clone(),
            None => {
                let shared: Arc<str> = Arc::from(s);
                strings.insert(shared.clone());
                shared
            }
        };
        let mut pairs: Vec<(Arc<str>, Arc<str>)> =
            pairs.map(|(k, v)| (intern(k), intern(v))).collect();
        pairs.sort();
        pairs.dedup_by(|a, b| a.0 == b.0);
        Self(pairs.into_boxed_slice())
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Self {
        Self::interned(pairs.iter().map(|(k, v)| (k, v)), &mut HashSet::new())
    }
}

impl serde::Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

fn display<S: serde::Serializer>(v: &SpiffeId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl WorkloadInfo {
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Serializes an optional workload as its `namespace/name`.
pub(crate) fn serialize_name<S: serde::Serializer>(
    w: &Option<Arc<WorkloadInfo>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match w {
        Some(w) => s.collect_str(&w.display_name()),
        None => s.serialize_none(),
    }
}
