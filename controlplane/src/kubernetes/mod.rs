//! Kubernetes as the source of truth: the control plane watches Namespaces, Pods, Services
//! and EndpointSlices (kube-rs reflectors) and turns them into the registry snapshot the
//! discovery stream already publishes. The Kubernetes API is the only store: any replica
//! rebuilds the same state from it.
//!
//! A namespace joins the mesh with the label `meshlet.dev/mesh=enabled`; a pod in it opts out
//! with `meshlet.dev/mesh=disabled`. Only such pods are mesh workloads; a Service's endpoints
//! that are not (pods outside the mesh, addresses of machines) are sent as addresses, which
//! agents dial in plaintext as destinations outside the mesh.
use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

pub mod node_auth;
pub mod policy;

use futures::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{ConfigMap, Container, Namespace, Node, Pod, Probe, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::{reflector, reflector::Store, watcher, WatchStreamExt},
    Api, Client, Resource,
};
use meshlet_proto::v1;
use tokio::sync::{watch, Notify};

use crate::registry::Snapshot;
use policy::{PolicyBook, PolicyKind, PolicyObject};

/// Where the mesh's own resources live: its root-namespace PeerAuthentication and
/// AuthorizationPolicies apply mesh-wide, its ConfigMap `meshlet` holds the mesh settings.
pub const DEFAULT_ROOT_NAMESPACE: &str = "meshlet-system";
/// The mesh settings ConfigMap in the root namespace.
pub const MESH_CONFIG_MAP: &str = "meshlet";

/// What to read from the cluster.
#[derive(Debug, Clone)]
pub struct Options {
    pub root_namespace: String,
    /// Also read `security.istio.io/v1` PeerAuthentications and AuthorizationPolicies.
    pub istio_policies: bool,
    /// The CA's trust domain (the mesh settings may only repeat it).
    pub trust_domain: String,
}

/// The policy APIs read: meshlet's group, and Istio's when asked.
fn policy_apis(istio: bool) -> Vec<(ApiResource, PolicyKind)> {
    let mut groups = vec!["security.meshlet.dev"];
    if istio {
        groups.push("security.istio.io");
    }
    groups
        .into_iter()
        .flat_map(|group| {
            [
                (
                    ApiResource {
                        group: group.into(),
                        version: "v1".into(),
                        api_version: format!("{group}/v1"),
                        kind: "PeerAuthentication".into(),
                        plural: "peerauthentications".into(),
                    },
                    PolicyKind::PeerAuthentication,
                ),
                (
                    ApiResource {
                        group: group.into(),
                        version: "v1".into(),
                        api_version: format!("{group}/v1"),
                        kind: "AuthorizationPolicy".into(),
                        plural: "authorizationpolicies".into(),
                    },
                    PolicyKind::AuthorizationPolicy,
                ),
            ]
        })
        .collect()
}

