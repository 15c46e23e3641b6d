//! Starting the agent: attach the eBPF programs, follow the control plane, serve the node API.
use std::{os::fd::AsFd, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use meshlet_proto::v1::node_service_server::NodeServiceServer;
use meshlet_proto::v1::ListenerKind;

use crate::{
    discovery,
    drain::Drain,
    handover::{self, Predecessor},
    identity::{GrpcCaClient, IdentityStore},
    limits::{self, TunnelLimits},
    node::NodeAgent,
    node_api::NodeApi,
    pods::PodRegistry,
    redirect::Redirect,
    state::OutboundTrafficPolicy,
    tls::{self, TrustBundle},
    tunnel::Pool,
};

/// The agent's settings.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentConfig {
    /// This node's name, as the control plane knows it.
    #[arg(long)]
    pub node: String,
    /// The control plane: `unix:/path` or `host:port`; several replicas separated by commas
    /// (the agent stays on the one that answers and moves to another when it goes away). In
    /// Kubernetes, the control plane's Service name.
    #[arg(long, default_value = "unix:/run/meshlet/controlplane.sock")]
    pub control_plane: String,
    /// The operator's root certificates (PEM): the control plane must chain to them.
    #[arg(long, default_value = "/etc/meshlet/roots.pem")]
    pub control_plane_roots: PathBuf,
    /// The mesh's trust domain (the control plane is spiffe://<it>/meshlet/controlplane).
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Where this node's key and node certificate are kept.
    #[arg(long, default_value = "/var/lib/meshlet/node")]
    pub node_identity_dir: PathBuf,
    /// A file with the join token for this node (needed once, for the first start).
    #[arg(long, conflicts_with = "service_account_token_file")]
    pub join_token_file: Option<PathBuf>,
    /// In Kubernetes: the agent pod's projected service account token (audience `meshlet`),
    /// with which the node joins instead of a join token; re-read at every join.
    #[arg(long)]
    pub service_account_token_file: Option<PathBuf>,
    /// Unix socket for the node-local pod API (the CNI side).
    #[arg(long, default_value = "/run/meshlet/agent.sock")]
    pub node_socket: PathBuf,
    /// Unix socket (SOCK_SEQPACKET) on which meshlet-cni hands over new pods' network
    /// namespaces. Default: `cni.sock` beside the node socket.
    #[arg(long)]
    pub cni_socket: Option<PathBuf>,
    /// Where the enrolled pods are recorded, so that a restarted agent adopts them again.
    /// Default: `pods.json` beside the node socket (a tmpfs in a cluster: it should outlive
    /// the agent, not the node).
    #[arg(long)]
    pub enrolled_file: Option<PathBuf>,
    /// This node's pod cgroup subtree; the redirect programs attach here.
    #[arg(long)]
    pub pod_cgroup: PathBuf,
    /// bpffs folder for this node's pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/meshlet")]
    pub bpf_pin_dir: PathBuf,
    /// Requested certificate lifetime in seconds (the CA may shorten it).
    #[arg(long, default_value_t = 24 * 3600)]
    pub cert_lifetime: u64,
    /// Tunnel connections per destination that busy streams spread over before sharing one
    /// (more spreads the TLS work of parallel streams over cores, at some memory per stream).
    #[arg(long, default_value_t = 1)]
    pub tunnel_connections_per_destination: usize,
    /// Threads that run connections (0: one per four cores, at least one). The agent shares
    /// the node's cores with the apps whose traffic it carries, and every hand-over between
    /// two of its threads is a wake-up in the kernel: on two cores, one thread made new
    /// connections 25 % faster and 50 clients' requests 40 % faster than two, at the same bulk
    /// throughput. With one, the agent runs on a single-threaded runtime.
    #[arg(long, default_value_t = 0)]
    pub worker_threads: usize,
    /// Streams per pooled tunnel connection.
    #[arg(long, default_value_t = 100)]
    pub max_streams_per_connection: usize,
    /// Seconds a pooled tunnel connection may carry no stream before it is closed.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub tunnel_idle_timeout: u64,
    /// Seconds a peer has for TCP → TLS → HTTP/2 preface on a pod's tunnel listener (and the
    /// client for the same towards a peer) before the connection is dropped.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub tunnel_handshake_timeout: u64,
    /// Seconds a server-side tunnel connection may carry no stream before it is closed (keep
    /// it above --tunnel-idle-timeout, so that clients close their idle connections first).
    #[arg(long, default_value_t = 120, value_parser = clap::value_parser!(u64).range(1..))]
    pub tunnel_server_idle_timeout: u64,
    /// Seconds between HTTP/2 PINGs on every tunnel connection.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub tunnel_keepalive_interval: u64,
    /// Seconds a PING (or unacknowledged data: TCP_USER_TIMEOUT) may go unanswered before the
    /// peer counts as dead and its connection is dropped.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub tunnel_keepalive_timeout: u64,
    /// CONNECT streams one peer may open at once on one tunnel connection (advertised as
    /// SETTINGS_MAX_CONCURRENT_STREAMS; the client side follows the peer's own).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub tunnel_max_streams: u32,
    /// Inbound connections (tunnel and plaintext) one source address may hold open at once;
    /// the newest past it are refused.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections_per_source: u64,
    /// Inbound connections the agent holds open in all; the newest past it are refused.
    /// Default: 3/8 of the open-files limit (the agent raises it to the hard limit at start).
    #[arg(long)]
    pub max_inbound_connections: Option<usize>,
    /// Redirected (outbound) connections the node's pods may have open at once: the size of
    /// the kernel's original-destination maps. Past it, new connects are refused and counted
    /// (`refused_no_space`); no pod's entries are ever evicted by another's.
    #[arg(long, default_value_t = 262_144, value_parser = clap::value_parser!(u32).range(16..))]
    pub max_redirected_connections: u32,
    /// This node's override of the mesh's outbound traffic policy (what pods may dial beyond
    /// the mesh's workloads and Services). Unset: the control plane's setting (ALLOW_ANY
    /// unless it says REGISTRY_ONLY). REGISTRY_ONLY here keeps this node fail-closed whatever
    /// the mesh says; external services the control plane lists still pass.
    #[arg(long, value_enum)]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    /// Addresses of this node that kubelet probes come from: connections from them reach a
    /// local pod's probe ports (from the control plane) without capture, so that probes work
    /// on STRICT pods. Only those ports: any other connection from these addresses is captured
    /// like any other. Repeatable.
    #[arg(long = "capture-exempt-source", value_name = "IP")]
    pub capture_exempt_sources: Vec<std::net::IpAddr>,
    /// Also accept TLS 1.2 on tunnels (ECDHE with AEAD suites only), for peers that cannot
    /// speak 1.3. Off by default: TLS 1.3 only.
    #[arg(long)]
    pub allow_tls12: bool,
    /// The admin API (JSON views for the `meshlet` CLI); keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: std::net::SocketAddr,
    /// Seconds this agent, once a successor has taken the node over, lets its connections
    /// run before it exits (a rolling upgrade: new connections go to the successor at once).
    #[arg(long, default_value_t = 30)]
    pub drain_timeout: u64,
    /// Seconds this agent, told to stop (SIGTERM), waits for a successor to take the node
    /// over before it stops; and a handover under way by then is finished. In a DaemonSet the
    /// rolling update stops the old pod once the new one looks ready, and its readiness probe
    /// reaches the port both agents share, so that may come before the new agent has taken
    /// over. 0: stop at once (traffic of the node's pods is refused until an agent runs).
    #[arg(long, default_value_t = 0)]
    pub handover_grace: u64,
    /// Tests only: adds this to every pinned map's layout version, as an agent whose map
    /// layout differs from the running one's would (the upgrade test's migration case).
    #[arg(long, default_value_t = 0, hide = true)]
    pub test_map_layout_bump: u32,
    /// `/metrics` and `/healthz/ready` only, e.g. on the node's address for Prometheus and
    /// the kubelet's readiness probe (`0.0.0.0:15020` in the DaemonSet). Off when unset.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl AgentConfig {
    /// The runtime's threads: `--worker-threads`, or one per four cores (at least one).
    pub fn runtime_threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism()
                .map(|n| n.get() / 4)
                .unwrap_or(1)
                .max(1),
            n => n,
        }
    }

    /// The tunnel's timeouts and limits from the flags.
    pub fn tunnel_limits(&self) -> TunnelLimits {
        TunnelLimits {
            handshake_timeout: Duration::from_secs(self.tunnel_handshake_timeout),
            idle_timeout: Duration::from_secs(self.tunnel_server_idle_timeout),
            keepalive_interval: Duration::from_secs(self.tunnel_keepalive_interval),
            keepalive_timeout: Duration::from_secs(self.tunnel_keepalive_timeout),
            max_streams: self.tunnel_max_streams,
            ..TunnelLimits::default()
        }
    }
}

pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let open_files = limits::raise_open_files_limit();
    let inbound_cap = config
        .max_inbound_connections
        .unwrap_or_else(|| limits::default_inbound_cap(open_files));
    let per_source = usize::try_from(config.max_connections_per_source).unwrap_or(usize::MAX);
    tracing::info!(
        open_files,
        max_inbound_connections = inbound_cap,
        max_connections_per_source = per_source,
        "open-files limit and inbound connection caps"
    );
    // An agent already running on this node hands it over (a rolling upgrade); else this one
    // starts on its own and adopts what a previous agent left.
    let handover_socket = beside(&config.node_socket, "handover.sock");
    let mut predecessor = {
        let (path, node) = (handover_socket.clone(), config.node.clone());
        tokio::task::spawn_blocking(move || Predecessor::find(&path, &node))
            .await
            .context("handover task")?
            .context("taking the node over from the running agent")?
    };
    if let Some(p) = &predecessor {
        tracing::info!(
            pods = p.pods.len(),
            host_sockets = p.host.len(),
            "an agent runs on this node: taking over from it once this one is ready"
        );
    }
    let tls_settings = Arc::new(tls::TlsSettings::new(config.allow_tls12));
    if config.allow_tls12 {
        tracing::warn!("--allow-tls12: tunnels also accept TLS 1.2 (ECDHE AEAD suites only)");
    }
    let bundle = Arc::new(TrustBundle::default());
    let link = crate::control_plane::ControlPlane::start(
        crate::control_plane::ControlPlaneSettings {
            address: config.control_plane.clone(),
            node: config.node.clone(),
            trust_domain: config.trust_domain.clone(),
            roots_file: config.control_plane_roots.clone(),
            identity_dir: config.node_identity_dir.clone(),
            token_file: config.join_token_file.clone(),
            service_account_token_file: config.service_account_token_file.clone(),
        },
        tls_settings.provider.clone(),
        bundle.clone(),
    )
    .context("setting up the control-plane link")?;
    let control_plane = link.channel.clone();
    let metrics = Arc::new(crate::metrics::Metrics::new(&config.node));
    let identities = Arc::new(IdentityStore::new(
        Arc::new(GrpcCaClient::new(
            control_plane.clone(),
            config.node.clone(),
        )),
        tls_settings.provider.clone(),
        Duration::from_secs(config.cert_lifetime),
        metrics.clone(),
    ));
    let state = Arc::new(crate::state::Store::default());
    tokio::spawn(discovery::follow(
        control_plane,
        config.node.clone(),
        state.clone(),
        bundle.clone(),
        metrics.clone(),
    ));
    // A successor changes nothing in the kernel before it could serve every pod it takes:
    // if it cannot get there, it exits and the running agent keeps the node.
    let prefetched = match &predecessor {
        Some(p) => {
            let uids: Vec<&str> = p.pods.iter().map(|p| p.uid.as_str()).collect();
            ready_for(&state, &identities, &uids, TAKEOVER_READY_TIMEOUT)
                .await
                .context("not taking the node over: the running agent keeps it")?
        }
        None => Vec::new(),
    };
    // Programs recording into maps of another layout: the predecessor must not accept
    // meanwhile (it would not find what they record); it pauses until this agent accepts.
    if crate::redirect::layout_changes(&config.bpf_pin_dir, config.test_map_layout_bump) {
        if let Some(p) = predecessor.take() {
            let (p, paused) = tokio::task::spawn_blocking(move || {
                let paused = p.pause();
                (p, paused)
            })
            .await
            .context("handover task")?;
            paused.context("asking the running agent to pause for the map-layout change")?;
            predecessor = Some(p);
        }
    }
    let redirect = Arc::new(
        Redirect::attach(
            &config.pod_cgroup,
            &config.bpf_pin_dir,
            config.max_redirected_connections,
            predecessor.as_ref().map(|p| p.cgroup_id),
            config.test_map_layout_bump,
        )
        .context("attaching the eBPF redirect")?,
    );
    for ip in &config.capture_exempt_sources {
        tracing::info!(%ip, "kubelet probes from this address reach their pods' probe ports without capture (nothing else from it does)");
    }
    let agent = Arc::new(NodeAgent {
        node: config.node.clone(),
        redirect,
        state: state.clone(),
        identities,
        bundle: bundle.clone(),
        tls: tls_settings,
        pool: Pool::with_spread(
            config.max_streams_per_connection,
            config.tunnel_connections_per_destination,
        ),
        outbound_override: config.outbound_traffic_policy,
        upstream_load: Default::default(),
        connections: Arc::new(crate::connections::LiveConnections::new(metrics.clone())),
        metrics: metrics.clone(),
        limits: config.tunnel_limits(),
        capture_exempt_sources: config.capture_exempt_sources.clone(),
        inbound_connections: limits::ConnectionLimiter::new(per_source, inbound_cap),
        drain: Drain::default(),
    });
    // Idle tunnel connections go (a burst's extra ones, those to pods that left).
    {
        let agent = agent.clone();
        let idle_timeout = Duration::from_secs(config.tunnel_idle_timeout);
        let every = (idle_timeout / 2).clamp(Duration::from_secs(1), Duration::from_secs(30));
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                agent.pool.sweep(idle_timeout);
            }
        });
    }
    // Every new trust bundle: renew what the new bundle or signer makes stale.
    {
        let identities = agent.identities.clone();
        let bundle = bundle.clone();
        let mut revisions = bundle.subscribe();
        tokio::spawn(async move {
            while revisions.changed().await.is_ok() {
                let current = bundle.current();
                identities.recheck(&current);
                link.recheck(&current);
            }
        });
    }
    let enrolled_file = config
        .enrolled_file
        .clone()
        .unwrap_or_else(|| beside(&config.node_socket, "pods.json"));
    let pods = PodRegistry::new(
        agent.clone(),
        Some(crate::enrolled::EnrolledFile::new(enrolled_file)),
    );
    match predecessor.as_mut() {
        // Its pods, on its sockets; accepting waits until this agent takes over.
        Some(p) => {
            pods.take_over(std::mem::take(&mut p.pods)).await;
            // The pods hold their identities now.
            for identity in &prefetched {
                agent.identities.release(identity);
            }
        }
        // Every pod a previous agent enrolled, adopted again before any new pod is taken.
        None => {
            pods.adopt().await;
            agent.redirect.forget_other_layouts();
        }
    }

    // The node's own sockets: the predecessor's where it handed them over, else new ones.
    let cni_socket = config
        .cni_socket
        .clone()
        .unwrap_or_else(|| beside(&config.node_socket, "cni.sock"));
    let mut take = |kind| predecessor.as_mut().and_then(|p| p.take_host(kind));
    let admin_listener = match take(ListenerKind::Admin).map(std::net::TcpListener::from) {
        Some(l) if l.local_addr().ok() == Some(config.admin_addr) => {
            l.set_nonblocking(true)?;
            l
        }
        _ => crate::admin::bind(config.admin_addr)?,
    };
    let metrics_listener = match (config.metrics_addr, take(ListenerKind::Metrics)) {
        (Some(addr), Some(fd)) => {
            let l = std::net::TcpListener::from(fd);
            if l.local_addr().ok() == Some(addr) {
                l.set_nonblocking(true)?;
                Some(l)
            } else {
                Some(crate::admin::bind(addr)?)
            }
        }
        (Some(addr), None) => Some(crate::admin::bind(addr)?),
        (None, _) => None,
    };
    let socket = &config.node_socket;
    let node_listener =
        match take(ListenerKind::NodeApi).map(std::os::unix::net::UnixListener::from) {
            Some(l)
                if l.local_addr()
                    .ok()
                    .and_then(|a| a.as_pathname().map(|p| p == socket.as_path()))
                    == Some(true) =>
            {
                l.set_nonblocking(true)?;
                tokio::net::UnixListener::from_std(l)?
            }
            _ => {
                if let Some(dir) = socket.parent() {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                }
                let _ = std::fs::remove_file(socket);
                bind_node_socket(socket)?
            }
        };
    let cni = match take(ListenerKind::Cni).and_then(|fd| crate::cni::adopt(fd, &cni_socket)) {
        Some(cni) => cni,
        None => crate::cni::bind(&cni_socket)?,
    };
    // Copies of them all, for a successor.
    let estate = handover::Estate {
        node: config.node.clone(),
        cgroup_id: agent.redirect.agent_cgroup(),
        host: [
            (
                ListenerKind::Admin,
                admin_listener.as_fd().try_clone_to_owned()?,
            ),
            (
                ListenerKind::NodeApi,
                node_listener.as_fd().try_clone_to_owned()?,
            ),
            (ListenerKind::Cni, cni.get_ref().try_clone()?),
        ]
        .into_iter()
        .chain(
            metrics_listener
                .as_ref()
                .map(|l| {
                    l.as_fd()
                        .try_clone_to_owned()
                        .map(|fd| (ListenerKind::Metrics, fd))
                })
                .transpose()?,
        )
        .collect(),
    };

    let admin = crate::admin::serve(admin_listener, agent.clone(), pods.clone())?;
    tokio::spawn(async move {
        if let Err(e) = admin.await {
            tracing::error!("admin API stopped: {e}");
        }
    });
    if let Some(listener) = metrics_listener {
        tokio::spawn(crate::admin::serve_metrics(
            listener,
            agent.clone(),
            pods.clone(),
        )?);
    }
    {
        let (pods, drain) = (pods.clone(), agent.drain.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = crate::cni::serve(cni, pods) => {}
                () = drain.signaled() => {}
            }
        });
    }
    tracing::info!(socket = %cni_socket.display(), "CNI socket open");
    // Only root on this node may enroll or remove pods: the socket is 0600 root, and each
    // caller's credentials are checked as well (a socket passed to another process, or a
    // folder with looser permissions, must not open the API).
    let callers = tokio_stream::StreamExt::filter(
        tokio_stream::wrappers::UnixListenerStream::new(node_listener),
        |conn| match conn {
            Ok(stream) => node_caller_allowed(stream),
            Err(_) => true,
        },
    );
    {
        let (pods, drain) = (pods.clone(), agent.drain.clone());
        tokio::spawn(async move {
            let serve = tonic::transport::Server::builder()
                .timeout(Duration::from_secs(30))
                .add_service(NodeServiceServer::new(NodeApi { pods }))
                .serve_with_incoming_shutdown(callers, async move { drain.signaled().await });
            if let Err(e) = serve.await {
                tracing::error!("node API server: {e}");
            }
        });
    }

    if let Some(predecessor) = predecessor {
        pods.start_accepting();
        let removed = tokio::task::spawn_blocking(move || {
            let removed = predecessor.taken();
            (predecessor, removed)
        })
        .await
        .context("handover task")?;
        let (predecessor, removed) = removed;
        for uid in removed.context("completing the handover")? {
            pods.remove(&uid);
        }
        tracing::info!("took the node over from the previous agent; it drains its connections");
        let redirect = agent.redirect.clone();
        std::thread::spawn(move || {
            predecessor.wait_gone();
            redirect.forget_predecessor();
            redirect.forget_other_layouts();
            tracing::info!("the previous agent has finished and gone");
        });
    }
    let handover_listener = crate::cni::bind(&handover_socket)?;
    let handed_over = tokio::spawn(handover::serve(
        handover_listener,
        pods.clone(),
        estate,
        agent.drain.clone(),
    ));
    tracing::info!(node = %config.node, socket = %socket.display(), "meshlet agent ready for pods");
    let mut handed_over = std::pin::pin!(handed_over);
    let mut stop_by: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            successor = &mut handed_over => {
                // Kept open until this process exits: the successor learns so that it has gone.
                let _successor = successor.context("handover task")?;
                drain_connections(&agent, Duration::from_secs(config.drain_timeout)).await;
                return Ok(());
            }
            () = shutdown_signal(), if stop_by.is_none() => {
                stop_by = Some(tokio::time::Instant::now() + Duration::from_secs(config.handover_grace));
                if config.handover_grace > 0 {
                    tracing::info!(grace_secs = config.handover_grace,
                        "told to stop: waiting for a successor to take the node over (--handover-grace)");
                }
            }
            () = tokio::time::sleep(Duration::from_millis(100)), if stop_by.is_some() => {}
        }
        if stop_by.is_some_and(|t| tokio::time::Instant::now() >= t) && !pods.is_handing_over() {
            tracing::info!("meshlet agent stopping");
            return Ok(());
        }
    }
}

