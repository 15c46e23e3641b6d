//! `cargo xtask demo`: web (node-1, frontend) → api (node-2, backend) through both agents,
//! explained; exit code 0 only when every claim below held.
use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use meshlet_lab::{Lab, LabOptions};

fn check(ok: bool, what: &str, failures: &mut Vec<String>) {
    println!("  [{}] {what}", if ok { "ok" } else { "FAILED" });
    if !ok {
        failures.push(what.to_string());
    }
}

pub fn run(bin_dir: &Path, timeout: Duration) -> anyhow::Result<()> {
    println!("== meshlet demo: bringing up the lab (2 nodes, 2 pods, control plane, 2 agents)");
    let lab = Lab::up(&crate::demo_pods(), &LabOptions::new(bin_dir))?;
    let web = lab.topology.pod("web").context("web")?.clone();
    let api = lab.topology.pod("api").context("api")?.clone();
    for p in [&web, &api] {
        println!(
            "   pod {:<4} on {}  ip {:<11} identity {}",
            p.name, p.node, p.ip, p.identity
        );
    }
    let probe = bin_dir.join("meshlet-lab-probe");
    let mut server = lab
        .command_in("api", &probe)?
        .args(["serve", "8080", "10", "120"])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting the server in api")?;
    let mut lines = BufReader::new(server.stdout.take().context("server stdout")?).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    if !first.starts_with("LISTENING") {
        bail!("server in api did not start: {first:?}");
    }
    println!("\n== web → {}:8080: 64 KiB request, echoed back", api.ip);
    let started = Instant::now();
    let output = lab
        .command_in("web", &probe)?
        .args(["send", &format!("{}:8080", api.ip), "65536"])
        .output()?;
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).unwrap_or(serde_json::Value::Null);
    let accept = lines.next().transpose()?.unwrap_or_default();
    let _ = server.kill();
    let _ = server.wait();

    // Give the agents a moment to write their access lines.
    let deadline = Instant::now() + timeout.min(Duration::from_secs(5));
    let (mut log1, mut log2) = (String::new(), String::new());
    while Instant::now() < deadline {
        log1 = lab.agent_log("node-1");
        log2 = lab.agent_log("node-2");
        if log1.contains("direction=\"outbound\"") && log2.contains("direction=\"inbound\"") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut failures = Vec::new();
    println!("   client report: {report}");
    println!("   server saw:    {accept}");
    println!("\n== what held");
    check(
        output.status.success() && report["ok"] == true,
        "the bytes came back intact (SHA-256 of 64 KiB sent = SHA-256 received)",
        &mut failures,
    );
    check(
        report["peer"] == format!("{}:8080", api.ip).as_str(),
        &format!(
            "web's getpeername() says {} (the peer it dialled, not the agent)",
            report["peer"]
        ),
        &mut failures,
    );
    check(
        accept.starts_with(&format!("ACCEPT {}:", web.ip)),
        &format!(
            "api's server saw the connection come from web's own IP {}",
            web.ip
        ),
        &mut failures,
    );
    let outbound = log1
        .lines()
        .rev()
        .find(|l| l.contains("direction=\"outbound\"") && l.contains(&api.ip.to_string()))
        .unwrap_or_default()
        .to_string();
    let inbound = log2
        .lines()
        .rev()
        .find(|l| l.contains("direction=\"inbound\"") && l.contains(&web.identity))
        .unwrap_or_default()
        .to_string();
    check(
        outbound.contains(&web.identity) && outbound.contains(&api.identity),
        &format!(
            "node-1's agent tunnelled it as {} to {}",
            web.identity, api.identity
        ),
        &mut failures,
    );
    check(
        inbound.contains(&web.identity) && inbound.contains("outcome=\"closed\""),
        &format!(
            "node-2's agent verified the client as {} and delivered it",
            web.identity
        ),
        &mut failures,
    );
    println!("\n== the agents' own view of the connection (access log)");
    println!("   node-1: {}", outbound.trim());
    println!("   node-2: {}", inbound.trim());
    println!("\n   (took {:?})", started.elapsed());
    lab.down();
    if !meshlet_lab::lab::leftovers().is_empty() {
        bail!("teardown left {:?}", meshlet_lab::lab::leftovers());
    }
    println!("== lab removed");
    if failures.is_empty() {
        println!("== demo passed");
        Ok(())
    } else {
        bail!("demo failed: {failures:?}")
    }
}
