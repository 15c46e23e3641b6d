//! meshlet-cni in the lab: driven by the real CNI plugins (ptp, host-local) exactly as a
//! runtime calls them, its spec conformance, what happens while the agent is away, and the
//! agent adopting its pods after a crash without any CNI call. Root only.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use meshlet_lab::{
    cni::{ptp_then_meshlet, Chain, Container, DEBIAN_PLUGINS},
    PodSpec,
};
use serde_json::Value;

mod common;
use common::{bin_dir, send, up, Capture, Server};

fn enrolled(lab: &meshlet_lab::Lab, node: &str, uid: &str) -> bool {
    lab.pods(node)
        .expect("list pods")
        .iter()
        .any(|p| p.uid == uid)
}

fn container(pod: &meshlet_lab::topology::PodInfo) -> Container {
    Container {
        id: format!("sandbox-{}", pod.name),
        netns: pod.netns_path.clone(),
        ifname: "eth0".into(),
        args: format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID=sandbox-{};K8S_POD_UID={}",
            pod.namespace, pod.name, pod.name, pod.uid
        ),
    }
}

/// The real ptp + host-local chain, then meshlet-cni, for a `made_by_cni` pod on node-1, run
/// in that node's netns.
fn ptp_chain(lab: &meshlet_lab::Lab, pod: &meshlet_lab::topology::PodInfo) -> Chain {
    let node1 = lab.topology.node("node-1").expect("node-1");
    Chain {
        conflist: ptp_then_meshlet(pod.ip, &lab.state_path("ipam"), &node1.cni_socket()),
        plugin_dirs: vec![DEBIAN_PLUGINS.into(), bin_dir()],
        node_netns: Some(node1.netns.clone()),
    }
}

#[test]
fn a_pod_made_by_the_real_cni_chain_is_captured_before_it_runs_and_talks_mtls() {
    let lab = up(&[
        PodSpec::new("web", "node-1", "frontend"),
        PodSpec::new("api", "node-2", "backend"),
        PodSpec::new("boxed", "node-1", "boxed").made_by_cni(),
    ]);
    let boxed = lab.topology.pod("boxed").expect("boxed").clone();
    let api = lab.topology.pod("api").expect("api").clone();
    let node1 = lab.topology.node("node-1").expect("node-1").clone();
    let chain = ptp_chain(&lab, &boxed);
    let sandbox = container(&boxed);

    // ADD: ptp wires the pod, meshlet-cni enrolls it; ptp's result passes through unchanged.
    let ptp = chain.conflist["plugins"][0].clone();
    let result = chain.add(&sandbox).expect("chain ADD");
    assert!(
        enrolled(&lab, "node-1", &boxed.uid),
        "the agent must have enrolled the pod before ADD returned"
    );
    let ips: Vec<&str> = result["ips"]
        .as_array()
        .expect("ips in the result")
        .iter()
        .filter_map(|i| i["address"].as_str())
        .collect();
    assert_eq!(ips, [format!("{}/24", boxed.ip)], "{result}");
    assert_eq!(result["cniVersion"], "1.0.0");
    // The same result as ptp alone gives for that config (meshlet-cni changes nothing): ptp's
    // CHECK accepts it.
    let check = chain
        .invoke(&ptp, "CHECK", &sandbox, Some(&result))
        .expect("ptp CHECK");
    assert!(check.success, "ptp CHECK of the chain's result: {check:?}");
    chain.check(&sandbox, &result).expect("chain CHECK");
    println!("chain ADD result: {result}");

    // The pod talks to api through the mesh: mTLS on the wire, nothing in plaintext.
    lab.wait_ready(Duration::from_secs(30)).expect("ready");
    let _server = Server::start(&lab, "api", 8080);
    let marker = "MESHLET-CNI-PLAINTEXT-MARKER";
    let capture = Capture::start(&node1.netns, &lab.topology.node_link[0]);
    let ok = common::eventually(Duration::from_secs(20), || {
        let (ok, report, _) = send(
            &lab,
            "boxed",
            &format!("{}:8080", api.ip),
            4096,
            None,
            Some(marker),
        );
        (ok && report["received"] == 4096).then_some(())
    });
    let frames = capture.finish();
    assert!(ok.is_some(), "boxed → api through the mesh failed");
    common::assert_only_tls(&frames, marker);

    // Idempotent: ADD again (same netns) succeeds; DEL twice succeeds; DEL after the netns is
    // gone succeeds.
    let again = chain
        .invoke(
            &chain.conflist["plugins"][1],
            "ADD",
            &sandbox,
            Some(&result),
        )
        .expect("second ADD");
    assert!(again.success, "{again:?}");
    assert_eq!(again.json(), result);
    chain.del(&sandbox, Some(&result)).expect("chain DEL");
    assert!(!enrolled(&lab, "node-1", &boxed.uid), "DEL must unenroll");
    chain.del(&sandbox, Some(&result)).expect("second DEL");
    let meshlet = &chain.conflist["plugins"][1];
    let gone = Container {
        netns: "/run/netns/ml-no-such-pod".into(),
        ..sandbox.clone()
    };
    let del = chain.invoke(meshlet, "DEL", &gone, None).expect("DEL");
    assert!(del.success, "DEL after the netns is gone: {del:?}");
}

