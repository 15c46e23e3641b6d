//! Rolling upgrades of the agents (issue 16): a new agent started beside the running one takes
//! the node over — the pods' listening sockets change hands, the old agent drains — while
//! traffic runs. Root only; run one at a time (`cargo xtask test` does).
use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use meshlet_lab::{Lab, PodSpec};

mod common;
use common::{assert_only_tls, send, up, Capture, Server, PROBE};

/// In the short requests of the load, to look for on the wire.
const MARKER: &str = "MESHLET-HANDOVER-MARKER-5d1e";

/// The lab with an echo server on api:8080 that outlasts every test here, checked once from
/// web; returns the lab, the server's address and the server.
fn lab_with_echo() -> (Lab, String, Server) {
    let lab = up(&pods());
    let api = lab.topology.pod("api").expect("api").clone();
    let to = format!("{}:8080", api.ip);
    let server = Server::start_with(&lab, "api", 8080, 100_000, 180);
    let (ok, report, err) = send(&lab, "web", &to, 1024, None, None);
    assert!(ok, "before: {err} {report}");
    (lab, to, server)
}

/// Starts the probe's load from web to `to` (see `meshlet-lab-probe load`).
fn start_load(lab: &Lab, to: &str, rate: u32, secs: u64, streams: u32) -> Child {
    lab.command_in("web", PROBE)
        .expect("command")
        .env("PROBE_FILL", MARKER)
        .args([
            "load",
            to,
            &rate.to_string(),
            &secs.to_string(),
            &streams.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("load")
}

/// The load's report.
fn finish_load(load: Child) -> serde_json::Value {
    let out = load.wait_with_output().expect("load output");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "load report: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("web", "node-1", "frontend"),
        PodSpec::new("api", "node-2", "backend"),
    ]
}

/// Under steady load — new short connections web → api at 200 a second, and 20 long-lived
/// connections streaming the whole time — the agent of node-1, then that of node-2, is
/// replaced by a new one (each in its own cgroup, as a new DaemonSet pod is): not one new
/// connection is refused or fails, not one long-lived connection is reset, every byte comes
/// back intact (SHA-256 both ways), and each old agent exits by itself once its connections
/// have ended.
#[test]
fn a_rolling_upgrade_under_load_refuses_no_connection_and_resets_none() {
    upgrade_under_load(&[]);
}

/// The same, the new agents with another layout of the pinned maps (a test flag bumps every
/// map's layout version): each pins new maps beside the old ones, migrates the entries
/// before its programs replace the old ones, and unpins the old maps once its predecessor
/// has gone.
#[test]
fn a_rolling_upgrade_to_a_new_map_layout_migrates_the_maps_and_drops_nothing() {
    let lab = upgrade_under_load(&["--test-map-layout-bump=1"]);
    for node in ["node-1", "node-2"] {
        let log = lab.agent_log(node);
        assert!(
            log.contains("map entries migrated from another layout"),
            "{node}: {log}"
        );
        let pins = lab.topology.node(node).expect("node").bpf_pin_dir.clone();
        let maps: Vec<String> = std::fs::read_dir(format!("{pins}/maps"))
            .expect("maps folder")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            maps.iter().any(|m| m == "ENROLLED-v2") && !maps.iter().any(|m| m.ends_with("-v1")),
            "{node}: old layout still pinned, or new one missing: {maps:?}"
        );
    }
}

