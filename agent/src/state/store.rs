//! The state in force: the last accepted [`MeshState`], swapped whole when an update is
//! accepted, read without waiting by every connection.
use std::sync::{Arc, RwLock};

use meshlet_proto::v1::DiscoveryResponse;
use tokio::sync::watch;

use super::{MeshState, Service, StateError, WorkloadInfo};
use crate::tls::TrustBundle;

/// Where an update stands in its discovery stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamPosition {
    /// The first update of a new stream: a full state, applied whatever its version.
    First,
    /// Any later one: must be newer than the version applied.
    Later,
}

/// The largest control-plane update the agent takes (tonic's default is 4 MiB: a mesh of
/// 50 000 workloads did not fit, and the agent kept its old state with only a log line to
/// show). A full state of 100 000 workloads is about 8 MB.
pub const MAX_UPDATE_BYTES: usize = 256 * 1024 * 1024;

/// The mesh state of the last accepted version, and why the last update was refused.
pub struct Store {
    state: RwLock<Arc<MeshState>>,
    changed: watch::Sender<u64>,
    /// Why the last update from the control plane was not applied (NACK, too large), until
    /// one is: readiness and `meshlet status` show it.
    problem: RwLock<Option<String>>,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            state: RwLock::new(Arc::new(MeshState::default())),
            changed: watch::channel(0).0,
            problem: RwLock::new(None),
        }
    }
}

impl Store {
    /// The state in force (a snapshot: later updates do not change it).
    pub fn current(&self) -> Arc<MeshState> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn by_uid(&self, uid: &str) -> Option<Arc<WorkloadInfo>> {
        self.current().by_uid(uid).cloned()
    }

    pub fn by_ip(&self, ip: std::net::IpAddr) -> Option<Arc<WorkloadInfo>> {
        self.current().by_ip(ip).cloned()
    }

    /// A workload by `namespace/name`.
    pub fn by_name(&self, name: &str) -> Option<Arc<WorkloadInfo>> {
        self.current().by_name(name).cloned()
    }

    /// The last accepted update, as the control plane sent it.
    pub fn last_update(&self) -> Option<DiscoveryResponse> {
        self.current().last_update()
    }

    /// Every workload of the mesh, by namespace/name.
    pub fn list(&self) -> Vec<Arc<WorkloadInfo>> {
        let mut list: Vec<_> = self.current().workloads().cloned().collect();
        list.sort_by_key(|w| w.display_name());
        list
    }

    /// Every Service, by namespace/name.
    pub fn services(&self) -> Vec<Arc<Service>> {
        self.current().services().to_vec()
    }

    /// The mTLS modes and authorization policies of the last accepted version.
    pub fn policy(&self) -> Arc<super::policy::PolicySet> {
        self.current().policy.clone()
    }

    pub fn version(&self) -> u64 {
        self.current().version
    }

    /// The workloads the control plane places on `node`.
    pub fn on_node(&self, node: &str) -> Vec<Arc<WorkloadInfo>> {
        self.current()
            .workloads()
            .filter(|w| w.node == node)
            .cloned()
            .collect()
    }

    /// Why the control plane's last update was not applied, if it was not.
    pub fn problem(&self) -> Option<String> {
        self.problem
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_problem(&self, problem: Option<String>) {
        *self.problem.write().unwrap_or_else(|e| e.into_inner()) = problem;
    }

    /// Notified with the version after every accepted update.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Validates a whole update and, only if all of it is good, makes it current.
    ///
    /// Versions order the updates of one discovery stream: within a stream, an update must be
    /// newer than the one applied. The first update of a stream (`StreamPosition::First`) is a full
    /// state and is applied whatever its number, as in xDS: a restarted control plane, or
    /// another replica, numbers its own way, and an agent that compared across streams
    /// froze on its old state until the new counter passed it.
    pub fn apply(
        &self,
        update: &DiscoveryResponse,
        bundle: &TrustBundle,
        position: StreamPosition,
    ) -> Result<(), StateError> {
        let applied = self.version();
        if position == StreamPosition::Later && update.version <= applied {
            return Err(StateError::OldVersion {
                got: update.version,
                applied,
            });
        }
        let mut state = MeshState::from_update(update)?;
        let source = crate::tls::BundleState::source_of(update);
        let trust = if bundle.differs_from(source) {
            Some(crate::tls::BundleState::from_update(update)?)
        } else {
            None
        };
        if let Some(trust) = trust {
            bundle.replace(trust);
        }
        let version = update.version;
        state.update = Some(prost::Message::encode_to_vec(update));
        let old = std::mem::replace(
            &mut *self.state.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(state),
        );
        self.set_problem(None);
        self.changed.send_replace(version);
        // The old state is freed here, outside the lock; give its pages back to the system
        // (a large mesh otherwise leaves the agent's RSS at twice its state after an update).
        drop(old);
        release_free_memory();
        Ok(())
    }
}

/// Returns freed heap pages to the system (glibc keeps them otherwise).
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory at the top of the heaps and in free
    // chunks; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