#[test]
fn spec_conformance_and_a_missing_agent_make_pods_wait_never_run_uncaptured() {
    let mut lab = up(&[
        PodSpec::new("web", "node-1", "frontend"),
        PodSpec::new("api", "node-2", "backend"),
        PodSpec::new("late", "node-1", "late").made_by_cni(),
    ]);
    let late = lab.topology.pod("late").expect("late").clone();
    let chain = ptp_chain(&lab, &late);
    let meshlet = chain.conflist["plugins"][1].clone();
    let sandbox = container(&late);

    // VERSION.
    let version = chain
        .invoke(&meshlet, "VERSION", &sandbox, None)
        .expect("VERSION");
    assert!(version.success);
    assert_eq!(version.json()["supportedVersions"][1], "1.0.0");
    println!("VERSION: {}", version.stdout.trim());
    // Malformed stdin: the spec's error object on stdout, a code, a message, non-zero exit.
    let out = std::process::Command::new(bin_dir().join("meshlet-cni"))
        .env("CNI_COMMAND", "ADD")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            if let Some(mut stdin) = c.stdin.take() {
                stdin.write_all(b"{\"cniVersion\": 1.0.0")?;
            }
            c.wait_with_output()
        })
        .expect("meshlet-cni");
    let error: Value = serde_json::from_slice(&out.stdout).expect("error JSON");
    assert!(!out.status.success());
    assert_eq!(error["code"], 6, "{error}");
    assert!(
        error["msg"].as_str().is_some_and(|m| m.contains("decode")),
        "{error}"
    );
    println!("malformed stdin: {error}");
    // An unknown uid in a namespace outside the mesh passes straight through.
    let outsider = Container {
        args: "K8S_POD_NAMESPACE=elsewhere;K8S_POD_NAME=x;K8S_POD_UID=uid-x".into(),
        ..sandbox.clone()
    };
    let prev = serde_json::json!({"cniVersion": "1.0.0", "ips": []});
    let out = chain
        .invoke(&meshlet, "ADD", &outsider, Some(&prev))
        .expect("ADD outside");
    assert!(out.success, "{out:?}");
    assert!(out.stderr.contains("not in the mesh"), "{out:?}");
    assert!(!enrolled(&lab, "node-1", "uid-x"));

    // The agent is away: ADD fails (code 11, try again later) and the pod's sandbox is not
    // started; STATUS says the plugin is not available; DEL still succeeds, at once.
    lab.kill_agent("node-1").expect("kill agent");
    let ptp = chain.conflist["plugins"][0].clone();
    let wired = chain.invoke(&ptp, "ADD", &sandbox, None).expect("ptp ADD");
    assert!(wired.success, "{wired:?}");
    let refused = chain
        .invoke(&meshlet, "ADD", &sandbox, Some(&wired.json()))
        .expect("ADD");
    assert!(!refused.success, "ADD must fail without the agent");
    assert_eq!(refused.json()["code"], 11, "{refused:?}");
    println!("ADD with the agent away: {}", refused.stdout.trim());
    let status = chain
        .invoke(&meshlet, "STATUS", &sandbox, None)
        .expect("STATUS");
    assert_eq!(status.json()["code"], 50, "{status:?}");
    let started = Instant::now();
    let del = chain
        .invoke(&meshlet, "DEL", &sandbox, Some(&wired.json()))
        .expect("DEL");
    assert!(del.success, "DEL without the agent: {del:?}");
    println!("DEL with the agent away took {:?}", started.elapsed());

    // The agent is back: the runtime's retry of the same sandbox succeeds.
    lab.restart_agent("node-1").expect("restart agent");
    let ok = common::eventually(Duration::from_secs(30), || {
        let out = chain
            .invoke(&meshlet, "ADD", &sandbox, Some(&wired.json()))
            .ok()?;
        out.success.then_some(out)
    })
    .expect("ADD after the agent came back");
    assert_eq!(ok.json(), wired.json());
    assert!(enrolled(&lab, "node-1", &late.uid));
    let status = chain
        .invoke(&meshlet, "STATUS", &sandbox, None)
        .expect("STATUS");
    assert!(status.success, "{status:?}");
    chain.del(&sandbox, Some(&wired.json())).expect("DEL");
}

