//! The agent's link to the control plane: the node's own certificate and the mutual-TLS
//! channel that every control-plane call uses.
//!
//! A node joins once: with a single-use token the operator made for it, it sends a CSR and gets
//! a node certificate (`spiffe://<td>/meshlet/node/<name>`); key and certificate are kept in
//! the node identity folder so a restarted agent does not need a new token. The certificate is
//! renewed over the authenticated channel at half-life, and at once when the CA starts signing
//! with another signer (a CA rotation). The control plane must present
//! `spiffe://<td>/meshlet/controlplane`, chained to the roots the operator gave the agent (or,
//! once the first update arrived, to the trust bundle the control plane pushes).
use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use meshlet_proto::v1::{
    node_identity_service_client::NodeIdentityServiceClient, JoinRequest,
    RenewNodeCertificateRequest,
};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    sign::CertifiedKey,
    DigitallySignedStruct, SignatureScheme,
};
use rustls_pki_types::{pem::PemObject, TrustAnchor};
use tokio::sync::Notify;
use tonic::transport::Channel;

use crate::tls::TrustBundle;

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the node identity to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--control-plane-roots {0}: no usable PEM root certificate in it")]
    NoRoots(PathBuf),
    #[error(
        "this node has no node certificate in {dir} and no join token: create one with \
         `meshlet-controlplane token create --node {node}` and pass it with --join-token-file \
         (in Kubernetes: --service-account-token-file with the pod's projected token)"
    )]
    NoToken { dir: PathBuf, node: String },
    #[error("the control plane refused to let node {node} join: {status}")]
    JoinRefused { node: String, status: tonic::Status },
    #[error("the control plane refused to renew the node certificate of {node}: {status}")]
    RenewalRefused { node: String, status: tonic::Status },
    #[error("the control plane answered an unusable node certificate: {0}")]
    BadChain(String),
    #[error("cannot make the node key or CSR: {0}")]
    Key(rcgen::Error),
    #[error("control-plane address: {0}")]
    Address(#[from] meshlet_proto::channel::ChannelError),
    #[error("TLS settings: {0}")]
    Tls(#[from] rustls::Error),
}

/// How the agent reaches and authenticates to the control plane.
#[derive(Debug, Clone)]
pub struct ControlPlaneSettings {
    pub address: String,
    pub node: String,
    pub trust_domain: String,
    /// The operator's roots, to verify the control plane before any update arrived.
    pub roots_file: PathBuf,
    /// Where the node key and certificate are kept.
    pub identity_dir: PathBuf,
    /// A join token, needed only when the folder holds no valid node certificate.
    pub token_file: Option<PathBuf>,
    /// In Kubernetes, instead: the agent pod's projected service account token, re-read at
    /// every join (the kubelet rotates it).
    pub service_account_token_file: Option<PathBuf>,
}

/// The node's certificate and key, swapped in place on renewal; none before the join.
pub struct NodeCredentials {
    current: RwLock<Option<Arc<CertifiedKey>>>,
    /// True once there is a certificate: the channel connects only then.
    ready: tokio::sync::watch::Sender<bool>,
    /// Wakes the renewal early (CA signer changed).
    renew_now: Notify,
}

impl std::fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCredentials")
    }
}

impl NodeCredentials {
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn install(&self, cert: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(cert);
        self.ready.send_replace(true);
    }
}

