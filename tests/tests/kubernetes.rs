//! The lab in Kubernetes mode: the control plane reads Namespaces, Pods, Services and
//! EndpointSlices from the emulated API server (kube-rs reflectors), and the real `kubectl`
//! works against the same server. Root only; one at a time.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use meshlet_lab::{kube_api, Lab, LabOptions, PodSpec};
use serde_json::{json, Value};

mod common;
use common::{bin_dir, many, meshlet_cli, send, ExtraAgent, Scratch, Server};

fn up_kubernetes(pods: &[PodSpec]) -> Lab {
    let mut options = LabOptions::new(bin_dir());
    options.kubernetes = true;
    Lab::up(pods, &options).expect("lab up in Kubernetes mode")
}

fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("web", "node-1", "frontend"),
        PodSpec::new("api", "node-2", "backend"),
        PodSpec::new("ext", "node-2", "ext").outside_mesh(),
    ]
}

/// Runs the real kubectl against the lab's API server.
fn kubectl(lab: &Lab, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let cache = lab.kubeconfig_path().with_file_name("kubectl-cache");
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(lab.kubeconfig_path())
        .arg("--cache-dir")
        .arg(&cache)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(std::process::Stdio::piped());
    }
    let mut child = cmd.spawn().expect("kubectl (setup installs it)");
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("kubectl stdin");
    }
    let out = child.wait_with_output().expect("kubectl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `meshlet workloads -o json` of `node`, as namespace/name.
fn workloads(lab: &Lab, node: &str) -> Vec<String> {
    let (ok, out, err) = meshlet_cli(lab, node, &["workloads", "-o", "json"]);
    assert!(ok, "{err}");
    let list: Value = serde_json::from_str(&out).expect("workloads json");
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|w| w["workload"].as_str().map(str::to_string))
        .collect()
}

