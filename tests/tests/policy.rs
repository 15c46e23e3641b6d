//! Policy in the lab: mTLS modes enforced by inbound capture, L4 authorization at the
//! destination, live re-evaluation, NACKs for bad policy, the bind ratchet, the emergency
//! switch and `meshlet check`. Root only; run one at a time (`cargo xtask test` does).
use std::time::{Duration, Instant};

use meshlet_lab::{Lab, PodSpec};
use serde_json::json;

mod common;
use common::{bin_dir, meshlet_cli, send, up, write_policy, Server, PROBE};

fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("web", "node-1", "frontend"),
        PodSpec::new("intruder", "node-1", "intruder"),
        PodSpec::new("api", "node-2", "backend"),
        PodSpec::new("legacy", "node-1", "legacy").outside_mesh(),
    ]
}

fn api_addr(lab: &Lab, port: u16) -> String {
    format!("{}:{port}", lab.topology.pod("api").expect("api").ip)
}

/// Sends a little through `from` to api:port; true when the echo came back.
fn reaches(lab: &Lab, from: &str, port: u16) -> bool {
    send(lab, from, &api_addr(lab, port), 256, None, None).0
}

/// Asserts that api's app saw no connection (the agent refused before it).
fn app_saw_nothing(server: &Server, what: &str) {
    let seen = server.accepted(Duration::from_millis(300));
    assert!(seen.is_empty(), "{what}: the app saw {seen:?}");
}

#[test]
fn strict_refuses_plaintext_before_the_app_and_permissive_and_port_overrides_let_it_in() {
    let lab = up(&pods());
    let s8080 = Server::start(&lab, "api", 8080);
    let s9090 = Server::start(&lab, "api", 9090);

    // Mesh default STRICT: a pod outside the mesh and the node itself are refused, and the
    // app never accepts; the mesh client gets through over mTLS.
    assert!(
        !reaches(&lab, "legacy", 8080),
        "plaintext reached a STRICT pod"
    );
    let (ok, report, _) = {
        let mut cmd = lab.command_in("node-1", PROBE).expect("command");
        cmd.args(["send", &api_addr(&lab, 8080), "64"]);
        let out = cmd.output().expect("probe");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            (),
        )
    };
    assert!(!ok, "the node's plaintext reached a STRICT pod: {report}");
    app_saw_nothing(&s8080, "STRICT");
    let log = lab.agent_log("node-2");
    assert!(
        log.contains("decision=\"denied\" transport=\"plaintext\"")
            && log.contains("plaintext refused: mode STRICT (mesh default)"),
        "no audit line for the refusal:\n{log}"
    );
    assert!(
        reaches(&lab, "web", 8080),
        "mesh traffic must pass in STRICT"
    );
    assert_eq!(s8080.accepted(Duration::from_millis(300)).len(), 1);

    // A per-port override: 9090 PERMISSIVE, 8080 still STRICT.
    write_policy(
        &lab,
        json!({"modes": [{"name": "api-9090", "namespace": "default",
            "selector": {"app": "api"}, "port_modes": {"9090": "PERMISSIVE"}}]}),
        2,
        false,
    );
    assert!(
        reaches(&lab, "legacy", 9090),
        "PERMISSIVE port refused plaintext"
    );
    assert_eq!(s9090.accepted(Duration::from_millis(300)).len(), 1);
    assert!(!reaches(&lab, "legacy", 8080), "8080 must stay STRICT");
    app_saw_nothing(&s8080, "8080 after the port override");

    // The whole workload PERMISSIVE.
    write_policy(
        &lab,
        json!({"modes": [{"name": "api", "namespace": "default",
            "selector": {"app": "api"}, "mode": "PERMISSIVE"}]}),
        3,
        false,
    );
    assert!(
        reaches(&lab, "legacy", 8080),
        "PERMISSIVE workload refused plaintext"
    );
    assert!(reaches(&lab, "web", 8080), "mTLS must pass in PERMISSIVE");
    assert_eq!(s8080.accepted(Duration::from_millis(300)).len(), 2);
}

