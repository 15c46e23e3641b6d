//! End-to-end tests in the lab: real network namespaces, real eBPF, real agents. Root only;
//! run one at a time (`cargo xtask test` does).
use std::time::{Duration, Instant};

use meshlet_lab::{lab, PodSpec};
use meshlet_proto::v1::AddPodRequest;

mod common;
use common::{contains, send, up, Capture, Server, AGENT_MARK};

fn mesh_pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("web", "node-1", "frontend"),
        PodSpec::new("api", "node-2", "backend"),
        PodSpec::new("legacy", "node-1", "legacy").outside_mesh(),
        PodSpec::new("ext", "node-2", "ext").outside_mesh(),
    ]
}

#[test]
fn web_to_api_one_mib_each_way_over_mtls_and_nothing_in_plaintext_on_the_wire() {
    let lab = up(&mesh_pods());
    let web = lab.topology.pod("web").expect("web").clone();
    let api = lab.topology.pod("api").expect("api").clone();
    let node1 = lab.topology.node("node-1").expect("node-1").clone();
    let link = lab.topology.node_link[0].clone();
    let server = Server::start(&lab, "api", 8080);

    let marker = "MESHLET-PLAINTEXT-MARKER-7f3a";
    let capture = Capture::start(&node1.netns, &link);
    let (ok, report, err) = send(
        &lab,
        "web",
        &format!("{}:8080", api.ip),
        1 << 20,
        None,
        Some(marker),
    );
    let frames = capture.finish();
    assert!(ok, "1 MiB echo through the mesh failed: {err} {report}");
    assert_eq!(report["received"], 1 << 20);
    assert_eq!(report["sent_sha256"], report["received_sha256"]);
    assert_eq!(
        report["peer"],
        format!("{}:8080", api.ip),
        "getpeername must show the dialled peer"
    );

    let accepted = server.accepted(Duration::from_millis(500));
    assert!(
        accepted
            .iter()
            .any(|l| l.starts_with(&format!("ACCEPT {}:", web.ip))),
        "api's server must see web's pod IP as source, saw {accepted:?}"
    );

    // Each destination gets a loopback source of its own (127/8, never the shared
    // 127.0.0.1), so redirected connections to one service do not crowd the 4-tuples of
    // another: the same one for the same destination, another for another.
    let _second_server = Server::start(&lab, "api", 8081);
    let local_of = |port: u16| -> String {
        let (ok, report, err) = send(&lab, "web", &format!("{}:{port}", api.ip), 16, None, None);
        assert!(ok, "connection to :{port} failed: {err} {report}");
        let local = report["local"].as_str().unwrap_or_default().to_string();
        local
            .rsplit_once(':')
            .map(|(ip, _)| ip.to_string())
            .unwrap_or(local)
    };
    let first = local_of(8080);
    assert!(
        first.starts_with("127.") && first != "127.0.0.1",
        "a redirected socket's source must be its destination's own loopback address, was {first}"
    );
    assert_eq!(
        report["local"]
            .as_str()
            .map(|l| l.starts_with(&format!("{first}:"))),
        Some(true),
        "{report}"
    );
    assert_ne!(local_of(8081), first, "another destination, another source");

    let all: Vec<u8> = frames.concat();
    assert!(!frames.is_empty(), "the capture saw no frames on {link}");
    assert!(
        !contains(&all, marker.as_bytes()),
        "plaintext marker crossed the node link"
    );
    // TLS 1.3 application-data records: content type 23, legacy version 3.3.
    assert!(
        contains(&all, &[0x17, 0x03, 0x03]),
        "no TLS records on the node link"
    );
    assert!(
        contains(&all, &15008u16.to_be_bytes()),
        "no traffic to port 15008 on the node link"
    );

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = lab.agent_log("node-2");
        if log.contains("accepted mTLS tunnel connection") && log.contains(&web.identity) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "api's agent never logged web's SPIFFE ID:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    lab.down();
    assert!(lab::leftovers().is_empty(), "{:?}", lab::leftovers());
}

#[test]
fn pods_outside_the_mesh_talk_directly_and_the_capture_would_see_plaintext() {
    let lab = up(&mesh_pods());
    let legacy = lab.topology.pod("legacy").expect("legacy").clone();
    let ext = lab.topology.pod("ext").expect("ext").clone();
    let node1 = lab.topology.node("node-1").expect("node-1").clone();
    let server = Server::start(&lab, "ext", 9090);
    let marker = "UNMESHED-PLAINTEXT-MARKER-91c2";
    let capture = Capture::start(&node1.netns, &lab.topology.node_link[0]);
    let (ok, report, err) = send(
        &lab,
        "legacy",
        &format!("{}:9090", ext.ip),
        4096,
        None,
        Some(marker),
    );
    let frames = capture.finish();
    assert!(ok, "direct connection failed: {err} {report}");
    // Uncaptured: the client's own socket talked to the server (no 127.0.0.1 redirect).
    assert_eq!(
        report["local"]
            .as_str()
            .map(|l| l.starts_with(&legacy.ip.to_string())),
        Some(true),
        "{report}"
    );
    assert!(server
        .accepted(Duration::from_millis(300))
        .iter()
        .any(|l| l.starts_with(&format!("ACCEPT {}:", legacy.ip))));
    // The same capture that proves the mesh hides the marker does see it here.
    assert!(
        contains(&frames.concat(), marker.as_bytes()),
        "capture must see unmeshed plaintext"
    );
    assert!(
        !lab.agent_log("node-1").contains(&ext.ip.to_string()),
        "node-1's agent must not see this connection"
    );
}

