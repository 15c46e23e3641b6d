//! Bringing the lab up and down, running commands in pods, talking to the agents.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use meshlet_proto::v1::{node_service_client::NodeServiceClient, AddPodRequest, ListPodsRequest};

use crate::{
    cgroup, net, netns,
    topology::{NodeInfo, PodInfo, PodSpec, Topology},
    BPF_ROOT, CGROUP_ROOT, NAME_PREFIX, STATE_DIR,
};

/// How long an agent may hold a log line before writing it (its 100 ms batch), with room
/// for a busy machine.
pub const AGENT_LOG_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

/// Where the binaries are and how to run them.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Folder with `meshlet` and `meshlet-controlplane`.
    pub bin_dir: PathBuf,
    pub trust_domain: String,
    /// Extra arguments for every agent.
    pub agent_args: Vec<String>,
    /// Certificate lifetime asked for, seconds.
    pub cert_lifetime: u64,
    /// Extra arguments for the control plane (e.g. `--max-cert-lifetime`).
    pub controlplane_args: Vec<String>,
    /// Pods get an IPv6 address (fd00:10:244:<node>::<n>) beside their IPv4 one, and nodes
    /// route both families.
    pub dual_stack: bool,
    /// Kubernetes mode: the lab runs the emulated API server ([`crate::kube_api`]), writes
    /// Namespaces, Nodes and Pods to it as a kubelet would, and the control plane reads the
    /// cluster from it (`--kubeconfig`) instead of a registry file.
    pub kubernetes: bool,
    /// Control-plane replicas (Kubernetes mode): each on a socket of its own, the agents
    /// given all of them.
    pub controlplane_replicas: usize,
    /// A command (and its arguments) the agents run under, e.g. `setpriv` limiting their
    /// capabilities to the DaemonSet's.
    pub agent_wrapper: Vec<String>,
    /// Runs the agents as this command followed by their arguments instead of the built
    /// binary (e.g. `podman run … IMAGE`, the image's entrypoint being `meshlet`);
    /// `{node_netns}` in it is the node's network namespace path.
    pub agent_command: Option<Vec<String>>,
}

impl LabOptions {
    pub fn new(bin_dir: impl Into<PathBuf>) -> Self {
        Self {
            bin_dir: bin_dir.into(),
            trust_domain: "cluster.local".into(),
            agent_args: Vec::new(),
            cert_lifetime: 3600,
            controlplane_args: Vec::new(),
            dual_stack: false,
            kubernetes: false,
            controlplane_replicas: 1,
            agent_wrapper: Vec::new(),
            agent_command: None,
        }
    }
}

/// A running lab. Dropping it tears everything down.
pub struct Lab {
    pub topology: Topology,
    bin_dir: PathBuf,
    runtime: tokio::runtime::Runtime,
    children: Vec<Child>,
    torn_down: bool,
    /// How the control plane was started, to start it again.
    controlplane_args: Vec<std::ffi::OsString>,
    /// How each node's agent was started, to start it again.
    agent_args: Vec<Vec<std::ffi::OsString>>,
    /// A command the agent runs under (e.g. `setpriv` with a capability set).
    agent_wrapper: Vec<String>,
    /// Instead of the built binary: this command, then the agent's arguments.
    agent_command: Option<Vec<String>>,
    /// The emulated Kubernetes API server, in Kubernetes mode.
    kube: Option<std::sync::Arc<crate::kube_api::KubeApi>>,
    /// Control-plane replicas beyond the first: (socket, process).
    replicas: Vec<(String, Child)>,
    /// The first control plane's health endpoint (Kubernetes mode).
    controlplane_health: Option<std::net::SocketAddr>,
    /// Agents that handed their node over and drain: (node, process).
    draining: Vec<(String, Child)>,
    /// Agents started so far, for the cgroup of the next one.
    agent_generation: usize,
}

fn state_path(file: &str) -> PathBuf {
    Path::new(STATE_DIR).join(file)
}

