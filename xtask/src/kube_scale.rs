//! `cargo xtask bench`, Kubernetes section: the control plane reading a large cluster from the
//! emulated API server (the lab's Kubernetes mode). Reported, never asserted:
//! - the time from the control plane's start to both agents holding the whole mesh,
//! - the control plane's RSS then,
//! - the bytes a node receives for one pod change (the incremental update),
//! - the time from a pod's creation in the API to both agents having it, p50/p99.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use meshlet_lab::{kube_api, Lab, LabOptions, PodSpec};
use serde_json::json;

/// How large.
pub struct ScalePlan {
    pub namespaces: usize,
    pub pods_per_namespace: usize,
    pub services_per_namespace: usize,
    /// Pod creations timed one after another.
    pub changes: usize,
}

impl ScalePlan {
    /// 5 000 pods and 1 000 Services in 50 namespaces, 100 timed changes.
    pub fn full() -> Self {
        Self {
            namespaces: 50,
            pods_per_namespace: 100,
            services_per_namespace: 20,
            changes: 100,
        }
    }

    /// The smoke run of `cargo xtask test`.
    pub fn quick() -> Self {
        Self {
            namespaces: 5,
            pods_per_namespace: 20,
            services_per_namespace: 4,
            changes: 10,
        }
    }
}

/// The mesh's workload count on `node`'s agent (its metrics, read inside the node's netns).
fn workloads_on(lab: &Lab, node: &str) -> Option<u64> {
    let netns = lab.topology.node(node)?.netns.clone();
    let (_, text) = meshlet_lab::netns::run_in(&netns, || {
        Ok(meshlet_lab::net::http_get(
            std::net::SocketAddr::from(([127, 0, 0, 1], 15000)),
            "/metrics",
        )?)
    })
    .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("meshlet_mesh_workloads "))
        .and_then(|v| v.trim().parse().ok())
}