impl rustls::client::ResolvesClientCert for NodeCredentials {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Verifies that the server is the control plane of our trust domain.
#[derive(Debug)]
struct ControlPlaneVerifier {
    provider: Arc<CryptoProvider>,
    bootstrap: Vec<TrustAnchor<'static>>,
    bundle: Arc<TrustBundle>,
    expected: String,
}

impl ServerCertVerifier for ControlPlaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let state = self.bundle.current();
        let pushed = state.domains.get(&state.own_domain).map(|d| &d.anchors);
        let anchors = match pushed {
            Some(a) if !a.is_empty() => a,
            _ => &self.bootstrap,
        };
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("control-plane certificate: {e}")))?;
        ee.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("control-plane certificate rejected: {e}")))?;
        let uri = only_uri(end_entity).unwrap_or_default();
        if uri != self.expected {
            return Err(rustls::Error::General(format!(
                "the server presented {uri:?}, not the control plane {:?}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn only_uri(der: &CertificateDer<'_>) -> Option<String> {
    meshlet_spiffe::single_uri_san_of_der(der).ok()
}

fn read(what: &'static str, path: &Path) -> Result<String, ControlPlaneError> {
    std::fs::read_to_string(path).map_err(|source| ControlPlaneError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn bootstrap_roots(path: &Path) -> Result<Vec<TrustAnchor<'static>>, ControlPlaneError> {
    let text = read("control-plane roots", path)?;
    let anchors: Vec<_> = CertificateDer::pem_slice_iter(text.as_bytes())
        .filter_map(Result::ok)
        .filter_map(|der| {
            webpki::anchor_from_trusted_cert(&der)
                .ok()
                .map(|a| a.to_owned())
        })
        .collect();
    if anchors.is_empty() {
        return Err(ControlPlaneError::NoRoots(path.to_path_buf()));
    }
    Ok(anchors)
}

/// A key and a CSR naming `node`.
fn key_and_csr(uri: &str) -> Result<(KeyPair, String), ControlPlaneError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(ControlPlaneError::Key)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        uri.to_string().try_into().map_err(ControlPlaneError::Key)?,
    )];
    let csr = params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(ControlPlaneError::Key)?;
    Ok((key, csr))
}

/// What a node certificate chain says, checked against the key we made.
struct NodeCertificate {
    certified: Arc<CertifiedKey>,
    not_before: SystemTime,
    not_after: SystemTime,
}

fn accept_chain(
    provider: &CryptoProvider,
    expected_uri: &str,
    key_pem: &str,
    chain_pem: &[String],
) -> Result<NodeCertificate, ControlPlaneError> {
    let bad = |m: String| ControlPlaneError::BadChain(m);
    let chain: Vec<CertificateDer<'static>> = chain_pem
        .iter()
        .flat_map(|p| CertificateDer::pem_slice_iter(p.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let leaf = chain.first().ok_or_else(|| bad("empty chain".into()))?;
    if only_uri(leaf).as_deref() != Some(expected_uri) {
        return Err(bad(format!("the leaf does not name {expected_uri}")));
    }
    let key = KeyPair::from_pem(key_pem).map_err(|e| bad(e.to_string()))?;
    let info = crate::tls::leaf_info(leaf).map_err(|e| bad(e.to_string()))?;
    if info.public_key != rcgen::PublicKeyData::subject_public_key_info(&key) {
        return Err(bad("the leaf is not for our key".into()));
    }
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| bad(e.to_string()))?;
    Ok(NodeCertificate {
        certified: Arc::new(CertifiedKey::new(chain, signer)),
        not_before: info.not_before,
        not_after: info.not_after,
    })
}

fn write_private(path: &Path, contents: &str) -> Result<(), ControlPlaneError> {
    crate::files::write_private(path, contents.as_bytes()).map_err(|source| {
        ControlPlaneError::Write {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// The control-plane link once set up: the node's credentials and the channel for every
/// other client.
pub struct ControlPlane {
    pub channel: Channel,
    pub credentials: Arc<NodeCredentials>,
    settings: ControlPlaneSettings,
    provider: Arc<CryptoProvider>,
}

impl ControlPlane {
    fn expected_node_uri(settings: &ControlPlaneSettings) -> String {
        meshlet_spiffe::node_id(&settings.trust_domain, &settings.node)
    }

    /// Sets up the link without waiting: a valid node certificate on disk is used at once;
    /// otherwise a background task joins with the token (retrying while the control plane
    /// is unreachable, and re-reading the token file after a refusal, so an operator can hand
    /// a fresh token without restarting the agent). Until then, calls on the channel wait.
    pub fn start(
        settings: ControlPlaneSettings,
        provider: Arc<CryptoProvider>,
        bundle: Arc<TrustBundle>,
    ) -> Result<Self, ControlPlaneError> {
        let verifier = Arc::new(ControlPlaneVerifier {
            provider: provider.clone(),
            bootstrap: bootstrap_roots(&settings.roots_file)?,
            bundle,
            expected: meshlet_spiffe::control_plane_id(&settings.trust_domain),
        });
        let uri = Self::expected_node_uri(&settings);
        let stored = load_stored(&settings.identity_dir)
            .and_then(|(key, chain)| accept_chain(&provider, &uri, &key, &[chain]).ok())
            .filter(|c| c.not_after > SystemTime::now() + Duration::from_secs(30));
        let (ready, ready_rx) = tokio::sync::watch::channel(false);
        let credentials = Arc::new(NodeCredentials {
            current: RwLock::new(None),
            ready,
            renew_now: Notify::new(),
        });
        let config = link_tls(&provider, verifier.clone(), Some(credentials.clone()))?;
        let channel =
            meshlet_proto::channel::connect_lazy_tls(&settings.address, config, ready_rx)?;
        let link = Self {
            channel,
            credentials,
            settings,
            provider,
        };
        match stored {
            Some(cert) => {
                tracing::info!(dir = %link.settings.identity_dir.display(), "using the stored node certificate");
                link.credentials.install(cert.certified.clone());
                link.spawn_renewal(cert.not_before, cert.not_after);
            }
            None => link.spawn_join(verifier),
        }
        Ok(link)
    }

    fn spawn_join(&self, verifier: Arc<ControlPlaneVerifier>) {
        let settings = self.settings.clone();
        let provider = self.provider.clone();
        let credentials = self.credentials.clone();
        let renewal = self.renewal_handle();
        tokio::spawn(async move {
            let mut backoff =
                crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
            loop {
                match Self::join(&settings, &provider, verifier.clone()).await {
                    Ok(cert) => {
                        credentials.install(cert.certified.clone());
                        renewal.spawn(cert.not_before, cert.not_after);
                        return;
                    }
                    Err(e) => {
                        let retry = backoff.next_delay();
                        tracing::error!(target: "audit", event = "node_join_failed", node = %settings.node,
                            error = %e, retry_in = ?retry, "cannot join the control plane");
                        tokio::time::sleep(retry).await;
                    }
                }
            }
        });
    }

    async fn join(
        settings: &ControlPlaneSettings,
        provider: &Arc<CryptoProvider>,
        verifier: Arc<ControlPlaneVerifier>,
    ) -> Result<NodeCertificate, ControlPlaneError> {
        let (token, service_account_token, how) =
            match (&settings.service_account_token_file, &settings.token_file) {
                (Some(file), _) => (
                    String::new(),
                    read("service account token", file)?.trim().to_string(),
                    "the pod's service account token",
                ),
                (None, Some(file)) => (
                    read("join token", file)?.trim().to_string(),
                    String::new(),
                    "the join token",
                ),
                (None, None) => {
                    return Err(ControlPlaneError::NoToken {
                        dir: settings.identity_dir.clone(),
                        node: settings.node.clone(),
                    })
                }
            };
        // No node certificate yet: the join is the one call made without one.
        let config = link_tls(provider, verifier, None)?;
        let (_open, open) = tokio::sync::watch::channel(true);
        let channel = meshlet_proto::channel::connect_lazy_tls(&settings.address, config, open)?;
        let mut client = NodeIdentityServiceClient::new(channel);
        let uri = Self::expected_node_uri(settings);
        let (key, csr_pem) = key_and_csr(&uri)?;
        let key_pem = key.serialize_pem();
        let request = JoinRequest {
            node: settings.node.clone(),
            token,
            csr_pem,
            service_account_token,
        };
        let mut request = tonic::Request::new(request);
        request.set_timeout(crate::identity::CALL_DEADLINE);
        let chain = client
            .join(request)
            .await
            .map_err(|status| ControlPlaneError::JoinRefused {
                node: settings.node.clone(),
                status,
            })?
            .into_inner()
            .chain_pem;
        let cert = accept_chain(provider, &uri, &key_pem, &chain)?;
        store(settings, &key_pem, &chain)?;
        tracing::info!(target: "audit", event = "node_joined", node = %settings.node,
            "joined the control plane with {how}; node certificate stored");
        Ok(cert)
    }

    fn renewal_handle(&self) -> Renewal {
        Renewal {
            credentials: self.credentials.clone(),
            channel: self.channel.clone(),
            settings: self.settings.clone(),
            provider: self.provider.clone(),
        }
    }

    fn spawn_renewal(&self, not_before: SystemTime, not_after: SystemTime) {
        self.renewal_handle().spawn(not_before, not_after);
    }
    /// After a new trust bundle: renew at once if the CA signs with another signer now.
    pub fn recheck(&self, bundle: &crate::tls::BundleState) {
        let Some(signer) = bundle.signer_chain.first() else {
            return;
        };
        let Some(current) = self.credentials.current() else {
            return;
        };
        if current.cert.get(1) != Some(signer) {
            tracing::info!(target: "audit", event = "node_certificate_renewal_forced", node = %self.settings.node,
                reason = "the CA signs with a new signer", "renewing the node certificate now");
            self.credentials.renew_now.notify_one();
        }
    }
}

/// The TLS settings of every connection to the control plane: TLS 1.3, ALPN h2, the control
/// plane verified as `spiffe://<td>/meshlet/controlplane`, and the node certificate presented
/// when there is one.
fn link_tls(
    provider: &Arc<CryptoProvider>,
    verifier: Arc<ControlPlaneVerifier>,
    node: Option<Arc<NodeCredentials>>,
) -> Result<Arc<rustls::ClientConfig>, ControlPlaneError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match node {
        Some(credentials) => builder.with_client_cert_resolver(credentials),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    // Full handshakes only (see the control plane's side): a resumed session would not
    // present the current node certificate.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

fn store(
    settings: &ControlPlaneSettings,
    key_pem: &str,
    chain: &[String],
) -> Result<(), ControlPlaneError> {
    std::fs::create_dir_all(&settings.identity_dir).map_err(|source| ControlPlaneError::Write {
        path: settings.identity_dir.clone(),
        source,
    })?;
    // Key and chain in one file, replaced by one rename: a crash can never leave a key
    // beside another key's certificate.
    write_private(
        &settings.identity_dir.join(IDENTITY_FILE),
        &format!("{}{}", key_pem, chain.concat()),
    )?;
    // The two files an earlier version wrote are read only when this one is missing; remove
    // them so that a stale pair can never be picked up again.
    for old in ["node.key", "node.pem"] {
        let _ = std::fs::remove_file(settings.identity_dir.join(old));
    }
    Ok(())
}

/// The node's key and certificate chain, together (key first, then the chain, PEM).
const IDENTITY_FILE: &str = "node-identity.pem";

/// The stored key PEM and chain PEM: from the one identity file, or from the two files an
/// earlier version wrote.
fn load_stored(dir: &std::path::Path) -> Option<(String, String)> {
    if let Ok(text) = std::fs::read_to_string(dir.join(IDENTITY_FILE)) {
        const END: &str = "-----END PRIVATE KEY-----";
        let split = text.find(END)? + END.len();
        let (key, chain) = text.split_at(split);
        return Some((key.to_string(), chain.to_string()));
    }
    let key = std::fs::read_to_string(dir.join("node.key")).ok()?;
    let chain = std::fs::read_to_string(dir.join("node.pem")).ok()?;
    Some((key, chain))
}

/// What the renewal task needs.
struct Renewal {
    credentials: Arc<NodeCredentials>,
    channel: Channel,
    settings: ControlPlaneSettings,
    provider: Arc<CryptoProvider>,
}

impl Renewal {
    /// Renews the node certificate at half-life (± 10 %), or at once when woken.
    fn spawn(self, not_before: SystemTime, not_after: SystemTime) {
        let Renewal {
            credentials,
            channel,
            settings,
            provider,
        } = self;
        let mut client = NodeIdentityServiceClient::new(channel);
        tokio::spawn(async move {
            let (mut not_before, mut not_after) = (not_before, not_after);
            let mut backoff =
                crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(120));
            loop {
                // Half the life left (± 10 %), counted from when this certificate was taken.
                let taken = SystemTime::now().max(not_before);
                let left = not_after.duration_since(taken).unwrap_or_default();
                let renew_at = taken + left.mul_f64(0.5 * (0.9 + rand::random::<f64>() * 0.2));
                let wait = renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = credentials.renew_now.notified() => {}
                }
                let uri = ControlPlane::expected_node_uri(&settings);
                let renewed = async {
                    let (key, csr_pem) = key_and_csr(&uri)?;
                    let key_pem = key.serialize_pem();
                    let mut request = tonic::Request::new(RenewNodeCertificateRequest { csr_pem });
                    request.set_timeout(crate::identity::CALL_DEADLINE);
                    let chain = client
                        .renew_node_certificate(request)
                        .await
                        .map_err(|status| ControlPlaneError::RenewalRefused {
                            node: settings.node.clone(),
                            status,
                        })?
                        .into_inner()
                        .chain_pem;
                    let cert = accept_chain(&provider, &uri, &key_pem, &chain)?;
                    store(&settings, &key_pem, &chain)?;
                    Ok::<_, ControlPlaneError>(cert)
                }
                .await;
                match renewed {
                    Ok(cert) => {
                        credentials.install(cert.certified.clone());
                        not_before = cert.not_before;
                        not_after = cert.not_after;
                        backoff.reset();
                        tracing::info!(target: "audit", event = "node_certificate_renewed", node = %settings.node, "node certificate renewed");
                    }
                    Err(e) => {
                        let retry = backoff.next_delay();
                        tracing::warn!(target: "audit", event = "node_certificate_renewal_failed", node = %settings.node, error = %e, retry_in = ?retry, "node certificate renewal failed");
                        tokio::time::sleep(retry).await;
                        // The next turn waits no more: renew_at has passed.
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resumed session would present the node certificate of its first handshake (expired,
    /// after a 2-minute node certificate: the control plane then cut the node off in a loop).
    #[test]
    fn every_control_plane_connection_is_a_full_handshake() {
        let provider = crate::tls::provider(false);
        let verifier = Arc::new(ControlPlaneVerifier {
            provider: provider.clone(),
            bootstrap: Vec::new(),
            bundle: Arc::new(TrustBundle::default()),
            expected: meshlet_spiffe::control_plane_id("td"),
        });
        let (ready, _) = tokio::sync::watch::channel(false);
        let credentials = Arc::new(NodeCredentials {
            current: RwLock::new(None),
            ready,
            renew_now: Notify::new(),
        });
        for node in [Some(credentials), None] {
            let config = link_tls(&provider, verifier.clone(), node).expect("config");
            assert!(
                format!("{:?}", config.resumption).contains("Disabled"),
                "{:?}",
                config.resumption
            );
            assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        }
    }

    #[test]
    fn the_node_key_and_chain_are_stored_together_and_read_back_as_a_pair() {
        let dir = std::env::temp_dir().join(format!("meshlet-node-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let settings = ControlPlaneSettings {
            address: "unix:/nowhere".into(),
            node: "node-1".into(),
            trust_domain: "td".into(),
            roots_file: dir.join("roots.pem"),
            identity_dir: dir.clone(),
            token_file: None,
            service_account_token_file: None,
        };
        let uri = ControlPlane::expected_node_uri(&settings);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.clone().try_into().expect("uri"))];
        let cert = params.self_signed(&key).expect("cert");
        // Files of an earlier version, with another key: replaced, never paired again.
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("node.key"), "stale").expect("write");
        store(&settings, &key.serialize_pem(), &[cert.pem()]).expect("store");
        assert!(!dir.join("node.key").exists() && !dir.join("node.pem").exists());
        let (key_pem, chain_pem) = load_stored(&dir).expect("stored");
        let provider = crate::tls::provider(false);
        let node = accept_chain(&provider, &uri, &key_pem, &[chain_pem]).expect("a pair");
        assert_eq!(node.certified.cert.len(), 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(IDENTITY_FILE))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