/// Waits until `node`'s agent shows workloads exactly `want` (sorted).
fn wait_workloads(lab: &Lab, node: &str, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut have = workloads(lab, node);
        have.sort();
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node} shows {have:?}, wanted {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `node`'s agent knows Service `name` with `endpoints` endpoints.
fn wait_service(lab: &Lab, node: &str, name: &str, endpoints: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out, _) = meshlet_cli(lab, node, &["services", "-o", "json"]);
        let list: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let found = list.as_array().into_iter().flatten().any(|s| {
            s["service"] == name && s["endpoints"].as_array().map(Vec::len) == Some(endpoints)
        });
        if ok && found {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{node} never showed service {name} with {endpoints} endpoints: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

const SERVICE_YAML: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: default
spec:
  clusterIP: 10.96.0.10
  clusterIPs: ["10.96.0.10"]
  ports:
  - name: web
    port: 80
    targetPort: http
    protocol: TCP
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-abcde
  namespace: default
  labels:
    kubernetes.io/service-name: api
addressType: IPv4
ports:
- name: http
  port: 8080
  protocol: TCP
endpoints:
- addresses: ["API_IP"]
  conditions: {ready: true, serving: true, terminating: false}
  targetRef: {kind: Pod, namespace: default, name: api, uid: uid-api}
"#;

#[test]
fn pods_and_services_from_the_kubernetes_api_reach_the_agents_and_kubectl_works() {
    let lab = up_kubernetes(&pods());
    // Lab::up waited for every mesh pod's certificate: the CA signed them because the API
    // says those pods run on those nodes.
    let api = lab.topology.pod("api").expect("api").clone();
    wait_workloads(&lab, "node-1", &["default/api", "default/web"]);
    let _server = Server::start_with(&lab, "api", 8080, 200, 120);
    let (ok, report, err) = send(&lab, "web", &format!("{}:8080", api.ip), 4096, None, None);
    assert!(ok, "web → api through the mesh: {err} {report}");

    // The real kubectl reads what the lab wrote.
    let (ok, out, err) = kubectl(&lab, &["get", "pods", "-n", "default", "-o", "json"], None);
    assert!(ok, "kubectl get pods: {err}");
    let list: Value = serde_json::from_str(&out).expect("kubectl json");
    let mut names: Vec<&str> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["api", "ext", "web"]);

    // A Service and its EndpointSlice, created with kubectl: the agents route its cluster IP.
    let yaml = SERVICE_YAML.replace("API_IP", &api.ip.to_string());
    let (ok, out, err) = kubectl(&lab, &["create", "-f", "-"], Some(&yaml));
    assert!(ok, "kubectl create: {out} {err}");
    wait_service(&lab, "node-1", "default/api", 1);
    let report = many(&lab, "web", "10.96.0.10:80", 20, None);
    assert_eq!(report["ok"], 20, "{report}");
    // After the first (full) state, the agents got what changed only.
    assert!(
        lab.agent_log("node-1")
            .lines()
            .any(|l| l.contains("applied control-plane update") && l.contains("incremental=true")),
        "no incremental update was applied"
    );

    // The namespace leaves the mesh (kubectl label, a merge patch): its pods are no longer
    // workloads; labelled again, they are back.
    let (ok, _, err) = kubectl(
        &lab,
        &["label", "namespace", "default", "meshlet.dev/mesh-"],
        None,
    );
    assert!(ok, "kubectl label: {err}");
    wait_workloads(&lab, "node-1", &[]);
    let (ok, _, err) = kubectl(
        &lab,
        &["label", "namespace", "default", "meshlet.dev/mesh=enabled"],
        None,
    );
    assert!(ok, "kubectl label: {err}");
    wait_workloads(&lab, "node-1", &["default/api", "default/web"]);
    let (ok, report, err) = send(&lab, "web", &format!("{}:8080", api.ip), 1024, None, None);
    assert!(ok, "back in the mesh: {err} {report}");

    // kubectl delete: the Service goes from the agents.
    let (ok, _, err) = kubectl(&lab, &["delete", "service", "api"], None);
    assert!(ok, "kubectl delete: {err}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, out, _) = meshlet_cli(&lab, "node-1", &["services", "-o", "json"]);
        if !out.contains("default/api") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the deleted Service stayed: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_control_plane_follows_the_api_through_cut_watches_410_and_an_outage() {
    let lab = up_kubernetes(&pods());
    let kube = lab.kube().expect("Kubernetes mode");
    let api = lab.topology.pod("api").expect("api").clone();
    let _server = Server::start_with(&lab, "api", 8080, 400, 300);
    let service = |name: &str| {
        json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"clusterIPs": [if name == "one" { "10.96.0.11" } else { "10.96.0.12" }],
                     "ports": [{"port": 80, "targetPort": 8080}]},
        })
    };
    let slice = |name: &str| {
        json!({
            "metadata": {"name": format!("{name}-x"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [api.ip.to_string()], "targetRef": {"kind": "Pod", "uid": api.uid}}],
        })
    };
    // Every watch cut and the history forgotten: the controller's resumes get 410 and it
    // relists; a change made meanwhile still arrives, and nothing is lost.
    kube.compact();
    kube.cut_watches();
    kube.create(kube_api::SERVICES, service("one"))
        .expect("service");
    kube.create(kube_api::ENDPOINT_SLICES, slice("one"))
        .expect("slice");
    wait_service(&lab, "node-1", "default/one", 1);
    wait_workloads(&lab, "node-1", &["default/api", "default/web"]);
    let report = many(&lab, "web", "10.96.0.11:80", 5, None);
    assert_eq!(report["ok"], 5, "{report}");

    assert_eq!(lab.controlplane_health("/ready").expect("ready").0, 200);
    // The API server away: the agents keep the last state and traffic flows; the control
    // plane says it is not ready, and why.
    kube.set_down(true);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = lab.controlplane_health("/ready").expect("ready");
        if status == 503 && body.contains("kubernetes: disconnected since") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still ready with the API down: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // How long it stays away: MESHLET_KUBE_OUTAGE_SECS (60 for the run by hand), 5 s in
    // `cargo xtask test`; a connection every second meanwhile.
    let outage = Duration::from_secs(
        std::env::var("MESHLET_KUBE_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    );
    let away = Instant::now();
    let (mut made, mut failed) = (0u32, Vec::new());
    while away.elapsed() < outage {
        let (ok, report, err) = send(&lab, "web", &format!("{}:8080", api.ip), 1024, None, None);
        made += 1;
        if !ok {
            failed.push(format!("{:?}: {err} {report}", away.elapsed()));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    println!(
        "{made} connections over {outage:?} with the API server away, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "with the API server away: {failed:?}");
    wait_workloads(&lab, "node-1", &["default/api", "default/web"]);
    wait_service(&lab, "node-1", "default/one", 1);
    // Back: changes made after flow again, and the control plane is ready again.
    kube.set_down(false);
    kube.create(kube_api::SERVICES, service("two"))
        .expect("service");
    kube.create(kube_api::ENDPOINT_SLICES, slice("two"))
        .expect("slice");
    wait_service(&lab, "node-1", "default/two", 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while lab.controlplane_health("/ready").expect("ready").0 != 200 {
        assert!(
            Instant::now() < deadline,
            "not ready again after the API came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_workloads(&lab, "node-1", &["default/api", "default/web"]);
    let report = many(&lab, "web", "10.96.0.12:80", 5, None);
    assert_eq!(report["ok"], 5, "{report}");
    // The control plane said it relisted (410) rather than missing the events.
    let log = std::fs::read_to_string(&lab.topology.controlplane_log).unwrap_or_default();
    assert!(
        log.contains("cluster changed"),
        "the control plane never published a change:\n{log}"
    );
}

/// Applies `yaml` with `kubectl create -f -`.
fn create(lab: &Lab, yaml: &str) {
    let (ok, out, err) = kubectl(lab, &["create", "-f", "-"], Some(yaml));
    assert!(ok, "kubectl create: {out} {err}\n{yaml}");
}

/// The `Accepted` condition of a policy resource, once the control plane wrote it.
fn accepted(lab: &Lab, kind: &str, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, out, _) = kubectl(lab, &["get", kind, name, "-o", "json"], None);
        let object: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        let condition = object["status"]["conditions"][0].clone();
        if ok
            && condition["type"] == "Accepted"
            && condition["observedGeneration"] == object["metadata"]["generation"]
        {
            return condition;
        }
        assert!(
            Instant::now() < deadline,
            "{kind}/{name} never got a status: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `send` until it succeeds (`want`) or keeps failing, within 20 s.
fn eventually_reaches(lab: &Lab, from: &str, to: &str, want: bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, report, err) = send(lab, from, to, 256, None, None);
        if ok == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{from} → {to}: wanted {}, got {err} {report}",
            if want { "through" } else { "refused" }
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn istio_shaped_policies_applied_with_kubectl_change_what_reaches_the_app() {
    let mut options = LabOptions::new(bin_dir());
    options.kubernetes = true;
    // Istio's own group too, as for a cluster moving from Istio.
    options.controlplane_args = vec!["--istio-policies".into()];
    let lab = Lab::up(&pods(), &options).expect("lab up in Kubernetes mode");
    let api = lab.topology.pod("api").expect("api").clone();
    let _s8080 = Server::start_with(&lab, "api", 8080, 500, 120);
    let _s9090 = Server::start_with(&lab, "api", 9090, 500, 120);
    let (to8080, to9090) = (format!("{}:8080", api.ip), format!("{}:9090", api.ip));
    // The mesh default is STRICT: plaintext from outside the mesh is refused.
    eventually_reaches(&lab, "ext", &to8080, false);

    // istio.io "Mutual TLS Migration": the namespace PERMISSIVE.
    create(
        &lab,
        "apiVersion: security.meshlet.dev/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: default\nspec:\n  mtls:\n    mode: PERMISSIVE\n",
    );
    assert_eq!(
        accepted(&lab, "peerauthentication", "default")["status"],
        "True"
    );
    eventually_reaches(&lab, "ext", &to8080, true);
    // istio.io "Authentication Policy": a workload STRICT with one port DISABLE.
    create(
        &lab,
        "apiVersion: security.meshlet.dev/v1\nkind: PeerAuthentication\nmetadata:\n  name: api\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: api\n  mtls:\n    mode: STRICT\n  portLevelMtls:\n    9090:\n      mode: DISABLE\n",
    );
    eventually_reaches(&lab, "ext", &to8080, false);
    eventually_reaches(&lab, "ext", &to9090, true);
    eventually_reaches(&lab, "web", &to8080, true);

    // istio.io "Authorization for HTTP traffic": ALLOW by principal, but for GET only. At L4
    // the rule matches nothing, so the policy denies, and its status says why.
    create(
        &lab,
        "apiVersion: security.meshlet.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: api-viewer\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: api\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/frontend\"]\n    to:\n    - operation:\n        methods: [\"GET\"]\n",
    );
    let condition = accepted(&lab, "authorizationpolicy", "api-viewer");
    assert_eq!(condition["reason"], "AcceptedWithNarrowing", "{condition}");
    assert!(
        condition["message"]
            .as_str()
            .is_some_and(|m| m.contains("methods") && m.contains("matches nothing")),
        "{condition}"
    );
    eventually_reaches(&lab, "web", &to8080, false);
    // The L4 version of it lets web in.
    let (ok, _, err) = kubectl(&lab, &["delete", "authorizationpolicy", "api-viewer"], None);
    assert!(ok, "{err}");
    create(
        &lab,
        "apiVersion: security.meshlet.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: api-viewer\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: api\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/frontend\"]\n    to:\n    - operation:\n        ports: [\"8080\"]\n",
    );
    assert_eq!(
        accepted(&lab, "authorizationpolicy", "api-viewer")["reason"],
        "Accepted"
    );
    eventually_reaches(&lab, "web", &to8080, true);
    // DENY by namespace wins over the ALLOW.
    create(
        &lab,
        "apiVersion: security.meshlet.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-default\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: api\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"default\"]\n",
    );
    eventually_reaches(&lab, "web", &to8080, false);
    // An invalid edit is refused in its status; the version in force stays.
    let (ok, _, err) = kubectl(
        &lab,
        &[
            "patch",
            "authorizationpolicy",
            "deny-default",
            "--type=merge",
            "-p",
            r#"{"spec": {"action": "CUSTOM"}}"#,
        ],
        None,
    );
    assert!(ok, "{err}");
    let condition = accepted(&lab, "authorizationpolicy", "deny-default");
    assert_eq!(condition["status"], "False", "{condition}");
    assert!(
        condition["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.action") && m.contains("stays in force")),
        "{condition}"
    );
    let (ok, _, _) = send(&lab, "web", &to8080, 256, None, None);
    assert!(!ok, "the DENY in force must stay after an invalid edit");
    // Gone: web is allowed again. The same policy in Istio's group (same name) denies again.
    let (ok, _, err) = kubectl(
        &lab,
        &[
            "delete",
            "authorizationpolicy.security.meshlet.dev",
            "deny-default",
        ],
        None,
    );
    assert!(ok, "{err}");
    eventually_reaches(&lab, "web", &to8080, true);
    create(
        &lab,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-default\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: api\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"default\"]\n",
    );
    eventually_reaches(&lab, "web", &to8080, false);
    assert_eq!(
        accepted(
            &lab,
            "authorizationpolicy.security.istio.io",
            "deny-default"
        )["status"],
        "True"
    );
}

/// Whether one line of the control plane's log has every one of `needles`.
fn control_plane_logged(lab: &Lab, needles: &[&str]) -> bool {
    std::fs::read_to_string(&lab.topology.controlplane_log)
        .unwrap_or_default()
        .lines()
        .any(|l| needles.iter().all(|n| l.contains(n)))
}

#[test]
fn nodes_join_with_their_agent_pods_service_account_token_and_nothing_else() {
    let lab = up_kubernetes(&pods()[..2]);
    // The lab's agents joined with their pods' projected tokens (no join token exists).
    let cp_log = std::fs::read_to_string(&lab.topology.controlplane_log).unwrap_or_default();
    assert!(
        cp_log.contains("event=\"node_joined\" node=node-1")
            && cp_log.contains("event=\"node_joined\" node=node-2"),
        "the nodes did not join:\n{cp_log}"
    );
    assert!(lab
        .agent_log("node-1")
        .contains("joined the control plane with the pod's service account token"));
    let kube = lab.kube().expect("Kubernetes mode");
    let scratch = Scratch::new("kube-join");
    let agent_pod = |name: &str, node: &str, sa: &str| {
        kube.create(
            kube_api::PODS,
            json!({"metadata": {"name": name, "namespace": "meshlet-system"},
                   "spec": {"nodeName": node, "serviceAccountName": sa, "containers": [{"name": "agent", "image": "meshlet"}]},
                   "status": {"phase": "Running"}}),
        )
        .expect("agent pod");
    };
    let token_flag = |file: &str, token: String| -> [std::ffi::OsString; 2] {
        let path = scratch.path(file);
        meshlet_lab::pki::write_atomically(&path, token.as_bytes()).expect("token file");
        ["--service-account-token-file".into(), path.into()]
    };
    agent_pod("meshlet-agent-node-x", "node-x", "meshlet-agent");
    agent_pod("impostor", "node-x", "default");
    agent_pod("gone", "node-x", "meshlet-agent");
    let mint = |pod: &str, sa: &str, audience: &str, ttl: i64| {
        kube.mint_token("meshlet-system", sa, pod, audience, ttl)
            .expect("token")
    };
    let gone = mint("gone", "meshlet-agent", "meshlet", 600);
    kube.delete(kube_api::PODS, "meshlet-system", "gone")
        .expect("delete");
    let cases = [
        (
            "node-y",
            token_flag(
                "wrong-node",
                mint("meshlet-agent-node-x", "meshlet-agent", "meshlet", 600),
            ),
            "runs on node",
        ),
        (
            "node-x",
            token_flag("other-sa", mint("impostor", "default", "meshlet", 600)),
            "not of the agent's service account",
        ),
        (
            "node-x",
            token_flag(
                "expired",
                mint("meshlet-agent-node-x", "meshlet-agent", "meshlet", -10),
            ),
            "has expired",
        ),
        ("node-x", token_flag("gone", gone), "not found"),
        (
            "node-x",
            token_flag(
                "audience",
                mint("meshlet-agent-node-x", "meshlet-agent", "vault", 600),
            ),
            "audiences don't match",
        ),
    ];
    for (i, (node, auth, reason)) in cases.iter().enumerate() {
        let agent = ExtraAgent::start(&lab, &scratch, node, auth, 15201 + i as u16);
        agent.wait_for(reason);
        drop(agent);
        assert!(
            control_plane_logged(
                &lab,
                &[
                    "event=\"node_join_refused\"",
                    "method=\"kubernetes\"",
                    reason
                ]
            ),
            "the control plane did not audit the refusal ({reason})"
        );
        println!("{node}: refused, {reason}");
    }
    // The right token, but node-x is no Node of the cluster (none was registered): refused.
    let agent = ExtraAgent::start(
        &lab,
        &scratch,
        "node-x",
        &token_flag(
            "good",
            mint("meshlet-agent-node-x", "meshlet-agent", "meshlet", 600),
        ),
        15210,
    );
    agent.wait_for("not a node of the cluster");
    assert!(
        control_plane_logged(
            &lab,
            &[
                "event=\"node_join_refused\"",
                "node=node-x",
                "not a node of the cluster"
            ]
        ),
        "the control plane did not audit the join of a node that is not in the cluster"
    );
    println!("node-x without a Node object: refused");
    // Its kubelet registers it: the agent's next attempt joins.
    kube.create(
        kube_api::NODES,
        json!({"metadata": {"name": "node-x"}, "spec": {"podCIDR": "10.244.99.0/24"}}),
    )
    .expect("node");
    agent.wait_for("event=\"node_joined\"");
    agent.wait_for("applied control-plane update");
    // `kubectl delete node node-x`: the control plane cuts its discovery stream and refuses
    // it any further certificate; the audit log says so.
    let (ok, _, stderr) = kubectl(&lab, &["delete", "node", "node-x"], None);
    assert!(ok, "kubectl delete node: {stderr}");
    agent.wait_for_line(&["discovery stream failed", "not a node of the cluster"]);
    for event in ["node_removed", "discovery_refused"] {
        assert!(
            control_plane_logged(&lab, &[&format!("event=\"{event}\""), "node-x"]),
            "no {event} audit for node-x:\n{}",
            std::fs::read_to_string(&lab.topology.controlplane_log).unwrap_or_default()
        );
    }
    println!("node-x deleted: discovery cut, audited");
}

#[test]
fn two_control_plane_replicas_serve_and_agents_move_when_theirs_dies() {
    let mut options = LabOptions::new(bin_dir());
    options.kubernetes = true;
    options.controlplane_replicas = 2;
    let mut lab = Lab::up(&pods()[..2], &options).expect("lab with two replicas");
    let api = lab.topology.pod("api").expect("api").clone();
    let _server = Server::start_with(&lab, "api", 8080, 200, 120);
    // The agents take the first address first: that replica goes away.
    lab.kill_replica(1).expect("kill the first replica");
    // A change made now reaches the agents through the other replica.
    let kube = lab.kube().expect("Kubernetes mode");
    kube.create(
        kube_api::SERVICES,
        json!({"metadata": {"name": "after", "namespace": "default"},
               "spec": {"clusterIPs": ["10.96.0.20"], "ports": [{"port": 80, "targetPort": 8080}]}}),
    )
    .expect("service");
    kube.create(
        kube_api::ENDPOINT_SLICES,
        json!({"metadata": {"name": "after-x", "namespace": "default",
                            "labels": {"kubernetes.io/service-name": "after"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": [api.ip.to_string()], "targetRef": {"kind": "Pod", "uid": api.uid}}]}),
    )
    .expect("slice");
    wait_service(&lab, "node-1", "default/after", 1);
    wait_service(&lab, "node-2", "default/after", 1);
    let report = many(&lab, "web", "10.96.0.20:80", 5, None);
    assert_eq!(report["ok"], 5, "{report}");
    // Certificates still come: the identities' CA calls go to the replica that is left.
    wait_workloads(&lab, "node-1", &["default/api", "default/web"]);
}

#[test]
fn the_mesh_config_map_sets_egress_and_a_wrong_setting_shows_in_readiness() {
    let lab = up_kubernetes(&pods());
    let kube = lab.kube().expect("Kubernetes mode");
    let ext = lab.topology.pod("ext").expect("ext").clone();
    let _server = Server::start_with(&lab, "ext", 9090, 100, 120);
    let to = format!("{}:9090", ext.ip);
    eventually_reaches(&lab, "web", &to, true);
    let config = |data: Value| json!({"metadata": {"name": "meshlet", "namespace": "meshlet-system"}, "data": data});
    kube.create(
        kube_api::CONFIG_MAPS,
        config(json!({"outboundTrafficPolicy": "REGISTRY_ONLY", "certificateLifetime": "30m"})),
    )
    .expect("config map");
    eventually_reaches(&lab, "web", &to, false);
    assert_eq!(lab.controlplane_health("/ready").expect("ready").0, 200);
    // A trust domain that is not the CA's: named in readiness, the rest still applied.
    kube.replace(
        kube_api::CONFIG_MAPS,
        config(json!({"outboundTrafficPolicy": "REGISTRY_ONLY", "trustDomain": "other.local"})),
    )
    .expect("config map");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = lab.controlplane_health("/ready").expect("ready");
        if status == 503 && body.contains("trustDomain \"other.local\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never named the bad setting: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, _, _) = send(&lab, "web", &to, 64, None, None);
    assert!(!ok, "REGISTRY_ONLY stays in force");
}
