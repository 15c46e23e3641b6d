//! `cargo xtask bench`: meshlet against plain TCP between the same kind of pods, in one run.
//!
//! Two paths cross the same node link: `client` → `server` (both enrolled: through both agents)
//! and `pclient` → `pserver` (neither enrolled: plain TCP). Real tools from Debian measure each:
//! iperf3 (bulk), sockperf (64 B ping-pong), redis-benchmark (PING, and a fresh connection per
//! request). Agent memory is read from /proc, idle and with many idle tunnelled connections.
use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use meshlet_lab::{Lab, LabOptions, PodSpec};
use serde_json::json;

/// How long and how much.
pub struct Plan {
    pub seconds: u32,
    pub redis_requests: u32,
    pub redis_new_connections: u32,
    pub idle_connections: u32,
    /// Plain and meshlet are measured alternately this many times; the table shows medians.
    pub rounds: u32,
    pub name: &'static str,
    /// Extra arguments for both agents (the configuration under test).
    pub agent_args: Vec<String>,
}

impl Plan {
    pub fn full() -> Self {
        Self {
            seconds: 10,
            redis_requests: 100_000,
            redis_new_connections: 8_000,
            idle_connections: 10_000,
            rounds: 3,
            name: "bench",
            agent_args: Vec::new(),
        }
    }

    /// A smoke run for `cargo xtask test`: every tool and path once, briefly; nothing asserted.
    pub fn quick() -> Self {
        Self {
            seconds: 1,
            redis_requests: 2_000,
            redis_new_connections: 200,
            idle_connections: 200,
            rounds: 1,
            name: "bench-quick",
            agent_args: Vec::new(),
        }
    }
}

struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn output(lab: &Lab, pod: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = lab
        .command_in(pod, program)?
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("running {program} in {pod} (is it installed? `cargo xtask setup`)")
        })?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} in {pod} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn iperf(lab: &Lab, pod: &str, ip: &str, streams: u32, seconds: u32) -> anyhow::Result<f64> {
    let text = output(
        lab,
        pod,
        "iperf3",
        &[
            "-c",
            ip,
            "-p",
            "5201",
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_str(&text).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| bps / 1e9)
        .context("iperf3 reported no throughput")
}

/// (p50, p99) in microseconds.
fn sockperf(lab: &Lab, pod: &str, ip: &str, seconds: u32) -> anyhow::Result<(f64, f64)> {
    let text = output(
        lab,
        pod,
        "sockperf",
        &[
            "ping-pong",
            "--tcp",
            "-i",
            ip,
            "-p",
            "11111",
            "-m",
            "64",
            "-t",
            &seconds.to_string(),
        ],
    )?;
    let percentile = |p: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse().ok())
    };
    Ok((
        percentile("50.000").context("sockperf p50")?,
        percentile("99.000").context("sockperf p99")?,
    ))
}

fn redis(
    lab: &Lab,
    pod: &str,
    ip: &str,
    clients: u32,
    requests: u32,
    keepalive: bool,
) -> anyhow::Result<f64> {
    let (clients, requests) = (clients.to_string(), requests.to_string());
    // PING_MBULK only: `-t ping` would also run PING_INLINE, whose fresh connections (with
    // `-k 0`) fill the source ports with TIME_WAITs before the measured test starts.
    let mut args = vec![
        "-h",
        ip,
        "-p",
        "6379",
        "-t",
        "ping_mbulk",
        "-n",
        &requests,
        "-c",
        &clients,
        "-q",
    ];
    if !keepalive {
        args.extend(["-k", "0"]);
    }
    let text = output(lab, pod, "redis-benchmark", &args)?;
    text.split("PING_MBULK: ")
        .filter_map(|part| part.split(" requests per second").next())
        .filter_map(|n| n.trim().parse::<f64>().ok())
        .last()
        .context("redis-benchmark reported no rate")
}

/// Fresh connections per second (`-k 0`). `requests` stays well under the ~14 000 ports that
/// connect() takes first (the kernel gives connect() the even half of the range): past them,
/// every connect() searches the range and the figure measures that search, on either path
/// (10 000 requests of PING_INLINE before PING_MBULK once gave both paths ~1 100/s).
fn redis_new_connections(lab: &Lab, pod: &str, ip: &str, requests: u32) -> anyhow::Result<f64> {
    redis(lab, pod, ip, 4, requests, false)
}

/// The bench Service's cluster IP (in front of the `server` pod).
const BENCH_VIP: &str = "10.96.0.50";

fn medians(runs: &[[f64; 8]]) -> [f64; 8] {
    let mut out = [0.0; 8];
    for (i, slot) in out.iter_mut().enumerate() {
        let mut column: Vec<f64> = runs.iter().map(|r| r[i]).collect();
        column.sort_by(f64::total_cmp);
        *slot = column.get(column.len() / 2).copied().unwrap_or(0.0);
    }
    out
}

fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")
}

struct Row {
    name: &'static str,
    unit: &'static str,
    plain: Option<f64>,
    mesh: f64,
    /// Higher is better (throughput) or lower (latency, memory).
    higher_better: bool,
    target: &'static str,
}

