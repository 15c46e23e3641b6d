//! Which pods join the mesh when they start on this node. The CNI plugin asks at ADD, before
//! the pod has run anything and before the control plane knows its address; the answer comes
//! from the pod's namespace and uid and the scope the control plane sends.
use std::collections::HashSet;

use meshlet_proto::v1::MeshScope;

/// The namespaces in the mesh and the pods that opted out of it.
#[derive(Debug, Default, Clone)]
pub struct Scope {
    namespaces: HashSet<String>,
    excluded_pods: HashSet<String>,
}

/// The answer for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Membership {
    /// Capture it before it starts.
    Mesh,
    /// Leave it alone; the reason is for the log and the CNI reply.
    Outside(String),
}

impl Scope {
    pub fn from_proto(scope: Option<&MeshScope>) -> Self {
        let Some(scope) = scope else {
            return Self::default();
        };
        Self {
            namespaces: scope.namespaces.iter().cloned().collect(),
            excluded_pods: scope.excluded_pods.iter().cloned().collect(),
        }
    }

    /// Whether the pod `uid` in `namespace` joins the mesh. A pod the control plane already
    /// lists as a workload (`known`) does, whatever its namespace says.
    pub fn membership(&self, uid: &str, namespace: &str, known: bool) -> Membership {
        if self.excluded_pods.contains(uid) {
            return Membership::Outside(format!(
                "pod {uid} opted out of the mesh (label meshlet.dev/mesh=disabled)"
            ));
        }
        if known || self.namespaces.contains(namespace) {
            return Membership::Mesh;
        }
        Membership::Outside(format!(
            "namespace {namespace:?} is not in the mesh (label it meshlet.dev/mesh=enabled to enroll its pods)"
        ))
    }
}