/// The label that puts a namespace in the mesh (`enabled`) or keeps a pod out (`disabled`).
pub const MESH_LABEL: &str = "meshlet.dev/mesh";
/// The EndpointSlice label naming its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Debug, thiserror::Error)]
pub enum KubernetesError {
    #[error("cannot read the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration (in-cluster service account or $KUBECONFIG): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("cannot make a Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from `kubeconfig`, or from the pod's service account when none is given.
pub async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client, KubernetesError> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubernetesError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|source| KubernetesError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// The cluster as the reflectors hold it.
#[derive(Clone)]
pub struct Cluster {
    namespaces: Store<Namespace>,
    nodes: Store<Node>,
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    config: Store<ConfigMap>,
    policies: Vec<(ApiResource, PolicyKind, Store<DynamicObject>)>,
    options: Options,
    health: Arc<crate::health::Health>,
}

impl Cluster {
    /// The registry snapshot this state describes, as `version`, with the statuses its
    /// policy resources should show.
    fn snapshot(
        &self,
        version: u64,
        book: &mut PolicyBook,
    ) -> (Snapshot, Vec<policy::StatusUpdate>) {
        let mut snapshot = snapshot(
            &self.namespaces.state(),
            &self.pods.state(),
            &self.services.state(),
            &self.slices.state(),
            version,
        );
        snapshot.nodes = Some(members(&self.nodes.state()));
        let states: Vec<(usize, PolicyKind, Vec<Arc<DynamicObject>>)> = self
            .policies
            .iter()
            .enumerate()
            .map(|(i, (_, kind, store))| (i, *kind, store.state()))
            .collect();
        static EMPTY: Value = Value::Null;
        let objects: Vec<PolicyObject<'_>> = states
            .iter()
            .flat_map(|(api, kind, objects)| {
                objects.iter().filter_map(move |o| {
                    let meta = o.meta();
                    Some(PolicyObject {
                        kind: *kind,
                        api: *api,
                        uid: meta.uid.as_deref()?,
                        namespace: meta.namespace.as_deref()?,
                        name: meta.name.as_deref()?,
                        generation: meta.generation,
                        spec: o.data.get("spec").unwrap_or(&EMPTY),
                    })
                })
            })
            .collect();
        let (part, updates) = book.apply(&objects, &self.options.root_namespace);
        snapshot.mesh.mode = part.mesh_mode;
        snapshot.modes = part.modes;
        snapshot.policies = part.policies;
        let problems = self
            .config
            .state()
            .iter()
            .find(|c| c.meta().name.as_deref() == Some(MESH_CONFIG_MAP))
            .map(|config| mesh_settings(config, &self.options.trust_domain, &mut snapshot))
            .unwrap_or_default();
        self.health
            .settings((!problems.is_empty()).then(|| problems.join("; ")));
        (snapshot, updates)
    }
}

use serde_json::Value;

/// The mesh settings of the `meshlet` ConfigMap: `outboundTrafficPolicy` (ALLOW_ANY or
/// REGISTRY_ONLY), `defaultDeny` ("true"/"false"), `certificateLifetime` (like "12h": caps the
/// CA's `--max-cert-lifetime`, never raises it), `trustDomain` (must be the control plane's:
/// it cannot change under a running CA). A bad value is left out (the default, never a guess)
/// and answered as a problem, which readiness shows.
pub fn mesh_settings(
    config: &ConfigMap,
    trust_domain: &str,
    snapshot: &mut Snapshot,
) -> Vec<String> {
    let data = config.data.clone().unwrap_or_default();
    let mut problems = Vec::new();
    for (key, value) in &data {
        match key.as_str() {
            "outboundTrafficPolicy" => match value.as_str() {
                "ALLOW_ANY" | "REGISTRY_ONLY" => {
                    snapshot.mesh.outbound_traffic_policy = value.clone()
                }
                other => problems.push(format!(
                    "outboundTrafficPolicy {other:?} is not ALLOW_ANY or REGISTRY_ONLY (ALLOW_ANY in force)"
                )),
            },
            "defaultDeny" => match value.as_str() {
                "true" => snapshot.mesh.default_deny = true,
                "false" => snapshot.mesh.default_deny = false,
                other => problems.push(format!(
                    "defaultDeny {other:?} is not \"true\" or \"false\" (false in force)"
                )),
            },
            "certificateLifetime" => match humantime::parse_duration(value) {
                Ok(d) if d >= Duration::from_secs(60) => snapshot.certificate_lifetime = Some(d),
                _ => problems.push(format!(
                    "certificateLifetime {value:?} is not a duration of at least a minute, like \"12h\" (--max-cert-lifetime in force)"
                )),
            },
            "trustDomain" if value != trust_domain => problems.push(format!(
                "trustDomain {value:?} is not this control plane's {trust_domain:?}; a trust domain cannot change under a running CA: fix the ConfigMap or --trust-domain"
            )),
            "trustDomain" => {}
            other => problems.push(format!(
                "{other:?} is not a mesh setting (outboundTrafficPolicy, defaultDeny, certificateLifetime, trustDomain)"
            )),
        }
    }
    problems
        .iter_mut()
        .for_each(|p| *p = format!("ConfigMap {MESH_CONFIG_MAP}: {p}"));
    problems
}

/// Starts watching the cluster and returns once every reflector has its first full list, so
/// that the first published state is whole (an agent must never be told of an empty mesh
/// because a list is still on its way). Then every change is a new snapshot, a few
/// milliseconds of changes at a time.
pub async fn watch_cluster(
    client: Client,
    options: Options,
    health: Arc<crate::health::Health>,
) -> watch::Receiver<Snapshot> {
    let changed = Arc::new(Notify::new());
    let watching = Watching {
        changed: changed.clone(),
        health: health.clone(),
    };
    let policies: Vec<(ApiResource, PolicyKind, Store<DynamicObject>)> =
        policy_apis(options.istio_policies)
            .into_iter()
            .map(|(api, kind)| {
                let store = reflect_dynamic(client.clone(), &api, watching.clone());
                (api, kind, store)
            })
            .collect();
    let cluster = Cluster {
        namespaces: reflect(Api::all(client.clone()), watching.clone()),
        nodes: reflect_nodes(Api::all(client.clone()), watching.clone()),
        pods: reflect(Api::all(client.clone()), watching.clone()),
        services: reflect(Api::all(client.clone()), watching.clone()),
        slices: reflect(Api::all(client.clone()), watching.clone()),
        config: reflect(
            Api::namespaced(client.clone(), &options.root_namespace),
            watching.clone(),
        ),
        policies,
        options,
        health,
    };
    tracing::info!("waiting for the first list of namespaces, nodes, pods, services, endpointslices, policies and the mesh settings");
    let _ = cluster.namespaces.wait_until_ready().await;
    let _ = cluster.nodes.wait_until_ready().await;
    let _ = cluster.pods.wait_until_ready().await;
    let _ = cluster.services.wait_until_ready().await;
    let _ = cluster.slices.wait_until_ready().await;
    let _ = cluster.config.wait_until_ready().await;
    for (_, _, store) in &cluster.policies {
        let _ = store.wait_until_ready().await;
    }
    let mut book = PolicyBook::default();
    let (first, updates) = cluster.snapshot(1, &mut book);
    write_statuses(&client, &cluster, updates);
    tracing::info!(
        workloads = first.workloads.len(),
        services = first.services.len(),
        policies = first.policies.len(),
        modes = first.modes.len(),
        "read the cluster"
    );
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        loop {
            changed.notified().await;
            // A burst of changes (a Deployment scaling, a relist) is one update.
            tokio::time::sleep(Duration::from_millis(20)).await;
            let version = tx.borrow().version + 1;
            let (next, updates) = cluster.snapshot(version, &mut book);
            write_statuses(&client, &cluster, updates);
            let same = {
                let current = tx.borrow();
                current.workloads == next.workloads
                    && current.services == next.services
                    && current.modes == next.modes
                    && current.policies == next.policies
                    && current.mesh == next.mesh
                    && current.certificate_lifetime == next.certificate_lifetime
                    && current.nodes == next.nodes
            };
            if same {
                continue;
            }
            for gone in removed_nodes(&tx.borrow(), &next) {
                tracing::warn!(target: "audit", event = "node_removed", node = %gone,
                    "node left the cluster: it is no longer served");
            }
            tracing::info!(
                version,
                workloads = next.workloads.len(),
                services = next.services.len(),
                policies = next.policies.len(),
                modes = next.modes.len(),
                "cluster changed"
            );
            if tx.send(next).is_err() {
                return;
            }
        }
    });
    rx
}