pub fn run(bin_dir: &Path, plan: Plan) -> anyhow::Result<()> {
    let pods = vec![
        PodSpec::new("client", "node-1", "bench-client"),
        PodSpec::new("server", "node-2", "bench-server"),
        PodSpec::new("pclient", "node-1", "plain").outside_mesh(),
        PodSpec::new("pserver", "node-2", "plain").outside_mesh(),
    ];
    println!(
        "== bench ({}): bringing up the lab (agent arguments: {:?})",
        plan.name, plan.agent_args
    );
    let mut options = LabOptions::new(bin_dir);
    options.agent_args = plan.agent_args.clone();
    let lab = Lab::up(&pods, &options)?;
    let ip = |pod: &str| -> anyhow::Result<String> {
        Ok(lab.topology.pod(pod).context("pod")?.ip.to_string())
    };
    let (server_ip, pserver_ip) = (ip("server")?, ip("pserver")?);
    // A Service in front of the server, so that the load-balancing path is measured too.
    let mut registry = lab.topology.workloads_json();
    registry["services"] = serde_json::json!([{
        "namespace": "default", "name": "bench", "cluster_ips": [BENCH_VIP],
        "ports": [{"port": 6379}],
        "endpoints": [{"workload_uid": "uid-server", "addresses": [server_ip], "ready": true}],
    }]);
    lab.write_workloads(&registry)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !lab
        .agent_log("node-1")
        .contains("applied control-plane update version=2 ")
    {
        if Instant::now() > deadline {
            bail!("node-1's agent did not take the bench Service");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let agent1 = lab.agent_pid("node-1").context("node-1 agent")?;
    let agent2 = lab.agent_pid("node-2").context("node-2 agent")?;
    std::thread::sleep(Duration::from_millis(500));
    let idle_rss = (rss_kib(agent1)?, rss_kib(agent2)?);

    let mut servers = Servers(Vec::new());
    let probe = bin_dir.join("meshlet-lab-probe");
    for pod in ["server", "pserver"] {
        servers.0.push(
            lab.command_in(pod, "iperf3")?
                .args(["-s", "-p", "5201"])
                .stdout(Stdio::null())
                .spawn()?,
        );
        servers.0.push(
            lab.command_in(pod, "sockperf")?
                .args(["server", "--tcp", "-i", "0.0.0.0", "-p", "11111"])
                .stdout(Stdio::null())
                .spawn()?,
        );
        servers.0.push(
            lab.command_in(pod, "redis-server")?
                .args([
                    "--port",
                    "6379",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                ])
                .stdout(Stdio::null())
                .spawn()?,
        );
    }
    let mut hold_server = lab
        .command_in("server", &probe)?
        .args([
            "hold-server",
            "7000",
            &plan.idle_connections.to_string(),
            "600",
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let hold_out = hold_server.stdout.take().context("hold-server stdout")?;
    let hold_server = Servers(vec![hold_server]);
    let mut hold_lines = BufReader::new(hold_out).lines();
    let _listening = hold_lines.next();
    std::thread::sleep(Duration::from_millis(500));

    // Memory with idle tunnelled connections, first: after the rounds the agents' heaps hold
    // free memory that new connections would reuse unseen (a later measurement once showed
    // 0 KiB per connection), and before them the figure is the connections' own.
    let before_hold = (rss_kib(agent1)?, rss_kib(agent2)?);
    let started = Instant::now();
    let mut holder = lab
        .command_in("client", &probe)?
        .args([
            "hold",
            &format!("{server_ip}:7000"),
            &plan.idle_connections.to_string(),
            "600",
        ])
        .stdout(Stdio::piped())
        .spawn()?;
    let holder_out = holder.stdout.take().context("hold stdout")?;
    let held = BufReader::new(holder_out)
        .lines()
        .next()
        .transpose()?
        .unwrap_or_default();
    if !held.starts_with("HELD") {
        let _ = holder.kill();
        bail!(
            "could not open {} idle connections through the mesh: {held:?}",
            plan.idle_connections
        );
    }
    let opened_in = started.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let held_rss = (rss_kib(agent1)?, rss_kib(agent2)?);
    // Both ends go, so no half-closed tunnelled connection outlives the measurement.
    let _ = holder.kill();
    let _ = holder.wait();
    drop(hold_server);
    std::thread::sleep(Duration::from_secs(2));
    // Their TIME_WAITs are gone before the first new-connection round (over a minute away).

    // Warm-up: one short round on each path, not counted.
    for (client, target) in [("client", &server_ip), ("pclient", &pserver_ip)] {
        let _ = iperf(&lab, client, target, 1, 1);
        let _ = redis(&lab, client, target, 1, 1000, true);
    }

    let mut rows = Vec::new();
    let t = plan.seconds;
    let measure = |client: &str, target: &str, vip: &str| -> anyhow::Result<[f64; 8]> {
        eprintln!("xtask: measuring {client} → {target}");
        let bulk1 = iperf(&lab, client, target, 1, t)?;
        let bulk8 = iperf(&lab, client, target, 8, t)?;
        let (p50, p99) = sockperf(&lab, client, target, t)?;
        let r1 = redis(&lab, client, target, 1, plan.redis_requests, true)?;
        let r50 = redis(&lab, client, target, 50, plan.redis_requests * 2, true)?;
        let fresh = redis_new_connections(&lab, client, target, plan.redis_new_connections)?;
        // Plain has no VIP: its baseline is the pod-IP figure just measured (a second run
        // to the same address would start among the first one's TIME_WAITs and measure those).
        let fresh_vip = if vip == target {
            fresh
        } else {
            redis_new_connections(&lab, client, vip, plan.redis_new_connections)?
        };
        eprintln!(
            "xtask:   {bulk1:.2} / {bulk8:.2} Gbit/s, p50 {p50:.1} p99 {p99:.1} µs, redis {r1:.0} / {r50:.0} req/s, {fresh:.0} / {fresh_vip:.0} (via {vip}) conn/s"
        );
        Ok([bulk1, bulk8, p50, p99, r1, r50, fresh, fresh_vip])
    };
    // Alternate the paths so that drift on the machine hits both alike; report medians.
    let (mut plain_runs, mut mesh_runs) = (Vec::new(), Vec::new());
    for _ in 0..plan.rounds.max(1) {
        // Plain has no Service VIP (no kube-proxy here): its baseline is the pod IP.
        plain_runs.push(measure("pclient", &pserver_ip, &pserver_ip)?);
        mesh_runs.push(measure("client", &server_ip, BENCH_VIP)?);
    }
    let (plain, mesh) = (medians(&plain_runs), medians(&mesh_runs));
    let names: [(&str, &str, bool, &str); 8] = [
        ("throughput, 1 stream", "Gbit/s", true, "≥ 45 % of plain"),
        ("throughput, 8 streams", "Gbit/s", true, "≥ 45 % of plain"),
        ("round trip 64 B, p50", "µs", false, "≤ plain + 30 µs"),
        ("round trip 64 B, p99", "µs", false, "≤ plain + 80 µs"),
        ("redis PING, 1 client", "req/s", true, "≥ 60 % of plain"),
        ("redis PING, 50 clients", "req/s", true, "(reported)"),
        (
            "new connections (redis -k 0)",
            "conn/s",
            true,
            "≥ 70 % of plain",
        ),
        (
            "new connections to a Service VIP",
            "conn/s",
            true,
            "(vs plain to the pod IP)",
        ),
    ];
    for (i, (name, unit, higher_better, target)) in names.into_iter().enumerate() {
        rows.push(Row {
            name,
            unit,
            plain: Some(plain[i]),
            mesh: mesh[i],
            higher_better,
            target,
        });
    }

    let n = f64::from(plan.idle_connections);
    rows.push(Row {
        name: "agent RSS idle, node-1",
        unit: "MiB",
        plain: None,
        mesh: idle_rss.0 / 1024.0,
        higher_better: false,
        target: "≤ 20 MB",
    });
    rows.push(Row {
        name: "agent RSS per idle connection, node-1",
        unit: "KiB",
        plain: None,
        mesh: (held_rss.0 - before_hold.0) / n,
        higher_better: false,
        target: "≤ 8 KiB",
    });
    rows.push(Row {
        name: "agent RSS per idle connection, node-2",
        unit: "KiB",
        plain: None,
        mesh: (held_rss.1 - before_hold.1) / n,
        higher_better: false,
        target: "≤ 8 KiB",
    });
    drop(servers);

    println!();
    println!(
        "{:<40} {:>12} {:>12} {:>9}  {:<8} target",
        "metric", "plain", "meshlet", "ratio", "unit"
    );
    let mut json_rows = Vec::new();
    for r in &rows {
        let ratio = r.plain.map(|p| if p > 0.0 { r.mesh / p } else { 0.0 });
        println!(
            "{:<40} {:>12} {:>12.2} {:>9}  {:<8} {}",
            r.name,
            r.plain
                .map(|p| format!("{p:.2}"))
                .unwrap_or_else(|| "-".into()),
            r.mesh,
            ratio
                .map(|x| format!("{:.0} %", x * 100.0))
                .unwrap_or_else(|| "-".into()),
            r.unit,
            r.target
        );
        json_rows.push(json!({
            "metric": r.name, "unit": r.unit, "plain": r.plain, "meshlet": r.mesh,
            "ratio": ratio, "higher_is_better": r.higher_better, "target": r.target,
        }));
    }
    println!(
        "(medians of {} alternating rounds, after a warm-up; idle connections: {}, opened in {:?})",
        plan.rounds, plan.idle_connections, opened_in
    );
    let dir = crate::root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("{}.json", plan.name));
    std::fs::write(
        &file,
        serde_json::to_vec_pretty(
            &json!({ "plan": plan.name, "seconds": plan.seconds, "agent_args": plan.agent_args, "rows": json_rows }),
        )?,
    )?;
    println!("written: {}", file.display());
    lab.down();
    Ok(())
}