/// How long a successor may take to follow the control plane and hold every pod's
/// certificate before it gives up taking over.
const TAKEOVER_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until this agent has the control plane's state and a certificate for every
/// identity of `uids` (it fetches them), at most `timeout`. Returns the identities it holds
/// (the caller releases them once the pods hold their own).
async fn ready_for(
    state: &crate::state::Store,
    identities: &Arc<IdentityStore>,
    uids: &[&str],
    timeout: Duration,
) -> anyhow::Result<Vec<crate::identity::SpiffeId>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut versions = state.subscribe();
    while state.version() == 0 {
        if tokio::time::timeout_at(deadline, versions.changed())
            .await
            .is_err()
        {
            anyhow::bail!("no state from the control plane within {timeout:?}");
        }
    }
    let mut wanted: Vec<_> = uids
        .iter()
        .filter_map(|uid| state.by_uid(uid))
        .map(|w| w.identity.clone())
        .collect();
    wanted.sort_by_key(|id| id.to_string());
    wanted.dedup();
    for identity in &wanted {
        identities.acquire(identity);
    }
    // Each identity in turn: wait until its certificate is valid, woken by its issuance.
    for identity in &wanted {
        if !certificate_by(identities, identity, deadline).await {
            let missing: Vec<String> = wanted
                .iter()
                .filter(|id| identities.current(id).is_err())
                .map(|id| id.to_string())
                .collect();
            for identity in &wanted {
                identities.release(identity);
            }
            anyhow::bail!(
                "no certificate within {timeout:?} for {}",
                missing.join(", ")
            );
        }
    }
    Ok(wanted)
}

