//! The mTLS tunnel between agents: HTTP/2 CONNECT over TLS 1.3 to port 15008 (HBONE framing),
//! many streams per pooled connection.
pub mod client;
pub mod copy;
pub mod pool;

use std::time::Duration;

pub use client::{start_stream, TunnelConnector};
pub use pool::{Credentials, Pool, PoolKey};

/// HTTP/2 flow-control windows: large enough that one stream can fill a fast link without
/// waiting for WINDOW_UPDATEs on every round trip.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("cannot reach the tunnel endpoint {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "TLS handshake with {addr} failed: {}",
        crate::tls::describe_handshake_error(source)
    )]
    Handshake {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP/2 with {addr} failed: {source}")]
    Http2 {
        addr: std::net::SocketAddr,
        source: h2::Error,
    },
    #[error("the peer agent refused CONNECT {authority}: HTTP {status}")]
    Refused {
        authority: String,
        status: http::StatusCode,
    },
    #[error("the peer agent did not answer CONNECT {authority} within {waited:?}")]
    NoAnswer { authority: String, waited: Duration },
    #[error("tunnel set-up to {0} timed out")]
    Timeout(std::net::SocketAddr),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("TLS config: {0}")]
    Config(#[from] rustls::Error),
}

/// Pings the peer every `interval` over HTTP/2 and returns when one PING goes unanswered for
/// `timeout`: the peer (or the path to it) is dead, and the caller drops the connection so that
/// its streams fail now and the next stream dials afresh, instead of hanging until the
/// kernel's retransmissions give up (83-90 s after the path came back, in the attack).
///
/// The connection must be polled meanwhile (the PONG is read by whoever drives it).
pub async fn keepalive(
    mut ping_pong: Option<h2::PingPong>,
    interval: Duration,
    timeout: Duration,
) -> Duration {
    let Some(pings) = ping_pong.as_mut() else {
        // Only when the handle was already taken; never in this crate.
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            // The connection ended: its driver reports why.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return timeout,
        }
    }
}

/// Tunnel sockets give up on a peer that acknowledges nothing for `timeout`, whatever the
/// retransmission backoff would do (`TCP_USER_TIMEOUT`).
pub fn set_user_timeout(socket: &socket2::SockRef<'_>, timeout: Duration) {
    if let Err(e) = socket.set_tcp_user_timeout(Some(timeout)) {
        tracing::debug!("cannot set TCP_USER_TIMEOUT: {e}");
    }
}

/// The W3C trace-context header the client sends on each CONNECT and both sides log, so one
/// connection's lines can be found on both nodes (and on an Istio ztunnel that logs it too).
pub const TRACEPARENT: &str = "traceparent";

/// A fresh `traceparent` (version 00, random trace and span ids, sampled).
pub fn new_traceparent() -> String {
    let trace: u128 = rand::random::<u128>().max(1);
    let span: u64 = rand::random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-01")
}

/// A peer's `traceparent`, if it is well formed (`00-<32 hex>-<16 hex>-<2 hex>`); anything
/// else is ignored rather than logged, so a peer cannot write what it likes into our logs.
pub fn valid_traceparent(value: &http::HeaderValue) -> Option<&str> {
    let text = value.to_str().ok()?;
    let parts: Vec<&str> = text.split('-').collect();
    let [version, trace, span, flags] = parts.as_slice() else {
        return None;
    };
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (hex(version, 2)
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && span.bytes().any(|b| b != b'0'))
    .then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_we_make_are_valid_and_odd_ones_are_ignored() {
        let made = new_traceparent();
        let value = http::HeaderValue::from_str(&made).expect("header");
        assert_eq!(valid_traceparent(&value), Some(made.as_str()));
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\nforged=1",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ] {
            if let Ok(value) = http::HeaderValue::from_str(bad) {
                assert_eq!(valid_traceparent(&value), None, "{bad:?}");
            }
        }
    }
}
