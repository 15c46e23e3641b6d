//! The tunnel listener (15008) in each local pod's netns: authenticate the peer agent (mTLS,
//! SPIFFE), accept its CONNECT streams for this pod, admit each (mode, policy), deliver it.
use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::net::TcpStream;

use super::{admit, Admission};
use crate::{
    deliver,
    identity::SpiffeId,
    node::NodeAgent,
    pods::PodHandle,
    state::policy::Transport,
    tls,
    tunnel::{copy, CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW},
};

/// One tunnel connection from a peer agent: mTLS, then its CONNECT streams.
///
/// What a peer can hold is bounded: a slot under the inbound caps (or the connection is shed
/// at once), the handshake timeout for TLS and the HTTP/2 preface, the stream and header
/// limits it is told in SETTINGS, the idle timeout while it has no stream, and the keepalive
/// that drops a peer which stops answering.
pub(crate) async fn handle_connection(
    agent: Arc<NodeAgent>,
    pod: Arc<PodHandle>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let Some(_permit) = super::slot(&agent, &pod, peer, "tunnel") else {
        return;
    };
    let Some(local) = agent.state.by_uid(&pod.uid) else {
        tracing::warn!(target: "access", direction = "inbound", pod = %pod.uid, %peer,
            outcome = "refused", reason = "the control plane has not described this pod yet");
        return;
    };
    let config = match pod.server_tls(&agent, &local.identity) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(pod = %pod.uid, "no TLS server config: {e}");
            return;
        }
    };
    let limits = &agent.limits;
    crate::tunnel::set_user_timeout(&socket2::SockRef::from(&tcp), limits.keepalive_timeout);
    let handshakes = async {
        let tls = match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
            Ok(tls) => tls,
            Err(e) => {
                agent
                    .metrics
                    .handshake_failures
                    .get_or_create(&crate::metrics::FailureLabels {
                        direction: "inbound",
                        reason: tls::handshake_failure_reason(&e),
                    })
                    .inc();
                tracing::warn!(target: "access", direction = "inbound", dst_workload = %local.display_name(),
                    %peer, outcome = "refused", reason = %format!("TLS handshake failed: {}", tls::describe_handshake_error(&e)));
                return None;
            }
        };
        let Some(peer_identity) = tls::peer_identity(tls.get_ref().1.peer_certificates()) else {
            tracing::warn!(target: "access", direction = "inbound", %peer, outcome = "refused",
                reason = "peer presented no SPIFFE identity");
            return None;
        };
        tracing::info!(dst_workload = %local.display_name(), %peer, src_identity = %peer_identity,
            "accepted mTLS tunnel connection");
        let client_chain: Vec<_> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let connection = match h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_concurrent_streams(limits.max_streams)
            .max_header_list_size(limits.max_header_list_size)
            .handshake::<_, Bytes>(tls)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%peer, src_identity = %peer_identity, "HTTP/2 handshake failed: {e}");
                return None;
            }
        };
        Some((connection, peer_identity, client_chain))
    };
    let (mut connection, peer_identity, client_chain) = match tokio::time::timeout(
        limits.handshake_timeout,
        handshakes,
    )
    .await
    {
        Ok(Some(done)) => done,
        Ok(None) => return,
        Err(_) => {
            agent.metrics.tunnel_timeout("handshake");
            tracing::warn!(target: "access", direction = "inbound", dst_workload = %local.display_name(),
                    %peer, outcome = "refused", reason = %format!(
                        "no TLS handshake and HTTP/2 preface within {:?} (--tunnel-handshake-timeout)",
                        limits.handshake_timeout));
            return;
        }
    };
    let untrusted = tls::verify::until_untrusted(
        agent.tls.provider.clone(),
        agent.bundle.clone(),
        client_chain,
        tls::Purpose::ClientAuth,
    );
    let keepalive = crate::tunnel::keepalive(
        connection.ping_pong(),
        limits.keepalive_interval,
        limits.keepalive_timeout,
    );
    // Streams in flight on this connection: while there are none, the idle timer runs.
    let streams = Arc::new(());
    let mut idle_since = Instant::now();
    let mut idle_check = tokio::time::interval(
        (limits.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)),
    );
    // Dropping the connection when the client's chain stops passing (a pushed CRL revokes
    // it, it expires) closes the TLS connection and every stream on it.
    tokio::pin!(untrusted);
    tokio::pin!(keepalive);
    let mut going_away = false;
    loop {
        let request = tokio::select! {
            request = connection.accept() => request,
            // Handed over: a GOAWAY, so that the peer opens its next streams on a new
            // connection (to the successor); the streams in flight finish here.
            () = agent.drain.signaled(), if !going_away => {
                going_away = true;
                connection.graceful_shutdown();
                continue;
            }
            rejection = &mut untrusted => {
                tracing::warn!(target: "audit", event = "tunnel_closed", direction = "inbound",
                    dst_workload = %local.display_name(), %peer, src_identity = %peer_identity,
                    reason = rejection.reason(),
                    "closed a live tunnel: the client's certificate is no longer trusted: {rejection}");
                return;
            }
            waited = &mut keepalive => {
                agent.metrics.tunnel_timeout("keepalive");
                tracing::warn!(target: "access", direction = "inbound", %peer, src_identity = %peer_identity,
                    outcome = "closed", reason = %format!("the peer answered no PING for {waited:?}; dropping the tunnel"));
                return;
            }
            _ = idle_check.tick() => {
                // Only this task and the stream tasks hold `streams`.
                if Arc::strong_count(&streams) > 1 {
                    idle_since = Instant::now();
                } else if idle_since.elapsed() >= limits.idle_timeout {
                    agent.metrics.tunnel_timeout("idle");
                    tracing::debug!(%peer, src_identity = %peer_identity,
                        "closing a tunnel connection idle for {:?}", limits.idle_timeout);
                    return;
                }
                continue;
            }
        };
        let Some(request) = request else { break };
        match request {
            Ok((request, respond)) => {
                let stream = streams.clone();
                let agent = agent.clone();
                let pod = pod.clone();
                let peer_identity = peer_identity.clone();
                tokio::spawn(async move {
                    handle_stream(agent, pod, peer, peer_identity, request, respond).await;
                    drop(stream);
                });
            }
            Err(e) => {
                tracing::debug!(%peer, "tunnel connection ended: {e}");
                break;
            }
        }
    }
}