/// Whether `identity` has a valid certificate by `deadline`, woken by each issuance. An
/// identity no pod holds any more (released meanwhile) has none: not ready.
async fn certificate_by(
    identities: &IdentityStore,
    identity: &crate::identity::SpiffeId,
    deadline: tokio::time::Instant,
) -> bool {
    let Some(mut updates) = identities.watch(identity) else {
        return false;
    };
    loop {
        // Seen before it is checked: an issuance after the check wakes the wait below.
        updates.borrow_and_update();
        if identities.current(identity).is_ok() {
            return true;
        }
        if !matches!(
            tokio::time::timeout_at(deadline, updates.changed()).await,
            Ok(Ok(()))
        ) {
            return false;
        }
    }
}

/// After a handover: waits for this agent's connections to end, at most `deadline`; what is
/// still open then closes with the process.
async fn drain_connections(agent: &NodeAgent, deadline: Duration) {
    let started = tokio::time::Instant::now();
    loop {
        let open = agent.connections.list().len();
        if open == 0 {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "drained: every connection has ended"
            );
            return;
        }
        if started.elapsed() >= deadline {
            tracing::warn!(
                open,
                "drain deadline (--drain-timeout) reached; closing what is still open"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `name` in the node socket's folder.
fn beside(node_socket: &std::path::Path, name: &str) -> PathBuf {
    node_socket
        .parent()
        .unwrap_or(std::path::Path::new("/"))
        .join(name)
}

/// Binds the node socket with mode 0600 from the start (the umask does not decide it: the
/// socket is made under a 0177 umask, then checked).
fn bind_node_socket(path: &std::path::Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let bound = tokio::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = bound.with_context(|| format!("binding the node socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on the node socket {}", path.display()))?;
    Ok(listener)
}

/// Whether a node-socket caller may use the API: root only.
fn node_caller_allowed(stream: &tokio::net::UnixStream) -> bool {
    crate::local_caller::require_root(stream)
        .inspect_err(|e| {
            tracing::warn!(target: "audit", event = "node_api_refused", error = %e,
                "refused a node-socket caller")
        })
        .is_ok()
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_node_socket_is_0600_and_takes_only_root_callers() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("meshlet-node-socket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("agent.sock");
        let listener = bind_node_socket(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let client = tokio::net::UnixStream::connect(&path)
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        // The tests run as root (the lab needs it); a caller's uid is what decides.
        let root = nix::unistd::Uid::effective().is_root();
        assert_eq!(node_caller_allowed(&server), root);
        drop(client);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
