//! `cargo xtask bench`: meshlet against plain TCP between the same kind of pods, in one run.
//!
//! Two paths cross the same node link: `client` → `server` (both enrolled: through both agents)
//! and `pclient` → `pserver` (neither enrolled: plain TCP). Real tools from Debian measure each:
//! iperf3 (bulk), sockperf (64 B ping-pong), redis-benchmark (PING, and a fresh connection per
//! request). Agent memory is read from /proc, idle and with many idle tunnelled connections;
//! CPU time from /proc too: the agents' own (user + system) and the whole machine's busy time,
//! per GB moved, per 1 000 new connections and per 1 000 requests.
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

/// (p50, p99, p99.9) in microseconds.
fn sockperf(lab: &Lab, pod: &str, ip: &str, seconds: u32) -> anyhow::Result<(f64, f64, f64)> {
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
        percentile("99.900").context("sockperf p99.9")?,
    ))
}

/// The bulk load beside the loaded round trips: the same rate on both paths, so that both
/// carry the same work (unlimited, plain would move four times what the mesh does), well
/// under what one mesh stream moves.
const BULK_RATE: &str = "2G";

/// Runs `f` while `pod` sends bulk traffic to `ip` (iperf3, one stream at [`BULK_RATE`]),
/// started a second before `f` and lasting well past it (killed after); fails when the bulk
/// load did not last (a "loaded" figure measured without its load would pass for one).
fn with_bulk<T>(
    lab: &Lab,
    pod: &str,
    ip: &str,
    seconds: u32,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut bulk = lab
        .command_in(pod, "iperf3")?
        .args(["-c", ip, "-p", "5201", "-b", BULK_RATE, "-t"])
        .arg((2 * seconds + 10).to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("iperf3 in {pod}"))?;
    std::thread::sleep(Duration::from_secs(1));
    let value = f();
    let ended_early = bulk.try_wait()?;
    let _ = bulk.kill();
    let _ = bulk.wait();
    if let Some(status) = ended_early {
        let mut stderr = String::new();
        if let Some(mut pipe) = bulk.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        bail!(
            "the bulk load from {pod} to {ip} ended before the measurement did ({status}): {}",
            stderr.trim()
        );
    }
    value
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

/// Figures of one measurement round: the eight rates and latencies, the CPU costs, then the
/// tail latencies (idle p99.9, under bulk load p99 and p99.9).
const FIGURES: usize = 17;

fn medians(runs: &[[f64; FIGURES]]) -> [f64; FIGURES] {
    let mut out = [0.0; FIGURES];
    for (i, slot) in out.iter_mut().enumerate() {
        let mut column: Vec<f64> = runs.iter().map(|r| r[i]).collect();
        column.sort_by(f64::total_cmp);
        *slot = column.get(column.len() / 2).copied().unwrap_or(0.0);
    }
    out
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name (in parentheses, which may hold spaces): state is field 3,
    // utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("/proc/PID/stat field")?
            .parse::<f64>()?)
    };
    Ok((ticks(11)? + ticks(12)?) / clock_ticks())
}

