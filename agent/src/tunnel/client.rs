//! Dialling a tunnel: TCP from inside the source pod's netns (with the agent mark, so it is
//! never redirected), TLS 1.3 with the source identity, then HTTP/2; and opening CONNECT
//! streams on it.
use std::{
    net::SocketAddr,
    sync::{atomic::AtomicBool, Arc},
};

use bytes::Bytes;
use meshlet_common::AGENT_MARK;
use rustls_pki_types::ServerName;
use socket2::Socket;
use tokio::net::TcpSocket;

use super::{
    pool::{Credentials, PooledConnection},
    TunnelError, CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW,
};
use crate::{
    limits::TunnelLimits,
    netns::Netns,
    tls::{verify, Purpose, TrustBundle},
};
use rustls::crypto::CryptoProvider;

/// Makes new tunnel connections for one source pod.
pub struct TunnelConnector<'a> {
    pub netns: &'a Netns,
    pub tls: Arc<rustls::ClientConfig>,
    /// The bundle the server was verified against: the connection closes when the server's
    /// chain stops passing it (revoked, expired).
    pub bundle: Arc<TrustBundle>,
    pub provider: Arc<CryptoProvider>,
    /// The leaf we present (the current certificate of the source identity), its
    /// `tls::fingerprint`.
    pub client_leaf: u64,
    /// Keepalive and header limits.
    pub limits: &'a TunnelLimits,
}

fn server_chain_issuer(tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> u64 {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.get(1))
        .map(|c| crate::tls::fingerprint(c))
        .unwrap_or_default()
}

impl TunnelConnector<'_> {
    /// TCP + TLS + HTTP/2 to `endpoint`, with a task driving the connection.
    pub async fn connect(&self, endpoint: SocketAddr) -> Result<PooledConnection, TunnelError> {
        let socket = self
            .netns
            .tcp_socket(endpoint)
            .await?
            .and_then(marked)
            .map_err(|source| TunnelError::Connect {
                addr: endpoint,
                source,
            })?;
        let socket = TcpSocket::from_std_stream(socket.into());
        let tcp = socket
            .connect(endpoint)
            .await
            .map_err(|source| TunnelError::Connect {
                addr: endpoint,
                source,
            })?;
        super::set_user_timeout(&socket2::SockRef::from(&tcp), self.limits.keepalive_timeout);
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        // The name is not used for verification (SPIFFE IDs are); it only fills SNI.
        let name = ServerName::IpAddress(endpoint.ip().into());
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|source| TunnelError::Handshake {
                addr: endpoint,
                source,
            })?;
        let credentials = Credentials {
            client_leaf: self.client_leaf,
            server_issuer: server_chain_issuer(&tls),
            server_not_after: tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|leaf| crate::tls::leaf_info(leaf).ok())
                .map(|info| info.not_after),
        };
        let server_chain: Vec<_> = tls
            .get_ref()
            .1
            .peer_certificates()
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default();
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_header_list_size(self.limits.max_header_list_size)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|source| TunnelError::Http2 {
                addr: endpoint,
                source,
            })?;
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let untrusted = verify::until_untrusted(
            self.provider.clone(),
            self.bundle.clone(),
            server_chain,
            Purpose::ServerAuth,
        );
        let keepalive = super::keepalive(
            connection.ping_pong(),
            self.limits.keepalive_interval,
            self.limits.keepalive_timeout,
        );
        tokio::spawn(async move {
            tokio::select! {
                result = connection => if let Err(e) = result {
                    // A graceful end (GOAWAY, idle close) is Ok; an error is a dead or
                    // misbehaving peer, which an operator wants to see.
                    tracing::warn!(target: "audit", event = "tunnel_closed", direction = "outbound",
                        %endpoint, reason = "error", "tunnel connection failed: {e}");
                },
                waited = keepalive => {
                    // Mark it closed before it goes, so no new stream picks it meanwhile.
                    flag.store(true, std::sync::atomic::Ordering::Release);
                    tracing::warn!(target: "audit", event = "tunnel_closed", direction = "outbound",
                        %endpoint, reason = "keepalive_timeout",
                        "closed a tunnel: the peer answered no PING for {waited:?}");
                },
                rejection = untrusted => {
                    flag.store(true, std::sync::atomic::Ordering::Release);
                    tracing::warn!(target: "audit", event = "tunnel_closed", direction = "outbound",
                        %endpoint, reason = rejection.reason(),
                        "closed a live tunnel: the server's certificate is no longer trusted: {rejection}");
                }
            }
            flag.store(true, std::sync::atomic::Ordering::Release);
        });
        Ok(PooledConnection::new(sender, closed, credentials))
    }
}

/// A tunnel socket carries the agent's mark, so the redirect programs leave it alone.
fn marked(socket: Socket) -> std::io::Result<Socket> {
    socket.set_mark(AGENT_MARK)?;
    socket.set_nodelay(true)?;
    Ok(socket)
}

/// Sends `CONNECT authority` without waiting for the answer: the caller may send data at once
/// (the peer agent delivers nothing before it has decided and connected), and awaits the
/// returned future for the peer's stream, which fails unless the answer is 200.
pub async fn start_stream(
    mut sender: h2::client::SendRequest<Bytes>,
    endpoint: SocketAddr,
    authority: SocketAddr,
    traceparent: &str,
) -> Result<
    (
        h2::SendStream<Bytes>,
        impl std::future::Future<Output = Result<h2::RecvStream, TunnelError>>,
    ),
    TunnelError,
> {
    let h2_err = move |source| TunnelError::Http2 {
        addr: endpoint,
        source,
    };
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority.to_string())
        .version(http::Version::HTTP_2)
        .header(super::TRACEPARENT, traceparent)
        .body(())
        .map_err(|_| TunnelError::Refused {
            authority: authority.to_string(),
            status: http::StatusCode::BAD_REQUEST,
        })?;
    sender = sender.ready().await.map_err(h2_err)?;
    let (response, send) = sender.send_request(request, false).map_err(h2_err)?;
    let answer = async move {
        let response = response.await.map_err(h2_err)?;
        if response.status() != http::StatusCode::OK {
            return Err(TunnelError::Refused {
                authority: authority.to_string(),
                status: response.status(),
            });
        }
        Ok(response.into_body())
    };
    Ok((send, answer))
}
