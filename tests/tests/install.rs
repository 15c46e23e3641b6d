//! What the install ships, checked against the running thing: the agent works with exactly
//! the capabilities the rendered DaemonSet lists, and without any one of them it fails in a
//! way that names what is missing; `meshlet doctor` on a lab node. Root only.
use std::time::Duration;

use meshlet_lab::{Lab, LabOptions, PodSpec};

mod common;
use common::{bin_dir, send, Server};

const MANIFESTS: &str = include_str!("../../deploy/manifests/meshlet.yaml");

/// The agent container's `capabilities.add`, from the rendered manifests.
fn daemonset_capabilities() -> Vec<String> {
    for doc in serde_norway::Deserializer::from_str(MANIFESTS) {
        let value: serde_json::Value =
            serde::Deserialize::deserialize(doc).expect("manifest document");
        if value["kind"] == "DaemonSet" {
            let containers = &value["spec"]["template"]["spec"]["containers"];
            let agent = containers
                .as_array()
                .and_then(|c| c.iter().find(|c| c["name"] == "agent"))
                .expect("agent container");
            let caps = &agent["securityContext"]["capabilities"];
            assert_eq!(caps["drop"], serde_json::json!(["ALL"]));
            assert_ne!(agent["securityContext"]["privileged"], true);
            return caps["add"]
                .as_array()
                .expect("capabilities.add")
                .iter()
                .filter_map(|c| c.as_str().map(str::to_lowercase))
                .collect();
        }
    }
    panic!("no DaemonSet in the manifests")
}

/// `setpriv` that leaves root exactly `caps` (bounding set; nothing inheritable or ambient).
fn with_capabilities(caps: &[String]) -> Vec<String> {
    let bounding = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        "setpriv".into(),
        format!("--bounding-set={bounding}"),
        "--inh-caps=-all".into(),
        "--".into(),
    ]
}

/// What an agent limited to `caps` manages, step by step: the lab comes up (pods enrolled
/// through meshlet-cni), web → api is mTLS, and after a crash the agent adopts a pod whose
/// namespace has no name left (found through /proc, held by a process of another uid, as a
/// pod's pause process holds it on a node). `Err` names the first step that failed.
fn what_works_with(caps: &[String]) -> Result<(), String> {
    let mut options = LabOptions::new(bin_dir());
    options.agent_wrapper = with_capabilities(caps);
    let mut lab = Lab::up(
        &[
            PodSpec::new("web", "node-1", "frontend"),
            PodSpec::new("api", "node-2", "backend"),
            PodSpec::new("hidden", "node-1", "hidden"),
        ],
        &options,
    )
    .map_err(|e| {
        format!(
            "the lab did not come up: {}",
            format!("{e:#}").lines().next().unwrap_or("")
        )
    })?;
    let api = lab.topology.pod("api").expect("api").clone();
    let hidden = lab.topology.pod("hidden").expect("hidden").clone();
    let _server = Server::start(&lab, "api", 8080);
    // A missing capability must fail every try, not one.
    let carried = (0..3).any(|_| {
        let (ok, _, _) = send(&lab, "web", &format!("{}:8080", api.ip), 4096, None, None);
        std::thread::sleep(Duration::from_millis(200));
        ok
    });
    if !carried {
        return Err("web → api failed".into());
    }
    // A process of uid 65534 holds hidden's namespace; then its name goes.
    let mut holder = lab
        .command_in("hidden", "setpriv")
        .expect("cmd")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "sleep",
            "60",
        ])
        .spawn()
        .expect("holder");
    let cookie = |lab: &Lab| {
        lab.pods("node-1")
            .ok()
            .and_then(|pods| pods.into_iter().find(|p| p.uid == hidden.uid))
            .map(|p| p.netns_cookie)
    };
    let before = cookie(&lab);
    lab.kill_agent("node-1").expect("kill");
    let gone = std::process::Command::new("ip")
        .args(["netns", "del", &hidden.netns])
        .status()
        .expect("ip netns del");
    assert!(gone.success());
    lab.restart_agent("node-1").expect("restart");
    let after = common::eventually(Duration::from_secs(10), || cookie(&lab));
    let _ = holder.kill();
    let _ = holder.wait();
    if after.is_none() || after != before {
        return Err("a pod whose namespace is found only through /proc was not adopted".into());
    }
    Ok(())
}

#[test]
fn the_agent_works_with_exactly_the_daemonsets_capabilities_and_needs_each_one() {
    let caps = daemonset_capabilities();
    println!("DaemonSet capabilities: {caps:?}");
    what_works_with(&caps).expect("everything works with the DaemonSet's capabilities");
    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        match what_works_with(&fewer) {
            Ok(()) => panic!(
                "without CAP_{} everything still works: the DaemonSet need not add it",
                dropped.to_uppercase()
            ),
            Err(e) => println!("without CAP_{}: {e}", dropped.to_uppercase()),
        }
    }
}

