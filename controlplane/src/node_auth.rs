//! Serving gRPC over mutual TLS and knowing which node calls.
//!
//! Every connection is TLS with the control plane's own certificate (issued by its CA, renewed
//! before it runs out or when the signer changes). A client certificate is optional at the TLS
//! level, because a node without one may only call `Join`; when present it must chain to the
//! trust roots, pass the CRLs, and name a node (`spiffe://<td>/meshlet/node/<name>`). The node
//! name then travels with each request as [`NodePeer`], and the services decide with it.
use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use std::future::Future;

use rcgen::KeyPair;
use rustls::{
    crypto::CryptoProvider,
    pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier},
    sign::CertifiedKey,
    RootCertStore,
};
use rustls_pki_types::pem::PemObject;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{mpsc, watch},
};
use tonic::{transport::server::Connected, Request, Status};

use crate::{ca::CertificateAuthority, pki::Trust};

/// Lifetime of the control plane's serving certificate.
const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes the control plane runs at once; more connections wait in the backlog or
/// are dropped.
const MAX_HANDSHAKES: usize = 256;
/// How long a connection without a node certificate (a Join) may stay open.
const UNAUTHENTICATED_LIFETIME: Duration = Duration::from_secs(30);

/// Who is calling: the node its certificate names, if it presented one.
#[derive(Debug, Clone, Default)]
pub struct NodePeer {
    pub node: Option<String>,
}

/// The calling node, or Unauthenticated with what to do.
pub fn node_of<T>(request: &Request<T>) -> Result<String, Status> {
    request
        .extensions()
        .get::<NodePeer>()
        .and_then(|p| p.node.clone())
        .ok_or_else(|| {
            Status::unauthenticated(
                "no node certificate: a node joins first with a token from \
                 `meshlet-controlplane token create --node NAME` (agent flag --join-token-file)",
            )
        })
}

/// A TLS connection with the node it authenticated as. It ends when the node certificate
/// expires, so a node cannot keep calling on a certificate it failed to renew.
pub struct NodeStream<IO> {
    inner: tokio_rustls::server::TlsStream<IO>,
    peer: NodePeer,
    expires: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> Connected for NodeStream<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type ConnectInfo = NodePeer;

    fn connect_info(&self) -> NodePeer {
        self.peer.clone()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for NodeStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(expires) = this.expires.as_mut() {
            if expires.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(std::io::Error::other(
                    "the node certificate of this connection expired",
                )));
            }
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for NodeStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A serving certificate, when to renew it, and the signer chain that issued it.
type Serving = (Arc<CertifiedKey>, SystemTime, Vec<String>);

/// The serving certificate, re-issued when it passed half its life or the signer changed.
struct ServingCert {
    ca: Arc<CertificateAuthority>,
    provider: Arc<CryptoProvider>,
    current: Mutex<Option<Serving>>,
}

impl ServingCert {
    fn issue(&self) -> Option<Arc<CertifiedKey>> {
        let key = KeyPair::generate().ok()?;
        let issued = self.ca.sign_serving(&key, SERVING_LIFETIME).ok()?;
        let chain: Vec<CertificateDer<'static>> = issued
            .chain_pem
            .iter()
            .filter_map(|p| CertificateDer::from_pem_slice(p.as_bytes()).ok())
            .collect();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = self.provider.key_provider.load_private_key(der).ok()?;
        tracing::info!(serial = %issued.serial, "issued the control plane's serving certificate");
        Some(Arc::new(CertifiedKey::new(chain, signer)))
    }
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServingCert")
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let signer = self.ca.signer_chain_pem();
        let fresh = current.as_ref().is_some_and(|(_, renew_at, issued_by)| {
            SystemTime::now() < *renew_at && *issued_by == signer
        });
        if !fresh {
            let key = self.issue()?;
            *current = Some((key, SystemTime::now() + SERVING_LIFETIME / 2, signer));
        }
        current.as_ref().map(|(key, _, _)| key.clone())
    }
}

/// The node a verified client certificate names, if it names one.
fn node_named_by(leaf: &CertificateDer<'_>, trust_domain: &str) -> Option<String> {
    let uri = meshlet_spiffe::single_uri_san_of_der(leaf).ok()?;
    let node = meshlet_spiffe::node_of(&uri, trust_domain)?;
    crate::tokens::valid_node_name(node).then(|| node.to_string())
}

