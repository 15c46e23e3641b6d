//! What the lab builds: nodes, pods, addresses; saved as JSON for `lab status` and the tests.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

/// A pod to create.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodSpec {
    pub name: String,
    pub node: String,
    pub namespace: String,
    pub service_account: String,
    /// Announced to the node's agent (in the mesh) or not.
    pub enrolled: bool,
    /// Listed in the control plane's registry (a pod can be enrolled yet unknown, or known
    /// yet not enrolled).
    pub registered: bool,
    /// Wired by the lab (veth, address, routes) before it starts. Not wired: the lab only
    /// makes its network namespace, and a test sets it up with real CNI plugins, as a
    /// runtime would (such a pod is not announced by the lab either).
    pub wired: bool,
}

impl PodSpec {
    pub fn new(name: &str, node: &str, service_account: &str) -> Self {
        Self {
            name: name.into(),
            node: node.into(),
            namespace: "default".into(),
            service_account: service_account.into(),
            enrolled: true,
            registered: true,
            wired: true,
        }
    }

    /// A pod whose network a test makes through a CNI chain (see `wired`).
    pub fn made_by_cni(mut self) -> Self {
        self.wired = false;
        self
    }

    /// A pod outside the mesh: neither enrolled nor in the registry.
    pub fn outside_mesh(mut self) -> Self {
        self.enrolled = false;
        self.registered = false;
        self
    }
}

/// A node as built.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub netns: String,
    /// Address on the node-to-node link.
    pub link_ip: Ipv4Addr,
    pub pod_cidr: String,
    /// Dual-stack labs: the node's IPv6 link address and pod range.
    #[serde(default)]
    pub link_ip6: Option<Ipv6Addr>,
    #[serde(default)]
    pub pod_cidr6: Option<String>,
    pub cgroup: String,
    pub bpf_pin_dir: String,
    pub agent_socket: String,
    pub agent_log: String,
}

/// A pod as built.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodInfo {
    pub name: String,
    pub uid: String,
    pub node: String,
    pub namespace: String,
    pub service_account: String,
    pub identity: String,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address, in a dual-stack lab.
    #[serde(default)]
    pub ip6: Option<Ipv6Addr>,
    pub netns: String,
    pub netns_path: String,
    pub cgroup: String,
    pub enrolled: bool,
    /// Wired and announced by the lab (see `PodSpec::wired`).
    #[serde(default = "yes")]
    pub wired: bool,
    pub registered: bool,
}

impl NodeInfo {
    /// The agent's CNI socket (the agent's default: beside its node socket).
    pub fn cni_socket(&self) -> std::path::PathBuf {
        std::path::Path::new(&self.agent_socket).with_file_name("cni.sock")
    }
}

impl PodInfo {
    /// The pod's addresses: IPv4, then IPv6 in a dual-stack lab.
    pub fn ips(&self) -> Vec<IpAddr> {
        std::iter::once(IpAddr::V4(self.ip))
            .chain(self.ip6.map(IpAddr::V6))
            .collect()
    }
}

/// The whole lab.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Topology {
    pub trust_domain: String,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
    /// Interface names of the node-to-node link, in node order.
    pub node_link: Vec<String>,
    pub controlplane_socket: String,
    pub controlplane_log: String,
    pub workloads_file: String,
    /// Pods and nodes have IPv6 addresses and routes too.
    #[serde(default)]
    pub dual_stack: bool,
}

impl Topology {
    pub fn pod(&self, name: &str) -> Option<&PodInfo> {
        self.pods.iter().find(|p| p.name == name)
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// The control plane's registry file contents.
    pub fn workloads_json(&self) -> serde_json::Value {
        let workloads: Vec<_> = self
            .pods
            .iter()
            .filter(|p| p.registered)
            .map(|p| {
                serde_json::json!({
                    "uid": p.uid, "namespace": p.namespace, "name": p.name,
                    "service_account": p.service_account, "node": p.node,
                    "ips": p.ips().iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "labels": {"app": p.name},
                })
            })
            .collect();
        serde_json::json!({ "workloads": workloads })
    }
}

fn yes() -> bool {
    true
}
