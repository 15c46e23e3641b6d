//! Seeing into the agents in the lab: metrics that move by what happened, alert rules and a
//! dashboard that only use exported names, the CLI live and from a saved dump, readiness.
//! Root only; run one at a time (`cargo xtask test` does).
use std::{
    collections::BTreeSet,
    io::{Read, Write},
    time::{Duration, Instant},
};

use meshlet_lab::PodSpec;

mod common;
use common::{admin_get, bin_dir, meshlet_cli, sample, send, up, Server};

fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("web", "node-1", "frontend"),
        PodSpec::new("api", "node-2", "backend"),
    ]
}

#[test]
fn metrics_move_by_what_happened() {
    let lab = up(&pods());
    let _server = Server::start(&lab, "api", 8080);
    let before1 = admin_get(&lab, "node-1", 15000, "/metrics").1;
    let before2 = admin_get(&lab, "node-2", 15000, "/metrics").1;
    let api = lab.topology.pod("api").expect("api").ip;
    for _ in 0..3 {
        let (ok, report, err) = send(&lab, "web", &format!("{api}:8080"), 4096, None, None);
        assert!(ok, "{err} {report}");
    }
    // The closes are counted when each connection's task ends: give them a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (after1, after2) = loop {
        let a1 = admin_get(&lab, "node-1", 15000, "/metrics").1;
        let a2 = admin_get(&lab, "node-2", 15000, "/metrics").1;
        let closed = |m: &str, d: &str| {
            sample(
                m,
                "meshlet_connections_closed_total",
                &[&format!("direction=\"{d}\"")],
            )
        };
        if (closed(&a1, "outbound") - closed(&before1, "outbound") >= 3.0
            && closed(&a2, "inbound") - closed(&before2, "inbound") >= 3.0)
            || Instant::now() > deadline
        {
            break (a1, a2);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let delta = |before: &str, after: &str, name: &str, with: &[&str]| {
        sample(after, name, with) - sample(before, name, with)
    };
    let out = [
        "direction=\"outbound\"",
        "source_identity=\"spiffe://cluster.local/ns/default/sa/frontend\"",
        "destination_identity=\"spiffe://cluster.local/ns/default/sa/backend\"",
    ];
    let inb = [
        "direction=\"inbound\"",
        "source_identity=\"spiffe://cluster.local/ns/default/sa/frontend\"",
    ];
    assert_eq!(
        delta(&before1, &after1, "meshlet_connections_opened_total", &out),
        3.0,
        "{after1}"
    );
    assert_eq!(
        delta(&before1, &after1, "meshlet_connections_closed_total", &out),
        3.0
    );
    assert_eq!(
        delta(&before1, &after1, "meshlet_sent_bytes_total", &out),
        3.0 * 4096.0
    );
    assert_eq!(
        delta(&before1, &after1, "meshlet_received_bytes_total", &out),
        3.0 * 4096.0
    );
    assert_eq!(
        delta(&before2, &after2, "meshlet_connections_opened_total", &inb),
        3.0,
        "{after2}"
    );
    assert_eq!(
        delta(&before2, &after2, "meshlet_sent_bytes_total", &inb),
        3.0 * 4096.0
    );
    assert!(
        delta(
            &before1,
            &after1,
            "meshlet_redirect_events_total",
            &["event=\"redirected\""]
        ) >= 3.0
    );
    assert_eq!(
        sample(&after1, "meshlet_connections_active", &["outbound"]),
        0.0
    );
    assert_eq!(sample(&after1, "meshlet_control_plane_connected", &[]), 1.0);
    let expiry = sample(
        &after2,
        "meshlet_certificate_expiry_timestamp_seconds",
        &["identity=\"spiffe://cluster.local/ns/default/sa/backend\""],
    );
    assert!(expiry > 1.7e9, "certificate expiry gauge: {expiry}");

    // A plaintext client refused in STRICT mode is a policy denial.
    let before = admin_get(&lab, "node-2", 15000, "/metrics").1;
    let ok = lab
        .command_in("node-1", common::PROBE)
        .expect("command")
        .args(["send", &format!("{api}:8080"), "16"])
        .output()
        .expect("probe")
        .status
        .success();
    assert!(!ok);
    let after = admin_get(&lab, "node-2", 15000, "/metrics").1;
    let reason = ["reason=\"plaintext_in_strict_mode\""];
    assert_eq!(
        delta(&before, &after, "meshlet_policy_denials_total", &reason),
        1.0
    );
    assert!(
        delta(
            &before,
            &after,
            "meshlet_redirect_events_total",
            &["event=\"inbound_captured\""]
        ) >= 1.0
    );
}

#[test]
fn alert_rules_and_dashboard_use_only_exported_metrics() {
    let lab = up(&pods());
    let _server = Server::start(&lab, "api", 8080);
    let api = lab.topology.pod("api").expect("api").ip;
    assert!(send(&lab, "web", &format!("{api}:8080"), 1024, None, None).0);
    let metrics = admin_get(&lab, "node-1", 15000, "/metrics").1;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut used = BTreeSet::new();
    for file in ["prometheus-alerts.yaml", "grafana-dashboard.json"] {
        let text = std::fs::read_to_string(root.join(file)).expect("deploy file");
        if file.ends_with(".json") {
            serde_json::from_str::<serde_json::Value>(&text).expect("dashboard is JSON");
        }
        let mut rest = text.as_str();
        while let Some(i) = rest.find("meshlet_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            used.insert(name);
        }
    }
    assert!(used.len() >= 8, "{used:?}");
    let declared: BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for name in &used {
        let base = name.strip_suffix("_total").unwrap_or(name);
        assert!(
            declared.contains(base),
            "{name} is used in deploy/ but the agent does not export it (it exports {declared:?})"
        );
    }
}

#[test]
fn every_cli_command_works_live_and_from_a_saved_dump() {
    let lab = up(&pods());
    let _server = Server::start(&lab, "api", 8080);
    let api = lab.topology.pod("api").expect("api").ip;
    assert!(send(&lab, "web", &format!("{api}:8080"), 1024, None, None).0);
    let headers: &[(&str, &[&str])] = &[
        ("status", &["node:", "ready:", "control plane:"]),
        (
            "workloads",
            &["WORKLOAD", "NODE", "IPS", "MODE", "LOCAL", "IDENTITY"],
        ),
        (
            "certs",
            &[
                "IDENTITY",
                "STATE",
                "SERIAL",
                "NOT BEFORE",
                "NOT AFTER",
                "ROTATES IN",
                "ISSUER CHAIN",
            ],
        ),
        (
            "connections",
            &[
                "DIRECTION",
                "TRANSPORT",
                "SOURCE",
                "DESTINATION",
                "AGE",
                "SENT",
                "RECEIVED",
            ],
        ),
        (
            "policies",
            &[
                "WORKLOAD",
                "MODE",
                "PORT MODES",
                "CAPTURED",
                "POLICIES",
                "DEFAULT",
            ],
        ),
        ("config-dump", &["node:", "WORKLOAD", "IDENTITY"]),
    ];
    for (command, columns) in headers {
        let (ok, out, err) = meshlet_cli(&lab, "node-2", &[command]);
        assert!(ok, "meshlet {command}: {err}");
        for c in *columns {
            assert!(out.contains(c), "meshlet {command} lacks {c:?}:\n{out}");
        }
        let (ok, json, err) = meshlet_cli(&lab, "node-2", &[command, "-o", "json"]);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(&json)
            .unwrap_or_else(|e| panic!("meshlet {command} -o json: {e}\n{json}"));
        let (ok, yaml, err) = meshlet_cli(&lab, "node-2", &[command, "-o", "yaml"]);
        assert!(ok && !yaml.is_empty(), "{err}");
    }
    let (_, status, _) = meshlet_cli(&lab, "node-2", &["status"]);
    println!("$ meshlet status\n{status}");
    let (_, certs, _) = meshlet_cli(&lab, "node-2", &["certs"]);
    println!("$ meshlet certs\n{certs}");
    assert!(
        certs.contains("spiffe://cluster.local/ns/default/sa/backend  valid"),
        "{certs}"
    );

    // A saved dump answers the same questions the same way.
    let (ok, dump, err) = meshlet_cli(&lab, "node-2", &["config-dump", "-o", "json"]);
    assert!(ok, "{err}");
    let file = std::env::temp_dir().join(format!("meshlet-dump-{}.json", std::process::id()));
    std::fs::write(&file, dump).expect("save dump");
    let file_arg = file.to_str().expect("utf-8").to_string();
    for args in [
        vec!["workloads", "-o", "json"],
        vec!["certs", "-o", "json"],
        vec!["policies", "-o", "json"],
        vec![
            "check",
            "--from",
            "default/web",
            "--to",
            "default/api:8080",
            "-o",
            "json",
        ],
    ] {
        let live = meshlet_cli(&lab, "node-2", &args).1;
        let mut with_file = args.clone();
        with_file.extend(["--file", &file_arg]);
        let saved = meshlet_cli(&lab, "node-2", &with_file).1;
        let (live, saved): (serde_json::Value, serde_json::Value) = (
            serde_json::from_str(&live).expect("live json"),
            serde_json::from_str(&saved).expect("saved json"),
        );
        assert_eq!(live, saved, "meshlet {args:?} differs from --file");
    }
    let _ = std::fs::remove_file(&file);

    // A clear error with no agent there.
    let (ok, _, err) = meshlet_cli(&lab, "node-2", &["status", "--admin", "127.0.0.1:15999"]);
    assert!(!ok && err.contains("no agent at 127.0.0.1:15999"), "{err}");

    // The log level changes at run time through the admin API.
    let netns = lab.topology.node("node-2").expect("node").netns.clone();
    let answer = meshlet_lab::netns::run_in(&netns, || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", 15000))?;
        write!(
            s,
            "POST /logging?level=debug HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        )?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })
    .expect("POST /logging");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(lab
        .agent_log("node-2")
        .contains("event=\"log_level_changed\" filter=debug"));
}

/// An agent started by the test itself (beside the lab's), killed when dropped.
struct ExtraAgent(std::process::Child);

impl Drop for ExtraAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn readiness_is_false_before_the_first_update_and_true_after() {
    let lab = up(&pods());
    let cgroup = "/sys/fs/cgroup/unified/meshlet-lab/node-x";
    std::fs::create_dir_all(cgroup).expect("cgroup");
    let late = "/run/meshlet-lab/late-controlplane.sock";
    let agent = ExtraAgent(
        lab.command_in("node-1", bin_dir().join("meshlet").to_str().expect("path"))
            .expect("command")
            .args([
                "agent",
                "--node",
                "node-x",
                "--control-plane",
                &format!("unix:{late}"),
                "--node-socket",
                "/run/meshlet-lab/node-x.sock",
                "--pod-cgroup",
                cgroup,
                "--bpf-pin-dir",
                "/sys/fs/bpf/meshlet-lab/node-x",
                "--admin-addr",
                "127.0.0.1:15100",
            ])
            .args(lab.agent_auth_args("node-x").expect("join token"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("extra agent"),
    );
    let wait_for = |want: u16| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let netns = lab.topology.node("node-1").expect("node").netns.clone();
            let got = meshlet_lab::netns::run_in(&netns, || {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", 15100))?;
                write!(
                    s,
                    "GET /healthz/ready HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )?;
                let mut text = String::new();
                s.read_to_string(&mut text)?;
                Ok(text)
            });
            if let Ok(text) = &got {
                if text.starts_with(&format!("HTTP/1.1 {want}")) {
                    return text.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "readiness never became {want}: {got:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let not_ready = wait_for(503);
    assert!(
        not_ready.contains("no control-plane update applied yet"),
        "{not_ready}"
    );
    // Now the control plane appears where the agent looks for it.
    std::os::unix::fs::symlink(&lab.topology.controlplane_socket, late).expect("symlink");
    let ready = wait_for(200);
    assert!(ready.contains("\"ready\":true"), "{ready}");
    drop(agent);
    let _ = std::fs::remove_file(late);
    let _ = std::fs::remove_dir(cgroup);
}