/// Removes everything any lab made: processes, netns (and their veths), cgroups, pins,
/// state. Safe to call when nothing is there.
pub fn cleanup() {
    if let Ok(text) = std::fs::read_to_string(state_path("pids")) {
        for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    crate::podman::cleanup(&state_path("podman"), "meshlet-lab");
    // The agent image's containers (tests/tests/podman.rs).
    crate::podman::cleanup(Path::new("/run/meshlet-lab-podman"), "meshlet-lab-podman");
    cgroup::remove_tree(Path::new("/sys/fs/cgroup/unified/meshlet-lab-podman"));
    let _ = std::fs::remove_dir_all("/run/meshlet-lab-podman");
    cgroup::remove_tree(Path::new(CGROUP_ROOT));
    for name in netns::list_lab() {
        netns::delete(&name);
    }
    let _ = std::fs::remove_dir_all(BPF_ROOT);
    let _ = std::fs::remove_dir_all(STATE_DIR);
}

/// What is left of the lab (empty when clean).
pub fn leftovers() -> Vec<String> {
    let mut left: Vec<String> = netns::list_lab()
        .into_iter()
        .map(|n| format!("netns {n}"))
        .collect();
    for (what, path) in [
        ("cgroup", CGROUP_ROOT),
        ("bpffs", BPF_ROOT),
        ("state", STATE_DIR),
    ] {
        if Path::new(path).exists() {
            left.push(format!("{what} {path}"));
        }
    }
    left
}

/// Mounts bpffs at /sys/fs/bpf when it is not there yet.
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains("bpf"))
    {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf")?;
    nix::mount::mount(
        Some("bpffs"),
        "/sys/fs/bpf",
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting bpffs at /sys/fs/bpf")
}

impl Lab {
    /// Builds the lab for `pods`, starts the control plane and agents, announces the enrolled
    /// pods and waits until their certificates are in hand.
    pub fn up(pods: &[PodSpec], options: &LabOptions) -> anyhow::Result<Self> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("the lab needs root (network namespaces, cgroups, BPF)");
        }
        cleanup();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let mut lab = Lab {
            topology: Topology::default(),
            bin_dir: options.bin_dir.clone(),
            runtime,
            children: Vec::new(),
            torn_down: false,
            controlplane_args: Vec::new(),
            agent_args: Vec::new(),
            agent_wrapper: options.agent_wrapper.clone(),
            agent_command: options.agent_command.clone(),
            kube: None,
            replicas: Vec::new(),
            controlplane_health: None,
            draining: Vec::new(),
            agent_generation: 0,
        };
        // From here on, a failure tears down what was made (Drop).
        lab.build(pods, options)?;
        lab.start(options)?;
        Ok(lab)
    }

    fn build(&mut self, pods: &[PodSpec], options: &LabOptions) -> anyhow::Result<()> {
        std::fs::create_dir_all(state_path("logs"))?;
        ensure_bpffs()?;
        let mut node_names: Vec<String> = Vec::new();
        for p in pods {
            if !node_names.contains(&p.node) {
                node_names.push(p.node.clone());
            }
        }
        if node_names.len() > 2 {
            bail!("the lab links at most two nodes");
        }
        let mut topo = Topology {
            trust_domain: options.trust_domain.clone(),
            controlplane_socket: state_path("controlplane.sock").display().to_string(),
            controlplane_log: state_path("logs/controlplane.log").display().to_string(),
            workloads_file: state_path("workloads.json").display().to_string(),
            dual_stack: options.dual_stack,
            ..Default::default()
        };
        for (i, node) in node_names.iter().enumerate() {
            let n = i as u8 + 1;
            let ns = format!("{NAME_PREFIX}{node}");
            netns::create(&ns)?;
            netns::sysctl(&ns, "net.ipv4.ip_forward", "1")?;
            if options.dual_stack {
                prepare_ipv6(&ns, true)?;
            }
            let cg = cgroup::node_dir(node);
            cgroup::create(&cg)?;
            topo.nodes.push(NodeInfo {
                name: node.clone(),
                netns: ns,
                link_ip: Ipv4Addr::new(10, 99, 0, n),
                pod_cidr: format!("10.244.{n}.0/24"),
                link_ip6: options
                    .dual_stack
                    .then(|| Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, u16::from(n))),
                pod_cidr6: options.dual_stack.then(|| format!("fd00:10:244:{n}::/64")),
                cgroup: cg.display().to_string(),
                bpf_pin_dir: Path::new(BPF_ROOT).join(node).display().to_string(),
                agent_socket: state_path(&format!("{node}/agent.sock"))
                    .display()
                    .to_string(),
                agent_log: state_path(&format!("logs/{node}.log"))
                    .display()
                    .to_string(),
            });
        }
        let mut next_host: BTreeMap<String, u8> = BTreeMap::new();
        for spec in pods {
            let node_index = topo
                .nodes
                .iter()
                .position(|n| n.name == spec.node)
                .context("pod on unknown node")? as u8
                + 1;
            let host = next_host.entry(spec.node.clone()).or_insert(2);
            let ip = Ipv4Addr::new(10, 244, node_index, *host);
            let ip6 = options.dual_stack.then(|| {
                Ipv6Addr::new(
                    0xfd00,
                    0x10,
                    0x244,
                    u16::from(node_index),
                    0,
                    0,
                    0,
                    u16::from(*host),
                )
            });
            *host += 1;
            let ns = format!("{NAME_PREFIX}{}", spec.name);
            let netns_path = netns::create(&ns)?;
            if options.dual_stack {
                prepare_ipv6(&ns, false)?;
            }
            let cg = cgroup::pod_dir(&spec.node, &spec.name);
            cgroup::create(&cg)?;
            topo.pods.push(PodInfo {
                name: spec.name.clone(),
                uid: format!("uid-{}", spec.name),
                node: spec.node.clone(),
                namespace: spec.namespace.clone(),
                service_account: spec.service_account.clone(),
                identity: format!(
                    "spiffe://{}/ns/{}/sa/{}",
                    options.trust_domain, spec.namespace, spec.service_account
                ),
                ip,
                ip6,
                netns: ns,
                netns_path: netns_path.display().to_string(),
                cgroup: cg.display().to_string(),
                enrolled: spec.enrolled,
                wired: spec.wired,
                registered: spec.registered,
            });
        }
        if topo.nodes.len() == 2 {
            topo.node_link = vec![
                format!("{NAME_PREFIX}{}", topo.nodes[1].name),
                format!("{NAME_PREFIX}{}", topo.nodes[0].name),
            ];
        }
        self.topology = topo.clone();
        self.save()?;
        self.runtime.block_on(wire(&topo))?;
        if options.kubernetes {
            let api = self.runtime.block_on(crate::kube_api::KubeApi::start())?;
            write_cluster(&api, &topo)?;
            // The control plane is held to the ClusterRole deploy/ ships.
            let token = format!("controlplane-{:016x}", rand::random::<u64>());
            api.bind_role(
                &token,
                "system:serviceaccount:meshlet-system:meshlet-controlplane",
                CONTROLPLANE_RBAC,
                "meshlet-controlplane",
            )?;
            std::fs::write(state_path("kubeconfig"), api.kubeconfig(&token))?;
            // kubectl in tests acts as the cluster's administrator.
            std::fs::write(state_path("admin-kubeconfig"), api.kubeconfig("lab-admin"))?;
            self.kube = Some(api);
        } else {
            std::fs::write(
                &topo.workloads_file,
                serde_json::to_vec_pretty(&topo.workloads_json())?,
            )?;
        }
        Ok(())
    }

    /// The emulated Kubernetes API server (Kubernetes mode only).
    pub fn kube(&self) -> Option<&crate::kube_api::KubeApi> {
        self.kube.as_deref()
    }

    /// An administrator's kubeconfig for the emulated API server (Kubernetes mode only),
    /// for kubectl.
    pub fn kubeconfig_path(&self) -> PathBuf {
        state_path("admin-kubeconfig")
    }

    fn save(&self) -> anyhow::Result<()> {
        std::fs::write(
            state_path("topology.json"),
            serde_json::to_vec_pretty(&self.topology)?,
        )?;
        Ok(())
    }

    fn record_pid(&self, pid: u32) -> anyhow::Result<()> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state_path("pids"))?;
        writeln!(f, "{pid}")?;
        Ok(())
    }

    fn start(&mut self, options: &LabOptions) -> anyhow::Result<()> {
        let topo = self.topology.clone();
        let cp_bin = options.bin_dir.join("meshlet-controlplane");
        let agent_bin = options.bin_dir.join("meshlet");
        for bin in [&cp_bin, &agent_bin] {
            if !bin.exists() {
                bail!(
                    "{} is missing: build first (`cargo build --workspace --bins`)",
                    bin.display()
                );
            }
        }
        // The control plane runs as in production: an intermediate from "the organisation's
        // PKI", never a self-signed signer.
        let pki = crate::pki::LabPki::create(&state_path("pki"), &options.trust_domain)?;
        let log = std::fs::File::create(&topo.controlplane_log)?;
        let mut cp_args: Vec<std::ffi::OsString> = Vec::new();
        if self.kube.is_some() {
            // In Kubernetes the CA comes as a cert-manager Secret mounted in the pod.
            let secret = pki.secret_args(&state_path("ca-secret"))?;
            cp_args.extend(secret.into_iter().map(Into::into));
        } else {
            cp_args.extend(pki.controlplane_args().into_iter().map(Into::into));
        }
        cp_args.push("--state-dir".into());
        cp_args.push(state_path("controlplane").into());
        cp_args.extend(options.controlplane_args.iter().map(Into::into));
        cp_args.push("--listen".into());
        cp_args.push(format!("unix:{}", topo.controlplane_socket).into());
        if self.kube.is_some() {
            cp_args.push("--kubeconfig".into());
            cp_args.push(state_path("kubeconfig").into());
            let health = free_port()?;
            cp_args.push("--health-addr".into());
            cp_args.push(health.to_string().into());
            self.controlplane_health = Some(health);
        } else {
            cp_args.push("--workloads".into());
            cp_args.push(topo.workloads_file.clone().into());
        }
        cp_args.push("--trust-domain".into());
        cp_args.push(options.trust_domain.clone().into());
        self.controlplane_args = cp_args;
        drop(log);
        let child = self.spawn_controlplane()?;
        self.children.push(child);
        let mut control_plane = format!("unix:{}", topo.controlplane_socket);
        for i in 2..=options.controlplane_replicas {
            let socket = state_path(&format!("controlplane-{i}.sock"))
                .display()
                .to_string();
            let child = self.spawn_replica(&socket)?;
            control_plane.push_str(&format!(",unix:{socket}"));
            self.replicas.push((socket, child));
        }

        for node in &topo.nodes {
            // Each node joins with a token made for it, as an operator would hand it out.
            let auth = self.agent_auth_args(&node.name)?;
            let mut args: Vec<std::ffi::OsString> = vec![
                "agent".into(),
                "--node".into(),
                node.name.clone().into(),
                "--control-plane".into(),
                control_plane.clone().into(),
                "--node-socket".into(),
                node.agent_socket.clone().into(),
                "--pod-cgroup".into(),
                node.cgroup.clone().into(),
                "--bpf-pin-dir".into(),
                node.bpf_pin_dir.clone().into(),
                "--cert-lifetime".into(),
                options.cert_lifetime.to_string().into(),
            ];
            args.extend(auth.into_iter().map(Into::into));
            args.extend(options.agent_args.iter().map(Into::into));
            std::fs::File::create(&node.agent_log)?;
            self.agent_args.push(args);
            let child = self.spawn_agent(self.agent_args.len() - 1)?;
            self.children.push(child);
        }
        for node in &topo.nodes {
            wait_for_path(Path::new(&node.agent_socket), Duration::from_secs(30)).with_context(
                || {
                    format!(
                        "agent of {} did not come up; its log ends:\n{}",
                        node.name,
                        log_tail(&node.agent_log, 30)
                    )
                },
            )?;
        }
        for pod in topo.pods.iter().filter(|p| p.enrolled && p.wired) {
            self.announce(pod)?;
        }
        self.wait_ready(Duration::from_secs(60))
    }

    /// A fresh single-use join token for `node`, made with `meshlet-controlplane token
    /// create`, in a file only root can read.
    pub fn create_join_token(&self, node: &str, ttl_seconds: u64) -> anyhow::Result<PathBuf> {
        let out = Command::new(self.bin_dir.join("meshlet-controlplane"))
            .args(["token", "create", "--node", node, "--ttl"])
            .arg(ttl_seconds.to_string())
            .arg("--state-dir")
            .arg(state_path("controlplane"))
            .output()
            .context("meshlet-controlplane token create")?;
        if !out.status.success() {
            bail!(
                "token create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let token = String::from_utf8(out.stdout)?.trim().to_string();
        self.write_secret(node, "join-token", &token)
    }

    /// Writes `secret` to `<state>/<node>/<file>`, readable by root only.
    pub fn write_secret(&self, node: &str, file: &str, secret: &str) -> anyhow::Result<PathBuf> {
        let dir = state_path(node);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(file);
        crate::pki::write_atomically(&path, secret.as_bytes())?;
        Ok(path)
    }

    /// The agent flags that authenticate `node` to the control plane: roots, trust domain,
    /// identity folder and a new join token.
    pub fn agent_auth_args(&self, node: &str) -> anyhow::Result<Vec<String>> {
        let path = |p: PathBuf| p.display().to_string();
        let credential = match &self.kube {
            // As the kubelet mounts it: the agent pod's projected token, audience meshlet.
            Some(kube) => {
                let token = kube.mint_token(
                    "meshlet-system",
                    "meshlet-agent",
                    &agent_pod(node),
                    "meshlet",
                    3600,
                )?;
                let file = self.write_secret(node, "service-account-token", &token)?;
                ["--service-account-token-file".to_string(), path(file)]
            }
            None => [
                "--join-token-file".to_string(),
                path(self.create_join_token(node, 600)?),
            ],
        };
        let mut args = vec![
            "--control-plane-roots".into(),
            path(self.pki().roots_path()),
            "--trust-domain".into(),
            self.topology.trust_domain.clone(),
            "--node-identity-dir".into(),
            path(state_path(&format!("{node}/identity"))),
        ];
        args.extend(credential);
        Ok(args)
    }

    /// Tells the pod's node agent about it as a container runtime does: runs `meshlet-cni`
    /// ADD with the CNI environment and a network configuration whose `prevResult` is the
    /// pod's interface and addresses (what the cluster's own plugin made), and retries while
    /// the plugin says to try again later (the agent has no state yet), as kubelet retries
    /// a sandbox.
    pub fn announce(&self, pod: &PodInfo) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.cni(pod, "ADD")?;
            if out.status.success() {
                return Ok(());
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            let retry =
                serde_json::from_str::<serde_json::Value>(&stdout).is_ok_and(|e| e["code"] == 11);
            if !retry || Instant::now() > deadline {
                bail!(
                    "meshlet-cni ADD of {} failed: {stdout}{}",
                    pod.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `meshlet-cni` with `command` for `pod`, as a runtime would.
    pub fn cni(&self, pod: &PodInfo, command: &str) -> anyhow::Result<std::process::Output> {
        use std::io::Write;
        let node = self.topology.node(&pod.node).context("pod's node")?;
        let socket = node.cni_socket();
        let mut ips =
            vec![serde_json::json!({"address": format!("{}/32", pod.ip), "interface": 0})];
        if let Some(ip6) = pod.ip6 {
            ips.push(serde_json::json!({"address": format!("{ip6}/128"), "interface": 0}));
        }
        let config = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "meshlet-lab",
            "type": "meshlet-cni",
            "socket": socket,
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": pod.netns_path}],
                "ips": ips,
            },
        });
        let mut child = Command::new(self.bin_dir.join("meshlet-cni"))
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("lab-{}", pod.name))
            .env("CNI_NETNS", &pod.netns_path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.bin_dir)
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
                    pod.namespace, pod.name, pod.uid
                ),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("running meshlet-cni")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&serde_json::to_vec(&config)?)?;
        }
        child.wait_with_output().context("meshlet-cni")
    }

    /// The pods `node`'s agent has enrolled, as its node API lists them.
    pub fn pods(&self, node: &str) -> anyhow::Result<Vec<meshlet_proto::v1::PodStatus>> {
        let socket = self
            .topology
            .node(node)
            .context("no such node")?
            .agent_socket
            .clone();
        self.runtime.block_on(async move {
            let mut client = NodeServiceClient::new(meshlet_proto::channel::connect_lazy(
                &format!("unix:{socket}"),
            )?);
            Ok(client
                .list_pods(ListPodsRequest {})
                .await?
                .into_inner()
                .pods)
        })
    }

    /// The lab's state folder for `file` (cleaned up with the lab).
    pub fn state_path(&self, file: &str) -> PathBuf {
        state_path(file)
    }

    /// Sends an AddPod to an agent; the error is the agent's own words.
    pub fn add_pod(&self, agent_socket: &str, request: AddPodRequest) -> anyhow::Result<u64> {
        let socket = agent_socket.to_string();
        self.runtime.block_on(async move {
            let mut client = NodeServiceClient::new(meshlet_proto::channel::connect_lazy(
                &format!("unix:{socket}"),
            )?);
            let response = client
                .add_pod(request)
                .await
                .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
            Ok(response.into_inner().netns_cookie)
        })
    }

    /// Waits until every enrolled, registered pod has its certificate.
    pub fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        for node in &self.topology.nodes {
            let wanted: Vec<&PodInfo> = self
                .topology
                .pods
                .iter()
                .filter(|p| p.node == node.name && p.enrolled && p.registered && p.wired)
                .collect();
            loop {
                let socket = node.agent_socket.clone();
                let pods = self.runtime.block_on(async move {
                    let mut client = NodeServiceClient::new(meshlet_proto::channel::connect_lazy(
                        &format!("unix:{socket}"),
                    )?);
                    let pods = client
                        .list_pods(ListPodsRequest {})
                        .await?
                        .into_inner()
                        .pods;
                    anyhow::Ok(pods)
                });
                let ready = pods.as_ref().is_ok_and(|pods| {
                    wanted
                        .iter()
                        .all(|w| pods.iter().any(|p| p.uid == w.uid && p.certificate_ready))
                });
                if ready {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "pods of {} not ready after {timeout:?} (agent says {pods:?}); its log ends:\n{}",
                        node.name,
                        log_tail(&node.agent_log, 30)
                    );
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }

    /// A command that runs inside pod `name`'s netns and cgroup.
    pub fn command_in(
        &self,
        name: &str,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<Command> {
        command_in(&self.topology, name, program)
    }

    /// Replaces the control plane's workload registry (it notices and pushes a new version).
    pub fn write_workloads(&self, value: &serde_json::Value) -> anyhow::Result<()> {
        let tmp = format!("{}.tmp", self.topology.workloads_file);
        std::fs::write(&tmp, serde_json::to_vec_pretty(value)?)?;
        std::fs::rename(&tmp, &self.topology.workloads_file)?;
        Ok(())
    }

    /// Starts the agent of node `index` with the lab's arguments, its output appended to its
    /// log.
    fn spawn_agent(&mut self, index: usize) -> anyhow::Result<Child> {
        self.spawn_agent_in(index, None, &[])
    }

    /// [`Self::spawn_agent`], in `cgroup` when given (else the caller's), with `extra`
    /// arguments.
    fn spawn_agent_in(
        &mut self,
        index: usize,
        cgroup: Option<&Path>,
        extra: &[&str],
    ) -> anyhow::Result<Child> {
        let node = self
            .topology
            .nodes
            .get(index)
            .context("no such node")?
            .clone();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.agent_log)?;
        let binary = self.bin_dir.join("meshlet");
        let mut agent = match (&self.agent_command, self.agent_wrapper.split_first()) {
            (Some(command), _) => {
                let (program, args) = command.split_first().context("empty agent command")?;
                let netns = netns::path(&node.netns).display().to_string();
                let mut cmd = Command::new(program);
                cmd.args(args.iter().map(|a| a.replace("{node_netns}", &netns)));
                cmd
            }
            (None, Some((program, args))) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(&binary);
                cmd
            }
            (None, None) => Command::new(&binary),
        };
        agent
            .args(&self.agent_args[index])
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("MESHLET_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log.try_clone()?)
            .stderr(log);
        enter_on_exec(&mut agent, &node.netns, cgroup)?;
        let child = agent
            .spawn()
            .with_context(|| format!("starting the agent of {}", node.name))?;
        self.record_pid(child.id())?;
        Ok(child)
    }

    /// `node`'s place in the topology (its agent is `children[index + 1]`).
    fn node_index(&self, node: &str) -> anyhow::Result<usize> {
        self.topology
            .nodes
            .iter()
            .position(|n| n.name == node)
            .with_context(|| format!("no node {node} in the lab"))
    }

    /// Starts again the agent of `node` (after [`Self::kill_agent`]) with the same arguments,
    /// and waits for its node socket. It announces nothing: adopting the pods is its job.
    pub fn restart_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let index = self.node_index(node)?;
        let socket = self.topology.nodes[index].agent_socket.clone();
        let _ = std::fs::remove_file(&socket);
        let child = self.spawn_agent(index)?;
        self.children[index + 1] = child;
        wait_for_path(Path::new(&socket), Duration::from_secs(30)).with_context(|| {
            format!(
                "agent of {node} did not come back; its log ends:\n{}",
                log_tail(&self.topology.nodes[index].agent_log, 30)
            )
        })
    }

    /// A rolling upgrade of `node`'s agent: starts a second agent beside the running one, in a
    /// cgroup of its own (as a new DaemonSet pod is), and returns once it has taken the node
    /// over. The old agent drains and exits by itself: see [`Self::wait_drained`].
    pub fn upgrade_agent(&mut self, node: &str) -> anyhow::Result<()> {
        self.upgrade_agent_with(node, &[])
    }

    /// [`Self::upgrade_agent`], the new agent with `extra` arguments.
    pub fn upgrade_agent_with(&mut self, node: &str, extra: &[&str]) -> anyhow::Result<()> {
        const TOOK_OVER: &str = "took the node over from the previous agent";
        let index = self.node_index(node)?;
        let log = self.topology.nodes[index].agent_log.clone();
        let before = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches(TOOK_OVER)
            .count();
        self.agent_generation += 1;
        let cgroup = Path::new(crate::CGROUP_ROOT)
            .join("agents")
            .join(format!("{node}-{}", self.agent_generation));
        cgroup::create(&cgroup)?;
        let mut child = self.spawn_agent_in(index, Some(&cgroup), extra)?;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.matches(TOOK_OVER).count() > before {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "the new agent of {node} exited ({status}) before taking over; its log ends:\n{}",
                    log_tail(&log, 30)
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the new agent of {node} did not take over within 90 s; its log ends:\n{}",
                    log_tail(&log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let old = std::mem::replace(&mut self.children[index + 1], child);
        self.draining.push((node.to_string(), old));
        Ok(())
    }

    /// Waits (at most `timeout`) for the agents that handed their nodes over to exit, and
    /// returns (node, exit status) for each.
    pub fn wait_drained(
        &mut self,
        timeout: Duration,
    ) -> anyhow::Result<Vec<(String, std::process::ExitStatus)>> {
        let deadline = Instant::now() + timeout;
        let mut done = Vec::new();
        while !self.draining.is_empty() {
            let mut i = 0;
            while i < self.draining.len() {
                if let Some(status) = self.draining[i].1.try_wait()? {
                    let (node, _) = self.draining.remove(i);
                    done.push((node, status));
                } else {
                    i += 1;
                }
            }
            if Instant::now() > deadline {
                let left: Vec<&str> = self.draining.iter().map(|(n, _)| n.as_str()).collect();
                bail!("the old agents of {left:?} still run after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(done)
    }

    /// Kills the agent of `node` with SIGKILL (a crash), and waits for it to be gone.
    pub fn kill_agent(&mut self, node: &str) -> anyhow::Result<()> {
        let index = self.node_index(node)?;
        // children[0] is the control plane, then one agent per node in node order.
        let child = self.children.get_mut(index + 1).context("agent process")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Starts the control plane with the lab's arguments, its output appended to its log,
    /// and waits for its socket.
    fn spawn_controlplane(&mut self) -> anyhow::Result<Child> {
        let path = &self.topology.controlplane_log;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let _ = std::fs::remove_file(&self.topology.controlplane_socket);
        let child = Command::new(self.bin_dir.join("meshlet-controlplane"))
            .args(&self.controlplane_args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the control plane")?;
        self.record_pid(child.id())?;
        wait_for_path(
            Path::new(&self.topology.controlplane_socket),
            Duration::from_secs(20),
        )
        .context("control plane socket")?;
        Ok(child)
    }

    /// Another control-plane replica with the lab's arguments, listening on `socket`.
    fn spawn_replica(&mut self, socket: &str) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.topology.controlplane_log)?;
        let mut args = self.controlplane_args.clone();
        if let Some(i) = args.iter().position(|a| a == "--listen") {
            args[i + 1] = format!("unix:{socket}").into();
        }
        if let Some(i) = args.iter().position(|a| a == "--health-addr") {
            args[i + 1] = free_port()?.to_string().into();
        }
        let child = Command::new(self.bin_dir.join("meshlet-controlplane"))
            .args(&args)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a control-plane replica")?;
        self.record_pid(child.id())?;
        wait_for_path(Path::new(socket), Duration::from_secs(20))
            .context("control-plane replica socket")?;
        Ok(child)
    }

    /// Kills control-plane replica `n` (1 is the first, `kill_controlplane`'s).
    pub fn kill_replica(&mut self, n: usize) -> anyhow::Result<()> {
        if n <= 1 {
            return self.kill_controlplane();
        }
        let (_, child) = self.replicas.get_mut(n - 2).context("no such replica")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Restarts the control plane (a new process: its versions start again from 1).
    pub fn restart_controlplane(&mut self) -> anyhow::Result<()> {
        self.kill_controlplane()?;
        let child = self.spawn_controlplane()?;
        self.children[0] = child;
        Ok(())
    }

    /// Stops the control plane (the agents keep running on what they have).
    pub fn kill_controlplane(&mut self) -> anyhow::Result<()> {
        let child = self.children.first_mut().context("control plane process")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// `GET path` from the first control plane's health endpoint: (status, body).
    pub fn controlplane_health(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let addr = self
            .controlplane_health
            .context("the control plane has a health endpoint in Kubernetes mode only")?;
        Ok(net::http_get(addr, path)?)
    }

    /// The process id of the (first) control plane.
    pub fn controlplane_pid(&self) -> Option<u32> {
        self.children.first().map(Child::id)
    }

    /// The process id of `node`'s agent.
    pub fn agent_pid(&self, node: &str) -> Option<u32> {
        let index = self.node_index(node).ok()?;
        self.children.get(index + 1).map(Child::id)
    }

    /// Everything an agent logged so far. The agent writes its lines in batches, at most
    /// 100 ms after they happened (warnings and errors at once), so this first waits a little
    /// longer than that: a test that just caused a line finds it.
    pub fn agent_log(&self, node: &str) -> String {
        std::thread::sleep(AGENT_LOG_DELAY);
        self.topology
            .node(node)
            .and_then(|n| std::fs::read_to_string(&n.agent_log).ok())
            .unwrap_or_default()
    }

    /// The lab's PKI files (to craft certificates and CRLs in tests).
    pub fn pki(&self) -> crate::pki::LabPki {
        crate::pki::LabPki {
            dir: state_path("pki"),
        }
    }

    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// Stops the processes and removes everything.
    pub fn down(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        self.children
            .extend(self.replicas.drain(..).map(|(_, child)| child));
        self.children
            .extend(self.draining.drain(..).map(|(_, child)| child));
        for child in &mut self.children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for child in &mut self.children {
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        cleanup();
    }

    /// Leaves the lab running when this value is dropped (for `lab up`).
    pub fn detach(mut self) -> Topology {
        self.torn_down = true;
        self.children.clear();
        self.topology.clone()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Reads the topology of a running lab.
pub fn running_topology() -> anyhow::Result<Topology> {
    let text = std::fs::read_to_string(state_path("topology.json"))
        .context("no lab is up (run `cargo xtask lab up`)")?;
    Ok(serde_json::from_str(&text)?)
}

/// A command that runs inside pod `name`'s netns and cgroup, or node `name`'s netns.
pub fn command_in(
    topology: &Topology,
    name: &str,
    program: impl AsRef<std::ffi::OsStr>,
) -> anyhow::Result<Command> {
    let (netns, cgroup) = if let Some(pod) = topology.pod(name) {
        (pod.netns.clone(), Some(PathBuf::from(&pod.cgroup)))
    } else if let Some(node) = topology.node(name) {
        (node.netns.clone(), None)
    } else {
        bail!("no pod or node named {name} in the lab");
    };
    let mut cmd = Command::new(program);
    enter_on_exec(&mut cmd, &netns, cgroup.as_deref())?;
    Ok(cmd)
}

/// Makes `cmd` enter `netns` (and join `cgroup`) between fork and exec.
pub fn enter_on_exec(
    cmd: &mut Command,
    netns_name: &str,
    cgroup: Option<&Path>,
) -> anyhow::Result<()> {
    let ns = std::fs::File::open(netns::path(netns_name))
        .with_context(|| format!("opening netns {netns_name}"))?;
    let procs = match cgroup {
        Some(dir) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .with_context(|| format!("opening {}/cgroup.procs", dir.display()))?,
        ),
        None => None,
    };
    let ns_fd = ns.as_raw_fd();
    let procs_fd = procs.as_ref().map(|f| f.as_raw_fd());
    // SAFETY: between fork and exec the closure only makes two raw syscalls (write, setns) on
    // fds opened before the fork; both are async-signal-safe. The files stay open in the parent
    // until the Command is dropped because the closure owns them.
    unsafe {
        cmd.pre_exec(move || {
            let _keep = (&ns, &procs);
            if let Some(fd) = procs_fd {
                // Writing "0" moves the writing process into the cgroup.
                if libc::write(fd, b"0".as_ptr().cast(), 1) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// The last `n` lines of a log file (for error messages: the lab removes its logs on teardown).
pub fn log_tail(path: &str, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn wait_for_path(path: &Path, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() > deadline {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A loopback address with a port free now (for a process started next).
fn free_port() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The control plane's RBAC as `deploy/` ships it (the chart, rendered).
const CONTROLPLANE_RBAC: &str = include_str!("../../deploy/manifests/meshlet.yaml");

/// The name of `node`'s agent pod in the lab's Kubernetes mode.
pub fn agent_pod(node: &str) -> String {
    format!("meshlet-agent-{node}")
}

/// What a cluster's kubelets and API server would hold for the lab: a Namespace per pod
/// namespace (in the mesh), a Node per node, a running Pod per pod (pods outside the mesh
/// carry the opt-out label).
fn write_cluster(api: &crate::kube_api::KubeApi, topo: &Topology) -> anyhow::Result<()> {
    use crate::kube_api::{NAMESPACES, NODES, PODS};
    use serde_json::json;
    let mut namespaces: Vec<&str> = topo.pods.iter().map(|p| p.namespace.as_str()).collect();
    namespaces.sort_unstable();
    namespaces.dedup();
    for ns in namespaces {
        api.create(
            NAMESPACES,
            json!({"metadata": {"name": ns, "labels": {"meshlet.dev/mesh": "enabled"}}}),
        )?;
    }
    // The agents run as DaemonSet pods of the meshlet-agent service account, outside the mesh.
    api.create(NAMESPACES, json!({"metadata": {"name": "meshlet-system"}}))?;
    for node in &topo.nodes {
        api.create(
            PODS,
            json!({
                "metadata": {"name": agent_pod(&node.name), "namespace": "meshlet-system",
                             "labels": {"app": "meshlet-agent"}},
                "spec": {"nodeName": node.name, "serviceAccountName": "meshlet-agent", "hostNetwork": true,
                         "containers": [{"name": "agent", "image": "meshlet"}]},
                "status": {"phase": "Running", "podIP": node.link_ip.to_string(),
                           "podIPs": [{"ip": node.link_ip.to_string()}]},
            }),
        )?;
        api.create(
            NODES,
            json!({"metadata": {"name": node.name}, "spec": {"podCIDR": node.pod_cidr},
                   "status": {"addresses": [{"type": "InternalIP", "address": node.link_ip.to_string()}]}}),
        )?;
    }
    for pod in &topo.pods {
        let mut labels = json!({"app": pod.name});
        if !pod.registered {
            labels["meshlet.dev/mesh"] = json!("disabled");
        }
        let ips: Vec<_> = pod
            .ips()
            .iter()
            .map(|ip| json!({"ip": ip.to_string()}))
            .collect();
        api.create(
            PODS,
            json!({
                "metadata": {"name": pod.name, "namespace": pod.namespace, "uid": pod.uid, "labels": labels},
                "spec": {"nodeName": pod.node, "serviceAccountName": pod.service_account,
                         "containers": [{"name": "app", "image": "meshlet-lab-probe"}]},
                "status": {"phase": "Running", "podIP": pod.ip.to_string(), "podIPs": ips},
            }),
        )?;
    }
    Ok(())
}

/// IPv6 in a lab netns: addresses usable at once (no duplicate address detection: the lab
/// makes every address itself), and forwarding on nodes.
fn prepare_ipv6(netns: &str, node: bool) -> anyhow::Result<()> {
    for scope in ["all", "default"] {
        netns::sysctl(netns, &format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        if node {
            netns::sysctl(netns, &format!("net.ipv6.conf.{scope}.forwarding"), "1")?;
        }
    }
    Ok(())
}

/// A pod's IPv6 gateway: `::1` of its node's range.
fn gateway6(ip6: Ipv6Addr) -> Ipv6Addr {
    let s = ip6.segments();
    Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 1)
}

/// Links, addresses and routes for the whole topology.
async fn wire(topo: &Topology) -> anyhow::Result<()> {
    for node in &topo.nodes {
        let h = net::handle_in(&node.netns).await?;
        net::up(&h, "lo").await?;
    }
    if topo.nodes.len() == 2 {
        let (a, b) = (&topo.nodes[0], &topo.nodes[1]);
        let ha = net::handle_in(&a.netns).await?;
        let hb = net::handle_in(&b.netns).await?;
        let (a_if, b_if) = (&topo.node_link[0], &topo.node_link[1]);
        net::veth(&ha, a_if, b_if, &b.netns, b_if).await?;
        net::address(&ha, a_if, a.link_ip, 24).await?;
        net::address(&hb, b_if, b.link_ip, 24).await?;
        net::up(&ha, a_if).await?;
        net::up(&hb, b_if).await?;
        let cidr = |n: &NodeInfo| -> anyhow::Result<Ipv4Addr> {
            let base = n.pod_cidr.split('/').next().context("cidr")?;
            Ok(base.parse()?)
        };
        net::route_via(&ha, cidr(b)?, 24, b.link_ip).await?;
        net::route_via(&hb, cidr(a)?, 24, a.link_ip).await?;
        if let (Some(a6), Some(b6)) = (a.link_ip6, b.link_ip6) {
            net::address(&ha, a_if, a6, 64).await?;
            net::address(&hb, b_if, b6, 64).await?;
            let cidr6 = |n: &NodeInfo| -> anyhow::Result<Ipv6Addr> {
                let cidr = n.pod_cidr6.as_deref().context("pod_cidr6")?;
                Ok(cidr.split('/').next().context("cidr")?.parse()?)
            };
            net::route_via(&ha, cidr6(b)?, 64, b6).await?;
            net::route_via(&hb, cidr6(a)?, 64, a6).await?;
        }
    }
    for pod in topo.pods.iter().filter(|p| p.wired) {
        let node = topo.node(&pod.node).context("pod node")?;
        let hn = net::handle_in(&node.netns).await?;
        let gateway = Ipv4Addr::new(
            pod.ip.octets()[0],
            pod.ip.octets()[1],
            pod.ip.octets()[2],
            1,
        );
        let node_if = format!("{NAME_PREFIX}{}", pod.name);
        let tmp_if = format!("mp-{}", pod.name);
        net::veth(&hn, &node_if, &tmp_if, &pod.netns, "eth0").await?;
        net::address(&hn, &node_if, gateway, 32).await?;
        net::up(&hn, &node_if).await?;
        net::route_dev(&hn, pod.ip, 32, &node_if).await?;
        let hp = net::handle_in(&pod.netns).await?;
        net::up(&hp, "lo").await?;
        net::address(&hp, "eth0", pod.ip, 32).await?;
        net::up(&hp, "eth0").await?;
        net::route_dev(&hp, gateway, 32, "eth0").await?;
        net::route_via(&hp, Ipv4Addr::UNSPECIFIED, 0, gateway).await?;
        if let Some(ip6) = pod.ip6 {
            let gateway6 = gateway6(ip6);
            net::address(&hn, &node_if, gateway6, 128).await?;
            net::route_dev(&hn, ip6, 128, &node_if).await?;
            net::address(&hp, "eth0", ip6, 128).await?;
            net::route_dev(&hp, gateway6, 128, "eth0").await?;
            net::route_via(&hp, Ipv6Addr::UNSPECIFIED, 0, gateway6).await?;
        }
    }
    Ok(())
}
