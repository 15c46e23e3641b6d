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
    println!(
        "== meshlet demo: bringing up the lab (2 nodes, 3 dual-stack pods, control plane, 2 agents)"
    );
    let mut options = LabOptions::new(bin_dir);
    options.dual_stack = true;
    let lab = Lab::up(&crate::demo_pods(), &options)?;
    let web = lab.topology.pod("web").context("web")?.clone();
    let api = lab.topology.pod("api").context("api")?.clone();
    let api_b = lab.topology.pod("api-b").context("api-b")?.clone();
    for p in [&web, &api, &api_b] {
        println!(
            "   pod {:<5} on {}  ips {:<30} identity {}",
            p.name,
            p.node,
            p.ips()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" "),
            p.identity
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

    service_step(&lab, bin_dir, &[&api, &api_b], &mut failures)?;
    lab.down();
    if !meshlet_lab::lab::leftovers().is_empty() {
        bail!("teardown left {:?}", meshlet_lab::lab::leftovers());
    }
    println!("== lab removed");
    kubernetes_step(bin_dir, &mut failures)?;
    if !meshlet_lab::lab::leftovers().is_empty() {
        bail!("teardown left {:?}", meshlet_lab::lab::leftovers());
    }
    if failures.is_empty() {
        println!("== demo passed");
        Ok(())
    } else {
        bail!("demo failed: {failures:?}")
    }
}

