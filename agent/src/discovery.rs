//! The node's view of the mesh, pushed by the control plane over a gRPC stream: workloads
//! (so that a destination IP maps to a workload and the identities it may present) and the
//! trust bundle. Every version is validated whole; a bad one is NACKed and changes nothing.
use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, RwLock},
    time::Duration,
};

use meshlet_proto::v1::{
    discovery_request, discovery_service_client::DiscoveryServiceClient, Ack, DiscoveryRequest,
    DiscoveryResponse, Hello, Nack,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::transport::Channel;

use crate::{identity::SpiffeId, policy::PolicySet, tls::TrustBundle};

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("workload {workload} (uid {uid}): IP {ip:?} is not an IP address; fix the workload's ips in the control plane")]
    BadIp {
        workload: String,
        uid: String,
        ip: String,
    },
    #[error("workload {workload} (uid {uid}): {source}")]
    BadIdentity {
        workload: String,
        uid: String,
        source: crate::identity::SpiffeIdError,
    },
    #[error("workload with uid {uid:?} has an empty uid, namespace, name or node")]
    MissingField { uid: String },
    #[error("IP {ip} belongs to both {first} and {second}; each IP must name one workload")]
    DuplicateIp {
        ip: IpAddr,
        first: String,
        second: String,
    },
    #[error("workload {workload}: probe port {port} is not a port a kubelet probe can use (1-65535, not one of the agent's own ports); fix its probe_ports")]
    BadProbePort { workload: String, port: u32 },
    #[error("uid {0} appears twice")]
    DuplicateUid(String),
    #[error("trust bundle refused: {0}")]
    TrustBundle(#[from] crate::tls::TlsError),
    #[error("policy refused: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    #[error("version {got} is not newer than the applied version {applied} of this stream")]
    OldVersion { got: u64, applied: u64 },
}

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
    #[serde(serialize_with = "crate::discovery::display")]
    pub identity: SpiffeId,
}

/// A workload's labels, compact: a sorted slice of shared strings. A mesh of 40 000 workloads
/// held each workload's two labels in a `BTreeMap` of its own (a 544-byte node) beside their
/// own copies of every key and value; label keys and values repeat across workloads, so one
/// update shares each distinct string once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Box<[(Arc<str>, Arc<str>)]>);

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
    fn interned<'a>(
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

#[derive(Debug, Default)]
struct Snapshot {
    version: u64,
    by_uid: HashMap<String, Arc<WorkloadInfo>>,
    by_ip: HashMap<IpAddr, Arc<WorkloadInfo>>,
    policy: Arc<PolicySet>,
    /// The update as applied, for config dumps: protobuf-encoded, a tenth of its decoded size
    /// (labels maps and strings of every workload), decoded only when a dump asks.
    update: Option<Vec<u8>>,
}

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

/// The workloads of the last accepted version.
pub struct Workloads {
    snapshot: RwLock<Arc<Snapshot>>,
    changed: watch::Sender<u64>,
    /// Why the last update from the control plane was not applied (NACK, too large), until
    /// one is: readiness and `meshlet status` show it.
    problem: RwLock<Option<String>>,
}

impl Default for Workloads {
    fn default() -> Self {
        Self {
            snapshot: RwLock::new(Arc::new(Snapshot::default())),
            changed: watch::channel(0).0,
            problem: RwLock::new(None),
        }
    }
}

impl Workloads {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn by_uid(&self, uid: &str) -> Option<Arc<WorkloadInfo>> {
        self.snapshot().by_uid.get(uid).cloned()
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<Arc<WorkloadInfo>> {
        self.snapshot().by_ip.get(&ip).cloned()
    }

    /// A workload by `namespace/name`.
    pub fn by_name(&self, name: &str) -> Option<Arc<WorkloadInfo>> {
        let (namespace, name) = name.split_once('/')?;
        self.snapshot()
            .by_uid
            .values()
            .find(|w| w.namespace == namespace && w.name == name)
            .cloned()
    }

    /// The last accepted update, as the control plane sent it.
    pub fn last_update(&self) -> Option<DiscoveryResponse> {
        let snapshot = self.snapshot();
        let bytes = snapshot.update.as_deref()?;
        // Encoded by us from a message that decoded; cannot fail but for a bug.
        prost::Message::decode(bytes).ok()
    }