/// CPU seconds all CPUs have spent busy so far (not idle, not waiting for I/O).
fn machine_busy_secs() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("/proc/stat")?;
    let values: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: f64 = values
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    Ok(busy / clock_ticks())
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map(|t| t as f64)
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// CPU used by the two agents and by the whole machine while `f` runs, in seconds.
fn with_cpu<T>(
    agents: (u32, u32),
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(T, f64, f64)> {
    let sample = || -> anyhow::Result<(f64, f64)> {
        Ok((
            cpu_secs(agents.0)? + cpu_secs(agents.1)?,
            machine_busy_secs()?,
        ))
    };
    let before = sample()?;
    let value = f()?;
    let after = sample()?;
    Ok((value, after.0 - before.0, after.1 - before.1))
}

fn rss_kib(pid: u32) -> anyhow::Result<f64> {
    status_kib(pid, "VmRSS")
}

/// A memory figure of /proc/PID/status, in KiB: `VmRSS` (all resident pages, the binary's
/// code among them, shared with every process that maps it and dropped under pressure) or
/// `RssAnon` (the process's own: heap, stacks, buffers).
fn status_kib(pid: u32, field: &str) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} of /proc/{pid}/status"))
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
    // Each path has a second pair of pods for the bulk load beside the loaded round trips:
    // on the mesh path the same identities (replicas of the same apps), so that both pairs'
    // connections share the agents and the tunnels between them.
    let pods = vec![
        PodSpec::new("client", "node-1", "bench-client"),
        PodSpec::new("server", "node-2", "bench-server"),
        PodSpec::new("pclient", "node-1", "plain").outside_mesh(),
        PodSpec::new("pserver", "node-2", "plain").outside_mesh(),
        PodSpec::new("bulk-client", "node-1", "bench-client"),
        PodSpec::new("bulk-server", "node-2", "bench-server"),
        PodSpec::new("pbulk-client", "node-1", "plain").outside_mesh(),
        PodSpec::new("pbulk-server", "node-2", "plain").outside_mesh(),
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
    let (bulk_server_ip, pbulk_server_ip) = (ip("bulk-server")?, ip("pbulk-server")?);
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
    let idle_anon = status_kib(agent1, "RssAnon")?;

    let mut servers = Servers(Vec::new());
    let probe = bin_dir.join("meshlet-lab-probe");
    // Every server pod takes iperf3 (the bulk pairs' only tool); the measured ones the rest.
    for pod in ["server", "pserver", "bulk-server", "pbulk-server"] {
        servers.0.push(
            lab.command_in(pod, "iperf3")?
                .args(["-s", "-p", "5201"])
                .stdout(Stdio::null())
                .spawn()?,
        );
    }
    for pod in ["server", "pserver"] {
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
    let agents = (agent1, agent2);
    let measure = |client: &str,
                   target: &str,
                   vip: &str,
                   bulk: (&str, &str)|
     -> anyhow::Result<[f64; FIGURES]> {
        eprintln!("xtask: measuring {client} → {target}");
        let (bulk1, bulk1_agents, bulk1_machine) =
            with_cpu(agents, || iperf(&lab, client, target, 1, t))?;
        let bulk8 = iperf(&lab, client, target, 8, t)?;
        let (p50, p99, p999) = sockperf(&lab, client, target, t)?;
        let (_, loaded_p99, loaded_p999) = with_bulk(&lab, bulk.0, bulk.1, t, || {
            sockperf(&lab, client, target, t)
        })?;
        let (r1, r1_agents, _) = with_cpu(agents, || {
            redis(&lab, client, target, 1, plan.redis_requests, true)
        })?;
        let (r50, r50_agents, _) = with_cpu(agents, || {
            redis(&lab, client, target, 50, plan.redis_requests * 2, true)
        })?;
        let (fresh, fresh_agents, fresh_machine) = with_cpu(agents, || {
            redis_new_connections(&lab, client, target, plan.redis_new_connections)
        })?;
        // Per unit of work: GB moved (the rate times the time), thousands of connections or
        // requests; CPU per agent where it says so (two agents carry each mesh connection).
        let gb = (bulk1 * f64::from(t) / 8.0).max(f64::MIN_POSITIVE);
        let thousand = |n: u32| (f64::from(n) / 1000.0).max(f64::MIN_POSITIVE);
        let conns = thousand(plan.redis_new_connections);
        let costs = [
            bulk1_machine / gb,
            bulk1_agents / gb,
            fresh_machine * 1000.0 / conns,
            fresh_agents * 1000.0 / conns,
            r1_agents / 2.0 * 1000.0 / thousand(plan.redis_requests),
            r50_agents / 2.0 * 1000.0 / thousand(plan.redis_requests * 2),
        ];
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
        eprintln!(
            "xtask:   CPU {:.2} s/GB (agents {:.2}), {:.0} ms per 1000 connections (agents {:.0}), agent {:.1} / {:.1} ms per 1000 requests",
            costs[0], costs[1], costs[2], costs[3], costs[4], costs[5]
        );
        eprintln!(
            "xtask:   p99.9 {p999:.1} µs; beside {BULK_RATE}bit/s of bulk: p99 {loaded_p99:.1} p99.9 {loaded_p999:.1} µs"
        );
        let mut figures = [0.0; FIGURES];
        figures[..8].copy_from_slice(&[bulk1, bulk8, p50, p99, r1, r50, fresh, fresh_vip]);
        figures[8..14].copy_from_slice(&costs);
        figures[14..].copy_from_slice(&[p999, loaded_p99, loaded_p999]);
        Ok(figures)
    };
    // Alternate the paths so that drift on the machine hits both alike; report medians.
    let (mut plain_runs, mut mesh_runs) = (Vec::new(), Vec::new());
    for _ in 0..plan.rounds.max(1) {
        // Plain has no Service VIP (no kube-proxy here): its baseline is the pod IP.
        plain_runs.push(measure(
            "pclient",
            &pserver_ip,
            &pserver_ip,
            ("pbulk-client", &pbulk_server_ip),
        )?);
        mesh_runs.push(measure(
            "client",
            &server_ip,
            BENCH_VIP,
            ("bulk-client", &bulk_server_ip),
        )?);
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
            "≥ 50 % of plain (then 70 %)",
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

    // Tail latency, idle and beside another pair's bulk traffic through the same agents
    // (head-of-line blocking on a shared tunnel or a busy agent shows here).
    let tails: [(&str, usize, &str); 3] = [
        ("round trip 64 B, p99.9", 14, "(reported)"),
        (
            "round trip 64 B, p99, beside 2 Gbit/s bulk",
            15,
            "(reported)",
        ),
        (
            "round trip 64 B, p99.9, beside 2 Gbit/s bulk",
            16,
            "(reported)",
        ),
    ];
    for (name, i, target) in tails {
        rows.push(Row {
            name,
            unit: "µs",
            plain: Some(plain[i]),
            mesh: mesh[i],
            higher_better: false,
            target,
        });
    }

    // CPU cost: the whole machine's busy time for the same work on both paths (apps, kernel
    // and, on the mesh path, the agents), and the agents' own share.
    let costs: [(&str, &str, usize, bool, &str); 6] = [
        (
            "CPU per GB, 1 stream (machine)",
            "CPU s",
            8,
            true,
            "(reported)",
        ),
        (
            "agents' CPU per GB, 1 stream",
            "CPU s",
            9,
            false,
            "(reported)",
        ),
        (
            "CPU per 1000 new connections (machine)",
            "CPU ms",
            10,
            true,
            "(reported)",
        ),
        (
            "agents' CPU per 1000 new connections",
            "CPU ms",
            11,
            false,
            "(reported)",
        ),
        (
            "agent CPU per 1000 requests, 1 client",
            "CPU ms",
            12,
            false,
            "≤ 20 (0.02 vCPU per 1000 req/s)",
        ),
        (
            "agent CPU per 1000 requests, 50 clients",
            "CPU ms",
            13,
            false,
            "≤ 6",
        ),
    ];
    for (name, unit, i, with_plain, target) in costs {
        rows.push(Row {
            name,
            unit,
            plain: with_plain.then_some(plain[i]),
            mesh: mesh[i],
            higher_better: false,
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
        target: "≤ 12 MiB",
    });
    rows.push(Row {
        name: "of which anonymous (heap, stacks), node-1",
        unit: "MiB",
        plain: None,
        mesh: idle_anon / 1024.0,
        higher_better: false,
        target: "(reported)",
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
        "{:<46} {:>12} {:>12} {:>9}  {:<8} target",
        "metric", "plain", "meshlet", "ratio", "unit"
    );
    let mut json_rows = Vec::new();
    for r in &rows {
        let ratio = r.plain.map(|p| if p > 0.0 { r.mesh / p } else { 0.0 });
        println!(
            "{:<46} {:>12} {:>12.2} {:>9}  {:<8} {}",
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
