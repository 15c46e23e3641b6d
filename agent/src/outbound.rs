//! Outbound: connections an enrolled pod made, redirected by the kernel to the agent's
//! listener in the pod's netns. Find where each was going ([`crate::state::route`]: a Service
//! endpoint, a workload, egress), reach it (the tunnel, or plaintext where the route says
//! so), trying the next endpoint when one refuses, and carry the bytes.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Instant,
};

use meshlet_common::{AGENT_MARK, TUNNEL_PORT};
use tokio::net::TcpStream;

use crate::{
    connections::{Direction, NewConnection},
    node::NodeAgent,
    pods::PodHandle,
    state::{policy::Transport, RouteInputs, RouteOutcome, Upstream, WorkloadInfo},
    tls,
    tunnel::{self, copy, pool::Checkout, Credentials, PoolKey, TunnelConnector},
};

/// Why an upstream could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(transparent)]
    Tunnel(#[from] tunnel::TunnelError),
    #[error("cannot connect directly: {0}")]
    Direct(#[from] std::io::Error),
    #[error("no identity to expect at this upstream: refused")]
    NoIdentity,
    /// This pod has no certificate to present (not issued yet, or expired with the CA away):
    /// nothing goes until it has one.
    #[error(transparent)]
    OwnIdentity(#[from] crate::identity::IdentityError),
}

impl OutboundError {
    /// Whether another endpoint may do better: not after a policy refusal (401, 403), which
    /// the next endpoint of the same Service would most likely repeat.
    fn retryable(&self) -> bool {
        match self {
            Self::Tunnel(tunnel::TunnelError::Refused { status, .. }) => {
                *status != http::StatusCode::UNAUTHORIZED && *status != http::StatusCode::FORBIDDEN
            }
            Self::OwnIdentity(_) | Self::NoIdentity => false,
            Self::Tunnel(_) | Self::Direct(_) => true,
        }
    }

    /// Refused by this agent before anything was sent (logged `outcome="refused"`), rather
    /// than failed on the way.
    fn refused_here(&self) -> bool {
        matches!(self, Self::OwnIdentity(_) | Self::NoIdentity)
    }
}

/// Open outbound connections per upstream address: the load that the route's power of two
/// choices compares.
#[derive(Debug, Default)]
pub struct UpstreamLoad(Mutex<HashMap<SocketAddr, usize>>);

impl UpstreamLoad {
    /// Connections open to `address` now.
    pub fn get(&self, address: SocketAddr) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&address)
            .copied()
            .unwrap_or(0)
    }

    /// Counts one connection to `address` for as long as the guard lives.
    fn open(&self, address: SocketAddr) -> LoadGuard<'_> {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(address)
            .or_default() += 1;
        LoadGuard {
            load: self,
            address,
        }
    }
}

struct LoadGuard<'a> {
    load: &'a UpstreamLoad,
    address: SocketAddr,
}

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.load.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.address);
            }
        }
    }
}

