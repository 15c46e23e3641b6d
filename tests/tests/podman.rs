//! A real container runtime runs meshlet-cni: podman (CNI backend, runc) starts a busybox
//! container on lab node-1 with a conflist that chains the real ptp/host-local plugins and
//! meshlet-cni. The agent enrolls the container before its command runs, so its very first
//! connection is mTLS on the wire; with the agent stopped the container does not start at
//! all, and with the agent back it does. Root only.
use std::{path::Path, time::Duration};

use meshlet_lab::{cni::ptp_then_meshlet, podman::Podman, PodSpec};

mod common;
use common::{bin_dir, contains, up, Capture, Server};

#[test]
fn podman_starts_a_mesh_container_only_once_the_agent_has_captured_it() {
    let mut lab = up(&[
        PodSpec::new("web", "node-1", "frontend"),
        PodSpec::new("api", "node-2", "backend"),
        // The container: its workload is known to the control plane (uid = the container's
        // name, which podman passes as K8S_POD_NAME), its address comes from host-local.
        PodSpec::new("boxed", "node-1", "boxed").made_by_cni(),
    ]);
    let boxed = lab.topology.pod("boxed").expect("boxed").clone();
    let api = lab.topology.pod("api").expect("api").clone();
    let node1 = lab.topology.node("node-1").expect("node-1").clone();
    let socket = Path::new(&node1.agent_socket).with_file_name("cni.sock");
    let podman = Podman::new(
        &lab.state_path("podman"),
        &node1.netns,
        Path::new(&node1.cgroup),
        &bin_dir(),
    )
    .expect("podman setup");
    let mut conflist = ptp_then_meshlet(boxed.ip, &lab.state_path("ipam"), &socket);
    conflist["name"] = "meshnet".into();
    // podman passes no K8S_POD_NAMESPACE: the conflist names the namespace its containers
    // belong to.
    conflist["plugins"][1]["workloadNamespace"] = boxed.namespace.clone().into();
    podman.add_network(&conflist).expect("network");
    let rootfs = Podman::busybox_rootfs(&lab.state_path("podman-image")).expect("rootfs");
    podman
        .import(&rootfs, "localhost/meshlet-test-busybox:1")
        .expect("import");
    let _server = Server::start(&lab, "api", 8080);
    let marker = "MESHLET-PODMAN-PLAINTEXT-MARKER";
    let run = |name: &str| {
        let mut cmd = podman.command().expect("podman");
        cmd.args(["run", "--rm", "--name", name, "--network", "meshnet"])
            .args(podman.run_args())
            .arg("localhost/meshlet-test-busybox:1")
            .args([
                "sh",
                "-c",
                &format!("echo {marker} | nc -w 5 {} 8080", api.ip),
            ]);
        let out = cmd.output().expect("podman run");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    // The agent is away: podman cannot start the container (meshlet-cni's ADD fails).
    lab.kill_agent("node-1").expect("kill agent");
    let (ok, stdout, stderr) = run(&boxed.uid);
    assert!(
        !ok,
        "the container must not start without the agent: {stdout}"
    );
    assert!(
        stderr.contains("meshlet") && !stdout.contains(marker),
        "podman must say why and the command must not have run: {stdout} {stderr}"
    );
    println!("agent away, podman says: {}", stderr.trim());

    // The agent is back: the container starts, and its first connection is already mTLS.
    lab.restart_agent("node-1").expect("restart agent");
    lab.wait_ready(Duration::from_secs(30)).expect("ready");
    let capture = Capture::start(&node1.netns, &lab.topology.node_link[0]);
    let result = common::eventually(Duration::from_secs(30), || {
        let (ok, stdout, stderr) = run(&boxed.uid);
        if ok && stdout.contains(marker) {
            Some(stdout)
        } else {
            println!("not yet: {stdout} {stderr}");
            std::thread::sleep(Duration::from_millis(500));
            None
        }
    });
    let frames = capture.finish();
    assert!(
        result.is_some(),
        "the container's echo through the mesh failed"
    );
    assert!(
        !frames.iter().any(|f| contains(f, marker.as_bytes())),
        "plaintext on the node link"
    );
    assert!(
        frames
            .iter()
            .any(|f| f.windows(2).any(|w| w == [0x17, 0x03])),
        "TLS application data on the node link"
    );
    let log = lab.agent_log("node-1");
    assert!(
        log.contains(&format!("pod {}/{} enrolled", boxed.namespace, boxed.uid))
            && log.contains("pod uid-boxed unenrolled"),
        "the agent enrolled the container at ADD and unenrolled it at DEL: {log}"
    );
    drop(podman);
}