/// Writes policy resources' status conditions (every replica writes the same ones).
fn write_statuses(client: &Client, cluster: &Cluster, updates: Vec<policy::StatusUpdate>) {
    for update in updates {
        let Some((api, _, _)) = cluster.policies.get(update.api) else {
            continue;
        };
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &update.namespace, api);
        tokio::spawn(async move {
            let patch = serde_json::json!({"status": {"conditions": [update.condition]}});
            if let Err(e) = api
                .patch_status(&update.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::warn!(namespace = %update.namespace, name = %update.name, "cannot write the policy's status: {e}");
            }
        });
    }
}

/// A reflector of a resource known at run time (the policy CRDs).
fn reflect_dynamic(client: Client, api: &ApiResource, watching: Watching) -> Store<DynamicObject> {
    let writer = reflector::store::Writer::new(api.clone());
    let reader = writer.as_reader();
    let stream = reflector(
        writer,
        watcher(
            Api::<DynamicObject>::all_with(client, api),
            watcher::Config::default(),
        )
        .default_backoff(),
    );
    drive(stream, api.kind.clone(), watching, || true);
    reader
}

/// What every reflector reports to: the rebuild trigger, and the health readiness reads.
#[derive(Clone)]
struct Watching {
    changed: Arc<Notify>,
    health: Arc<crate::health::Health>,
}