/// One redirected connection from an app in the pod.
pub(crate) async fn handle(
    agent: Arc<NodeAgent>,
    pod: Arc<PodHandle>,
    app: TcpStream,
    peer: SocketAddr,
) {
    let started = Instant::now();
    let Some(original) = agent.redirect.take_original_dst(pod.netns_cookie, peer) else {
        tracing::warn!(target: "access", direction = "outbound", pod = %pod.uid, %peer,
            outcome = "refused", reason = "no original destination recorded for this connection");
        return;
    };
    let Some(source) = agent.state.by_uid(&pod.uid) else {
        tracing::warn!(target: "access", direction = "outbound", pod = %pod.uid, dst = %original,
            outcome = "refused", reason = "the control plane has not described this pod yet");
        return;
    };
    let route = agent.state.current().route(
        original,
        &RouteInputs {
            outbound_override: agent.outbound_override,
            load: &|address| agent.upstream_load.get(address),
            explain: false,
        },
        &mut rand::thread_rng(),
    );
    let service = route.service.unwrap_or_default();
    let upstreams = match route.outcome {
        RouteOutcome::Upstreams(upstreams) => upstreams,
        RouteOutcome::Refuse { reason, detail } => {
            agent.metrics.outbound("refused", reason);
            tracing::warn!(target: "access", direction = "outbound", src = %source.identity,
                src_workload = %source.display_name(), dst = %original, %service,
                outcome = "refused", reason, %detail);
            // A reset, as a refused connect would give: the app fails at once, not on a read.
            let _ = app.set_zero_linger();
            return;
        }
    };
    let mut failures: Vec<String> = Vec::new();
    let mut refused_here = false;
    let last = upstreams.len().saturating_sub(1);
    for (attempt, upstream) in upstreams.iter().enumerate() {
        // Waiting for the peer's answer before the app's bytes go costs a round trip, and is
        // what makes a retry possible (the bytes are still in the app's socket); the last
        // candidate sends at once.
        let retry_possible = attempt < last;
        let connected = match (upstream.transport(), upstream.workload.as_ref()) {
            (Transport::Mtls, Some(destination)) => {
                tunnel_to(
                    &agent,
                    &pod,
                    &source,
                    destination,
                    upstream.address,
                    retry_possible,
                )
                .await
            }
            // A route makes mTLS upstreams of workloads only; were it ever otherwise, refuse
            // rather than guess.
            (Transport::Mtls, None) => Err(OutboundError::NoIdentity),
            (Transport::Plaintext, _) => direct_to(&pod, upstream.address)
                .await
                .map_err(OutboundError::from),
        };
        match connected {
            Ok(connected) => {
                let context = Context {
                    agent: &agent,
                    pod: &pod,
                    source: &source,
                    peer,
                    original,
                    service: &service,
                    upstream,
                    retried: &failures,
                    started,
                };
                carry(context, app, connected).await;
                return;
            }
            Err(e) => {
                refused_here = e.refused_here();
                let retry_possible = retry_possible && e.retryable();
                if retry_possible {
                    agent.metrics.endpoint_retries.inc();
                    tracing::info!(target: "access", direction = "outbound", src = %source.identity,
                        dst = %original, %service, endpoint = %upstream.address,
                        outcome = "retry", reason = %e, "endpoint failed; trying another");
                }
                failures.push(format!("{}: {e}", upstream.address));
                if !retry_possible {
                    break;
                }
            }
        }
    }
    let _ = app.set_zero_linger();
    let outcome = if refused_here {
        agent.metrics.outbound("refused", "no_own_certificate");
        "refused"
    } else {
        agent.metrics.outbound("failed", "unreachable");
        "failed"
    };
    tracing::warn!(target: "access", direction = "outbound", src = %source.identity,
        src_workload = %source.display_name(), dst = %original, %service, outcome,
        reason = %failures.join("; "));
}

/// A connection made to an upstream, ready to carry the app's bytes.
enum Connected {
    Tunnel {
        checkout: Checkout,
        send: h2::SendStream<bytes::Bytes>,
        /// The peer's answer: already received when a retry was possible, else in flight.
        answer: Answer,
        traceparent: String,
    },
    Plaintext(TcpStream),
}

enum Answer {
    Received(h2::RecvStream),
    Pending(
        std::pin::Pin<
            Box<
                dyn std::future::Future<Output = Result<h2::RecvStream, tunnel::TunnelError>>
                    + Send,
            >,
        >,
    ),
}

