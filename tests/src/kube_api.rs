//! An emulation of the Kubernetes API server, for the lab's Kubernetes mode (no kube-apiserver
//! can run on these machines). It speaks the wire contract of the Kubernetes API reference that
//! the control plane's kube-rs client and the real `kubectl` use:
//!
//! - discovery: `/version`, `/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`;
//! - collections (all namespaces and per namespace) and items of the resources below, as JSON:
//!   `GET` (list, with `metadata.resourceVersion`; `labelSelector` `k=v`, `k!=v`, `k`, `!k`;
//!   `fieldSelector` `metadata.name=` / `metadata.namespace=`), `POST` (create: uid,
//!   resourceVersion, creationTimestamp; 409 when it exists), `PUT` (replace; 409 on a stale
//!   `resourceVersion`; the `status` subresource apart), `PATCH` (JSON merge patch, also for
//!   strategic merge patches of maps, which is what `kubectl label` sends), `DELETE`;
//! - watches (`?watch=1&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=S`):
//!   newline-delimited `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": …}` events
//!   after N, from a bounded history; a version older than the history gets the `ERROR` event
//!   with a `Status` of code 410 (`Expired`), as the real server does; no version: the current
//!   objects as `ADDED` first;
//! - paged lists (`limit`, `continue`; `metadata.continue` and `remainingItemCount`), each page
//!   from the snapshot the first one was cut from, as etcd serves them; a continue token that
//!   has expired (after [`PAGE_LIFETIME`], or pushed out by [`OPEN_LISTS`] newer ones) gets 410
//!   `Expired`. kube-rs's watcher lists in pages of 500, kubectl in chunks of 500;
//! - custom resources held to the chart's CRD schemas ([`crate::kube_schema`]): undeclared
//!   fields pruned, or refused under `fieldValidation=Strict`; types and enums checked;
//! - errors as `Status` objects (`NotFound`, `AlreadyExists`, `Conflict`, `Expired`).
//!
//! Tests can cut every open watch, forget the history (forcing 410 on resume) and stop
//! answering, to exercise the controller's recovery. Resources: namespaces, nodes, pods,
//! services (core/v1), endpointslices (discovery.k8s.io/v1).
use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// A resource the emulation serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Resource {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short: &'static [&'static str],
}

