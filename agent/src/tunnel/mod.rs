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
/// A peer that does not finish TCP + TLS + HTTP/2 set-up in this time is given up on.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    #[error("tunnel set-up to {0} timed out")]
    Timeout(std::net::SocketAddr),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("TLS config: {0}")]
    Config(#[from] rustls::Error),
}
