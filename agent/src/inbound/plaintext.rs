//! The plaintext listener (15006) in each local pod's netns. The kernel's capture program
//! hands it every TCP connection that arrives from outside the pod for an app port; the
//! accepted socket's local address is where the client was going. STRICT refuses it with a
//! reset before the app sees anything; PERMISSIVE and DISABLE ports deliver it if policy allows.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use std::{os::fd::AsRawFd, sync::atomic::Ordering};

use tokio::net::TcpStream;

use super::{admit, Admission};
use crate::{deliver, node::NodeAgent, pods::PodHandle, state::policy::Transport, tunnel::copy};

/// SO_LINGER 0 on a socket that is about to be dropped by the select, so that it resets.
fn set_zero_linger(fd: std::os::fd::RawFd) {
    // SAFETY: the fd belongs to a TcpStream still alive in the caller's select; we only set an
    // option on it and never close it.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let _ = socket2::SockRef::from(&borrowed).set_linger(Some(std::time::Duration::ZERO));
}

/// Refuses a captured connection with a reset, so the client knows at once.
fn reset(client: TcpStream) {
    let _ = client.set_zero_linger();
    drop(client);
}

/// One captured plaintext connection.
pub(crate) async fn handle(
    agent: Arc<NodeAgent>,
    pod: Arc<PodHandle>,
    client: TcpStream,
    peer: SocketAddr,
) {
    let started = Instant::now();
    let Some(_permit) = super::slot(&agent, &pod, peer, "plaintext") else {
        reset(client);
        return;
    };
    let Ok(target) = client.local_addr() else {
        reset(client);
        return;
    };
    let Some(local) = agent.state.by_uid(&pod.uid) else {
        tracing::warn!(target: "access", direction = "inbound", transport = "plaintext",
            pod = %pod.uid, src = %peer, dst = %target, outcome = "refused",
            reason = "the control plane has not described this pod yet");
        reset(client);
        return;
    };
    if !local.ips.contains(&target.ip()) {
        tracing::warn!(target: "access", direction = "inbound", transport = "plaintext",
            src = %peer, dst = %target, dst_workload = %local.display_name(), outcome = "refused",
            reason = "destination is not an address of this pod");
        reset(client);
        return;
    }
    // A plaintext connection straight to the agent's own plaintext port (no capture runs for
    // it): delivering it would connect the agent to itself.
    if super::is_agent_port(target.port()) {
        tracing::warn!(target: "access", direction = "inbound", transport = "plaintext",
            src = %peer, dst = %target, dst_workload = %local.display_name(), outcome = "refused",
            reason = "destination is one of the agent's own ports");
        reset(client);
        return;
    }
    let Some(Admission {
        registration,
        mut close,
    }) = admit(
        &agent,
        &pod,
        &local,
        Transport::Plaintext,
        None,
        peer,
        target,
    )
    else {
        tracing::warn!(target: "access", direction = "inbound", transport = "plaintext",
            src = %peer, dst = %target, dst_workload = %local.display_name(),
            outcome = "refused", reason = "denied (see the audit line)");
        reset(client);
        return;
    };
    // The delivery socket takes the client's address; never its port as well, or the app's
    // connection would have the captured connection's addresses and ports.
    let app = match deliver::connect_to_app(
        &agent.redirect,
        &pod.netns,
        peer.ip(),
        target,
        Some(peer.port()),
    )
    .await
    {
        Ok(app) => app,
        Err(e) => {
            tracing::warn!(target: "access", direction = "inbound", transport = "plaintext",
                    src = %peer, dst = %target, outcome = "failed", reason = %e);
            reset(client);
            return;
        }
    };
    let client_fd = client.as_raw_fd();
    let result = tokio::select! {
        result = copy::copy_tcp(
            client,
            app,
            &registration.bytes().from_source,
            &registration.bytes().to_source,
        ) => result.map(|_| ()),
        reason = close.closed() => {
            // Reset the client rather than let it think the app finished.
            set_zero_linger(client_fd);
            Err(std::io::Error::other(reason))
        }
    };
    let received = registration.bytes().from_source.load(Ordering::Relaxed);
    let sent = registration.bytes().to_source.load(Ordering::Relaxed);
    drop(registration);
    let (outcome, reason) = match result {
        Ok(()) => ("closed", String::new()),
        Err(e) => ("closed_by_agent", e.to_string()),
    };
    tracing::info!(target: "access", direction = "inbound", transport = "plaintext",
        src = %peer, dst = %target, dst_workload = %local.display_name(),
        bytes_received = received, bytes_sent = sent,
        duration_ms = started.elapsed().as_millis() as u64, outcome, reason = %reason,
        "connection closed");
}
