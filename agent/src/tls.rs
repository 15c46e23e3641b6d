//! TLS for the tunnel: the crypto provider and protocol settings, the trust bundle, and the
//! SPIFFE verifiers used in both directions.
//!
//! Peers are authenticated by SPIFFE ID, not DNS name: the verifiers check the chain with
//! webpki against the trust bundle of the mesh, then read the single URI SAN of the leaf.
use std::{
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::identity::{IdentityStore, SpiffeId};

/// ALPN of the tunnel: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate is not valid X.509 DER: {0}")]
    Parse(String),
    #[error("trust root is unusable: {0}")]
    BadRoot(String),
    #[error("no trust roots: the control plane has not sent a trust bundle yet")]
    NoRoots,
}

/// The crypto provider: aws-lc-rs, TLS 1.3 suites only (AES-256-GCM, AES-128-GCM,
/// CHACHA20-POLY1305).
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// What the agent needs to know about a leaf certificate.
pub struct LeafInfo {
    /// The SPIFFE ID, when the leaf has exactly one URI SAN and it is one.
    pub identity: Option<SpiffeId>,
    pub public_key: Vec<u8>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
    /// The issuer's distinguished name.
    pub issuer: String,
}

pub fn leaf_info(der: &CertificateDer<'_>) -> Result<LeafInfo, TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::Parse(e.to_string()))?;
    let to_time = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok(LeafInfo {
        identity: spiffe_id_of(&cert).ok(),
        public_key: cert.public_key().raw.to_vec(),
        not_before: to_time(cert.validity().not_before.timestamp()),
        not_after: to_time(cert.validity().not_after.timestamp()),
        serial: cert.raw_serial_as_string(),
        issuer: cert.issuer().to_string(),
    })
}

/// The peer's SPIFFE ID: exactly one URI SAN, and a valid workload SPIFFE ID.
fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, String> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad SAN extension: {e}"))?
        .ok_or_else(|| "no SAN extension (a SPIFFE ID is a URI SAN)".to_string())?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => SpiffeId::parse(one).map_err(|e| e.to_string()),
        [] => Err("no URI SAN".to_string()),
        _ => Err(format!("{} URI SANs; exactly one is allowed", uris.len())),
    }
}

/// The roots that workload certificates must chain to, replaced as the control plane pushes.
#[derive(Default)]
pub struct TrustBundle {
    roots: RwLock<Arc<Vec<rustls_pki_types::TrustAnchor<'static>>>>,
}

impl TrustBundle {
    /// Replaces the roots (PEM). Refuses the whole bundle if any root is bad.
    pub fn replace(&self, roots_pem: &[String]) -> Result<usize, TlsError> {
        use rustls_pki_types::pem::PemObject;
        let mut anchors = Vec::new();
        for pem in roots_pem {
            for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                let der = der.map_err(|e| TlsError::BadRoot(e.to_string()))?;
                let anchor = webpki::anchor_from_trusted_cert(&der)
                    .map_err(|e| TlsError::BadRoot(e.to_string()))?
                    .to_owned();
                anchors.push(anchor);
            }
        }
        if anchors.is_empty() {
            return Err(TlsError::NoRoots);
        }
        let n = anchors.len();
        *self.roots.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(anchors);
        Ok(n)
    }

    fn anchors(&self) -> Arc<Vec<rustls_pki_types::TrustAnchor<'static>>> {
        self.roots.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Checks the chain for `usage` and returns the leaf's SPIFFE ID.
    fn verify(
        &self,
        provider: &CryptoProvider,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, rustls::Error> {
        let anchors = self.anchors();
        if anchors.is_empty() {
            return Err(rustls::Error::General(TlsError::NoRoots.to_string()));
        }
        let (_, cert) = X509Certificate::from_der(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        if cert.is_ca() {
            return Err(rustls::Error::General(
                "peer leaf is a CA certificate".into(),
            ));
        }
        let id = spiffe_id_of(&cert).map_err(|e| {
            rustls::Error::General(format!("peer certificate has no usable SPIFFE ID: {e}"))
        })?;
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        ee.verify_for_usage(
            provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("peer chain rejected: {e}")))?;
        Ok(id)
    }
}

