//! Rolling upgrades of the agents (issue 16): a new agent started beside the running one takes
//! the node over — the pods' listening sockets change hands, the old agent drains — while
//! traffic runs. Root only; run one at a time (`cargo xtask test` does).
use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use meshlet_lab::PodSpec;

mod common;
use common::{send, up, Server, PROBE};

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
    let mut lab = up(&pods());
    let api = lab.topology.pod("api").expect("api").clone();
    let to = format!("{}:8080", api.ip);
    let _server = Server::start_with(&lab, "api", 8080, 100_000, 180);
    let (ok, report, err) = send(&lab, "web", &to, 1024, None, None);
    assert!(ok, "before: {err} {report}");

    let secs: u64 = std::env::var("MESHLET_UPGRADE_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    let started = Instant::now();
    let load = lab
        .command_in("web", PROBE)
        .expect("command")
        .args(["load", &to, "200", &secs.to_string(), "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("load");
    std::thread::sleep(Duration::from_secs(secs / 6));
    lab.upgrade_agent_with("node-1", extra)
        .expect("upgrade node-1");
    let node1_at = started.elapsed();
    std::thread::sleep(Duration::from_secs(secs / 4));
    lab.upgrade_agent_with("node-2", extra)
        .expect("upgrade node-2");
    let node2_at = started.elapsed();
    let out = load.wait_with_output().expect("load output");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "load report: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
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
