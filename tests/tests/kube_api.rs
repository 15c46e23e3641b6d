//! The emulated Kubernetes API server against the real `kubectl`: an independent client
//! that reads discovery, lists, creates from YAML, patches labels, watches and deletes. No
//! root, no lab.
use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
    time::Duration,
};

use meshlet_lab::kube_api::{KubeApi, NAMESPACES, PODS};
use serde_json::{json, Value};

struct Kubectl {
    dir: std::path::PathBuf,
}

impl Kubectl {
    fn new(api: &KubeApi) -> Self {
        // One folder per server: the tests of this file run at once in one process.
        let dir = std::env::temp_dir().join(format!(
            "meshlet-kube-api-{}-{}",
            std::process::id(),
            api.addr.port()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("kubeconfig"), api.kubeconfig("test")).expect("kubeconfig");
        Self { dir }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(self.dir.join("kubeconfig"))
            .arg("--cache-dir")
            .arg(self.dir.join("cache"))
            .args(args);
        cmd
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl (setup installs it)");
        let mut input = child.stdin.take().expect("stdin");
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).expect("stdin");
        }
        drop(input);
        let out = child.wait_with_output().expect("kubectl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Kubectl {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The emulated API server on a runtime of its own (kept alive by the caller).
fn start() -> (tokio::runtime::Runtime, std::sync::Arc<KubeApi>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let api = runtime.block_on(KubeApi::start()).expect("API server");
    (runtime, api)
}

#[test]
fn kubectl_lists_creates_labels_watches_and_deletes() {
    let (_runtime, api) = start();
    api.create(NAMESPACES, json!({"metadata": {"name": "default"}}))
        .expect("namespace");
    api.create(
        PODS,
        json!({"metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
               "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "x"}]},
               "status": {"phase": "Running", "podIP": "10.244.1.2"}}),
    )
    .expect("pod");
    let kubectl = Kubectl::new(&api);

    let (ok, out, err) = kubectl.run(&["get", "pods", "-o", "json"], None);
    assert!(ok, "kubectl get pods: {err}");
    let list: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(list["items"][0]["metadata"]["name"], "web");
    assert_eq!(list["items"][0]["status"]["podIP"], "10.244.1.2");

    // A watch sees what happens after it started.
    let mut watch = kubectl
        .command(&["get", "pods", "--watch", "-o", "name"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl watch");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = watch.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).ok().as_deref(),
        Some("pod/web")
    );

    let yaml = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: api\n  namespace: default\nspec:\n  containers:\n  - name: app\n    image: x\n";
    let (ok, out, err) = kubectl.run(&["create", "-f", "-"], Some(yaml));
    assert!(ok, "kubectl create: {out} {err}");
    assert!(out.contains("pod/api created"), "{out}");
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).ok().as_deref(),
        Some("pod/api")
    );
    let (ok, _, err) = kubectl.run(&["create", "-f", "-"], Some(yaml));
    assert!(!ok && err.contains("already exists"), "{err}");

    let (ok, _, err) = kubectl.run(&["label", "pod", "api", "tier=back"], None);
    assert!(ok, "kubectl label: {err}");
    let labelled = api.get(PODS, "default", "api").expect("api");
    assert_eq!(labelled["metadata"]["labels"]["tier"], "back");
    let (ok, out, err) = kubectl.run(&["get", "pods", "-l", "tier=back", "-o", "name"], None);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "pod/api", "label selector");

    let (ok, _, err) = kubectl.run(&["delete", "pod", "api", "--wait=false"], None);
    assert!(ok, "kubectl delete: {err}");
    assert!(api.get(PODS, "default", "api").is_none());
    let (ok, _, err) = kubectl.run(&["get", "pod", "api"], None);
    assert!(!ok && err.contains("not found"), "{err}");
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn callers_bound_to_the_shipped_cluster_role_get_exactly_its_verbs() {
    let (_runtime, api) = start();
    api.create(
        PODS,
        json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {"containers": []}}),
    )
    .expect("pod");
    let manifests = include_str!("../../deploy/manifests/meshlet.yaml");
    api.bind_role(
        "cp-token",
        "system:serviceaccount:meshlet-system:meshlet-controlplane",
        manifests,
        "meshlet-controlplane",
    )
    .expect("role");
    let kubectl = Kubectl::new(&api);
    std::fs::write(kubectl.dir.join("kubeconfig"), api.kubeconfig("cp-token")).expect("kubeconfig");
    let (ok, out, err) = kubectl.run(&["get", "pods", "-A", "-o", "name"], None);
    assert!(ok, "list is in the role: {err}");
    assert_eq!(out.trim(), "pod/web");
    let (ok, out, err) = kubectl.run(&["delete", "pod", "web"], None);
    assert!(!ok, "delete is not in the role: {out} {err}");
    assert!(
        err.contains("forbidden") && err.contains("cannot delete resource \"pods\""),
        "{err}"
    );
    let (ok, _, err) = kubectl.run(&["label", "pod", "web", "x=y"], None);
    assert!(!ok && err.contains("cannot patch"), "{err}");
}

