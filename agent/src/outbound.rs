//! Outbound: connections an enrolled pod made, redirected by the kernel to the agent's
//! listener in the pod's netns. Find where each was going, pick the tunnel, carry it.
use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::Instant,
};

use meshlet_common::{AGENT_MARK, TUNNEL_PORT};
use tokio::net::TcpStream;

use crate::{
    connections::{Direction, NewConnection},
    node::{NodeAgent, UnknownDestination},
    pods::PodHandle,
    policy::{Mode, Transport},
    tls,
    tunnel::{self, copy, Credentials, PoolKey, TunnelConnector},
};

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
    let Some(source) = agent.workloads.by_uid(&pod.uid) else {
        tracing::warn!(target: "access", direction = "outbound", pod = %pod.uid, dst = %original,
            outcome = "refused", reason = "the control plane has not described this pod yet");
        return;
    };
    let Some(destination) = agent.workloads.by_ip(original.ip()) else {
        match agent.unknown_destination {
            UnknownDestination::Refuse => {
                tracing::warn!(target: "access", direction = "outbound", src = %source.display_name(),
                    dst = %original, outcome = "refused",
                    reason = "destination is not a known workload (unknown_destination=refuse)");
            }
            UnknownDestination::Passthrough => {
                passthrough(&pod, app, original, "unknown_destination=passthrough").await
            }
        }
        return;
    };
    // Plaintext only because the destination's own mode says so.
    let mode = agent
        .workloads
        .policy()
        .mode_for(&destination, original.port());
    if mode.mode == Mode::Disable {
        let reason = format!("destination mode DISABLE ({})", mode.source);
        passthrough(&pod, app, original, &reason).await;
        return;
    }
    let source_identity = source.identity.clone();
    let own_certificate = match agent.identities.current(&source_identity) {
        Ok(cert) => cert,
        Err(e) => {
            tracing::warn!(target: "access", direction = "outbound", src = %source_identity,
                dst = %original, outcome = "refused", reason = %e);
            return;
        }
    };
    // The pool lookup's values (our leaf, the signer, the key) are dropped once we have a
    // connection: an idle tunnelled connection should hold only what it moves bytes with.
    let endpoint = SocketAddr::new(original.ip(), TUNNEL_PORT);
    let checkout = {
        let client_leaf = own_certificate
            .certified_key
            .cert
            .first()
            .map(|c| tunnel::pool::fingerprint(c))
            .unwrap_or_default();
        let signer = agent
            .bundle
            .current()
            .signer_chain
            .first()
            .map(|c| tunnel::pool::fingerprint(c));
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
            match tokio::time::timeout(agent.limits.handshake_timeout, connector.connect(endpoint))
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
        match Box::pin(agent.pool.checkout(&key, &current, connect)).await {
            Ok(c) => c,
            Err(e) => {
                if let tunnel::TunnelError::Handshake { source, .. } = &e {
                    agent
                        .metrics
                        .handshake_failures
                        .get_or_create(&crate::metrics::FailureLabels {
                            direction: "outbound",
                            reason: tls::handshake_failure_reason(source),
                        })
                        .inc();
                }
                tracing::warn!(target: "access", direction = "outbound", src = %source_identity,
                    dst = %original, dst_identity = %destination.identity, outcome = "failed", reason = %e);
                return;
            }
        }
    };
    let traceparent = tunnel::new_traceparent();
    let (send, answer) =
        match tunnel::start_stream(checkout.sender(), endpoint, original, &traceparent).await {
            Ok(s) => s,
            Err(e) => {
                if matches!(e, tunnel::TunnelError::Http2 { .. }) {
                    checkout.poison();
                }
                tracing::warn!(target: "access", direction = "outbound", src = %source_identity,
                dst = %original, dst_identity = %destination.identity, %traceparent,
                outcome = "failed", reason = %e);
                return;
            }
        };
    let (registration, _never_closed) = agent.connections.register(NewConnection {
        direction: Direction::Outbound,
        pod: pod.uid.clone(),
        transport: Transport::Mtls,
        source_identity: Some(source_identity.clone()),
        destination_identity: Some(destination.identity.clone()),
        // The app's socket was redirected to loopback; show it with the pod's own address.
        source: SocketAddr::new(
            source.ips.first().copied().unwrap_or(peer.ip()),
            peer.port(),
        ),
        destination: original,
    });
    let bytes = registration.bytes();
    let checkout_ref = &checkout;
    let response_timeout = agent.limits.connect_response_timeout;
    let metrics = &agent.metrics;
    let recv = async move {
        let answer = match tokio::time::timeout(response_timeout, answer).await {
            Ok(answer) => answer,
            Err(_) => {
                metrics.tunnel_timeout("connect_response");
                Err(tunnel::TunnelError::NoAnswer {
                    authority: original.to_string(),
                    waited: response_timeout,
                })
            }
        };
        answer.map_err(|e| {
            if matches!(e, tunnel::TunnelError::Http2 { .. }) {
                checkout_ref.poison();
            }
            std::io::Error::other(e)
        })
    };
    let result =
        copy::copy_bidirectional(app, send, recv, &bytes.from_source, &bytes.to_source).await;
    drop(checkout);
    let sent = bytes.from_source.load(Ordering::Relaxed);
    let received = bytes.to_source.load(Ordering::Relaxed);
    drop(registration);
    let (outcome, reason) = match result {
        Ok(_) => ("closed", String::new()),
        Err(e) => ("error", e.to_string()),
    };
    tracing::info!(target: "access", direction = "outbound", src = %source_identity,
        src_workload = %source.display_name(), dst = %original,
        dst_workload = %destination.display_name(), dst_identity = %destination.identity,
        bytes_sent = sent, bytes_received = received, %traceparent,
        duration_ms = started.elapsed().as_millis() as u64, outcome, reason = %reason,
        "connection closed");
}

/// Plaintext, from the pod itself: to a destination outside the mesh when the operator chose
/// passthrough, or to a destination whose mode is DISABLE.
async fn passthrough(pod: &PodHandle, mut app: TcpStream, original: SocketAddr, why: &str) {
    let socket = match pod.netns.tcp_socket(original).await {
        Ok(made) => made.and_then(|s| {
            s.set_mark(AGENT_MARK)?;
            Ok(s)
        }),
        Err(e) => Err(std::io::Error::other(e)),
    };
    let socket = match socket {
        Ok(socket) => socket,
        Err(e) => {
            tracing::warn!(target: "access", direction = "outbound", pod = %pod.uid,
                dst = %original, outcome = "failed", reason = %format!("cannot make the plaintext socket: {e}"));
            return;
        }
    };
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    match socket.connect(original).await {
        Ok(mut upstream) => {
            let moved = tokio::io::copy_bidirectional(&mut app, &mut upstream).await;
            tracing::info!(target: "access", direction = "outbound", pod = %pod.uid, dst = %original,
                outcome = "plaintext", reason = why, bytes = ?moved.ok(), "connection closed");
        }
        Err(e) => tracing::warn!(target: "access", direction = "outbound", pod = %pod.uid,
            dst = %original, outcome = "failed", reason = %e),
    }
}