/// Only TLS 1.3 is offered, so a TLS 1.2 signature never needs checking.
fn refuse_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

fn verify_tls13(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// Server side: demands a client certificate that chains to the bundle and carries a SPIFFE
/// ID. Which IDs may connect is policy, decided after the handshake.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: Arc<TrustBundle>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustBundle({} roots)", self.anchors().len())
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.bundle
            .verify(
                &self.provider,
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
            )
            .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client side: the server must chain to the bundle and present one of the identities the
/// control plane says the destination may have.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: Arc<TrustBundle>,
    provider: Arc<CryptoProvider>,
    expected: Vec<SpiffeId>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let id = self.bundle.verify(
            &self.provider,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if !self.expected.contains(&id) {
            return Err(rustls::Error::General(format!(
                "server presented {id}, but the destination may only be {}",
                self.expected
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
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
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Presents the current certificate of one identity (rotations take effect at the next
/// handshake without rebuilding the config).
#[derive(Debug)]
struct IdentityCertResolver {
    identities: Arc<IdentityStore>,
    identity: SpiffeId,
}

impl std::fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdentityStore")
    }
}

impl IdentityCertResolver {
    fn current(&self) -> Option<Arc<rustls::sign::CertifiedKey>> {
        match self.identities.current(&self.identity) {
            Ok(cert) => Some(cert.certified_key.clone()),
            Err(e) => {
                tracing::warn!(identity = %self.identity, "no certificate to present: {e}");
                None
            }
        }
    }
}

impl rustls::server::ResolvesServerCert for IdentityCertResolver {
    fn resolve(
        &self,
        _client_hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.current()
    }
}

impl rustls::client::ResolvesClientCert for IdentityCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The tunnel server's config for a pod with `identity`: TLS 1.3, ALPN h2, client certificate
/// required and verified against the bundle.
pub fn server_config(
    provider: Arc<CryptoProvider>,
    bundle: Arc<TrustBundle>,
    identities: Arc<IdentityStore>,
    identity: SpiffeId,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let verifier = Arc::new(SpiffeClientVerifier {
        bundle,
        provider: provider.clone(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(IdentityCertResolver {
            identities,
            identity,
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The tunnel client's config for a source pod with `identity` towards a destination that
/// may present any of `expected`.
pub fn client_config(
    provider: Arc<CryptoProvider>,
    bundle: Arc<TrustBundle>,
    identities: Arc<IdentityStore>,
    identity: SpiffeId,
    expected: Vec<SpiffeId>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let verifier = Arc::new(SpiffeServerVerifier {
        bundle,
        provider: provider.clone(),
        expected,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(IdentityCertResolver {
            identities,
            identity,
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// The SPIFFE ID of an authenticated peer (after the handshake).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    leaf_info(leaf).ok()?.identity
}

/// A short, bounded reason for a failed TLS handshake (a metrics label).
pub fn handshake_failure_reason(error: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return "io";
    };
    match tls {
        Error::InvalidCertificate(CertificateError::Expired)
        | Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => {
            "certificate_expired"
        }
        Error::InvalidCertificate(CertificateError::NotValidYet)
        | Error::InvalidCertificate(CertificateError::NotValidYetContext { .. }) => {
            "certificate_not_yet_valid"
        }
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_issuer",
        Error::InvalidCertificate(CertificateError::Revoked) => "revoked",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::NoCertificatesPresented => "no_certificate",
        Error::PeerIncompatible(_) => "peer_incompatible",
        Error::AlertReceived(_) => "alert_received",
        Error::InappropriateMessage { .. } | Error::InappropriateHandshakeMessage { .. } => {
            "protocol"
        }
        Error::General(_) => "general",
        _ => "other",
    }
}