/// The `api` Service (cluster IPs 10.96.0.10 and fd00:96::10, port 80 → `http` = 8080) with
/// endpoints on both nodes: web dials each cluster IP and is spread over them, through the
/// tunnel, also to the endpoint on its own node.
fn service_step(
    lab: &Lab,
    bin_dir: &Path,
    endpoints: &[&meshlet_lab::topology::PodInfo],
    failures: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut registry = lab.topology.workloads_json();
    registry["services"] = serde_json::json!([{
        "namespace": "default", "name": "api", "cluster_ips": ["10.96.0.10", "fd00:96::10"],
        "ports": [{"name": "web", "port": 80, "target_port_name": "http"}],
        "endpoints": endpoints.iter().map(|p| serde_json::json!({
            "workload_uid": p.uid,
            "addresses": p.ips().iter().map(ToString::to_string).collect::<Vec<_>>(),
            "ready": true, "serving": true, "ports": {"http": 8080},
        })).collect::<Vec<_>>(),
    }]);
    lab.write_workloads(&registry)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !["node-1", "node-2"].iter().all(|n| {
        lab.agent_log(n)
            .contains("applied control-plane update version=2 ")
    }) {
        if Instant::now() > deadline {
            bail!("the agents did not take the api Service");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let probe = bin_dir.join("meshlet-lab-probe");
    let mut servers = Vec::new();
    for p in endpoints {
        let mut child = lab
            .command_in(&p.name, &probe)?
            .env("PROBE_LISTEN", "::")
            .args(["serve", "8080", "100", "60"])
            .stdout(Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let _listening = lines.next();
        servers.push((child, lines));
    }
    println!("\n== web → Service api: 20 connections to 10.96.0.10:80, 20 to [fd00:96::10]:80");
    let mut reports = Vec::new();
    for vip in ["10.96.0.10:80", "[fd00:96::10]:80"] {
        let out = lab
            .command_in("web", &probe)?
            .args(["many", vip, "20"])
            .output()?;
        let report: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
        println!("   {vip}: {report}");
        reports.push(report);
    }
    let mut counts = Vec::new();
    for (mut child, lines) in servers {
        let _ = child.kill();
        let _ = child.wait();
        counts.push(
            lines
                .map_while(Result::ok)
                .filter(|l| l.starts_with("ACCEPT"))
                .count(),
        );
    }
    check(
        reports.iter().all(|r| r["ok"] == 20),
        "every connection to both cluster IPs was answered through the mesh",
        failures,
    );
    check(
        counts.iter().all(|c| *c > 0),
        &format!(
            "spread over the endpoints on both nodes (api on node-2: {}, api-b on node-1: {})",
            counts.first().copied().unwrap_or(0),
            counts.get(1).copied().unwrap_or(0)
        ),
        failures,
    );
    let services = lab
        .command_in("node-1", bin_dir.join("meshlet"))?
        .arg("services")
        .output()?;
    println!("\n== meshlet services (node-1)");
    print!("{}", String::from_utf8_lossy(&services.stdout));
    let check_out = lab
        .command_in("node-1", bin_dir.join("meshlet"))?
        .args([
            "check",
            "--from",
            "default/web",
            "--to",
            "svc/default/api:80",
        ])
        .output()?;
    println!("\n== meshlet check --from default/web --to svc/default/api:80");
    print!("{}", String::from_utf8_lossy(&check_out.stdout));
    Ok(())
}

/// The same mesh run from Kubernetes: the lab's emulated API server holds the pods (the
/// control plane reads them, the agents join with their pods' service account tokens), and an
/// AuthorizationPolicy applied with `kubectl create -f` closes a live connection it denies.
fn kubernetes_step(bin_dir: &Path, failures: &mut Vec<String>) -> anyhow::Result<()> {
    println!("\n== Kubernetes mode: an emulated API server, the control plane reading it, kubectl");
    let mut options = LabOptions::new(bin_dir);
    options.kubernetes = true;
    let pods = &crate::demo_pods()[..2];
    let lab = Lab::up(pods, &options)?;
    let api = lab.topology.pod("api").context("api")?.clone();
    let kubectl = |args: &[&str], stdin: Option<&str>| -> anyhow::Result<(bool, String)> {
        let mut child = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(lab.kubeconfig_path())
            .arg("--cache-dir")
            .arg(lab.kubeconfig_path().with_file_name("kubectl-cache"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("kubectl")?;
        if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
            use std::io::Write;
            input.write_all(text.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    };
    let columns = "custom-columns=NAMESPACE:.metadata.namespace,NAME:.metadata.name,NODE:.spec.nodeName,IP:.status.podIP,SERVICE-ACCOUNT:.spec.serviceAccountName";
    let (_, pods_out) = kubectl(&["get", "pods", "-A", "-o", columns], None)?;
    println!("$ kubectl get pods -A -o {columns}\n{pods_out}");
    let probe = bin_dir.join("meshlet-lab-probe");
    let mut server = lab
        .command_in("api", &probe)?
        .args(["serve", "8080", "10", "60"])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(server.stdout.take().context("stdout")?).lines();
    let _listening = lines.next();
    let mut ping = lab
        .command_in("web", &probe)?
        .args(["ping", &format!("{}:8080", api.ip), "30"])
        .stdout(Stdio::piped())
        .spawn()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let ping_out = ping.stdout.take().context("stdout")?;
    std::thread::spawn(move || {
        for line in BufReader::new(ping_out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let connected = rx.recv_timeout(Duration::from_secs(10)).ok();
    check(
        connected.as_deref() == Some("CONNECTED"),
        "web holds a live mTLS connection to api (pods, identities and node joins all from the API)",
        failures,
    );
    let policy = "apiVersion: security.meshlet.dev/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-default\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: api\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"default\"]\n";
    println!("$ kubectl create -f deny.yaml\n{policy}");
    let (ok, out) = kubectl(&["create", "-f", "-"], Some(policy))?;
    print!("{out}");
    check(ok, "kubectl created the AuthorizationPolicy", failures);
    let closed = rx.recv_timeout(Duration::from_secs(15)).ok();
    check(
        closed.as_deref() == Some("CLOSED"),
        "the live connection was closed by the new DENY policy",
        failures,
    );
    std::thread::sleep(Duration::from_millis(500));
    let (_, status) = kubectl(
        &[
            "get",
            "authorizationpolicy",
            "deny-default",
            "-o",
            "jsonpath={.status.conditions[0]}",
        ],
        None,
    )?;
    println!("   its status: {status}");
    let _ = ping.kill();
    let _ = ping.wait();
    let _ = server.kill();
    let _ = server.wait();
    lab.down();
    Ok(())
}