/// Opens a stream to `address` of mesh workload `destination` through a pooled tunnel from
/// the pod.
async fn tunnel_to(
    agent: &NodeAgent,
    pod: &PodHandle,
    source: &WorkloadInfo,
    destination: &WorkloadInfo,
    address: SocketAddr,
    wait_for_answer: bool,
) -> Result<Connected, OutboundError> {
    let source_identity = source.identity.clone();
    let own_certificate = agent.identities.current(&source_identity)?;
    // The pool lookup's values (our leaf, the signer, the key) are dropped once we have a
    // connection: an idle tunnelled connection should hold only what it moves bytes with.
    let endpoint = SocketAddr::new(address.ip(), TUNNEL_PORT);
    // A stream that fails to open has sent nothing: on a pooled connection the peer is
    // closing (GOAWAY: its agent hands the node over, or restarts), a second try takes
    // another connection, or makes one.
    let mut tries = 0;
    let (checkout, send, answer, traceparent) = loop {
        tries += 1;
        let checkout = {
            let client_leaf = own_certificate.leaf_fingerprint;
            let signer = agent.bundle.current().signer_fingerprint;
            // New streams only on a connection made with our current certificate and, once the CA
            // signs with a new signer, with a server certificate from it.
            let now = std::time::SystemTime::now();
            let current = |c: &Credentials| {
                c.client_leaf == client_leaf
                    && signer.is_none_or(|s| s == c.server_issuer)
                    && c.server_not_after.is_none_or(|t| t > now)
            };
            let key = PoolKey {
                source_pod: pod.uid.clone(),
                source_identity: source_identity.clone(),
                endpoint,
                expected: vec![destination.identity.clone()],
            };
            let connect = || async {
                let config = tls::client_config(
                    &agent.tls,
                    agent.bundle.clone(),
                    agent.identities.clone(),
                    source_identity.clone(),
                    vec![destination.identity.clone()],
                )?;
                let connector = TunnelConnector {
                    netns: &pod.netns,
                    tls: config,
                    bundle: agent.bundle.clone(),
                    provider: agent.tls.provider.clone(),
                    client_leaf,
                    limits: &agent.limits,
                };
                match tokio::time::timeout(
                    agent.limits.handshake_timeout,
                    connector.connect(endpoint),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_) => {
                        agent.metrics.tunnel_timeout("connect");
                        Err(tunnel::TunnelError::Timeout(endpoint))
                    }
                }
            };
            // Boxed: a tunnel set-up (TCP, TLS and HTTP/2 handshakes) is a large future, and in
            // place it would size every connection's task, idle ones included, for its whole life.
            Box::pin(agent.pool.checkout(&key, &current, connect))
                .await
                .inspect_err(|e| {
                    if let tunnel::TunnelError::Handshake { source, .. } = e {
                        agent
                            .metrics
                            .handshake_failures
                            .get_or_create(&crate::metrics::FailureLabels {
                                direction: "outbound",
                                reason: tls::handshake_failure_reason(source),
                            })
                            .inc();
                    }
                })?
        };
        let traceparent = tunnel::new_traceparent();
        match tunnel::start_stream(checkout.sender(), endpoint, address, &traceparent).await {
            Ok((send, answer)) => break (checkout, send, answer, traceparent),
            Err(e @ tunnel::TunnelError::Http2 { .. }) => {
                checkout.poison();
                if tries >= 2 {
                    return Err(e.into());
                }
                tracing::debug!(%endpoint, "pooled tunnel connection is closing ({e}); trying another");
            }
            Err(e) => return Err(e.into()),
        }
    };
    let response_timeout = agent.limits.connect_response_timeout;
    let authority = address;
    let metrics = agent.metrics.clone();
    let answer = async move {
        match tokio::time::timeout(response_timeout, answer).await {
            Ok(answer) => answer,
            Err(_) => {
                metrics.tunnel_timeout("connect_response");
                Err(tunnel::TunnelError::NoAnswer {
                    authority: authority.to_string(),
                    waited: response_timeout,
                })
            }
        }
    };
    let answer = if wait_for_answer {
        match answer.await {
            Ok(stream) => Answer::Received(stream),
            Err(e) => {
                if matches!(e, tunnel::TunnelError::Http2 { .. }) {
                    checkout.poison();
                }
                return Err(e.into());
            }
        }
    } else {
        Answer::Pending(Box::pin(answer))
    };
    Ok(Connected::Tunnel {
        checkout,
        send,
        answer,
        traceparent,
    })
}