#[test]
fn a_restarted_agent_adopts_its_pods_without_any_cni_call_and_forgets_pods_that_left() {
    let mut lab = up(&[
        PodSpec::new("web", "node-1", "frontend"),
        PodSpec::new("api", "node-2", "backend"),
        PodSpec::new("brief", "node-1", "brief"),
    ]);
    let api = lab.topology.pod("api").expect("api").clone();
    let brief = lab.topology.pod("brief").expect("brief").clone();
    let node1 = lab.topology.node("node-1").expect("node-1").clone();
    let _server = Server::start(&lab, "api", 8080);
    let to = format!("{}:8080", api.ip);
    let (ok, report, err) = send(&lab, "web", &to, 1024, None, None);
    assert!(ok, "before the crash: {err} {report}");
    let before: Vec<_> = lab.pods("node-1").expect("pods");
    let cookie_of = |pods: &[meshlet_proto::v1::PodStatus], uid: &str| {
        pods.iter().find(|p| p.uid == uid).map(|p| p.netns_cookie)
    };
    let brief_cookie = cookie_of(&before, &brief.uid).expect("brief enrolled");

    lab.kill_agent("node-1").expect("kill -9");
    let (ok, _, _) = send(&lab, "web", &to, 1024, None, None);
    assert!(!ok, "fail closed while the agent is away");
    // A pod leaves while no agent runs (its netns is deleted; its DEL never reached the agent).
    let del = std::process::Command::new("ip")
        .args(["netns", "del", &brief.netns])
        .status()
        .expect("ip netns del");
    assert!(del.success());

    let started = Instant::now();
    lab.restart_agent("node-1").expect("restart");
    let recovered = common::eventually(Duration::from_secs(20), || {
        let (ok, _, _) = send(&lab, "web", &to, 1024, None, None);
        ok.then_some(started.elapsed())
    })
    .expect("web → api must work again with no CNI call");
    println!("traffic recovered {recovered:?} after the agent was started again");
    let after = lab.pods("node-1").expect("pods");
    let web = lab.topology.pod("web").expect("web");
    assert_eq!(
        cookie_of(&after, &web.uid),
        cookie_of(&before, &web.uid),
        "web adopted in the same netns"
    );
    assert_eq!(
        cookie_of(&after, &brief.uid),
        None,
        "the pod that left is forgotten"
    );
    assert!(
        !Path::new(&node1.bpf_pin_dir)
            .join(format!("capture_{brief_cookie}"))
            .exists(),
        "the departed pod's capture pin is removed"
    );
    let log = lab.agent_log("node-1");
    assert!(
        log.contains("pods of the previous agent adopted")
            && log.contains("pod left while no agent ran"),
        "{log}"
    );
}