/// Runs the load, upgrades node-1 then node-2 (the new agents with `extra` arguments), checks
/// that nothing failed, and returns the lab.
fn upgrade_under_load(extra: &[&str]) -> meshlet_lab::Lab {
    let (mut lab, to, _server) = lab_with_echo();

    let secs: u64 = std::env::var("MESHLET_UPGRADE_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let node1 = lab.topology.node("node-1").expect("node-1").clone();
    let capture = Capture::start(&node1.netns, &lab.topology.node_link[0]);
    let started = Instant::now();
    let load = start_load(&lab, &to, 200, secs, 20);
    std::thread::sleep(Duration::from_secs(secs / 6));
    lab.upgrade_agent_with("node-1", extra)
        .expect("upgrade node-1");
    let node1_at = started.elapsed();
    std::thread::sleep(Duration::from_secs(secs / 4));
    lab.upgrade_agent_with("node-2", extra)
        .expect("upgrade node-2");
    let node2_at = started.elapsed();
    let report = finish_load(load);
    // Not one request in the clear on the wire between the nodes, handovers included.
    assert_only_tls(&capture.finish(), MARKER);
    println!(
        "node-1 upgraded at {node1_at:?}, node-2 at {node2_at:?}; load over {secs} s: {report}"
    );
    print_handover_log(&lab);
    let count = |key: &str| report[key].as_u64().unwrap_or(u64::MAX);
    assert_eq!(count("short_failed"), 0, "new connections failed: {report}");
    assert_eq!(
        count("long_failed"),
        0,
        "long-lived connections broke: {report}"
    );
    assert_eq!(count("long_ok"), 20, "{report}");
    // The schedule is 200 a second; a loaded two-core machine may lag, never fail.
    assert!(
        count("short_ok") >= 100 * secs,
        "too few connections ran: {report}"
    );

    // The old agents end by themselves once their connections have (well before the drain
    // deadline: the long-lived ones ended with the load), and say so.
    let drained = lab
        .wait_drained(Duration::from_secs(45))
        .expect("old agents exit");
    assert_eq!(drained.len(), 2, "{drained:?}");
    for (node, status) in &drained {
        assert!(
            status.success(),
            "the old agent of {node} exited with {status}"
        );
    }
    for node in ["node-1", "node-2"] {
        let log = lab.agent_log(node);
        assert!(
            log.contains("drained: every connection has ended"),
            "{node}: {log}"
        );
        assert!(!log.contains("drain deadline"), "{node}: {log}");
    }
    // The new agents serve on their own, and the node's sockets answer (pods, status).
    let (ok, report, err) = send(&lab, "web", &to, 64 * 1024, None, None);
    assert!(ok, "after: {err} {report}");
    let (ok, status, err) = common::meshlet_cli(&lab, "node-1", &["status"]);
    assert!(ok, "status after the upgrade: {err} {status}");
    lab
}

/// The agents' lines about the handover, and their warnings and errors.
fn print_handover_log(lab: &meshlet_lab::Lab) {
    const WORDS: &[&str] = &[
        "taking over",
        "taken over",
        "took the node",
        "handed over",
        "drain",
        "gone",
        "migrated",
        " WARN ",
        " ERROR ",
    ];
    for node in ["node-1", "node-2"] {
        let log = lab.agent_log(node);
        for line in log.lines().filter(|l| WORDS.iter().any(|w| l.contains(w))) {
            println!("{node}: {line}");
        }
    }
}

/// kill -9 of node-1's agent under load (100 new connections a second): while it is away,
/// web's new connections are refused (fail closed: a capture on node-1's link sees only TLS,
/// never a request); the agent started again adopts its pods by itself (nothing announces
/// them again) and serves; every failure falls inside the outage.
#[test]
fn an_agent_killed_under_load_fails_closed_and_serves_again_after_its_restart() {
    let (mut lab, to, _server) = lab_with_echo();
    let node1 = lab.topology.node("node-1").expect("node-1").clone();
    let capture = Capture::start(&node1.netns, &lab.topology.node_link[0]);
    let started = Instant::now();
    let load = start_load(&lab, &to, 100, 10, 0);
    std::thread::sleep(Duration::from_secs(3));
    let killed_at = started.elapsed().as_secs_f64();
    lab.kill_agent("node-1").expect("kill -9");
    std::thread::sleep(Duration::from_secs(2));
    let restarted_at = started.elapsed().as_secs_f64();
    lab.restart_agent("node-1").expect("restart");
    let back_at = started.elapsed().as_secs_f64();
    let report = finish_load(load);
    assert_only_tls(&capture.finish(), MARKER);
    let log = lab.agent_log("node-1");
    let adopted = log
        .lines()
        .rfind(|l| l.contains("pods of the previous agent adopted"))
        .unwrap_or_default()
        .to_string();
    println!(
        "killed at {killed_at:.2} s, restarted at {restarted_at:.2} s, serving at {back_at:.2} s; \
         {adopted}\nload: {report}"
    );
    let secs = |key: &str| report[key].as_f64().unwrap_or(f64::NAN);
    let count = |key: &str| report[key].as_u64().unwrap_or(u64::MAX);
    assert!(
        count("short_failed") > 0,
        "nothing was refused while the agent was away: {report}"
    );
    assert!(
        secs("first_failure_secs") >= killed_at - 0.05
            && secs("last_failure_secs") <= back_at + 0.5,
        "failures outside the outage ({killed_at:.2}..{back_at:.2} s): {report}"
    );
    assert!(count("short_ok") > 600, "too few served: {report}");
    assert!(adopted.contains("adopted=1"), "{log}");
    let (ok, report, err) = send(&lab, "web", &to, 64 * 1024, None, None);
    assert!(ok, "after: {err} {report}");
}