/// Runs a reflector's stream for as long as the control plane runs, notifying `changed` on
/// each event that `relevant` says matters; errors (the API away, a watch refused) are logged
/// and retried by the stream.
fn drive<E: std::fmt::Display>(
    stream: impl futures::Stream<Item = Result<impl Send, E>> + Send + 'static,
    kind: String,
    watching: Watching,
    mut relevant: impl FnMut() -> bool + Send + 'static,
) {
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    watching.health.kubernetes_ok();
                    if relevant() {
                        watching.changed.notify_one();
                    }
                }
                Err(e) => {
                    // Said once per outage (by the health); each retry only at debug.
                    if !watching
                        .health
                        .kubernetes_failed(&format!("watching {kind}s: {e}"))
                    {
                        tracing::debug!(%kind, "watching the Kubernetes API: {e}");
                    }
                }
            }
        }
    });
}

/// A reflector of every `K` in the cluster, notifying `changed` on each event. The watcher
/// relists on a 410 and resumes after a cut watch, with backoff while the API is away; the
/// store keeps the last state meanwhile.
fn reflect<K>(api: Api<K>, watching: Watching) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    drive(stream, K::kind(&()).to_string(), watching, || true);
    reader
}

/// A reflector of the cluster's Nodes, of which only names and deletion matter here: each is
/// kept as its name and deletion timestamp (a Node's status is large and changes at every
/// kubelet report), and only a change of the member set rebuilds the mesh.
fn reflect_nodes(api: Api<Node>, watching: Watching) -> Store<Node> {
    let (reader, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|node: &mut Node| {
                node.spec = None;
                node.status = None;
                let meta = &mut node.metadata;
                meta.managed_fields = None;
                meta.annotations = None;
                meta.labels = None;
            }),
    );
    let store = reader.clone();
    let mut last = None;
    drive(stream, "Node".into(), watching, move || {
        let now = members(&store.state());
        let changed = last.as_ref() != Some(&now);
        last = Some(now);
        changed
    });
    reader
}

/// The registry snapshot of a cluster's state (pure: tested on its own).
pub fn snapshot(
    namespaces: &[Arc<Namespace>],
    pods: &[Arc<Pod>],
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    version: u64,
) -> Snapshot {
    let meshed_namespaces: std::collections::HashSet<&str> = namespaces
        .iter()
        .filter(|n| label(n.meta().labels.as_ref(), MESH_LABEL) == Some("enabled"))
        .filter_map(|n| n.meta().name.as_deref())
        .collect();
    let mut workloads: Vec<v1::Workload> = pods
        .iter()
        .filter_map(|p| workload(p, &meshed_namespaces))
        .collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mesh_uids: std::collections::HashSet<&str> =
        workloads.iter().map(|w| w.uid.as_str()).collect();
    // EndpointSlices by (namespace, service name).
    let mut slices_of: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let meta = slice.meta();
        if let (Some(ns), Some(service)) = (
            meta.namespace.as_deref(),
            label(meta.labels.as_ref(), SERVICE_NAME_LABEL),
        ) {
            slices_of.entry((ns, service)).or_default().push(slice);
        }
    }
    let mut services: Vec<v1::Service> = services
        .iter()
        .filter_map(|s| {
            let meta = s.meta();
            let (ns, name) = (meta.namespace.as_deref()?, meta.name.as_deref()?);
            let slices = slices_of.get(&(ns, name)).map(Vec::as_slice).unwrap_or(&[]);
            service(s, slices, &mesh_uids)
        })
        .collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    let mut excluded_pods: Vec<String> = pods
        .iter()
        .filter(|p| {
            let meta = p.meta();
            meta.namespace
                .as_deref()
                .is_some_and(|ns| meshed_namespaces.contains(ns))
                && label(meta.labels.as_ref(), MESH_LABEL) == Some("disabled")
        })
        .filter_map(|p| p.meta().uid.clone())
        .collect();
    excluded_pods.sort();
    let mut namespaces: Vec<String> = meshed_namespaces.iter().map(|n| n.to_string()).collect();
    namespaces.sort();
    Snapshot {
        version,
        workloads,
        services,
        scope: v1::MeshScope {
            namespaces,
            excluded_pods,
        },
        ..Default::default()
    }
}