    /// Every workload of the mesh, by namespace/name.
    pub fn list(&self) -> Vec<Arc<WorkloadInfo>> {
        let mut list: Vec<_> = self.snapshot().by_uid.values().cloned().collect();
        list.sort_by_key(|w| w.display_name());
        list
    }

    /// The mTLS modes and authorization policies of the last accepted version.
    pub fn policy(&self) -> Arc<PolicySet> {
        self.snapshot().policy.clone()
    }

    pub fn version(&self) -> u64 {
        self.snapshot().version
    }

    /// The workloads the control plane places on `node`.
    pub fn on_node(&self, node: &str) -> Vec<Arc<WorkloadInfo>> {
        self.snapshot()
            .by_uid
            .values()
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

    fn set_problem(&self, problem: Option<String>) {
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
    ) -> Result<(), DiscoveryError> {
        let applied = self.version();
        if position == StreamPosition::Later && update.version <= applied {
            return Err(DiscoveryError::OldVersion {
                got: update.version,
                applied,
            });
        }
        let mut snapshot = validate(update)?;
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
        snapshot.update = Some(prost::Message::encode_to_vec(update));
        let old = std::mem::replace(
            &mut *self.snapshot.write().unwrap_or_else(|e| e.into_inner()),
            Arc::new(snapshot),
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

fn validate(update: &DiscoveryResponse) -> Result<Snapshot, DiscoveryError> {
    let mut snapshot = Snapshot {
        version: update.version,
        policy: Arc::new(PolicySet::from_proto(
            update.mesh.as_ref(),
            &update.modes,
            &update.policies,
        )?),
        ..Default::default()
    };
    // Label strings shared across the update's workloads.
    let mut strings = HashSet::new();
    for w in &update.workloads {
        if w.uid.is_empty() || w.namespace.is_empty() || w.name.is_empty() || w.node.is_empty() {
            return Err(DiscoveryError::MissingField { uid: w.uid.clone() });
        }
        let workload = format!("{}/{}", w.namespace, w.name);
        let identity = SpiffeId::new(&update.trust_domain, &w.namespace, &w.service_account)
            .map_err(|source| DiscoveryError::BadIdentity {
                workload: workload.clone(),
                uid: w.uid.clone(),
                source,
            })?;
        let mut probe_ports = Vec::with_capacity(w.probe_ports.len());
        for port in &w.probe_ports {
            match u16::try_from(*port) {
                Ok(p) if p != 0 && !meshlet_common::AGENT_PORTS.contains(&p) => probe_ports.push(p),
                _ => {
                    return Err(DiscoveryError::BadProbePort {
                        workload: workload.clone(),
                        port: *port,
                    })
                }
            }
        }
        let mut ips = Vec::with_capacity(w.ips.len());
        for ip in &w.ips {
            ips.push(ip.parse::<IpAddr>().map_err(|_| DiscoveryError::BadIp {
                workload: workload.clone(),
                uid: w.uid.clone(),
                ip: ip.clone(),
            })?);
        }
        let info = Arc::new(WorkloadInfo {
            uid: w.uid.clone(),
            namespace: w.namespace.clone(),
            name: w.name.clone(),
            service_account: w.service_account.clone(),
            node: w.node.clone(),
            ips,
            labels: Labels::interned(w.labels.iter(), &mut strings),
            probe_ports,
            identity,
        });
        for ip in &info.ips {
            if let Some(other) = snapshot.by_ip.insert(*ip, info.clone()) {
                return Err(DiscoveryError::DuplicateIp {
                    ip: *ip,
                    first: other.display_name(),
                    second: info.display_name(),
                });
            }
        }
        if snapshot
            .by_uid
            .insert(info.uid.clone(), info.clone())
            .is_some()
        {
            return Err(DiscoveryError::DuplicateUid(info.uid.clone()));
        }
    }
    Ok(snapshot)
}

/// Follows the control plane's discovery stream for as long as the agent runs; reconnects
/// with backoff and keeps serving the last good state while the control plane is away.
pub async fn follow(
    channel: Channel,
    node: String,
    workloads: Arc<Workloads>,
    bundle: Arc<TrustBundle>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let mut connected = false;
        let result = follow_once(
            channel.clone(),
            &node,
            &workloads,
            &bundle,
            &metrics,
            &mut connected,
        )
        .await;
        metrics.control_plane_connected.set(0);
        // A stream that got going was a success: the next failure starts from the shortest
        // delay again, not from where a long outage left the backoff.
        if connected {
            backoff.reset();
        }
        let wait = backoff.next_delay();
        match result {
            Ok(()) => tracing::warn!("discovery stream ended; reconnecting in {wait:?}"),
            Err(e) => tracing::warn!("discovery stream failed: {e}; reconnecting in {wait:?}"),
        }
        tokio::time::sleep(wait).await;
    }
}

async fn follow_once(
    channel: Channel,
    node: &str,
    workloads: &Workloads,
    bundle: &TrustBundle,
    metrics: &crate::metrics::Metrics,
    connected: &mut bool,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    let hello = DiscoveryRequest {
        kind: Some(discovery_request::Kind::Hello(Hello {
            node: node.to_string(),
        })),
    };
    let _ = tx.send(hello).await;
    let mut client =
        DiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_UPDATE_BYTES);
    let mut responses = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    metrics.control_plane_connected.set(1);
    *connected = true;
    let mut position = StreamPosition::First;
    while let Some(update) = responses.next().await {
        let update = update.inspect_err(|status| {
            if status.code() == tonic::Code::OutOfRange {
                metrics.control_plane_rejected.inc();
                workloads.set_problem(Some(format!(
                    "update too large (the agent takes up to {MAX_UPDATE_BYTES} bytes): {}",
                    status.message()
                )));
            }
        })?;
        let (version, count) = (update.version, update.workloads.len());
        let applied = workloads.apply(&update, bundle, position);
        // The decoded message goes before the next one is read: one copy of a large mesh
        // at a time.
        drop(update);
        if applied.is_ok() {
            position = StreamPosition::Later;
        }
        let kind = match applied {
            Ok(()) => {
                metrics.control_plane_version.set(version as i64);
                tracing::info!(
                    version = version,
                    workloads = count,
                    "applied control-plane update"
                );
                discovery_request::Kind::Ack(Ack { version })
            }
            Err(e) => {
                metrics.control_plane_rejected.inc();
                workloads.set_problem(Some(format!(
                    "version {} refused (NACK), keeping version {}: {e}",
                    version,
                    workloads.version()
                )));
                tracing::error!(
                    version = version,
                    "refused control-plane update (NACK), keeping version {}: {e}",
                    workloads.version()
                );
                discovery_request::Kind::Nack(Nack {
                    version,
                    error: e.to_string(),
                })
            }
        };
        if tx
            .send(DiscoveryRequest { kind: Some(kind) })
            .await
            .is_err()
        {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet_proto::v1::Workload;

    fn workload(uid: &str, ip: &str) -> Workload {
        Workload {
            uid: uid.into(),
            namespace: "default".into(),
            name: format!("pod-{uid}"),
            service_account: "web".into(),
            node: "node-1".into(),
            ips: vec![ip.into()],
            labels: Default::default(),
            probe_ports: vec![],
        }
    }

    fn update(version: u64, workloads: Vec<Workload>) -> DiscoveryResponse {
        DiscoveryResponse {
            version,
            workloads,
            trust_roots_pem: vec![],
            trust_domain: "cluster.local".into(),
            ..Default::default()
        }
    }

    #[test]
    fn validates_whole_updates() {
        let good = validate(&update(1, vec![workload("a", "10.0.0.1")])).expect("valid");
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        assert_eq!(
            good.by_ip[&ip].identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/web"
        );
        let bad_ip = validate(&update(
            2,
            vec![workload("a", "10.0.0.1"), workload("b", "10.0.0.300")],
        ));
        assert!(matches!(bad_ip, Err(DiscoveryError::BadIp { .. })));
        let dup = validate(&update(
            2,
            vec![workload("a", "10.0.0.1"), workload("b", "10.0.0.1")],
        ));
        assert!(matches!(dup, Err(DiscoveryError::DuplicateIp { .. })));
        let mut bad_sa = workload("c", "10.0.0.3");
        bad_sa.service_account = "../x".into();
        assert!(matches!(
            validate(&update(3, vec![bad_sa])),
            Err(DiscoveryError::BadIdentity { .. })
        ));
    }

    #[test]
    fn refused_update_keeps_the_last_good_state() {
        let workloads = Workloads::default();
        let bundle = TrustBundle::default();
        // No roots: refused as a whole, nothing applied.
        assert!(workloads
            .apply(
                &update(1, vec![workload("a", "10.0.0.1")]),
                &bundle,
                StreamPosition::First
            )
            .is_err());
        assert_eq!(workloads.version(), 0);
        assert!(workloads.by_uid("a").is_none());
    }

    /// An update with a real root, so that it validates.
    fn rooted(version: u64, workloads: Vec<Workload>, root_pem: &str) -> DiscoveryResponse {
        let mut u = update(version, workloads);
        u.trust_roots_pem = vec![root_pem.to_string()];
        u
    }

    fn root_pem() -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).expect("root").pem()
    }

    #[test]
    fn a_new_stream_starts_with_a_full_state_whatever_its_version() {
        let workloads = Workloads::default();
        let bundle = TrustBundle::default();
        let root = root_pem();
        // Stream 1: versions 1..=3.
        workloads
            .apply(&rooted(1, vec![], &root), &bundle, StreamPosition::First)
            .expect("first of stream 1");
        workloads
            .apply(
                &rooted(3, vec![workload("a", "10.0.0.1")], &root),
                &bundle,
                StreamPosition::Later,
            )
            .expect("v3");
        // Within the stream an older or equal version is refused, and changes nothing.
        let old = workloads.apply(&rooted(2, vec![], &root), &bundle, StreamPosition::Later);
        assert!(matches!(
            old,
            Err(DiscoveryError::OldVersion { got: 2, applied: 3 })
        ));
        assert!(workloads.by_uid("a").is_some());
        // The control plane restarts and numbers from 1 again: its first update applies...
        workloads
            .apply(
                &rooted(1, vec![workload("b", "10.0.0.2")], &root),
                &bundle,
                StreamPosition::First,
            )
            .expect("first of stream 2");
        assert_eq!(workloads.version(), 1);
        assert!(workloads.by_uid("a").is_none() && workloads.by_uid("b").is_some());
        // ...and so do its later ones.
        workloads
            .apply(&rooted(2, vec![], &root), &bundle, StreamPosition::Later)
            .expect("v2 of stream 2");
        assert_eq!(workloads.version(), 2);
    }

    #[test]
    fn labels_are_shared_sorted_and_read_like_a_map() {
        let mut strings = HashSet::new();
        let a: std::collections::HashMap<String, String> =
            [("app".into(), "api".into()), ("tier".into(), "back".into())].into();
        let b: std::collections::HashMap<String, String> = [("app".into(), "api".into())].into();
        let la = Labels::interned(a.iter(), &mut strings);
        let lb = Labels::interned(b.iter(), &mut strings);
        assert_eq!(la.get("app"), Some("api"));
        assert_eq!(la.get("tier"), Some("back"));
        assert_eq!(la.get("nope"), None);
        assert_eq!(strings.len(), 4, "each distinct string once");
        assert!(
            Arc::ptr_eq(&la.0[0].1, &lb.0[0].1),
            "one copy of a repeated value"
        );
        assert_eq!(
            serde_json::to_value(&la).expect("json"),
            serde_json::json!({"app": "api", "tier": "back"})
        );
    }

    #[test]
    fn the_applied_update_is_kept_for_dumps_as_it_came() {
        let workloads = Workloads::default();
        let bundle = TrustBundle::default();
        let mut update = rooted(7, vec![workload("a", "10.0.0.1")], &root_pem());
        update.workloads[0].labels = [("app".to_string(), "a".to_string())].into();
        workloads
            .apply(&update, &bundle, StreamPosition::First)
            .expect("applied");
        assert_eq!(workloads.last_update(), Some(update));
    }

    #[test]
    fn the_bundle_changes_only_when_its_roots_or_crls_do() {
        let workloads = Workloads::default();
        let bundle = TrustBundle::default();
        let revisions = bundle.subscribe();
        let root = root_pem();
        workloads
            .apply(&rooted(1, vec![], &root), &bundle, StreamPosition::First)
            .expect("v1");
        assert_eq!(*revisions.borrow(), 1);
        // Workloads and policies change; roots do not: live tunnels are not woken.
        workloads
            .apply(
                &rooted(2, vec![workload("a", "10.0.0.1")], &root),
                &bundle,
                StreamPosition::Later,
            )
            .expect("v2");
        assert_eq!(*revisions.borrow(), 1);
        // A second root (a CA rotation) is a change.
        let mut rotated = rooted(3, vec![], &root);
        rotated.trust_roots_pem.push(root_pem());
        workloads
            .apply(&rotated, &bundle, StreamPosition::Later)
            .expect("v3");
        assert_eq!(*revisions.borrow(), 2);
        assert_eq!(bundle.current().domains["cluster.local"].anchors.len(), 2);
    }
}