/// A server TLS config from the trust in force now: client certificates optional, checked
/// against the roots and CRLs when given.
fn server_config(
    trust: &Trust,
    serving: Arc<ServingCert>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut roots = RootCertStore::empty();
    for pem in &trust.roots_pem {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string())?;
        roots.add(der).map_err(|e| e.to_string())?;
    }
    let crls: Vec<CertificateRevocationListDer<'static>> = trust
        .crls_pem
        .iter()
        .filter_map(|p| CertificateRevocationListDer::from_pem_slice(p.as_bytes()).ok())
        .collect();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .allow_unknown_revocation_status()
        .allow_unauthenticated()
        .build()
        .map_err(|e| e.to_string())?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec()];
    // No resumption: a resumed session carries the node certificate of its first handshake,
    // so a node would come back with a certificate that has expired (the connection then ends
    // at once, again and again) or been revoked. Every connection is a full handshake.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// What [`incoming`] needs.
pub struct TlsServing {
    pub ca: Arc<CertificateAuthority>,
    pub trust: watch::Receiver<Trust>,
    pub trust_domain: String,
}

/// Accepts connections from `accept`, does the TLS handshakes (concurrently, bounded in
/// time) and yields authenticated streams for tonic's `serve_with_incoming`.
pub fn incoming<IO, A, F>(
    serving: TlsServing,
    mut accept: A,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<NodeStream<IO>>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: FnMut() -> F + Send + 'static,
    F: std::future::Future<Output = std::io::Result<IO>> + Send,
{
    let (tx, rx) = mpsc::channel(64);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cert = Arc::new(ServingCert {
        ca: serving.ca.clone(),
        provider: provider.clone(),
        current: Mutex::new(None),
    });
    // TLS handshakes in flight: anyone can open a connection (Join needs no certificate), so
    // their number is bounded; past it, new connections are dropped at once.
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let mut trust = serving.trust.clone();
    tokio::spawn(async move {
        // Built once per trust change (roots and CRLs parsed), not per connection.
        let mut config: Option<Arc<rustls::ServerConfig>> = None;
        loop {
            let io = match accept().await {
                Ok(io) => io,
                Err(e) => {
                    tracing::warn!("control-plane accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::warn!(target: "audit", event = "node_tls_shed",
                    "{MAX_HANDSHAKES} TLS handshakes in flight; dropped a new connection");
                continue;
            };
            if config.is_none() || trust.has_changed().unwrap_or(false) {
                let current = trust.borrow_and_update().clone();
                match server_config(&current, cert.clone(), provider.clone()) {
                    Ok(c) => config = Some(c),
                    Err(e) => {
                        tracing::error!("cannot build the control plane's TLS config: {e}");
                    }
                }
            }
            let Some(config) = config.clone() else {
                continue;
            };
            let tx = tx.clone();
            let trust_domain = serving.trust_domain.clone();
            tokio::spawn(async move {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                let _permit = permit;
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::warn!(target: "audit", event = "node_tls_refused", "control-plane TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                };
                let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                let node = leaf.and_then(|leaf| node_named_by(leaf, &trust_domain));
                let expires = leaf
                    .filter(|_| node.is_some())
                    .and_then(|leaf| x509_parser::parse_x509_certificate(leaf).ok())
                    .map(|(_, cert)| {
                        let at = cert.validity().not_after.timestamp().max(0) as u64;
                        let left = (SystemTime::UNIX_EPOCH + Duration::from_secs(at))
                            .duration_since(SystemTime::now())
                            .unwrap_or_default();
                        Box::pin(tokio::time::sleep(left))
                    })
                    // A connection without a node certificate can only Join: one call, so
                    // it gets a short life rather than an open-ended one.
                    .or_else(|| Some(Box::pin(tokio::time::sleep(UNAUTHENTICATED_LIFETIME))));
                let _ = tx
                    .send(Ok(NodeStream {
                        inner: tls,
                        peer: NodePeer { node },
                        expires,
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed session would carry the node certificate of its first handshake: with
    /// 2-minute node certificates, reconnections presented an expired one and were ended at
    /// once, forever (the rotation lab test caught it).
    #[test]
    fn the_control_plane_never_resumes_a_session() {
        let (signer, trust) = crate::pki::generate_dev("cluster.local").expect("dev CA");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let serving = Arc::new(ServingCert {
            ca: Arc::new(CertificateAuthority::new(
                "cluster.local",
                signer,
                Duration::from_secs(3600),
            )),
            provider: provider.clone(),
            current: Mutex::new(None),
        });
        let config = server_config(&trust, serving, provider).expect("config");
        assert_eq!(config.send_tls13_tickets, 0);
        assert!(!config.session_storage.can_cache());
        assert!(!config.ticketer.enabled());
    }
}