#[test]
fn doctor_on_a_lab_node_passes_and_names_what_fails() {
    let mut lab = Lab::up(
        &[PodSpec::new("web", "node-1", "frontend")],
        &LabOptions::new(bin_dir()),
    )
    .expect("lab");
    let node = lab.topology.node("node-1").expect("node-1").clone();
    // A node whose cluster CNI is ptp, with meshlet-cni installed by its installer.
    let conf_dir = lab.state_path("cni/net.d");
    let bin = lab.state_path("cni/bin");
    std::fs::create_dir_all(&conf_dir).expect("conf dir");
    std::fs::create_dir_all(&bin).expect("bin dir");
    std::fs::write(
        conf_dir.join("10-ptp.conflist"),
        r#"{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"ptp","ipam":{"type":"host-local","subnet":"10.250.0.0/24"}}]}"#,
    )
    .expect("conflist");
    let install = std::process::Command::new(bin_dir().join("meshlet-cni"))
        .arg("install")
        .arg("--cni-bin-dir")
        .arg(&bin)
        .arg("--cni-conf-dir")
        .arg(&conf_dir)
        .arg("--socket")
        .arg(node.cni_socket())
        .output()
        .expect("meshlet-cni install");
    assert!(install.status.success(), "{install:?}");
    println!("{}", String::from_utf8_lossy(&install.stdout).trim());
    let doctor = |lab: &Lab| {
        let mut cmd = lab
            .command_in("node-1", bin_dir().join("meshlet"))
            .expect("cmd");
        cmd.args(["doctor", "-o", "json", "--node-socket", &node.agent_socket])
            .arg("--cni-conf-dir")
            .arg(&conf_dir)
            .arg("--cni-bin-dir")
            .arg(&bin)
            .arg("--pod-cgroup")
            .arg(&node.cgroup);
        let out = cmd.output().expect("meshlet doctor");
        let checks: serde_json::Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
        (out.status.success(), checks)
    };
    let ready = common::eventually(Duration::from_secs(20), || {
        let (ok, checks) = doctor(&lab);
        ok.then_some(checks)
    });
    let checks = ready.unwrap_or_else(|| doctor(&lab).1);
    for check in checks.as_array().expect("checks") {
        println!(
            "{:<18} {:<5} {}",
            check["name"].as_str().unwrap_or(""),
            check["outcome"].as_str().unwrap_or(""),
            check["detail"].as_str().unwrap_or("")
        );
        assert_eq!(check["outcome"], "pass", "{check}");
    }
    let names: Vec<&str> = checks
        .as_array()
        .expect("checks")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for wanted in [
        "kernel",
        "bpf program types",
        "bpf helpers",
        "bpffs",
        "cgroup v2",
        "cni chain",
        "agent sockets",
        "agent readiness",
        "certificates",
    ] {
        assert!(names.contains(&wanted), "{wanted} missing from {names:?}");
    }

    // The agent gone and the plugin taken out: named failures with a fix, exit status 1.
    lab.kill_agent("node-1").expect("kill");
    let out = std::process::Command::new(bin_dir().join("meshlet-cni"))
        .arg("uninstall")
        .arg("--cni-bin-dir")
        .arg(&bin)
        .arg("--cni-conf-dir")
        .arg(&conf_dir)
        .output()
        .expect("uninstall");
    assert!(out.status.success());
    let (ok, checks) = doctor(&lab);
    assert!(!ok, "doctor must exit 1 when a check fails");
    let failed: Vec<(&str, &str)> = checks
        .as_array()
        .expect("checks")
        .iter()
        .filter(|c| c["outcome"] == "fail")
        .map(|c| {
            (
                c["name"].as_str().unwrap_or(""),
                c["fix"].as_str().unwrap_or(""),
            )
        })
        .collect();
    println!("failed: {failed:?}");
    for name in ["cni chain", "agent sockets", "agent readiness"] {
        assert!(
            failed.iter().any(|(n, fix)| *n == name && !fix.is_empty()),
            "{name} must fail with a fix: {failed:?}"
        );
    }
    // Without the BPF capabilities, the probes say so.
    let mut cmd = lab.command_in("node-1", "setpriv").expect("cmd");
    cmd.args([
        "--bounding-set=-bpf,-sys_admin,-perfmon",
        "--inh-caps=-all",
        "--",
    ])
    .arg(bin_dir().join("meshlet"))
    .args(["doctor", "-o", "json"]);
    let out = cmd.output().expect("doctor without CAP_BPF");
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let bpf = checks
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "bpf program types"))
        .expect("check")
        .clone();
    println!("without CAP_BPF/CAP_SYS_ADMIN: {bpf}");
    assert_eq!(bpf["outcome"], "fail", "{bpf}");
}
