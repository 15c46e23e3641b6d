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
    /// The discovery stream: up or down, since when, and why it went down.
    link: RwLock<Link>,
}

/// The discovery stream's state, for `meshlet status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Link {
    pub connected: bool,
    /// Seconds since the Unix epoch of the last change (the agent's start before any).
    pub since: u64,
    /// Why it is down (the last error), when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Default for Store {
    fn default() -> Self {
        Self {
            state: RwLock::new(Arc::new(MeshState::default())),
            changed: watch::channel(0).0,
            problem: RwLock::new(None),
            link: RwLock::new(Link {
                connected: false,
                since: unix_now(),
                reason: Some("not connected yet".into()),
            }),
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

    /// The discovery stream's state.
    pub fn link(&self) -> Link {
        self.link.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records the stream going up, or down with `reason`; `since` moves only on a change.
    pub(crate) fn set_link(&self, connected: bool, reason: Option<String>) {
        let mut link = self.link.write().unwrap_or_else(|e| e.into_inner());
        if link.connected != connected {
            link.since = unix_now();
        }
        link.connected = connected;
        link.reason = if connected { None } else { reason };
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
        // An incremental update is applied to the state held, and the result validated as a
        // whole, exactly as a full update would be.
        let merged;
        let update = if update.incremental {
            if position == StreamPosition::First {
                return Err(StateError::IncrementalFirst);
            }
            merged = merge(self.last_update().unwrap_or_default(), update)?;
            &merged
        } else {
            update
        };
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

/// `base` with an incremental `update` applied: removals and upserts of workloads (by uid)
/// and Services (by namespace/name); every other field from the update. Removing what is not
/// there means the control plane and this agent disagree: refused, so that the control plane
/// sends the full state.
fn merge(
    mut base: DiscoveryResponse,
    update: &DiscoveryResponse,
) -> Result<DiscoveryResponse, StateError> {
    use std::collections::HashSet;
    let service_key = |s: &meshlet_proto::v1::Service| format!("{}/{}", s.namespace, s.name);
    let removed: HashSet<&str> = update
        .removed_workloads
        .iter()
        .map(String::as_str)
        .collect();
    let upserted: HashSet<&str> = update.workloads.iter().map(|w| w.uid.as_str()).collect();
    let present = base
        .workloads
        .iter()
        .filter(|w| removed.contains(w.uid.as_str()))
        .count();
    if present != removed.len() {
        return Err(StateError::Incremental(
            "it removes workloads this agent does not have".into(),
        ));
    }
    base.workloads
        .retain(|w| !removed.contains(w.uid.as_str()) && !upserted.contains(w.uid.as_str()));
    base.workloads.extend(update.workloads.iter().cloned());
    let removed: HashSet<&str> = update.removed_services.iter().map(String::as_str).collect();
    let upserted: HashSet<String> = update.services.iter().map(service_key).collect();
    let present = base
        .services
        .iter()
        .filter(|s| removed.contains(service_key(s).as_str()))
        .count();
    if present != removed.len() {
        return Err(StateError::Incremental(
            "it removes Services this agent does not have".into(),
        ));
    }
    base.services.retain(|s| {
        let key = service_key(s);
        !removed.contains(key.as_str()) && !upserted.contains(&key)
    });
    base.services.extend(update.services.iter().cloned());
    Ok(DiscoveryResponse {
        workloads: base.workloads,
        services: base.services,
        incremental: false,
        removed_workloads: Vec::new(),
        removed_services: Vec::new(),
        ..update.clone()
    })
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
