//! The tunnel listener (15008) in each local pod's netns: authenticate the peer agent (mTLS,
//! SPIFFE), accept its CONNECT streams for this pod, admit each (mode, policy), deliver it.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use bytes::Bytes;
use meshlet_common::{INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, TUNNEL_PORT};
use tokio::net::TcpStream;

use super::{admit, Admission};
use crate::{
    deliver,
    identity::SpiffeId,
    node::NodeAgent,
    pods::PodHandle,
    policy::Transport,
    tls,
    tunnel::{copy, CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW},
};

/// One tunnel connection from a peer agent: mTLS, then its CONNECT streams.
pub(crate) async fn handle_connection(
    agent: Arc<NodeAgent>,
    pod: Arc<PodHandle>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let Some(local) = agent.workloads.by_uid(&pod.uid) else {
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
            return;
        }
    };
    let Some(peer_identity) = tls::peer_identity(tls.get_ref().1.peer_certificates()) else {
        tracing::warn!(target: "access", direction = "inbound", %peer, outcome = "refused",
            reason = "peer presented no SPIFFE identity");
        return;
    };
    tracing::info!(dst_workload = %local.display_name(), %peer, src_identity = %peer_identity,
        "accepted mTLS tunnel connection");
    let client_chain: Vec<_> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    let untrusted = tls::verify::until_untrusted(
        agent.tls.provider.clone(),
        agent.bundle.clone(),
        client_chain,
        tls::Purpose::ClientAuth,
    );
    let mut connection = match h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .handshake::<_, Bytes>(tls)
        .await
    {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%peer, "HTTP/2 handshake failed: {e}");
            return;
        }
    };
    // Dropping the connection when the client's chain stops passing (a pushed CRL revokes
    // it, it expires) closes the TLS connection and every stream on it.
    tokio::pin!(untrusted);
    loop {
        let request = tokio::select! {
            request = connection.accept() => request,
            rejection = &mut untrusted => {
                tracing::warn!(target: "audit", event = "tunnel_closed", direction = "inbound",
                    dst_workload = %local.display_name(), %peer, src_identity = %peer_identity,
                    reason = rejection.reason(),
                    "closed a live tunnel: the client's certificate is no longer trusted: {rejection}");
                return;
            }
        };
        let Some(request) = request else { break };
        match request {
            Ok((request, respond)) => {
                tokio::spawn(handle_stream(
                    agent.clone(),
                    pod.clone(),
                    peer,
                    peer_identity.clone(),
                    request,
                    respond,
                ));
            }
            Err(e) => {
                tracing::debug!(%peer, "tunnel connection ended: {e}");
                break;
            }
        }
    }
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
    if request.method() != http::Method::CONNECT {
        reply(&mut respond, http::StatusCode::METHOD_NOT_ALLOWED);
        return;
    }
    let authority = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
    let Some(target) = authority else {
        tracing::warn!(target: "access", direction = "inbound", src_identity = %peer_identity,
            outcome = "refused", reason = "CONNECT authority is not IP:port");
        reply(&mut respond, http::StatusCode::BAD_REQUEST);
        return;
    };
    let Some(local) = agent.workloads.by_uid(&pod.uid) else {
        reply(&mut respond, http::StatusCode::SERVICE_UNAVAILABLE);
        return;
    };
    // The tunnel may only reach this pod, and never the agent's own ports.
    let reserved = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, TUNNEL_PORT].contains(&target.port());
    if !local.ips.contains(&target.ip()) || reserved {
        tracing::warn!(target: "access", direction = "inbound", src_identity = %peer_identity,
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
        reply(&mut respond, http::StatusCode::FORBIDDEN);
        return;
    };
    let app = match deliver::connect_to_app(&agent.redirect, &pod.netns, peer.ip(), target, None)
        .await
    {
        Ok(app) => app,
        Err(e) => {
            tracing::warn!(target: "access", direction = "inbound", src_identity = %peer_identity,
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
    drop(registration);
    let (to_app, from_app, outcome, reason) = match result {
        Ok(t) => (t.stream_to_tcp, t.tcp_to_stream, "closed", String::new()),
        Err(e) => (0, 0, "error", e.to_string()),
    };
    tracing::info!(target: "access", direction = "inbound", src_identity = %peer_identity,
        src = %peer.ip(), dst = %target, dst_workload = %local.display_name(),
        dst_identity = %local.identity, bytes_received = to_app, bytes_sent = from_app,
        duration_ms = started.elapsed().as_millis() as u64, outcome, reason = %reason,
        "connection closed");
}