#[test]
fn lists_come_in_pages_from_one_snapshot_and_old_continue_tokens_expire() {
    let (_runtime, api) = start();
    let pods = 1203;
    for i in 0..pods {
        api.create(
            PODS,
            json!({"metadata": {"name": format!("pod-{i:04}"), "namespace": "default"},
                   "spec": {"containers": []}}),
        )
        .expect("pod");
    }
    let kubectl = Kubectl::new(&api);
    let raw = |path: &str| -> Value {
        let (ok, out, err) = kubectl.run(&["get", "--raw", path], None);
        assert!(ok, "GET {path}: {err}");
        serde_json::from_str(&out).expect("json")
    };
    // The first page: 500 items, a continue token, what remains.
    let first = raw("/api/v1/pods?limit=500");
    assert_eq!(first["items"].as_array().map(Vec::len), Some(500));
    assert_eq!(first["metadata"]["remainingItemCount"], json!(pods - 500));
    let token = first["metadata"]["continue"]
        .as_str()
        .expect("a continue token")
        .to_string();
    let version = first["metadata"]["resourceVersion"].clone();
    // A pod created between pages is not in them: they are cut from the first page's snapshot.
    api.create(
        PODS,
        json!({"metadata": {"name": "pod-9999", "namespace": "default"}, "spec": {"containers": []}}),
    )
    .expect("pod");
    let mut names: Vec<String> = Vec::new();
    let mut page = first;
    let mut token = Some(token);
    loop {
        assert_eq!(page["metadata"]["resourceVersion"], version, "one snapshot");
        names.extend(
            page["items"]
                .as_array()
                .expect("items")
                .iter()
                .filter_map(|p| p["metadata"]["name"].as_str().map(String::from)),
        );
        let Some(next) = token.take() else { break };
        page = raw(&format!("/api/v1/pods?limit=500&continue={next}"));
        token = page["metadata"]["continue"].as_str().map(String::from);
    }
    assert_eq!(names.len(), pods, "every pod once, none added");
    names.dedup();
    assert_eq!(names.len(), pods, "no pod twice");
    assert!(!names.iter().any(|n| n == "pod-9999"));
    // A spent (or expired) token: 410 Expired, as the real server answers a compacted one.
    let (ok, _, err) = kubectl.run(
        &["get", "--raw", "/api/v1/pods?limit=500&continue=emu-1-1"],
        None,
    );
    assert!(!ok && err.contains("too old"), "{err}");
    // kubectl's own chunked listing (500 at a time by default) sees every pod.
    let (ok, out, err) = kubectl.run(&["get", "pods", "-A", "-o", "name"], None);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), pods + 1);
}

#[test]
fn custom_resources_are_held_to_the_charts_crd_schemas() {
    let (_runtime, api) = start();
    api.create(NAMESPACES, json!({"metadata": {"name": "default"}}))
        .expect("namespace");
    let kubectl = Kubectl::new(&api);
    let policy = |mtls: &str| {
        format!("apiVersion: security.meshlet.dev/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: default\nspec:\n  mtls:\n    {mtls}\n")
    };
    // A typo: kubectl validates strictly, and the server names the field.
    let (ok, out, err) = kubectl.run(&["create", "-f", "-"], Some(&policy("mod: STRICT")));
    assert!(
        !ok,
        "a PeerAuthentication with spec.mtls.mod was accepted: {out}"
    );
    assert!(err.contains("unknown field \"spec.mtls.mod\""), "{err}");
    // A mode that is not one: refused whatever the validation asked for.
    let (ok, _, err) = kubectl.run(
        &["create", "--validate=false", "-f", "-"],
        Some(&policy("mode: STRCT")),
    );
    assert!(!ok && err.contains("Unsupported value: \"STRCT\""), "{err}");
    // Without strict validation the typo is pruned, as the real server prunes it.
    let (ok, _, err) = kubectl.run(
        &["create", "--validate=false", "-f", "-"],
        Some(&policy("mod: STRICT")),
    );
    assert!(ok, "{err}");
    let stored = api
        .get(
            meshlet_lab::kube_api::PEER_AUTHENTICATIONS,
            "default",
            "strict",
        )
        .expect("stored");
    assert_eq!(stored["spec"]["mtls"], json!({}), "{stored}");
}
