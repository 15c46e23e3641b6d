//! The meshlet lab: Kubernetes-like nodes and pods made of real kernel pieces on one machine.
//!
//! Each node and each pod is a named network namespace (`/run/netns/ml-*`); pods hang off their
//! node by a veth pair with /32 routes; the nodes are joined by one veth link. Each node has a
//! cgroup subtree with one cgroup per pod, and a bpffs pin folder, so that each node's agent
//! attaches only to its own pods although all nodes share one kernel. The lab plays the CNI
//! (announces pods to the agents) and runs the control plane and one agent per node.
//!
//! Everything the lab makes is named from [`NAME_PREFIX`] and the fixed paths below, so
//! [`cleanup`] can remove it all, also after a crash.
pub mod cgroup;
pub mod cni;
pub mod kube_api;
pub mod kube_schema;
pub mod lab;
pub mod net;
pub mod netns;
pub mod pki;
pub mod podman;
pub mod topology;

pub use lab::{cleanup, Lab, LabOptions};
pub use topology::{PodSpec, Topology};

/// Prefix of every netns and veth the lab makes.
pub const NAME_PREFIX: &str = "ml-";
/// The lab's state folder: sockets, logs, topology JSON.
pub const STATE_DIR: &str = "/run/meshlet-lab";
/// The lab's cgroup root.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified/meshlet-lab";
/// The lab's bpffs folder.
pub const BPF_ROOT: &str = "/sys/fs/bpf/meshlet-lab";