#[test]
fn disable_leaves_the_workload_uncaptured_and_mesh_clients_send_plaintext_because_it_says_so() {
    let lab = up(&pods());
    let server = Server::start(&lab, "api", 8080);
    write_policy(
        &lab,
        json!({"modes": [{"name": "api-off", "namespace": "default",
            "selector": {"app": "api"}, "mode": "DISABLE"}]}),
        2,
        false,
    );
    // Uncaptured: the agent of node-2 does not even see legacy's connection.
    assert!(
        reaches(&lab, "legacy", 8080),
        "DISABLE pod refused plaintext"
    );
    let legacy = lab.topology.pod("legacy").expect("legacy").ip;
    assert!(
        !lab.agent_log("node-2")
            .contains(&format!("src_ip={legacy}")),
        "the agent saw an uncaptured connection"
    );
    // The mesh client goes plaintext, from its own pod, and says why.
    assert!(reaches(&lab, "web", 8080));
    assert_eq!(server.accepted(Duration::from_millis(300)).len(), 2);
    assert!(lab
        .agent_log("node-1")
        .contains("destination mode DISABLE (rule default/api-off)"));
}

#[test]
fn allow_by_principal_deny_by_namespace_and_dry_run() {
    let lab = up(&pods());
    let server = Server::start(&lab, "api", 8080);
    let allow_web = json!({"name": "web-only", "namespace": "default",
        "selector": {"app": "api"}, "action": "ALLOW",
        "rules": [{"from": [{"principals": ["cluster.local/ns/default/sa/frontend"]}]}]});
    write_policy(&lab, json!({"policies": [allow_web.clone()]}), 2, false);
    assert!(
        reaches(&lab, "web", 8080),
        "the allowed principal was refused"
    );
    assert_eq!(server.accepted(Duration::from_millis(300)).len(), 1);
    assert!(!reaches(&lab, "intruder", 8080), "intruder got in");
    app_saw_nothing(&server, "intruder");
    let log = lab.agent_log("node-2");
    assert!(
        log.contains("decision=\"allowed\"") && log.contains("policy=default/web-only rule=0"),
        "{log}"
    );
    assert!(
        log.contains("src_identity=spiffe://cluster.local/ns/default/sa/intruder")
            && log.contains("reason=no ALLOW policy matched (default/web-only)")
    );

    // `meshlet check` explains both without sending anything.
    let (ok, out, err) = meshlet_cli(
        &lab,
        "node-2",
        &["check", "--from", "default/web", "--to", "default/api:8080"],
    );
    assert!(ok, "{err}");
    println!("$ meshlet check --from default/web --to default/api:8080\n{out}");
    assert!(
        out.contains("verdict: ALLOW — allowed by default/web-only rule 0"),
        "{out}"
    );
    let (ok, out, err) = meshlet_cli(
        &lab,
        "node-2",
        &[
            "check",
            "--from",
            "default/intruder",
            "--to",
            "default/api:8080",
            "-o",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("check -o json");
    assert_eq!(v["decision"]["verdict"], "deny", "{out}");
    let legacy = lab.topology.pod("legacy").expect("legacy").ip.to_string();
    let (ok, out, _) = meshlet_cli(
        &lab,
        "node-2",
        &["check", "--from", &legacy, "--to", "default/api:8080"],
    );
    assert!(
        ok && out.contains("plaintext refused: mode STRICT"),
        "{out}"
    );
    println!("$ meshlet check --from default/intruder --to default/api:8080");
    println!(
        "{}",
        meshlet_cli(
            &lab,
            "node-2",
            &[
                "check",
                "--from",
                "default/intruder",
                "--to",
                "default/api:8080"
            ]
        )
        .1
    );
    let (ok, out, err) = meshlet_cli(&lab, "node-2", &["policies"]);
    assert!(ok, "{err}");
    println!("$ meshlet policies\n{out}");
    assert!(
        out.contains("default/api") && out.contains("default/web-only(ALLOW)"),
        "{out}"
    );

    // DENY by namespace beats the ALLOW.
    let deny_default = json!({"name": "no-default", "namespace": "default",
        "selector": {"app": "api"}, "action": "DENY",
        "rules": [{"from": [{"namespaces": ["default"]}]}]});
    write_policy(
        &lab,
        json!({"policies": [allow_web.clone(), deny_default.clone()]}),
        3,
        false,
    );
    assert!(!reaches(&lab, "web", 8080), "DENY must beat ALLOW");
    app_saw_nothing(&server, "DENY beats ALLOW");
    assert!(lab
        .agent_log("node-2")
        .contains("reason=denied by default/no-default rule 0"));

    // The same DENY as a dry run: logged, not enforced.
    let mut dry = deny_default;
    dry["dry_run"] = json!(true);
    write_policy(&lab, json!({"policies": [allow_web, dry]}), 4, false);
    assert!(reaches(&lab, "web", 8080), "a dry-run policy denied");
    assert!(lab
        .agent_log("node-2")
        .contains("decision=\"dry_run\" transport=\"mtls\""));
}

#[test]
fn a_policy_change_closes_a_live_now_denied_connection() {
    let lab = up(&pods());
    let _server = Server::start(&lab, "api", 8080);
    let mut ping = lab
        .command_in("web", PROBE)
        .expect("command")
        .args(["ping", &api_addr(&lab, 8080), "30"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ping");
    let stdout = ping.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(10)).as_deref(),
        Ok("CONNECTED")
    );
    let written = Instant::now();
    write_policy(
        &lab,
        json!({"policies": [{"name": "cut-web", "namespace": "default",
            "selector": {"app": "api"}, "action": "DENY",
            "rules": [{"from": [{"principals": ["*/sa/frontend"]}]}]}]}),
        2,
        false,
    );
    let applied = written.elapsed();
    let line = rx.recv_timeout(Duration::from_secs(5));
    let closed = written.elapsed();
    let _ = ping.kill();
    let _ = ping.wait();
    assert_eq!(
        line.as_deref(),
        Ok("CLOSED"),
        "the live connection stayed open"
    );
    println!(
        "registry written → applied on both nodes {applied:?} → client saw the close {closed:?}"
    );
    let log = lab.agent_log("node-2");
    assert!(
        log.contains("event=\"connection_closed_by_policy_change\"")
            && log.contains("policy=default/cut-web"),
        "{log}"
    );
    // The access line of a connection that ended in an error still counts what it moved
    // (the ping's bytes, both ways); it used to say 0 and 0.
    let access = log
        .lines()
        .find(|l| {
            l.contains("direction=\"inbound\"")
                && l.contains("connection closed")
                && l.contains("outcome=\"error\"")
        })
        .unwrap_or_else(|| panic!("no inbound access line for the closed connection:\n{log}"));
    let count = |field: &str| -> u64 {
        access
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{field}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert!(
        count("bytes_received") > 0 && count("bytes_sent") > 0,
        "bytes lost from the access line: {access}"
    );
}

#[test]
fn invalid_policy_is_nacked_with_a_clear_error_and_the_policy_in_force_stays() {
    let lab = up(&pods());
    let _server = Server::start(&lab, "api", 8080);
    let allow = |rule: serde_json::Value, action: &str| {
        json!({"policies": [{"name": "web-only", "namespace": "default",
            "selector": {"app": "api"}, "action": action, "rules": [rule]}]})
    };
    let good = json!({"from": [{"principals": ["*/sa/frontend"]}]});
    write_policy(&lab, allow(good.clone(), "ALLOW"), 2, false);
    let bad = [
        (
            allow(json!({"from": [{"ip_blocks": ["10.0.0.0/33"]}]}), "ALLOW"),
            "IP block \"10.0.0.0/33\" is not a CIDR",
        ),
        (
            allow(good.clone(), "PERMIT"),
            "action \"PERMIT\" is not ALLOW, DENY or AUDIT",
        ),
        (
            allow(json!({"to": [{"ports": [0]}]}), "ALLOW"),
            "port 0 is not a TCP port",
        ),
        (
            allow(json!({"to": [{"ports": [70000]}]}), "ALLOW"),
            "port 70000 is not a TCP port",
        ),
    ];
    for (i, (policy, message)) in bad.into_iter().enumerate() {
        let version = 3 + i as u64;
        write_policy(&lab, policy, version, true);
        let log = lab.agent_log("node-2");
        assert!(
            log.lines()
                .any(|l| l.contains("NACK") && l.contains(message)),
            "the NACK must say {message:?}:\n{log}"
        );
        // The policy in force stays: web in, intruder out.
        assert!(reaches(&lab, "web", 8080), "after bad version {version}");
        assert!(
            !reaches(&lab, "intruder", 8080),
            "after bad version {version}"
        );
    }
}

#[test]
fn pods_cannot_bind_the_agent_ports_and_the_emergency_switch_opens_a_strict_pod() {
    let lab = up(&pods());
    for port in ["15001", "15006", "15008"] {
        let out = lab
            .command_in("web", PROBE)
            .expect("command")
            .args(["bind", port])
            .output()
            .expect("probe bind");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("Operation not permitted"),
            "binding {port} in a mesh pod: {err}"
        );
    }
    let out = lab
        .command_in("web", PROBE)
        .expect("command")
        .args(["bind", "15009"])
        .output()
        .expect("probe bind");
    assert!(out.status.success(), "other ports stay free");

    let server = Server::start(&lab, "api", 8080);
    assert!(!reaches(&lab, "legacy", 8080));
    app_saw_nothing(&server, "before the switch");
    let controlplane = bin_dir().join("meshlet-controlplane");
    let out = std::process::Command::new(controlplane)
        .args([
            "mode",
            "--workloads",
            &lab.topology.workloads_file,
            "--namespace",
            "default",
            "--workload",
            "api",
            "--mode",
            "PERMISSIVE",
            "--reason",
            "legacy client migration",
        ])
        .output()
        .expect("emergency switch");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    common::wait_version(&lab, 2, false);
    assert!(
        reaches(&lab, "legacy", 8080),
        "the emergency switch did not open api"
    );
    let log = lab.agent_log("node-2");
    assert!(
        log.contains("event=\"mode_changed\"")
            && log.contains("mode=PERMISSIVE mode_source=rule default/emergency-api"),
        "{log}"
    );
}

#[test]
fn the_node_address_can_be_exempted_from_capture_for_kubelet_probes() {
    // node-2 reaches its pods from its side of their veth, the pods' gateway.
    let mut options = meshlet_lab::LabOptions::new(bin_dir());
    options.agent_args = vec!["--capture-exempt-source".into(), "10.244.2.1".into()];
    let lab = Lab::up(&pods(), &options).expect("lab up");
    let server = Server::start(&lab, "api", 8080);
    let other = Server::start(&lab, "api", 9090);
    // The control plane says api's kubelet probes use port 8080.
    let mut registry = lab.topology.workloads_json();
    for w in registry["workloads"].as_array_mut().expect("list") {
        if w["name"] == "api" {
            w["probe_ports"] = serde_json::json!([8080]);
        }
    }
    lab.write_workloads(&registry).expect("write registry");
    common::wait_version(&lab, 2, false);
    let probe = |node: &str, port: u16| {
        lab.command_in(node, PROBE)
            .expect("command")
            .args(["send", &api_addr(&lab, port), "64"])
            .output()
            .expect("probe")
            .status
            .success()
    };
    assert!(
        probe("node-2", 8080),
        "a probe from the exempted node address was captured"
    );
    assert_eq!(server.accepted(Duration::from_millis(300)).len(), 1);
    // Only the probe port: the same address is captured (and refused) on any other port.
    assert!(
        !probe("node-2", 9090),
        "the exempted address reached a port that is no probe port"
    );
    app_saw_nothing(&other, "a non-probe port from the exempted address");
    // Everything else stays captured: node-1's address and pods outside the mesh.
    assert!(
        !probe("node-1", 8080),
        "a non-exempt node reached a STRICT pod"
    );
    assert!(!reaches(&lab, "legacy", 8080));
    app_saw_nothing(&server, "non-exempt sources");
}