/// A plaintext connection from the pod itself (its own address, the agent's mark so that it
/// is not redirected again).
async fn direct_to(pod: &PodHandle, address: SocketAddr) -> Result<Connected, std::io::Error> {
    let socket = pod
        .netns
        .tcp_socket(address)
        .await
        .map_err(std::io::Error::other)??;
    socket.set_mark(AGENT_MARK)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    Ok(Connected::Plaintext(socket.connect(address).await?))
}

/// What the access line of a connection names.
struct Context<'a> {
    agent: &'a NodeAgent,
    pod: &'a PodHandle,
    source: &'a WorkloadInfo,
    peer: SocketAddr,
    original: SocketAddr,
    service: &'a str,
    upstream: &'a Upstream,
    /// Endpoints tried before this one, and why they failed.
    retried: &'a [String],
    started: Instant,
}

/// Copies the app's bytes to the upstream and back until either side ends, then writes the
/// access line.
async fn carry(cx: Context<'_>, app: TcpStream, connected: Connected) {
    let agent = cx.agent;
    let upstream = cx.upstream;
    let _load = agent.upstream_load.open(upstream.address);
    agent
        .metrics
        .outbound(upstream.kind.outcome(), upstream.kind.reason());
    let destination_identity = upstream.workload.as_ref().map(|w| w.identity.clone());
    let (registration, _never_closed) = agent.connections.register(NewConnection {
        direction: Direction::Outbound,
        pod: cx.pod.uid.clone(),
        transport: upstream.transport(),
        source_identity: Some(cx.source.identity.clone()),
        destination_identity: destination_identity.clone(),
        // The app's socket was redirected to loopback; show it with the pod's own address.
        source: SocketAddr::new(
            cx.source.ips.first().copied().unwrap_or(cx.peer.ip()),
            cx.peer.port(),
        ),
        destination: cx.original,
    });
    let bytes = registration.bytes();
    let (result, traceparent) = match connected {
        Connected::Tunnel {
            checkout,
            send,
            answer,
            traceparent,
        } => {
            let checkout_ref = &checkout;
            let recv = async move {
                let answer = match answer {
                    Answer::Received(stream) => Ok(stream),
                    Answer::Pending(answer) => answer.await,
                };
                answer.map_err(|e| {
                    if matches!(e, tunnel::TunnelError::Http2 { .. }) {
                        checkout_ref.poison();
                    }
                    std::io::Error::other(e)
                })
            };
            let result =
                copy::copy_bidirectional(app, send, recv, &bytes.from_source, &bytes.to_source)
                    .await
                    .map(|_| ());
            drop(checkout);
            (result, traceparent)
        }
        Connected::Plaintext(mut socket) => {
            let mut app = app;
            let result = tokio::io::copy_bidirectional(&mut app, &mut socket)
                .await
                .map(|(sent, received)| {
                    bytes.from_source.fetch_add(sent, Ordering::Relaxed);
                    bytes.to_source.fetch_add(received, Ordering::Relaxed);
                });
            (result, String::new())
        }
    };
    let sent = bytes.from_source.load(Ordering::Relaxed);
    let received = bytes.to_source.load(Ordering::Relaxed);
    drop(registration);
    let (outcome, error) = match result {
        Ok(()) => (upstream.kind.outcome(), String::new()),
        Err(e) => ("error", e.to_string()),
    };
    let dst_identity = destination_identity
        .map(|i| i.to_string())
        .unwrap_or_default();
    let dst_workload = upstream
        .workload
        .as_ref()
        .map(|w| w.display_name())
        .unwrap_or_default();
    tracing::info!(target: "access", direction = "outbound", src = %cx.source.identity,
        src_workload = %cx.source.display_name(), dst = %cx.original, service = %cx.service,
        endpoint = %upstream.address, %dst_workload, %dst_identity,
        why = %upstream.why,
        retried = %cx.retried.join("; "),
        bytes_sent = sent, bytes_received = received, %traceparent,
        duration_ms = cx.started.elapsed().as_millis() as u64, outcome, error = %error,
        "connection closed");
}