impl Resource {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

pub const NAMESPACES: Resource = Resource {
    group: "",
    version: "v1",
    plural: "namespaces",
    kind: "Namespace",
    namespaced: false,
    short: &["ns"],
};
pub const NODES: Resource = Resource {
    group: "",
    version: "v1",
    plural: "nodes",
    kind: "Node",
    namespaced: false,
    short: &["no"],
};
pub const PODS: Resource = Resource {
    group: "",
    version: "v1",
    plural: "pods",
    kind: "Pod",
    namespaced: true,
    short: &["po"],
};
pub const SERVICES: Resource = Resource {
    group: "",
    version: "v1",
    plural: "services",
    kind: "Service",
    namespaced: true,
    short: &["svc"],
};
pub const ENDPOINT_SLICES: Resource = Resource {
    group: "discovery.k8s.io",
    version: "v1",
    plural: "endpointslices",
    kind: "EndpointSlice",
    namespaced: true,
    short: &[],
};

pub const CONFIG_MAPS: Resource = Resource {
    group: "",
    version: "v1",
    plural: "configmaps",
    kind: "ConfigMap",
    namespaced: true,
    short: &["cm"],
};
pub const PEER_AUTHENTICATIONS: Resource = Resource {
    group: "security.meshlet.dev",
    version: "v1",
    plural: "peerauthentications",
    kind: "PeerAuthentication",
    namespaced: true,
    short: &["pa"],
};
pub const AUTHORIZATION_POLICIES: Resource = Resource {
    group: "security.meshlet.dev",
    version: "v1",
    plural: "authorizationpolicies",
    kind: "AuthorizationPolicy",
    namespaced: true,
    short: &["ap"],
};
pub const ISTIO_PEER_AUTHENTICATIONS: Resource = Resource {
    group: "security.istio.io",
    ..PEER_AUTHENTICATIONS
};
pub const ISTIO_AUTHORIZATION_POLICIES: Resource = Resource {
    group: "security.istio.io",
    ..AUTHORIZATION_POLICIES
};

pub const TOKEN_REVIEWS: Resource = Resource {
    group: "authentication.k8s.io",
    version: "v1",
    plural: "tokenreviews",
    kind: "TokenReview",
    namespaced: false,
    short: &[],
};

/// The resources served: core and discovery ones, and the CRDs `deploy/` installs (meshlet's
/// policy kinds, and Istio's for clusters that keep them).
const RESOURCES: &[Resource] = &[
    NAMESPACES,
    NODES,
    PODS,
    SERVICES,
    CONFIG_MAPS,
    ENDPOINT_SLICES,
    PEER_AUTHENTICATIONS,
    AUTHORIZATION_POLICIES,
    ISTIO_PEER_AUTHENTICATIONS,
    ISTIO_AUTHORIZATION_POLICIES,
    TOKEN_REVIEWS,
];

/// How many events a watch can resume from; older versions get 410.
const HISTORY: usize = 4096;

#[derive(Debug, Clone)]
struct Event {
    resource: Resource,
    kind: &'static str,
    object: Value,
    version: u64,
}

/// How long a paged list's continue token lasts (the API server's default etcd compaction
/// interval: past it the snapshot is gone).
pub const PAGE_LIFETIME: Duration = Duration::from_secs(300);
/// How many paged lists may be open at once; the oldest token expires first.
pub const OPEN_LISTS: usize = 64;

/// The rest of paged lists, by continue token: what is left of the snapshot their first page
/// was cut from.
#[derive(Default)]
struct Pages {
    next: u64,
    open: BTreeMap<u64, Page>,
}

struct Page {
    created: std::time::Instant,
    resource_version: String,
    rest: VecDeque<Value>,
}

#[derive(Default)]
struct Objects {
    version: u64,
    /// (resource plural, namespace, name) → object.
    items: BTreeMap<(&'static str, String, String), Value>,
    history: VecDeque<Event>,
    /// Versions at or below this are no longer in the history.
    compacted: u64,
}

/// The emulated API server's state, shared by its handlers and the lab.
pub struct KubeApi {
    objects: Mutex<Objects>,
    pages: Mutex<Pages>,
    events: broadcast::Sender<Event>,
    /// Bumped to end every open watch.
    cuts: broadcast::Sender<()>,
    /// While set, the API server is "down": connections are refused (closed at once) and open
    /// ones, watches included, are dropped, as when the process is gone.
    down: AtomicBool,
    down_signal: tokio::sync::watch::Sender<bool>,
    uids: AtomicU64,
    /// Signs the service account tokens it mints (HS256; only this server verifies them).
    signing_key: [u8; 32],
    /// Bearer token → (user, ClusterRole rules) for callers held to a role; any other
    /// caller is an administrator.
    roles: Mutex<BTreeMap<String, (String, Vec<Rule>)>>,
    /// The serving certificate's CA (PEM), for kubeconfigs: clients send their bearer token
    /// only over TLS, as kubectl does.
    ca_pem: String,
    pub addr: SocketAddr,
}

/// Holds `object` to its kind's schema (see [`crate::kube_schema`]), as the API server does on
/// every write.
fn admit(resource: Resource, object: &mut Value, strict: bool) -> Result<(), ApiError> {
    use crate::kube_schema::SchemaError;
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    crate::kube_schema::admit(resource.group, resource.plural, object, strict).map_err(
        |e| match e {
            SchemaError::Unknown(fields) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!(
                    "{}: strict decoding error: {}",
                    resource.kind,
                    fields
                        .iter()
                        .map(|f| format!("unknown field \"{f}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            SchemaError::Invalid(errors) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                format!(
                    "{}.{} \"{name}\" is invalid: [{}]",
                    resource.kind,
                    resource.group,
                    errors.join(", ")
                ),
            ),
        },
    )
}

/// An API error, answered as a `Status`.
#[derive(Debug)]
pub struct ApiError {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

impl ApiError {
    fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    fn status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code.as_u16(),
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.code, json_body(&self.status())).into_response()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

fn json_body(v: &Value) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl KubeApi {
    /// Starts the emulation on https://127.0.0.1 (a free port) in the current tokio runtime,
    /// with a certificate from a CA of its own.
    pub async fn start() -> anyhow::Result<Arc<Self>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (ca_pem, tls) = serving_tls()?;
        let api = Arc::new(Self {
            objects: Mutex::new(Objects::default()),
            pages: Mutex::new(Pages::default()),
            events: broadcast::channel(HISTORY).0,
            cuts: broadcast::channel(4).0,
            down: AtomicBool::new(false),
            down_signal: tokio::sync::watch::channel(false).0,
            uids: AtomicU64::new(1),
            signing_key: rand::random(),
            roles: Mutex::new(BTreeMap::new()),
            ca_pem,
            addr: listener.local_addr()?,
        });
        let state = api.clone();
        let router = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let api = state.clone();
                async move { api.handle(method, uri, headers, body).await }
            },
        );
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let server = api.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                if server.down.load(Ordering::SeqCst) {
                    drop(tcp);
                    continue;
                }
                let (acceptor, router) = (acceptor.clone(), router.clone());
                let mut down = server.down_signal.subscribe();
                tokio::spawn(async move {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(router);
                    let connection = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    // Going down drops the connection, as a dead server would.
                    tokio::select! {
                        _ = connection => {}
                        _ = down.wait_for(|d| *d) => {}
                    }
                });
            }
        });
        Ok(api)
    }

    /// A kubeconfig for this server (its CA, a bearer token).
    pub fn kubeconfig(&self, token: &str) -> String {
        use base64::Engine;
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://{}\n    certificate-authority-data: {ca}\ncontexts:\n- name: lab\n  context:\n    cluster: lab\n    user: lab\ncurrent-context: lab\nusers:\n- name: lab\n  user:\n    token: {token}\n",
            self.addr
        )
    }

    /// Holds the caller with bearer `token` (acting as `user`) to the rules of the
    /// ClusterRole named `role` in the YAML documents `manifests` (as `deploy/` ships them): a
    /// request those rules do not allow gets 403 Forbidden.
    pub fn bind_role(
        &self,
        token: &str,
        user: &str,
        manifests: &str,
        role: &str,
    ) -> anyhow::Result<()> {
        let mut rules = None;
        for document in serde_norway::Deserializer::from_str(manifests) {
            let value: Value = serde::Deserialize::deserialize(document)?;
            if value["kind"] == "ClusterRole" && value["metadata"]["name"] == role {
                rules = Some(serde_json::from_value::<Vec<Rule>>(value["rules"].clone())?);
            }
        }
        let rules =
            rules.ok_or_else(|| anyhow::anyhow!("no ClusterRole {role} in the manifests"))?;
        self.roles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(token.to_string(), (user.to_string(), rules));
        Ok(())
    }

    /// RBAC: whether the caller may `verb` the target (403 with the real server's words if
    /// not).
    fn authorize(&self, headers: &HeaderMap, verb: &str, target: &Target) -> Result<(), ApiError> {
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        let roles = self.roles.lock().unwrap_or_else(|e| e.into_inner());
        let Some((user, rules)) = roles.get(token) else {
            return Ok(());
        };
        let resource = match target.subresource {
            Subresource::Whole => target.resource.plural.to_string(),
            Subresource::Status => format!("{}/status", target.resource.plural),
        };
        let allowed = rules.iter().any(|r| {
            r.api_groups
                .iter()
                .any(|g| g == target.resource.group || g == "*")
                && r.resources.iter().any(|x| *x == resource || x == "*")
                && r.verbs.iter().any(|v| v == verb || v == "*")
        });
        if allowed {
            return Ok(());
        }
        let scope = match &target.namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".into(),
        };
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{resource} is forbidden: User \"{user}\" cannot {verb} resource \"{resource}\" in API group \"{}\" {scope}",
                target.resource.group
            ),
        ))
    }

    /// A projected service account token, as the kubelet would mount in `pod` (of
    /// `namespace`, running as `service_account`): a JWT for `audience`, valid `ttl` from now
    /// (negative: already expired), bound to the pod's name and uid.
    pub fn mint_token(
        &self,
        namespace: &str,
        service_account: &str,
        pod: &str,
        audience: &str,
        ttl_seconds: i64,
    ) -> Result<String, ApiError> {
        use base64::Engine;
        let uid = self
            .get(PODS, namespace, pod)
            .and_then(|p| p["metadata"]["uid"].as_str().map(str::to_string))
            .ok_or_else(|| not_found(PODS, pod))?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = json!({
            "iss": "https://kubernetes.default.svc.cluster.local", "aud": [audience],
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "iat": now, "nbf": now, "exp": now + ttl_seconds,
            "kubernetes.io": {"namespace": namespace, "pod": {"name": pod, "uid": uid},
                              "serviceaccount": {"name": service_account}},
        });
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let signing_input = format!(
            "{}.{}",
            b64.encode(json!({"alg": "HS256", "typ": "JWT"}).to_string()),
            b64.encode(claims.to_string())
        );
        let signature = b64.encode(self.sign(signing_input.as_bytes()));
        Ok(format!("{signing_input}.{signature}"))
    }

    /// The HMAC of `data` under the signing key, ready to finish or verify.
    fn mac(&self, data: &[u8]) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.signing_key)
            .expect("HMAC takes any key length");
        mac.update(data);
        mac
    }

    fn sign(&self, data: &[u8]) -> Vec<u8> {
        hmac::Mac::finalize(self.mac(data)).into_bytes().to_vec()
    }

    /// `TokenReview` (authentication.k8s.io/v1): the status the real server gives a bound
    /// service account token: authenticated, the user, the pod claims as extras and the
    /// audiences it is valid for; or not authenticated, with why.
    fn review(&self, review: &Value) -> Value {
        let token = review["spec"]["token"].as_str().unwrap_or_default();
        let wanted = strings(&review["spec"]["audiences"]);
        let status = match self.verify(token, &wanted) {
            Ok(status) => status,
            Err(error) => json!({"authenticated": false, "error": error}),
        };
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
               "metadata": {"creationTimestamp": null}, "spec": review["spec"], "status": status})
    }

    fn verify(&self, token: &str, wanted: &[String]) -> Result<Value, String> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let invalid = || "invalid bearer token".to_string();
        let (signing_input, signature) = token.rsplit_once('.').ok_or_else(invalid)?;
        let signature = b64.decode(signature).map_err(|_| invalid())?;
        hmac::Mac::verify_slice(self.mac(signing_input.as_bytes()), &signature)
            .map_err(|_| invalid())?;
        let claims = signing_input.split('.').nth(1).ok_or_else(invalid)?;
        let claims: Value = serde_json::from_slice(&b64.decode(claims).map_err(|_| invalid())?)
            .map_err(|_| invalid())?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if claims["exp"].as_i64().is_none_or(|exp| exp < now) {
            return Err("[invalid bearer token, service account token has expired]".into());
        }
        let audiences = strings(&claims["aud"]);
        let granted: Vec<String> = if wanted.is_empty() {
            audiences.clone()
        } else {
            wanted
                .iter()
                .filter(|w| audiences.contains(w))
                .cloned()
                .collect()
        };
        if granted.is_empty() {
            return Err("[invalid bearer token, token audiences don't match]".into());
        }
        let k8s = &claims["kubernetes.io"];
        let namespace = k8s["namespace"].as_str().unwrap_or_default();
        let pod = k8s["pod"]["name"].as_str().unwrap_or_default();
        let uid = k8s["pod"]["uid"].as_str().unwrap_or_default();
        // A bound token dies with its pod (the real server checks the bound object).
        match self.get(PODS, namespace, pod) {
            Some(p) if p["metadata"]["uid"].as_str() == Some(uid) => {}
            Some(_) => {
                return Err(format!(
                    "[invalid bearer token, pod {pod} has a different uid than the token's {uid}]"
                ))
            }
            None => return Err(format!("[invalid bearer token, pods \"{pod}\" not found]")),
        }
        let username = claims["sub"].as_str().unwrap_or_default();
        Ok(json!({
            "authenticated": true,
            "user": {"username": username,
                     "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"],
                     "extra": {"authentication.kubernetes.io/pod-name": [pod],
                               "authentication.kubernetes.io/pod-uid": [uid]}},
            "audiences": granted,
        }))
    }

    /// Ends every open watch (clients resume from their last version).
    pub fn cut_watches(&self) {
        let _ = self.cuts.send(());
    }

    /// Forgets the event history: a watch resumed from any earlier version gets 410 Gone.
    pub fn compact(&self) {
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        objects.history.clear();
        objects.compacted = objects.version;
    }

    /// While `down`, the server is as if gone: new connections are closed at once, open
    /// ones (and their watches) are dropped.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        self.down_signal.send_replace(down);
        if down {
            self.cut_watches();
        }
    }

    /// Creates `object` (of `resource`, in `namespace` when namespaced).
    pub fn create(&self, resource: Resource, mut object: Value) -> Result<Value, ApiError> {
        admit(resource, &mut object, true)?;
        let namespace = object["metadata"]["namespace"].as_str().map(str::to_string);
        self.create_in(resource, namespace.as_deref(), object)
    }

    /// Replaces `object` (metadata.name and namespace name it), keeping its uid.
    pub fn replace(&self, resource: Resource, mut object: Value) -> Result<Value, ApiError> {
        admit(resource, &mut object, true)?;
        let namespace = object["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.update(resource, &namespace, &name, object, Subresource::Whole)
    }

    /// Deletes an object.
    pub fn delete(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
    ) -> Result<Value, ApiError> {
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        let key = key(resource, namespace, name);
        let Some(mut object) = objects.items.remove(&key) else {
            return Err(not_found(resource, name));
        };
        objects.version += 1;
        object["metadata"]["resourceVersion"] = json!(objects.version.to_string());
        self.record(&mut objects, resource, "DELETED", object.clone());
        Ok(object)
    }

    /// An object, if it exists.
    pub fn get(&self, resource: Resource, namespace: &str, name: &str) -> Option<Value> {
        let objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        objects.items.get(&key(resource, namespace, name)).cloned()
    }

    fn create_in(
        &self,
        resource: Resource,
        namespace: Option<&str>,
        mut object: Value,
    ) -> Result<Value, ApiError> {
        let name = object["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Invalid",
                    "metadata.name: Required value",
                )
            })?
            .to_string();
        let namespace = if resource.namespaced {
            namespace.unwrap_or("default").to_string()
        } else {
            String::new()
        };
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        let key = (resource.plural, namespace.clone(), name.clone());
        if objects.items.contains_key(&key) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", resource.plural),
            ));
        }
        objects.version += 1;
        let uid = object["metadata"]["uid"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| {
                format!(
                    "00000000-0000-4000-8000-{:012x}",
                    self.uids.fetch_add(1, Ordering::Relaxed)
                )
            });
        object["apiVersion"] = json!(resource.api_version());
        object["kind"] = json!(resource.kind);
        let meta = &mut object["metadata"];
        meta["uid"] = json!(uid);
        meta["resourceVersion"] = json!(objects.version.to_string());
        meta["creationTimestamp"] = json!(now_rfc3339());
        meta["generation"] = json!(1);
        if resource.namespaced {
            meta["namespace"] = json!(namespace);
        }
        objects.items.insert(key, object.clone());
        self.record(&mut objects, resource, "ADDED", object.clone());
        Ok(object)
    }

    fn update(
        &self,
        resource: Resource,
        namespace: &str,
        name: &str,
        mut object: Value,
        part: Subresource,
    ) -> Result<Value, ApiError> {
        let mut objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
        let key = key(resource, namespace, name);
        let Some(current) = objects.items.get(&key).cloned() else {
            return Err(not_found(resource, name));
        };
        if let Some(given) = object["metadata"]["resourceVersion"].as_str() {
            if !given.is_empty() && Some(given) != current["metadata"]["resourceVersion"].as_str() {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "Conflict",
                    format!(
                        "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                        resource.plural
                    ),
                ));
            }
        }
        let mut next = match part {
            // The status subresource changes the status only.
            Subresource::Status => {
                let mut next = current.clone();
                next["status"] = object["status"].take();
                next
            }
            Subresource::Whole => {
                object["metadata"]["uid"] = current["metadata"]["uid"].clone();
                object["metadata"]["creationTimestamp"] =
                    current["metadata"]["creationTimestamp"].clone();
                object["metadata"]["namespace"] = current["metadata"]["namespace"].clone();
                object["apiVersion"] = json!(resource.api_version());
                object["kind"] = json!(resource.kind);
                // The spec's generation moves with the spec, not with the status (which this
                // endpoint leaves as it was, as for resources with a status subresource).
                let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
                object["metadata"]["generation"] = json!(if object["spec"] == current["spec"] {
                    generation
                } else {
                    generation + 1
                });
                match current.get("status") {
                    Some(status) => object["status"] = status.clone(),
                    None => {
                        if let Some(map) = object.as_object_mut() {
                            map.remove("status");
                        }
                    }
                }
                object
            }
        };
        if next == current {
            return Ok(current);
        }
        objects.version += 1;
        next["metadata"]["resourceVersion"] = json!(objects.version.to_string());
        objects.items.insert(key, next.clone());
        self.record(&mut objects, resource, "MODIFIED", next.clone());
        Ok(next)
    }

    fn record(&self, objects: &mut Objects, resource: Resource, kind: &'static str, object: Value) {
        let event = Event {
            resource,
            kind,
            object,
            version: objects.version,
        };
        if objects.history.len() == HISTORY {
            if let Some(old) = objects.history.pop_front() {
                objects.compacted = old.version;
            }
        }
        objects.history.push_back(event.clone());
        let _ = self.events.send(event);
    }

    async fn handle(
        self: Arc<Self>,
        method: Method,
        uri: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        if self.down.load(Ordering::SeqCst) {
            return ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the API server is down",
            )
            .into_response();
        }
        let path = uri.path().trim_end_matches('/');
        let query: BTreeMap<String, String> = uri
            .query()
            .map(|q| {
                q.split('&')
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                        (decode(k), decode(v))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if method == Method::GET {
            if let Some(v) = discovery(path) {
                return json_body(&v);
            }
        }
        let Some(target) = Target::parse(path) else {
            return ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the server could not find the requested resource ({path})"),
            )
            .into_response();
        };
        let verb = match (&method, &target.name) {
            (&Method::GET, None) if is_true(query.get("watch")) => "watch",
            (&Method::GET, None) => "list",
            (&Method::GET, Some(_)) => "get",
            (&Method::POST, _) => "create",
            (&Method::PUT, _) => "update",
            (&Method::PATCH, _) => "patch",
            (&Method::DELETE, _) => "delete",
            _ => "unknown",
        };
        if let Err(e) = self.authorize(&headers, verb, &target) {
            return e.into_response();
        }
        // Unset, the real server's default is to warn and prune; kubectl asks for Strict.
        let strict = query.get("fieldValidation").map(String::as_str) == Some("Strict");
        let result = match (&method, &target.name) {
            (&Method::GET, None) if is_true(query.get("watch")) => {
                return self.watch(target, &query);
            }
            (&Method::GET, None) => self.list(&target, &query),
            (&Method::GET, Some(name)) => self
                .get(
                    target.resource,
                    target.namespace.as_deref().unwrap_or(""),
                    name,
                )
                .ok_or_else(|| not_found(target.resource, name)),
            (&Method::POST, None) if target.resource == TOKEN_REVIEWS => {
                return match serde_json::from_slice::<Value>(&body) {
                    Ok(review) => {
                        (StatusCode::CREATED, json_body(&self.review(&review))).into_response()
                    }
                    Err(e) => bad_request(&e).into_response(),
                };
            }
            (&Method::POST, None) => {
                return match serde_json::from_slice::<Value>(&body)
                    .map_err(|e| bad_request(&e))
                    .and_then(|mut object| {
                        admit(target.resource, &mut object, strict)?;
                        self.create_in(target.resource, target.namespace.as_deref(), object)
                    }) {
                    Ok(created) => (StatusCode::CREATED, json_body(&created)).into_response(),
                    Err(e) => e.into_response(),
                };
            }
            (&Method::PUT, Some(name)) => serde_json::from_slice::<Value>(&body)
                .map_err(|e| bad_request(&e))
                .and_then(|mut object| {
                    admit(target.resource, &mut object, strict)?;
                    self.update(
                        target.resource,
                        target.namespace.as_deref().unwrap_or(""),
                        name,
                        object,
                        target.subresource,
                    )
                }),
            (&Method::PATCH, Some(name)) => {
                let content_type = headers
                    .get(axum::http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if content_type.starts_with("application/json-patch") {
                    Err(ApiError::new(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        "UnsupportedMediaType",
                        "JSON patches are not supported by this emulation; use a merge patch",
                    ))
                } else {
                    self.patch(&target, name, &body, strict)
                }
            }
            (&Method::DELETE, Some(name)) => self.delete(
                target.resource,
                target.namespace.as_deref().unwrap_or(""),
                name,
            ),
            _ => Err(ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} is not supported on {path}"),
            )),
        };
        match result {
            Ok(v) => json_body(&v),
            Err(e) => e.into_response(),
        }
    }

    fn patch(
        &self,
        target: &Target,
        name: &str,
        body: &[u8],
        strict: bool,
    ) -> Result<Value, ApiError> {
        let patch: Value = serde_json::from_slice(body).map_err(|e| bad_request(&e))?;
        let namespace = target.namespace.as_deref().unwrap_or("");
        let mut object = self
            .get(target.resource, namespace, name)
            .ok_or_else(|| not_found(target.resource, name))?;
        merge_patch(&mut object, &patch);
        admit(target.resource, &mut object, strict)?;
        // A patch applies to the current version.
        object["metadata"]["resourceVersion"] = Value::Null;
        self.update(target.resource, namespace, name, object, target.subresource)
    }

    fn list(&self, target: &Target, query: &BTreeMap<String, String>) -> Result<Value, ApiError> {
        let limit = match query.get("limit").filter(|l| !l.is_empty()) {
            Some(l) => match l.parse::<usize>() {
                Ok(0) => None,
                Ok(n) => Some(n),
                Err(_) => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("limit {l:?} is not a number"),
                    ))
                }
            },
            None => None,
        };
        let (resource_version, mut items) = match query.get("continue").filter(|c| !c.is_empty()) {
            Some(token) => self.next_page(token)?,
            None => {
                let objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
                let items: VecDeque<Value> = objects
                    .items
                    .iter()
                    .filter(|((plural, ns, _), object)| {
                        *plural == target.resource.plural
                            && target.namespace.as_ref().is_none_or(|want| want == ns)
                            && selected(object, query)
                    })
                    .map(|(_, object)| object.clone())
                    .collect();
                (objects.version.to_string(), items)
            }
        };
        let mut metadata = json!({ "resourceVersion": resource_version });
        let page: Vec<Value> = match limit {
            Some(n) if items.len() > n => {
                let page = items.drain(..n).collect();
                metadata["remainingItemCount"] = json!(items.len());
                metadata["continue"] = json!(self.keep_rest(&resource_version, items));
                page
            }
            _ => items.into(),
        };
        Ok(json!({
            "kind": format!("{}List", target.resource.kind),
            "apiVersion": target.resource.api_version(),
            "metadata": metadata,
            "items": page,
        }))
    }

    /// Keeps what is left of a paged list; answers its continue token.
    fn keep_rest(&self, resource_version: &str, rest: VecDeque<Value>) -> String {
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        pages
            .open
            .retain(|_, page| page.created.elapsed() < PAGE_LIFETIME);
        while pages.open.len() >= OPEN_LISTS {
            pages.open.pop_first();
        }
        pages.next += 1;
        let id = pages.next;
        pages.open.insert(
            id,
            Page {
                created: std::time::Instant::now(),
                resource_version: resource_version.to_string(),
                rest,
            },
        );
        // Opaque to clients, like the real server's (base64 of its own JSON).
        format!("emu-{resource_version}-{id}")
    }

    /// The rest of the paged list `token` continues, as of its first page.
    fn next_page(&self, token: &str) -> Result<(String, VecDeque<Value>), ApiError> {
        let expired = || {
            ApiError::new(
                StatusCode::GONE,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
            )
        };
        let id: u64 = token
            .rsplit_once('-')
            .and_then(|(_, id)| id.parse().ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    format!("continue token {token:?} is not valid"),
                )
            })?;
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        let page = pages.open.remove(&id).ok_or_else(expired)?;
        if page.created.elapsed() >= PAGE_LIFETIME {
            return Err(expired());
        }
        Ok((page.resource_version, page.rest))
    }

    fn watch(self: Arc<Self>, target: Target, query: &BTreeMap<String, String>) -> Response {
        let query = query.clone();
        let bookmarks = is_true(query.get("allowWatchBookmarks"));
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse::<u64>().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(1800));
        let since: Option<u64> = query
            .get("resourceVersion")
            .filter(|v| !v.is_empty() && *v != "0")
            .and_then(|v| v.parse().ok());
        // Subscribe before reading the history, so no event falls between the two.
        let mut live = self.events.subscribe();
        let mut cuts = self.cuts.subscribe();
        let (backlog, mut last) = {
            let objects = self.objects.lock().unwrap_or_else(|e| e.into_inner());
            match since {
                Some(v) if v < objects.compacted => {
                    let gone = ApiError::new(
                        StatusCode::GONE,
                        "Expired",
                        format!("too old resource version: {v} ({})", objects.compacted + 1),
                    );
                    let line = json!({"type": "ERROR", "object": gone.status()}).to_string() + "\n";
                    return json_stream(Body::from(line));
                }
                Some(v) => (
                    objects
                        .history
                        .iter()
                        .filter(|e| e.version > v && e.resource == target.resource)
                        .map(|e| (e.kind, e.object.clone()))
                        .collect::<Vec<_>>(),
                    objects.version,
                ),
                None => (
                    objects
                        .items
                        .iter()
                        .filter(|((plural, ns, _), _)| {
                            *plural == target.resource.plural
                                && target.namespace.as_ref().is_none_or(|want| want == ns)
                        })
                        .map(|(_, o)| ("ADDED", o.clone()))
                        .collect(),
                    objects.version,
                ),
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
        let resource = target.resource;
        tokio::spawn(async move {
            let line = |kind: &str, object: &Value| {
                Bytes::from(json!({"type": kind, "object": object}).to_string() + "\n")
            };
            let in_scope = |object: &Value| {
                target
                    .namespace
                    .as_ref()
                    .is_none_or(|want| object["metadata"]["namespace"].as_str() == Some(want))
            };
            for (kind, object) in backlog {
                if in_scope(&object)
                    && selected(&object, &query)
                    && tx.send(Ok(line(kind, &object))).await.is_err()
                {
                    return;
                }
            }
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = &mut deadline => return,
                    _ = cuts.recv() => return,
                    _ = ticks.tick(), if bookmarks => {
                        let mark = json!({"kind": resource.kind, "apiVersion": resource.api_version(),
                            "metadata": {"resourceVersion": last.to_string()}});
                        if tx.send(Ok(line("BOOKMARK", &mark))).await.is_err() {
                            return;
                        }
                    }
                    event = live.recv() => match event {
                        Ok(event) => {
                            if event.version <= last {
                                continue;
                            }
                            last = event.version;
                            if event.resource != resource || !in_scope(&event.object) {
                                continue;
                            }
                            // A change that moves an object out of a label selector is a
                            // deletion for this watch, as the real server sends it.
                            let kind = if selected(&event.object, &query) { event.kind } else if event.kind == "MODIFIED" { "DELETED" } else { continue };
                            if tx.send(Ok(line(kind, &event.object))).await.is_err() {
                                return;
                            }
                        }
                        // Fell behind: end the watch; the client resumes (or relists on 410).
                        Err(_) => return,
                    }
                }
            }
        });
        json_stream(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
    }
}

