//! A real container runtime runs meshlet-cni: podman (CNI backend, runc) starts a busybox
//! container on lab node-1 with a conflist that chains the real ptp/host-local plugins and
//! meshlet-cni. The agent enrolls the container before its command runs, so its very first
//! connection is mTLS on the wire; with the agent stopped the container does not start at
//! all, and with the agent back it does. Root only.
use std::{path::Path, time::Duration};

use meshlet_lab::{cni::ptp_then_meshlet, podman::Podman, PodSpec};

mod common;
use common::{bin_dir, up, Capture, Server};

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
    let socket = node1.cni_socket();
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
    common::assert_only_tls(&frames, marker);
    let log = lab.agent_log("node-1");
    assert!(
        log.contains(&format!("pod {}/{} enrolled", boxed.namespace, boxed.uid))
            && log.contains("pod uid-boxed unenrolled"),
        "the agent enrolled the container at ADD and unenrolled it at DEL: {log}"
    );
    drop(podman);
}

#[test]
fn the_agent_image_runs_under_podman_with_the_daemonsets_privileges() {
    // Built by `cargo xtask test` (or `cargo xtask image`) before the lab tests.
    let archive = std::env::var("MESHLET_IMAGE_ARCHIVE")
        .ok()
        .filter(|a| !a.is_empty())
        .expect("MESHLET_IMAGE_ARCHIVE: the image's OCI archive (cargo xtask image makes it)");
    let image = format!("oci-archive:{archive}");
    // The DaemonSet's privileges, as podman flags: host network (the lab node's netns) and
    // PID, root, read-only root filesystem, all capabilities dropped but the three it adds,
    // the runtime's default seccomp profile; host paths: bpffs, cgroup2 (read-only) and the
    // node's socket folder (the lab keeps the node's files in its state folder).
    let storage = Path::new("/run/meshlet-lab-podman");
    let _ = std::fs::remove_dir_all(storage);
    // podman's default sysctls (ping_group_range) cannot be set in a shared network namespace.
    let conf = std::env::temp_dir().join(format!("meshlet-image-test-{}.conf", std::process::id()));
    std::fs::write(&conf, "[containers]\ndefault_sysctls = []\n").expect("containers.conf");
    let command = vec![
        "env".to_string(),
        format!("CONTAINERS_CONF={}", conf.display()),
        "podman".to_string(),
        "--root".into(),
        storage.join("root").display().to_string(),
        "--runroot".into(),
        storage.join("run").display().to_string(),
        "--storage-driver".into(),
        "vfs".into(),
        "--runtime".into(),
        "runc".into(),
        "--cgroup-manager".into(),
        "cgroupfs".into(),
        "--events-backend".into(),
        "file".into(),
        "run".into(),
        "--rm".into(),
        "--cgroup-parent".into(),
        "/meshlet-lab-podman".into(),
        "--network".into(),
        "ns:{node_netns}".into(),
        "--pid".into(),
        "host".into(),
        "--user".into(),
        "0:0".into(),
        "--read-only".into(),
        "--cap-drop".into(),
        "all".into(),
        "--cap-add".into(),
        "sys_admin,net_admin,sys_ptrace".into(),
        "--ulimit".into(),
        "nofile=4096:4096".into(),
        "--ulimit".into(),
        "nproc=4096:4096".into(),
        "-v".into(),
        "/sys/fs/bpf:/sys/fs/bpf".into(),
        "-v".into(),
        "/sys/fs/cgroup:/sys/fs/cgroup:ro".into(),
        "-v".into(),
        "/run/meshlet-lab:/run/meshlet-lab".into(),
        image,
    ];
    let mut options = meshlet_lab::LabOptions::new(bin_dir());
    options.agent_command = Some(command);
    let lab = meshlet_lab::Lab::up(
        &[
            PodSpec::new("web", "node-1", "frontend"),
            PodSpec::new("api", "node-2", "backend"),
        ],
        &options,
    );
    let cleanup = || {
        let _ = std::fs::remove_file(&conf);
        meshlet_lab::podman::cleanup(storage, "meshlet-lab-podman");
        meshlet_lab::cgroup::remove_tree(Path::new("/sys/fs/cgroup/unified/meshlet-lab-podman"));
        let _ = std::fs::remove_dir_all(storage);
    };
    let lab = match lab {
        Ok(lab) => lab,
        Err(e) => {
            cleanup();
            panic!("lab with the agents in the image: {e:#}");
        }
    };
    let api = lab.topology.pod("api").expect("api").clone();
    let _server = Server::start(&lab, "api", 8080);
    let marker = "MESHLET-IMAGE-PLAINTEXT-MARKER";
    let node1 = lab.topology.node("node-1").expect("node-1").clone();
    let capture = Capture::start(&node1.netns, &lab.topology.node_link[0]);
    let (ok, report, err) = common::send(
        &lab,
        "web",
        &format!("{}:8080", api.ip),
        4096,
        None,
        Some(marker),
    );
    let frames = capture.finish();
    let agent_log = lab.agent_log("node-1");
    drop(lab);
    cleanup();
    assert!(
        ok,
        "web → api with the agents in the image: {err} {report}\n{agent_log}"
    );
    common::assert_only_tls(&frames, marker);
    assert!(agent_log.contains("pod enrolled"), "{agent_log}");
}
