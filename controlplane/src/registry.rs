//! The workload registry: which pods exist, on which node, with which service account, and the
//! mesh's policy (mTLS modes, authorization policies).
//!
//! The reference control plane reads it from a JSON file that the operator (or the lab) writes,
//! and re-reads it when the file changes; every change is a new version pushed to the nodes.
//! The policy is relayed as written: the agents, which enforce it, validate every version and
//! NACK a bad one (naming what is wrong), keeping the policy in force.
use std::{path::PathBuf, time::Duration};

use meshlet_proto::v1::{
    AuthorizationPolicy, ExternalService, MeshPolicy, MeshScope, ModeRule, Service, Workload,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read workload file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "workload file {path} is not valid JSON of the form {{\"workloads\": [...], \"services\": [...], \"external_services\": [...], \"mesh\": {{...}}, \"modes\": [...], \"policies\": [...]}}: {source}"
    )]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// One workload as written in the registry file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadEntry {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub node: String,
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Ports the kubelet probes (the only ones a node's exempt address may reach in
    /// plaintext).
    #[serde(default)]
    pub probe_ports: Vec<u16>,
}

/// The registry file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryFile {
    pub workloads: Vec<WorkloadEntry>,
    #[serde(default)]
    pub mesh: MeshPolicy,
    #[serde(default)]
    pub modes: Vec<ModeRule>,
    #[serde(default)]
    pub policies: Vec<AuthorizationPolicy>,
    /// Services (cluster IPs, ports) and their endpoints.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Destinations outside the mesh that REGISTRY_ONLY lets through.
    #[serde(default)]
    pub external_services: Vec<ExternalService>,
    /// Namespaces whose new pods the CNI plugin enrolls; unset, those of `workloads`.
    #[serde(default)]
    pub mesh_namespaces: Option<Vec<String>>,
}

impl RegistryFile {
    pub fn read(path: &PathBuf) -> Result<Self, RegistryError> {
        let text = std::fs::read_to_string(path).map_err(|source| RegistryError::Read {
            path: path.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|source| RegistryError::Parse {
            path: path.clone(),
            source,
        })
    }

    /// Parses a registry file's text.
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The snapshot this file describes, as version `version`.
    pub fn into_snapshot(self, version: u64) -> Snapshot {
        let mut namespaces = self
            .mesh_namespaces
            .unwrap_or_else(|| self.workloads.iter().map(|w| w.namespace.clone()).collect());
        namespaces.sort();
        namespaces.dedup();
        let workloads = self
            .workloads
            .into_iter()
            .map(|w| Workload {
                uid: w.uid,
                namespace: w.namespace,
                name: w.name,
                service_account: w.service_account,
                node: w.node,
                ips: w.ips,
                labels: w.labels.into_iter().collect(),
                probe_ports: w.probe_ports.into_iter().map(u32::from).collect(),
            })
            .collect();
        Snapshot {
            version,
            workloads,
            mesh: self.mesh,
            modes: self.modes,
            policies: self.policies,
            services: self.services,
            external_services: self.external_services,
            scope: MeshScope {
                namespaces,
                excluded_pods: Vec::new(),
            },
            certificate_lifetime: None,
            nodes: None,
        }
    }
}

/// A versioned snapshot of all workloads and the mesh's policy.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub version: u64,
    pub workloads: Vec<Workload>,
    pub mesh: MeshPolicy,
    pub modes: Vec<ModeRule>,
    pub policies: Vec<AuthorizationPolicy>,
    pub services: Vec<Service>,
    pub external_services: Vec<ExternalService>,
    /// Which new pods the CNI plugin enrolls.
    pub scope: MeshScope,
    /// The mesh settings' cap on workload certificate lifetimes (Kubernetes mode), for the
    /// CA; not sent to nodes.
    pub certificate_lifetime: Option<std::time::Duration>,
    /// The nodes of the cluster (Kubernetes mode: the Node objects not being deleted); a node
    /// outside it is not served, whatever certificate it holds. `None` (the file registry): a
    /// node is whoever holds a node certificate.
    pub nodes: Option<std::collections::BTreeSet<String>>,
}

impl Snapshot {
    /// Whether `node` may be served: a node removed from the cluster (`kubectl delete node`)
    /// loses its discovery stream and gets no certificate, node or workload, from then on.
    pub fn admits_node(&self, node: &str) -> Result<(), String> {
        match &self.nodes {
            Some(nodes) if !nodes.contains(node) => Err(format!(
                "node {node:?} is not a node of the cluster (no Node object, or it is being deleted): a removed node is not served; if the node is back, its kubelet registers it again"
            )),
            _ => Ok(()),
        }
    }

    /// Whether a pod with this service account runs on `node`.
    pub fn has_pod(&self, node: &str, namespace: &str, service_account: &str) -> bool {
        self.workloads.iter().any(|w| {
            w.node == node && w.namespace == namespace && w.service_account == service_account
        })
    }
}

fn load(path: &PathBuf, version: u64) -> Result<Snapshot, RegistryError> {
    Ok(RegistryFile::read(path)?.into_snapshot(version))
}

/// Loads the file once (failing loudly if it is bad) and then watches it: a changed file
/// becomes a new version; a file that no longer parses is reported and the last good
/// snapshot stays.
pub fn watch_file(path: PathBuf) -> Result<watch::Receiver<Snapshot>, RegistryError> {
    let (tx, rx) = watch::channel(load(&path, 1)?);
    tokio::spawn(async move {
        let mut last_seen = modified(&path);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = modified(&path);
            if now == last_seen {
                continue;
            }
            last_seen = now;
            let version = tx.borrow().version + 1;
            match load(&path, version) {
                Ok(snapshot) => {
                    tracing::info!(
                        version,
                        workloads = snapshot.workloads.len(),
                        modes = snapshot.modes.len(),
                        policies = snapshot.policies.len(),
                        services = snapshot.services.len(),
                        "registry changed"
                    );
                    if tx.send(snapshot).is_err() {
                        return;
                    }
                }
                Err(e) => tracing::error!("{e}; keeping the last good registry"),
            }
        }
    });
    Ok(rx)
}

fn modified(path: &PathBuf) -> Option<(std::time::SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}