/// A CA of the emulation's own and a serving certificate for 127.0.0.1 and localhost.
fn serving_tls() -> anyhow::Result<(String, Arc<rustls::ServerConfig>)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "meshlet-lab kubernetes CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kube-apiserver");
    let cert = params.signed_by(&key, &issuer)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    Ok((ca_cert.pem(), Arc::new(config)))
}

/// The strings of a JSON array (nothing for anything else).
fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn json_stream(body: Body) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// One rule of a ClusterRole.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default)]
    api_groups: Vec<String>,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    verbs: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Subresource {
    Whole,
    Status,
}

/// What a path names: a collection (all namespaces or one) or an item, maybe its status.
#[derive(Debug, Clone)]
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Subresource,
}

impl Target {
    fn parse(path: &str) -> Option<Self> {
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let (group, version, rest) = match parts.as_slice() {
            ["api", version, rest @ ..] => ("", *version, rest),
            ["apis", group, version, rest @ ..] => (*group, *version, rest),
            _ => return None,
        };
        let find = |plural: &str| {
            RESOURCES
                .iter()
                .find(|r| r.group == group && r.version == version && r.plural == plural)
                .copied()
        };
        let (resource, namespace, rest) = match rest {
            ["namespaces", ns, plural, rest @ ..] if find(plural).is_some_and(|r| r.namespaced) => {
                (find(plural)?, Some(decode(ns)), rest)
            }
            [plural, rest @ ..] => (find(plural)?, None, rest),
            _ => return None,
        };
        let (name, subresource) = match rest {
            [] => (None, Subresource::Whole),
            [name] => (Some(decode(name)), Subresource::Whole),
            [name, "status"] => (Some(decode(name)), Subresource::Status),
            _ => return None,
        };
        Some(Self {
            resource,
            namespace,
            name,
            subresource,
        })
    }
}