/// The nodes a cluster has: its Node objects, less those being deleted (a node on its way out
/// gets no new certificate).
fn members(nodes: &[Arc<Node>]) -> std::collections::BTreeSet<String> {
    nodes
        .iter()
        .filter(|n| n.meta().deletion_timestamp.is_none())
        .filter_map(|n| n.meta().name.clone())
        .collect()
}

/// The nodes `before` served and `after` does not.
fn removed_nodes(before: &Snapshot, after: &Snapshot) -> Vec<String> {
    match (&before.nodes, &after.nodes) {
        (Some(before), Some(after)) => before.difference(after).cloned().collect(),
        _ => Vec::new(),
    }
}

fn label<'a>(labels: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.and_then(|l| l.get(key)).map(String::as_str)
}

/// A pod as a mesh workload, when it is one: in a mesh namespace, not opted out, scheduled,
/// with addresses, not finished, not on the host's network (its address is the node's).
fn workload(pod: &Pod, meshed: &std::collections::HashSet<&str>) -> Option<v1::Workload> {
    let meta = pod.meta();
    let namespace = meta.namespace.as_deref()?;
    if !meshed.contains(namespace) || label(meta.labels.as_ref(), MESH_LABEL) == Some("disabled") {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref()?;
    if spec.host_network == Some(true)
        || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    let node = spec.node_name.clone()?;
    let ips: Vec<String> = status
        .pod_ips
        .iter()
        .flatten()
        .map(|ip| ip.ip.clone())
        .filter(|ip| !ip.is_empty())
        .collect();
    if ips.is_empty() {
        return None;
    }
    let mut probe_ports: Vec<u32> = spec
        .containers
        .iter()
        .flat_map(|c| {
            [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
                .into_iter()
                .flatten()
                .filter_map(move |probe| probe_port(c, probe))
        })
        .collect();
    probe_ports.sort_unstable();
    probe_ports.dedup();
    Some(v1::Workload {
        uid: meta.uid.clone()?,
        namespace: namespace.to_string(),
        name: meta.name.clone()?,
        service_account: spec
            .service_account_name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        node,
        ips,
        labels: meta
            .labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        probe_ports,
    })
}

/// The port a kubelet probe connects to (HTTP, TCP or gRPC), its name resolved through the
/// container's ports. Exec probes connect to nothing.
fn probe_port(container: &Container, probe: &Probe) -> Option<u32> {
    let port = probe
        .http_get
        .as_ref()
        .map(|h| h.port.clone())
        .or_else(|| probe.tcp_socket.as_ref().map(|t| t.port.clone()))
        .or_else(|| probe.grpc.as_ref().map(|g| IntOrString::Int(g.port)))?;
    match port {
        IntOrString::Int(n) => u32::try_from(n).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u32::try_from(p.container_port).ok()),
    }
}

/// A Service with its endpoints from its EndpointSlices (one per family in a dual-stack
/// cluster: an endpoint's addresses are merged by the pod they name).
fn service(
    s: &Service,
    slices: &[&EndpointSlice],
    mesh_uids: &std::collections::HashSet<&str>,
) -> Option<v1::Service> {
    let meta = s.meta();
    let spec = s.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let cluster_ips: Vec<String> = spec
        .cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default()
        .into_iter()
        .filter(|ip| !ip.is_empty() && ip != "None")
        .collect();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let (target_port, target_port_name) = match &p.target_port {
                Some(IntOrString::Int(n)) => (u32::try_from(*n).unwrap_or(0), String::new()),
                Some(IntOrString::String(name)) => (0, name.clone()),
                None => (0, String::new()),
            };
            v1::ServicePort {
                name: p.name.clone().unwrap_or_default(),
                port: u32::try_from(p.port).unwrap_or(0),
                target_port,
                target_port_name,
                protocol: p.protocol.clone().unwrap_or_default(),
            }
        })
        .collect();
    // Endpoints keyed by the pod they name, else by their first address.
    let mut endpoints: BTreeMap<String, v1::Endpoint> = BTreeMap::new();
    for slice in slices {
        let named: HashMap<String, u32> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| Some((p.name.clone()?, u32::try_from(p.port?).ok()?)))
            .filter(|(name, _)| !name.is_empty())
            .collect();
        for e in &slice.endpoints {
            let pod_uid = e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.uid.clone());
            let key = pod_uid
                .clone()
                .or_else(|| e.addresses.first().cloned())
                .unwrap_or_default();
            let conditions = e.conditions.as_ref();
            // The API: a nil `ready` is true; a nil `serving` follows `ready`; a nil
            // `terminating` is false.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let serving = conditions.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            let entry = endpoints.entry(key).or_insert_with(|| v1::Endpoint {
                workload_uid: pod_uid
                    .filter(|uid| mesh_uids.contains(uid.as_str()))
                    .unwrap_or_default(),
                ready,
                serving,
                terminating,
                ..Default::default()
            });
            entry.addresses.extend(e.addresses.iter().cloned());
            entry.ready &= ready;
            entry.serving &= serving;
            entry.terminating |= terminating;
            entry.ports.extend(named.clone());
        }
    }
    Some(v1::Service {
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
        cluster_ips,
        ports,
        endpoints: endpoints.into_values().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn from<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(v).expect("object"))
    }

    fn pod(ns: &str, name: &str, ips: &[&str], labels: serde_json::Value) -> Arc<Pod> {
        from(json!({
            "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}"), "labels": labels},
            "spec": {"nodeName": "node-1", "serviceAccountName": "api",
                     "containers": [{"name": "app", "ports": [{"name": "http", "containerPort": 8080}],
                                     "readinessProbe": {"httpGet": {"port": "http"}},
                                     "livenessProbe": {"tcpSocket": {"port": 9090}}}]},
            "status": {"phase": "Running", "podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()},
        }))
    }

    #[test]
    fn nodes_being_deleted_are_not_members() {
        let nodes: Vec<Arc<Node>> = vec![
            from(json!({"metadata": {"name": "node-1"}})),
            from(
                json!({"metadata": {"name": "node-2", "deletionTimestamp": "2026-11-30T10:00:00Z"}}),
            ),
        ];
        let members = members(&nodes);
        assert_eq!(members, ["node-1".to_string()].into());
        let before = Snapshot {
            nodes: Some(["node-1".to_string(), "node-2".to_string()].into()),
            ..Default::default()
        };
        let after = Snapshot {
            nodes: Some(members),
            ..Default::default()
        };
        assert_eq!(removed_nodes(&before, &after), vec!["node-2".to_string()]);
        assert!(after.admits_node("node-1").is_ok());
        assert!(after.admits_node("node-2").is_err());
        // The file registry knows no nodes: whoever holds a node certificate is served.
        assert!(Snapshot::default().admits_node("node-9").is_ok());
    }

    #[test]
    fn mesh_settings_apply_and_bad_ones_are_named() {
        let config: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": MESH_CONFIG_MAP, "namespace": "meshlet-system"},
            "data": {"outboundTrafficPolicy": "REGISTRY_ONLY", "defaultDeny": "true",
                     "certificateLifetime": "2h", "trustDomain": "cluster.local"},
        }))
        .expect("config map");
        let mut s = Snapshot::default();
        assert!(mesh_settings(&config, "cluster.local", &mut s).is_empty());
        assert_eq!(s.mesh.outbound_traffic_policy, "REGISTRY_ONLY");
        assert!(s.mesh.default_deny);
        assert_eq!(s.certificate_lifetime, Some(Duration::from_secs(7200)));
        let bad: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": MESH_CONFIG_MAP},
            "data": {"outboundTrafficPolicy": "DENY", "certificateLifetime": "5s",
                     "trustDomain": "other.local", "colour": "blue"},
        }))
        .expect("config map");
        let mut s = Snapshot::default();
        let problems = mesh_settings(&bad, "cluster.local", &mut s).join("\n");
        for needle in [
            "outboundTrafficPolicy \"DENY\"",
            "certificateLifetime \"5s\"",
            "trustDomain \"other.local\"",
            "\"colour\" is not a mesh setting",
        ] {
            assert!(problems.contains(needle), "{problems}");
        }
        assert_eq!(s.mesh.outbound_traffic_policy, "");
        assert_eq!(s.certificate_lifetime, None);
    }

    #[test]
    fn mesh_namespaces_pods_services_and_slices_become_the_registry() {
        let namespaces = vec![
            from(json!({"metadata": {"name": "default", "labels": {MESH_LABEL: "enabled"}}})),
            from(json!({"metadata": {"name": "plain"}})),
        ];
        let pods = vec![
            pod(
                "default",
                "api-1",
                &["10.244.1.2", "fd00::2"],
                json!({"app": "api"}),
            ),
            pod(
                "default",
                "out",
                &["10.244.1.3"],
                json!({MESH_LABEL: "disabled"}),
            ),
            pod("plain", "legacy", &["10.244.1.4"], json!({})),
            pod("default", "pending", &[], json!({})),
        ];
        let services = vec![
            from(json!({"metadata": {"namespace": "default", "name": "api"},
                        "spec": {"clusterIPs": ["10.96.0.10", "fd00:96::10"],
                                 "ports": [{"name": "web", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})),
            from(
                json!({"metadata": {"namespace": "default", "name": "headless"},
                        "spec": {"clusterIP": "None", "ports": [{"port": 5432}]}}),
            ),
        ];
        let slice = |family: &str, address: &str, uid: &str, ready: Option<bool>| {
            from::<EndpointSlice>(json!({
                "metadata": {"namespace": "default", "name": format!("api-{family}-{uid}"),
                             "labels": {SERVICE_NAME_LABEL: "api"}},
                "addressType": family,
                "ports": [{"name": "http", "port": 8080}],
                "endpoints": [{"addresses": [address], "conditions": {"ready": ready},
                               "targetRef": {"kind": "Pod", "uid": uid}}],
            }))
        };
        let slices = vec![
            slice("IPv4", "10.244.1.2", "uid-api-1", Some(true)),
            slice("IPv6", "fd00::2", "uid-api-1", None),
            slice("IPv4", "10.244.1.4", "uid-legacy", Some(false)),
        ];
        let s = snapshot(&namespaces, &pods, &services, &slices, 7);
        assert_eq!(s.version, 7);
        let uids: Vec<&str> = s.workloads.iter().map(|w| w.uid.as_str()).collect();
        assert_eq!(
            uids,
            ["uid-api-1"],
            "only running pods of mesh namespaces, not opted out"
        );
        let api = &s.workloads[0];
        assert_eq!(api.ips, ["10.244.1.2", "fd00::2"]);
        assert_eq!(api.service_account, "api");
        assert_eq!(api.node, "node-1");
        assert_eq!(api.probe_ports, [8080, 9090], "named probe ports resolved");
        let svc = &s.services[0];
        assert_eq!(svc.name, "api");
        assert_eq!(svc.cluster_ips, ["10.96.0.10", "fd00:96::10"]);
        assert_eq!(svc.ports[0].target_port_name, "http");
        assert_eq!(svc.endpoints.len(), 2);
        let mesh = svc
            .endpoints
            .iter()
            .find(|e| e.workload_uid == "uid-api-1")
            .expect("the mesh endpoint");
        assert_eq!(
            mesh.addresses,
            ["10.244.1.2", "fd00::2"],
            "both families merged"
        );
        assert!(mesh.ready, "a nil ready is ready");
        assert_eq!(mesh.ports.get("http"), Some(&8080));
        let outside = svc
            .endpoints
            .iter()
            .find(|e| e.workload_uid.is_empty())
            .expect("the endpoint outside the mesh");
        assert_eq!(outside.addresses, ["10.244.1.4"]);
        assert!(!outside.ready);
        assert!(
            s.services[1].cluster_ips.is_empty(),
            "headless: no cluster IP"
        );
    }
}