#[test]
fn unknown_destinations_are_refused_and_pod_sockets_with_the_agent_mark_are_still_redirected() {
    let mut pods = mesh_pods();
    // Enrolled on node-2 but unknown to the control plane.
    let mut ghost = PodSpec::new("ghost", "node-2", "ghost");
    ghost.registered = false;
    pods.push(ghost);
    let lab = up(&pods);
    // A mesh that lets nothing out but what it lists (ALLOW_ANY, the default, is tested with
    // Services).
    common::write_policy(
        &lab,
        serde_json::json!({"mesh": {"outbound_traffic_policy": "REGISTRY_ONLY"}}),
        2,
        false,
    );
    let ext = lab.topology.pod("ext").expect("ext").clone();
    let ghost = lab.topology.pod("ghost").expect("ghost").clone();
    let ext_server = Server::start(&lab, "ext", 9090);
    let ghost_server = Server::start(&lab, "ghost", 8080);

    // From a mesh pod to an address that is no workload: refused (fail closed).
    let (ok, report, _) = send(&lab, "web", &format!("{}:9090", ext.ip), 1024, None, None);
    assert!(!ok, "an unknown destination must be refused, got {report}");
    let (ok, report, _) = send(&lab, "web", &format!("{}:8080", ghost.ip), 1024, None, None);
    assert!(
        !ok,
        "a pod unknown to the control plane must not be reached, got {report}"
    );
    assert!(
        ghost_server.accepted(Duration::from_millis(300)).is_empty(),
        "ghost got plaintext"
    );
    assert!(
        ext_server.accepted(Duration::from_millis(300)).is_empty(),
        "ext got plaintext"
    );
    assert!(lab.agent_log("node-1").contains("reason=\"registry_only\""));

    // A pod process that sets the agent's mark on its socket (root in the pod can) is still
    // redirected, and so refused like above: the redirect knows the agent by its cgroup, not
    // by a mark. Before, the mark let plaintext past the mesh.
    let skipped_before = redirect_counter(&lab, "node-1", "skipped_agent");
    let (ok, report, _) = send(
        &lab,
        "web",
        &format!("{}:9090", ext.ip),
        1024,
        Some(AGENT_MARK),
        None,
    );
    assert!(
        !ok,
        "a pod socket with the agent's mark bypassed the mesh: {report}"
    );
    assert!(
        ext_server.accepted(Duration::from_millis(300)).is_empty(),
        "ext got plaintext from a marked pod socket"
    );
    assert_eq!(
        redirect_counter(&lab, "node-1", "skipped_agent"),
        skipped_before,
        "a pod socket was taken for the agent's"
    );
    // Nor does the mark let a pod bind the agent's outbound port.
    let bind = lab
        .command_in("web", common::PROBE)
        .expect("command")
        .args(["bind", "15001", AGENT_MARK])
        .output()
        .expect("probe bind");
    assert!(
        !bind.status.success(),
        "a marked pod socket bound the agent's port 15001: {}",
        String::from_utf8_lossy(&bind.stdout)
    );
}