/// Where an object is stored: (resource, namespace or "" when cluster-scoped, name).
fn key(resource: Resource, namespace: &str, name: &str) -> (&'static str, String, String) {
    (
        resource.plural,
        scope(resource, namespace),
        name.to_string(),
    )
}

fn scope(resource: Resource, namespace: &str) -> String {
    if resource.namespaced {
        namespace.to_string()
    } else {
        String::new()
    }
}

fn not_found(resource: Resource, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("{} \"{name}\" not found", resource.plural),
    )
}

fn bad_request(e: &serde_json::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "BadRequest",
        format!("the body is not a JSON object: {e}"),
    )
}

fn is_true(v: Option<&String>) -> bool {
    matches!(v.map(String::as_str), Some("1" | "true"))
}

/// Percent-decoding of a query or path part (`+` is a space in queries).
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or(""),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `object` matches the query's label and field selectors.
fn selected(object: &Value, query: &BTreeMap<String, String>) -> bool {
    let labels = &object["metadata"]["labels"];
    let label = |k: &str| labels[k].as_str();
    let labels_ok = query.get("labelSelector").is_none_or(|selector| {
        selector.split(',').filter(|s| !s.is_empty()).all(|term| {
            if let Some((k, v)) = term.split_once("!=") {
                label(k.trim()) != Some(v.trim())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                label(k.trim()) == Some(v.trim())
            } else if let Some(k) = term.strip_prefix('!') {
                label(k.trim()).is_none()
            } else {
                label(term.trim()).is_some()
            }
        })
    });
    let fields_ok = query.get("fieldSelector").is_none_or(|selector| {
        selector.split(',').filter(|s| !s.is_empty()).all(|term| {
            let (k, v, equal) = match term.split_once("!=") {
                Some((k, v)) => (k, v, false),
                None => match term.split_once("==").or_else(|| term.split_once('=')) {
                    Some((k, v)) => (k, v, true),
                    None => return false,
                },
            };
            let value = k
                .split('.')
                .fold(object, |o, part| &o[part])
                .as_str()
                .unwrap_or_default();
            (value == v) == equal
        })
    });
    labels_ok && fields_ok
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(map) => {
            if !target.is_object() {
                *target = json!({});
            }
            for (k, v) in map {
                if v.is_null() {
                    if let Some(t) = target.as_object_mut() {
                        t.remove(k);
                    }
                } else {
                    merge_patch(&mut target[k.as_str()], v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// The discovery documents kubectl reads before anything else.
fn discovery(path: &str) -> Option<Value> {
    let resources = |group: &str, version: &str| -> Value {
        let list: Vec<Value> = RESOURCES
            .iter()
            .filter(|r| r.group == group && r.version == version)
            .flat_map(|r| {
                let main = json!({
                    "name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced,
                    "kind": r.kind, "shortNames": r.short,
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                });
                let status = json!({
                    "name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                    "kind": r.kind, "verbs": ["get", "patch", "update"],
                });
                [main, status]
            })
            .collect();
        let group_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": list})
    };
    if let Some(v) = openapi_v3(path) {
        return Some(v);
    }
    match path {
        "/version" => Some(json!({
            "major": "1", "minor": "33", "gitVersion": "v1.33.0-meshlet-lab", "gitCommit": "", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64",
        })),
        "/api" => Some(json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]})),
        "/apis" => {
            let mut groups: Vec<&str> = RESOURCES
                .iter()
                .map(|r| r.group)
                .filter(|g| !g.is_empty())
                .collect();
            groups.dedup();
            Some(
                json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups.iter().map(|g| {
                let gv = format!("{g}/v1");
                json!({"name": g, "versions": [{"groupVersion": gv, "version": "v1"}],
                       "preferredVersion": {"groupVersion": gv, "version": "v1"}})
            }).collect::<Vec<_>>()}),
            )
        }
        "/api/v1" => Some(resources("", "v1")),
        _ => {
            let rest = path.strip_prefix("/apis/")?;
            let (group, version) = rest.split_once('/')?;
            if version.contains('/')
                || !RESOURCES
                    .iter()
                    .any(|r| r.group == group && r.version == version)
            {
                return None;
            }
            Some(resources(group, version))
        }
    }
}

