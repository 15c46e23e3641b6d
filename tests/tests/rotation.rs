//! Certificate lifecycle in the lab with 2-minute certificates: rotation under steady
//! traffic without a failed connection, and, with the CA gone, the current certificate
//! serving until it expires and then failing closed. Slow (about seven minutes); root only;
//! run one at a time (`cargo xtask test` does).
use std::time::{Duration, Instant, SystemTime};

use meshlet_lab::{Lab, LabOptions, PodSpec};

mod common;
use common::{bin_dir, meshlet_cli, metrics, sample, send, Server};

const LIFETIME: u64 = 120;

fn lab() -> Lab {
    let mut options = LabOptions::new(bin_dir());
    options.cert_lifetime = LIFETIME;
    // Node certificates live two minutes too: their renewal, and the control plane ending a
    // connection whose node certificate expired, happen under the same traffic.
    options.controlplane_args = vec![
        "--max-cert-lifetime".into(),
        LIFETIME.to_string(),
        "--node-cert-lifetime".into(),
        LIFETIME.to_string(),
    ];
    Lab::up(
        &[
            PodSpec::new("web", "node-1", "frontend"),
            PodSpec::new("api", "node-2", "backend"),
        ],
        &options,
    )
    .expect("lab up")
}

fn api(lab: &Lab) -> String {
    format!("{}:8080", lab.topology.pod("api").expect("api").ip)
}

fn rotations(lab: &Lab, node: &str) -> f64 {
    sample(
        &metrics(lab, node),
        "meshlet_certificate_rotations_total",
        &[],
    )
}

#[test]
fn two_minute_certificates_rotate_under_steady_traffic_without_a_failure() {
    let lab = lab();
    let run = Duration::from_secs(300);
    let pause = Duration::from_millis(500);
    let max_connections = (run.as_millis() / pause.as_millis()) as usize + 50;
    let _server = Server::start_with(&lab, "api", 8080, max_connections, run.as_secs() + 60);
    let before = (rotations(&lab, "node-1"), rotations(&lab, "node-2"));
    let started = Instant::now();
    let (mut sent, mut failed) = (0, Vec::new());
    while started.elapsed() < run && sent < max_connections - 10 {
        let (ok, _, err) = send(&lab, "web", &api(&lab), 1024, None, None);
        sent += 1;
        if !ok {
            failed.push(format!("{:?}: {err}", started.elapsed()));
        }
        std::thread::sleep(pause);
    }
    let after = (rotations(&lab, "node-1"), rotations(&lab, "node-2"));
    println!(
        "{sent} connections in {:?}, {} failed; certificates issued node-1 {} → {}, node-2 {} → {}",
        started.elapsed(),
        failed.len(),
        before.0,
        after.0,
        before.1,
        after.1
    );
    for node in ["node-1", "node-2"] {
        let renewals = lab
            .agent_log(node)
            .matches("event=\"node_certificate_renewed\"")
            .count();
        println!("{node}: node certificate renewed {renewals} times");
        assert!(
            renewals >= 2,
            "{node} renewed its node certificate {renewals} times"
        );
    }
    assert!(
        failed.is_empty(),
        "connections failed during rotation:\n{}",
        failed.join("\n")
    );
    assert!(
        after.0 - before.0 >= 2.0 && after.1 - before.1 >= 2.0,
        "fewer than two rotations per node in {run:?} of {LIFETIME} s certificates"
    );
}

/// `not_after` (unix seconds) of the one certificate on `node`.
fn not_after(lab: &Lab, node: &str) -> u64 {
    let (ok, out, err) = meshlet_cli(lab, node, &["certs", "-o", "json"]);
    assert!(ok, "meshlet certs: {err}");
    let certs: serde_json::Value = serde_json::from_str(&out).expect("json");
    certs[0]["not_after"].as_u64().expect("not_after")
}

#[test]
fn with_the_ca_gone_the_certificate_serves_until_it_expires_then_connections_fail_closed() {
    let mut lab = lab();
    let _server = Server::start_with(&lab, "api", 8080, 100, 300);
    lab.kill_controlplane().expect("stop the control plane");
    let (ok, _, err) = send(&lab, "web", &api(&lab), 1024, None, None);
    assert!(
        ok,
        "the current certificate stopped serving with the CA gone: {err}"
    );
    let expiry = not_after(&lab, "node-1");
    let now = || {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    };
    assert!(
        expiry <= now() + LIFETIME + 60,
        "certificate longer than asked"
    );
    // Still good shortly before expiry.
    while now() + 15 < expiry {
        std::thread::sleep(Duration::from_secs(1));
    }
    let (ok, _, err) = send(&lab, "web", &api(&lab), 1024, None, None);
    assert!(
        ok,
        "the certificate stopped serving before it expired: {err}"
    );
    while now() <= expiry + 1 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, _, _) = send(&lab, "web", &api(&lab), 1024, None, None);
    assert!(!ok, "a connection went through on an expired identity");
    let log = lab.agent_log("node-1");
    assert!(
        log.lines()
            .any(|l| l.contains("outcome=\"refused\"") && l.contains("identity expired")),
        "no refusal with reason `identity expired` in node-1's log"
    );
    assert!(
        log.contains("event=\"certificate_request_failed\""),
        "the agent did not keep asking the CA"
    );
}