/// A redirect counter of `node`'s agent, from its metrics.
fn redirect_counter(lab: &meshlet_lab::Lab, node: &str, event: &str) -> f64 {
    common::sample(
        &common::metrics(lab, node),
        "meshlet_redirect_events_total",
        &[&format!("event=\"{event}\"")],
    )
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let lab = up(&mesh_pods());
    let api = lab.topology.pod("api").expect("api").clone();
    let node1 = lab.topology.node("node-1").expect("node-1").clone();
    let _server = Server::start(&lab, "api", 8080);

    // A pod whose netns does not exist.
    let err = lab
        .add_pod(
            &node1.agent_socket,
            AddPodRequest {
                uid: "uid-missing".into(),
                netns_path: "/run/netns/ml-does-not-exist".into(),
            },
        )
        .expect_err("a missing netns must be refused");
    assert!(
        err.to_string().contains("cannot open network namespace"),
        "{err}"
    );
    assert!(lab
        .agent_log("node-1")
        .contains("/run/netns/ml-does-not-exist"));

    // A workload update with an invalid IP: NACKed, the last good state stays.
    let mut workloads = lab.topology.workloads_json();
    workloads["workloads"][1]["ips"] = serde_json::json!(["10.244.2.300"]);
    lab.write_workloads(&workloads).expect("write registry");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = lab.agent_log("node-1");
        if log.contains("refused control-plane update (NACK)") && log.contains("10.244.2.300") {
            break;
        }
        assert!(Instant::now() < deadline, "no NACK logged:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, report, err) = send(&lab, "web", &format!("{}:8080", api.ip), 65536, None, None);
    assert!(
        ok,
        "traffic must keep flowing on the last good state: {err} {report}"
    );
}

#[test]
fn with_the_agent_gone_enrolled_pods_fail_closed() {
    let mut lab = up(&mesh_pods());
    let api = lab.topology.pod("api").expect("api").clone();
    let ext = lab.topology.pod("ext").expect("ext").clone();
    let server = Server::start(&lab, "api", 8080);
    let ext_server = Server::start(&lab, "ext", 9090);
    let (ok, report, err) = send(&lab, "web", &format!("{}:8080", api.ip), 1024, None, None);
    assert!(ok, "mesh path must work before the crash: {err} {report}");
    server.accepted(Duration::from_millis(300));

    lab.kill_agent("node-1").expect("kill agent");
    // The pinned programs still redirect web's connects, to a port nobody listens on now:
    // refused, and neither server ever sees a plaintext connection.
    for to in [format!("{}:8080", api.ip), format!("{}:9090", ext.ip)] {
        let (ok, report, _) = send(&lab, "web", &to, 1024, None, None);
        assert!(
            !ok,
            "with the agent gone, {to} must be refused, got {report}"
        );
    }
    assert!(
        server.accepted(Duration::from_millis(300)).is_empty(),
        "api got a connection"
    );
    assert!(
        ext_server.accepted(Duration::from_millis(300)).is_empty(),
        "ext got plaintext"
    );
    // A pod outside the mesh on the same node is unaffected.
    let (ok, report, err) = send(
        &lab,
        "legacy",
        &format!("{}:9090", ext.ip),
        1024,
        None,
        None,
    );
    assert!(ok, "unenrolled pods keep working: {err} {report}");
}

#[test]
fn lab_down_and_crash_cleanup_leave_nothing_behind() {
    let lab = up(&[
        PodSpec::new("web", "node-1", "frontend"),
        PodSpec::new("api", "node-2", "backend"),
    ]);
    assert!(!lab::leftovers().is_empty());
    // A crash: processes and kernel objects left as they are.
    let _topology = lab.detach();
    meshlet_lab::cleanup();
    assert!(
        lab::leftovers().is_empty(),
        "after cleanup: {:?}",
        lab::leftovers()
    );
    // And the ordinary way.
    let lab = up(&[PodSpec::new("web", "node-1", "frontend")]);
    lab.down();
    assert!(
        lab::leftovers().is_empty(),
        "after down: {:?}",
        lab::leftovers()
    );
}

#[test]
fn with_the_control_plane_gone_known_workloads_keep_talking_and_status_says_since_when() {
    let mut lab = up(&mesh_pods());
    let api = lab.topology.pod("api").expect("api").clone();
    // How long it stays away: MESHLET_CONTROL_PLANE_OUTAGE_SECS (600 for the 10-minute run by
    // hand), 20 s in `cargo xtask test`.
    let outage = Duration::from_secs(
        std::env::var("MESHLET_CONTROL_PLANE_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    // Four connections a second for the whole outage, and some to spare.
    let _server = Server::start_with(
        &lab,
        "api",
        8080,
        outage.as_secs() as usize * 5 + 100,
        outage.as_secs() + 180,
    );
    let to = format!("{}:8080", api.ip);
    let (ok, report, err) = send(&lab, "web", &to, 1024, None, None);
    assert!(ok, "before: {err} {report}");
    let (_, status, _) = common::meshlet_cli(&lab, "node-1", &["status"]);
    assert!(
        status.contains("control plane:  connected since"),
        "{status}"
    );

    lab.kill_controlplane().expect("stop the control plane");
    let started = Instant::now();
    let (mut made, mut failed) = (0u32, Vec::new());
    while started.elapsed() < outage {
        let (ok, report, err) = send(&lab, "web", &to, 1024, None, None);
        made += 1;
        if !ok {
            failed.push(format!("{:?}: {err} {report}", started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let (_, status, _) = common::meshlet_cli(&lab, "node-1", &["status"]);
    println!(
        "{made} connections over {outage:?} without a control plane, {} failed; status:\n{status}",
        failed.len()
    );
    if !failed.is_empty() {
        for node in ["node-1", "node-2"] {
            for line in lab
                .agent_log(node)
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            {
                println!("{node}: {line}");
            }
        }
    }
    assert!(
        failed.is_empty(),
        "connections failed without the control plane: {failed:?}"
    );
    assert!(
        status.contains("control plane:  disconnected since")
            && status.contains("serving the last good state"),
        "{status}"
    );
    assert_eq!(
        common::sample(
            &common::metrics(&lab, "node-1"),
            "meshlet_control_plane_connected",
            &[]
        ),
        0.0
    );

    // Back: the agents resync by themselves.
    lab.restart_controlplane().expect("restart");
    let back = common::eventually(Duration::from_secs(20), || {
        let (_, status, _) = common::meshlet_cli(&lab, "node-1", &["status"]);
        status
            .contains("control plane:  connected since")
            .then_some(status)
    });
    assert!(back.is_some(), "the agent did not reconnect");
    let (ok, report, err) = send(&lab, "web", &to, 1024, None, None);
    assert!(ok, "after: {err} {report}");
}