/// Where a tunnel stream asks to go: a `CONNECT` to `IP:port` (HBONE), or the status to
/// refuse it with and why. Untrusted input from the peer; fuzzed (`fuzz/`).
pub fn connect_target<B>(
    request: &http::Request<B>,
) -> Result<SocketAddr, (http::StatusCode, &'static str)> {
    if request.method() != http::Method::CONNECT {
        return Err((
            http::StatusCode::METHOD_NOT_ALLOWED,
            "the tunnel takes CONNECT only",
        ));
    }
    request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or((
            http::StatusCode::BAD_REQUEST,
            "CONNECT authority is not IP:port",
        ))
}

fn reply(respond: &mut h2::server::SendResponse<Bytes>, status: http::StatusCode) {
    let response = http::Response::builder()
        .status(status)
        .body(())
        .unwrap_or_default();
    let _ = respond.send_response(response, true);
}

async fn handle_stream(
    agent: Arc<NodeAgent>,
    pod: Arc<PodHandle>,
    peer: SocketAddr,
    peer_identity: SpiffeId,
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let started = Instant::now();
    let traceparent = request
        .headers()
        .get(crate::tunnel::TRACEPARENT)
        .and_then(crate::tunnel::valid_traceparent)
        .unwrap_or_default()
        .to_string();
    let target = match connect_target(&request) {
        Ok(target) => target,
        Err((status, reason)) => {
            tracing::warn!(target: "access", direction = "inbound", src_identity = %peer_identity, %traceparent,
                outcome = "refused", reason);
            reply(&mut respond, status);
            return;
        }
    };
    let Some(local) = agent.state.by_uid(&pod.uid) else {
        reply(&mut respond, http::StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    // The tunnel may only reach this pod, and never the agent's own ports.
    if !local.ips.contains(&target.ip()) || super::is_agent_port(target.port()) {
        tracing::warn!(target: "access", direction = "inbound", src_identity = %peer_identity, %traceparent,
            dst = %target, dst_workload = %local.display_name(), outcome = "refused",
            reason = "CONNECT target is not an app port of this pod");
        reply(&mut respond, http::StatusCode::FORBIDDEN);
        return;
    }
    let Some(Admission {
        registration,
        mut close,
    }) = admit(
        &agent,
        &pod,
        &local,
        Transport::Mtls,
        Some(&peer_identity),
        peer,
        target,
    )
    else {
        // 401, as Istio's ztunnel answers an authorization denial: both kinds of node mean
        // the same thing by it.
        reply(&mut respond, http::StatusCode::UNAUTHORIZED);
        return;
    };
    let app = match deliver::connect_to_app(&agent.redirect, &pod.netns, peer.ip(), target, None)
        .await
    {
        Ok(app) => app,
        Err(e) => {
            tracing::warn!(target: "access", direction = "inbound", src_identity = %peer_identity, %traceparent,
                dst = %target, outcome = "failed", reason = %e);
            reply(&mut respond, http::StatusCode::SERVICE_UNAVAILABLE);
            return;
        }
    };
    let send = match respond.send_response(
        http::Response::builder()
            .status(http::StatusCode::OK)
            .body(())
            .unwrap_or_default(),
        false,
    ) {
        Ok(send) => send,
        Err(e) => {
            tracing::debug!("peer went away before the 200: {e}");
            return;
        }
    };
    // A policy change that denies this connection ends the copy: dropping the streams closes
    // the app's socket and resets the tunnel stream.
    let result = tokio::select! {
        result = copy::copy_bidirectional(
            app,
            send,
            std::future::ready(Ok(request.into_body())),
            &registration.bytes().to_source,
            &registration.bytes().from_source,
        ) => result,
        reason = close.closed() => Err(std::io::Error::other(reason)),
    };
    // The counters, not the copy's result: a stream that ends in an error moved bytes too.
    let to_app = registration.bytes().from_source.load(Ordering::Relaxed);
    let from_app = registration.bytes().to_source.load(Ordering::Relaxed);
    drop(registration);
    let (outcome, reason) = match result {
        Ok(_) => ("closed", String::new()),
        Err(e) => ("error", e.to_string()),
    };
    tracing::info!(target: "access", direction = "inbound", src_identity = %peer_identity, %traceparent,
        src = %peer.ip(), dst = %target, dst_workload = %local.display_name(),
        dst_identity = %local.identity, bytes_received = to_app, bytes_sent = from_app,
        duration_ms = started.elapsed().as_millis() as u64, outcome, reason = %reason,
        "connection closed");
}