/// Waits until both agents hold `want` workloads; answers how long it took.
fn until_both_have(lab: &Lab, want: u64, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if ["node-1", "node-2"]
            .iter()
            .all(|n| workloads_on(lab, n) == Some(want))
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!(
                "the agents did not reach {want} workloads within {limit:?} (node-1 {:?}, node-2 {:?})",
                workloads_on(lab, "node-1"),
                workloads_on(lab, "node-2")
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS")?;
    Ok(kib / 1024.0)
}

/// A pod object as a kubelet would report it (not a real netns: the agents only learn it).
fn pod(namespace: &str, name: &str, node: &str, ip: String) -> serde_json::Value {
    json!({
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": format!("sa-{}", name.len() % 10),
                 "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

pub fn run(bin_dir: &Path, plan: &ScalePlan) -> anyhow::Result<()> {
    let total_pods = plan.namespaces * plan.pods_per_namespace;
    let total_services = plan.namespaces * plan.services_per_namespace;
    println!(
        "\n== bench, Kubernetes: {total_pods} pods and {total_services} Services in {} namespaces",
        plan.namespaces
    );
    let mut options = LabOptions::new(bin_dir);
    options.kubernetes = true;
    let pods = vec![
        PodSpec::new("web", "node-1", "web"),
        PodSpec::new("api", "node-2", "api"),
    ];
    let mut lab = Lab::up(&pods, &options)?;
    let kube = lab.kube().context("Kubernetes mode")?;
    let mut n = 0u32;
    let mut next_ip = || {
        n += 1;
        format!("10.250.{}.{}", n / 250, n % 250 + 1)
    };
    for ns in 0..plan.namespaces {
        let namespace = format!("bench-{ns}");
        kube.create(
            kube_api::NAMESPACES,
            json!({"metadata": {"name": namespace, "labels": {"meshlet.dev/mesh": "enabled"}}}),
        )?;
        let mut ips = Vec::new();
        for p in 0..plan.pods_per_namespace {
            let node = if p % 2 == 0 { "node-1" } else { "node-2" };
            let ip = next_ip();
            let created = kube.create(
                kube_api::PODS,
                pod(&namespace, &format!("pod-{p}"), node, ip.clone()),
            )?;
            ips.push((
                ip,
                created["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ));
        }
        for s in 0..plan.services_per_namespace {
            let name = format!("svc-{s}");
            kube.create(
                kube_api::SERVICES,
                json!({"metadata": {"name": name, "namespace": namespace},
                       "spec": {"clusterIPs": [format!("10.97.{ns}.{}", s + 1)],
                                "ports": [{"port": 80, "targetPort": 8080}]}}),
            )?;
            let endpoints: Vec<_> = ips
                .iter()
                .skip(s * 5 % ips.len().max(1))
                .take(5)
                .map(|(ip, uid)| json!({"addresses": [ip], "targetRef": {"kind": "Pod", "uid": uid}}))
                .collect();
            kube.create(
                kube_api::ENDPOINT_SLICES,
                json!({"metadata": {"name": format!("{name}-x"), "namespace": namespace,
                                    "labels": {"kubernetes.io/service-name": name}},
                       "addressType": "IPv4", "endpoints": endpoints}),
            )?;
        }
    }
    let mesh = (total_pods + 2) as u64;
    // A control plane that starts with the cluster already there: list, build, push.
    let started = Instant::now();
    lab.restart_controlplane()?;
    let restarted_in = started.elapsed();
    let first_state = until_both_have(&lab, mesh, Duration::from_secs(300))? + restarted_in;
    let cp_rss = rss_mib(lab.controlplane_pid().context("control plane pid")?)?;

    // One pod change at a time, timed from the API to both agents.
    let kube = lab.kube().context("Kubernetes mode")?;
    let mut latencies = Vec::with_capacity(plan.changes);
    for i in 0..plan.changes {
        let t0 = Instant::now();
        kube.create(
            kube_api::PODS,
            pod(
                "bench-0",
                &format!("new-{i}"),
                "node-1",
                format!("10.251.{}.{}", i / 250, i % 250 + 1),
            ),
        )?;
        until_both_have(&lab, mesh + i as u64 + 1, Duration::from_secs(30))?;
        latencies.push(t0.elapsed());
    }
    let bytes_per_change = lab
        .agent_log("node-1")
        .lines()
        .rev()
        .find(|l| l.contains("applied control-plane update") && l.contains("incremental=true"))
        .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("bytes=")))
        .and_then(|b| b.parse::<u64>().ok())
        .unwrap_or(0);
    let full_bytes = lab
        .agent_log("node-1")
        .lines()
        .filter(|l| l.contains("applied control-plane update") && l.contains("incremental=false"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("bytes=")))
        .filter_map(|b| b.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    latencies.sort();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let (p50, p99) = (pick(0.5), pick(0.99));
    lab.down();
    println!("{:<52} {:>12}", "metric", "value");
    let rows = [
        (
            "control-plane start → both agents hold the mesh",
            format!("{:.2} s", first_state.as_secs_f64()),
        ),
        (
            "control-plane RSS with the mesh",
            format!("{cp_rss:.1} MiB"),
        ),
        ("full state, bytes to a node", format!("{full_bytes}")),
        (
            "one pod created, bytes to a node (incremental)",
            format!("{bytes_per_change}"),
        ),
        (
            "pod created in the API → both agents, p50",
            format!("{:.1} ms", p50.as_secs_f64() * 1000.0),
        ),
        (
            "pod created in the API → both agents, p99",
            format!("{:.1} ms", p99.as_secs_f64() * 1000.0),
        ),
    ];
    for (name, value) in &rows {
        println!("{name:<52} {value:>12}");
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/bench-kubernetes.json");
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &out,
        serde_json::to_vec_pretty(&json!({
            "pods": total_pods, "services": total_services, "namespaces": plan.namespaces,
            "first_state_seconds": first_state.as_secs_f64(), "controlplane_rss_mib": cp_rss,
            "full_state_bytes": full_bytes, "pod_change_bytes": bytes_per_change,
            "pod_change_p50_ms": p50.as_secs_f64() * 1000.0, "pod_change_p99_ms": p99.as_secs_f64() * 1000.0,
            "changes": plan.changes,
        }))?,
    )?;
    println!("   written to {}", out.display());
    Ok(())
}