/// The OpenAPI v3 documents kubectl reads to learn whether the server validates fields itself
/// (`fieldValidation` on each kind's PATCH operation): it then sends `fieldValidation=Strict`
/// instead of validating against schemas this emulation does not carry. The emulation takes
/// the parameter and, unlike the real server, does not check unknown fields.
fn openapi_v3(path: &str) -> Option<Value> {
    let group_versions: Vec<(&str, &str)> = {
        let mut gvs: Vec<(&str, &str)> = RESOURCES.iter().map(|r| (r.group, r.version)).collect();
        gvs.sort_unstable();
        gvs.dedup();
        gvs
    };
    let prefix = |group: &str, version: &str| {
        if group.is_empty() {
            format!("api/{version}")
        } else {
            format!("apis/{group}/{version}")
        }
    };
    if path == "/openapi/v3" {
        let paths: serde_json::Map<String, Value> = group_versions
            .iter()
            .map(|(g, v)| {
                let p = prefix(g, v);
                (
                    p.clone(),
                    json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash=meshlet-lab")}),
                )
            })
            .collect();
        return Some(json!({ "paths": paths }));
    }
    let wanted = path.strip_prefix("/openapi/v3/")?;
    let (group, version) = group_versions
        .iter()
        .find(|(g, v)| prefix(g, v) == wanted)
        .copied()?;
    let mut paths = serde_json::Map::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let item = if r.namespaced {
            format!("/{wanted}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("/{wanted}/{}/{{name}}", r.plural)
        };
        paths.insert(
            item,
            json!({"patch": {
                "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}},
            }}),
        );
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.33.0"}, "paths": paths}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_collections_items_and_status() {
        let t = Target::parse("/api/v1/namespaces/default/pods/web/status").expect("item status");
        assert_eq!(t.resource, PODS);
        assert_eq!(t.namespace.as_deref(), Some("default"));
        assert_eq!(t.name.as_deref(), Some("web"));
        assert!(matches!(t.subresource, Subresource::Status));
        let t = Target::parse("/apis/discovery.k8s.io/v1/endpointslices").expect("all");
        assert_eq!(t.resource, ENDPOINT_SLICES);
        assert!(t.namespace.is_none() && t.name.is_none());
        let t = Target::parse("/api/v1/namespaces/plain").expect("a namespace");
        assert_eq!(t.resource, NAMESPACES);
        assert_eq!(t.name.as_deref(), Some("plain"));
        assert!(Target::parse("/api/v1/secrets").is_none());
    }

    #[test]
    fn selectors_and_merge_patches() {
        let object = json!({"metadata": {"name": "a", "namespace": "x", "labels": {"app": "web"}}});
        let q = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(selected(&object, &q("labelSelector", "app=web")));
        assert!(!selected(&object, &q("labelSelector", "app!=web")));
        assert!(selected(&object, &q("labelSelector", "!tier,app")));
        assert!(selected(
            &object,
            &q("fieldSelector", "metadata.namespace=x")
        ));
        assert!(!selected(&object, &q("fieldSelector", "metadata.name=b")));
        let mut o = object.clone();
        merge_patch(
            &mut o,
            &json!({"metadata": {"labels": {"app": null, "mesh": "on"}}}),
        );
        assert_eq!(o["metadata"]["labels"], json!({"mesh": "on"}));
        assert_eq!(decode("app%3Dweb%2Cx"), "app=web,x");
    }
}
