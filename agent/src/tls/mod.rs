//! TLS for the tunnel: the crypto provider and protocol settings, the trust bundle, and the
//! SPIFFE verifiers used in both directions.
//!
//! Peers are authenticated by SPIFFE ID, not DNS name: the verifiers check the chain with
//! webpki against the trust bundle of the mesh, then read the single URI SAN of the leaf.
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    crypto::CryptoProvider, pki_types::CertificateDer, SignatureScheme, SupportedProtocolVersion,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::{IdentityStore, SpiffeId};

pub mod bundle;
pub mod verify;

pub use bundle::{BundleState, TrustBundle};
pub use verify::{Purpose, Rejection};
use verify::{SpiffeClientVerifier, SpiffeServerVerifier};

/// ALPN of the tunnel: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate is not valid X.509 DER: {0}")]
    Parse(String),
    #[error("a trust root of {domain:?} is unusable: {reason}")]
    BadRoot { domain: String, reason: String },
    #[error("no trust roots for trust domain {0:?}")]
    NoRoots(String),
    #[error(
        "trust domain {0:?} has two bundles (federated bundles must name other domains, once each)"
    )]
    DuplicateDomain(String),
    #[error("a CRL is unusable: {0}")]
    BadCrl(String),
    #[error("the CA's signer chain is unusable: {0}")]
    BadSigner(String),
}

/// The protocol settings of every tunnel: TLS 1.3 only unless the operator opts in to 1.2,
/// and then only ECDHE key exchange with AEAD suites.
#[derive(Debug)]
pub struct TlsSettings {
    pub provider: Arc<CryptoProvider>,
    pub versions: Vec<&'static SupportedProtocolVersion>,
}

impl TlsSettings {
    pub fn new(allow_tls12: bool) -> Self {
        Self {
            provider: provider(allow_tls12),
            versions: if allow_tls12 {
                vec![&rustls::version::TLS13, &rustls::version::TLS12]
            } else {
                vec![&rustls::version::TLS13]
            },
        }
    }
}

/// The crypto provider: aws-lc-rs (its FIPS module with the `fips` feature), TLS 1.3 suites
/// AES-256-GCM, AES-128-GCM, CHACHA20-POLY1305; with TLS 1.2 allowed, the ECDHE AEAD suites of
/// 1.2 as well.
pub fn provider(allow_tls12: bool) -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::cipher_suite as suite;
    #[cfg(feature = "fips")]
    let mut provider = rustls::crypto::default_fips_provider();
    #[cfg(not(feature = "fips"))]
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    let mut suites = vec![
        suite::TLS13_AES_256_GCM_SHA384,
        suite::TLS13_AES_128_GCM_SHA256,
    ];
    // CHACHA20-POLY1305 is not a FIPS-approved algorithm.
    #[cfg(not(feature = "fips"))]
    suites.push(suite::TLS13_CHACHA20_POLY1305_SHA256);
    if allow_tls12 {
        suites.extend([
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            suite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        ]);
        #[cfg(not(feature = "fips"))]
        suites.extend([
            suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ]);
    }
    provider.cipher_suites = suites;
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

/// A certificate's DER, boiled down for comparing credentials on every checkout: a checkout
/// may look at every connection of its destination (a hundred after a burst), and comparing
/// whole certificates made that a measurable part of a new connection's cost. A collision
/// would only let a stream onto a connection made with another certificate of ours that the
/// peer verified, not past any check.
pub fn fingerprint(der: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    der.hash(&mut hasher);
    hasher.finish()
}

pub fn leaf_info(der: &CertificateDer<'_>) -> Result<LeafInfo, TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::Parse(e.to_string()))?;
    let to_time = |t: i64| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    Ok(LeafInfo {
        identity: verify::spiffe_id_of(&cert).ok(),
        public_key: cert.public_key().raw.to_vec(),
        not_before: to_time(cert.validity().not_before.timestamp()),
        not_after: to_time(cert.validity().not_after.timestamp()),
        serial: cert.raw_serial_as_string(),
        issuer: cert.issuer().to_string(),
    })
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
    settings: &TlsSettings,
    bundle: Arc<TrustBundle>,
    identities: Arc<IdentityStore>,
    identity: SpiffeId,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let verifier = Arc::new(SpiffeClientVerifier {
        bundle,
        provider: settings.provider.clone(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(settings.provider.clone())
        .with_protocol_versions(&settings.versions)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(IdentityCertResolver {
            identities,
            identity,
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: a resumed session skips certificate verification, so a client whose
    // certificate was revoked after its first handshake could come back on a ticket. Every
    // tunnel is a full handshake against the bundle and CRLs in force (tunnels are pooled,
    // so this costs one handshake per peer, not per connection).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    #[cfg(feature = "fips")]
    assert!(
        config.fips(),
        "the fips build made a server config that is not FIPS"
    );
    Ok(Arc::new(config))
}

/// The tunnel client's config for a source pod with `identity` towards a destination that
/// may present any of `expected`.
pub fn client_config(
    settings: &TlsSettings,
    bundle: Arc<TrustBundle>,
    identities: Arc<IdentityStore>,
    identity: SpiffeId,
    expected: Vec<SpiffeId>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let verifier = Arc::new(SpiffeServerVerifier {
        bundle,
        provider: settings.provider.clone(),
        expected,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(settings.provider.clone())
        .with_protocol_versions(&settings.versions)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(IdentityCertResolver {
            identities,
            identity,
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Nor on the client side: the server's chain is verified at every handshake.
    config.resumption = rustls::client::Resumption::disabled();
    #[cfg(feature = "fips")]
    assert!(
        config.fips(),
        "the fips build made a client config that is not FIPS"
    );
    Ok(Arc::new(config))
}

/// The SPIFFE ID of an authenticated peer (after the handshake).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let leaf = certs?.first()?;
    leaf_info(leaf).ok()?.identity
}

/// A failed handshake in words: the verifier's own reason when it refused the peer.
pub fn describe_handshake_error(error: &std::io::Error) -> String {
    error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(verify::rejection_of)
        .map(|r| format!("peer certificate refused ({}): {r}", r.reason()))
        .unwrap_or_else(|| error.to_string())
}

/// A short, bounded reason for a failed TLS handshake (a metrics label).
pub fn handshake_failure_reason(error: &std::io::Error) -> &'static str {
    use rustls::{CertificateError, Error, PeerIncompatible};
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return "io";
    };
    if let Some(rejection) = verify::rejection_of(tls) {
        return rejection.reason();
    }
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
        Error::PeerIncompatible(
            PeerIncompatible::SupportedVersionsExtensionRequired
            | PeerIncompatible::Tls12NotOffered
            | PeerIncompatible::Tls12NotOfferedOrEnabled
            | PeerIncompatible::ServerDoesNotSupportTls12Or13
            | PeerIncompatible::ServerTlsVersionIsDisabledByOurConfig,
        ) => "tls_version",
        Error::PeerIncompatible(_) | Error::NoApplicationProtocol => "peer_incompatible",
        Error::AlertReceived(_) => "alert_received",
        Error::InappropriateMessage { .. } | Error::InappropriateHandshakeMessage { .. } => {
            "protocol"
        }
        Error::General(_) => "general",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls13_only_by_default_and_tls12_only_with_ecdhe_aead() {
        let strict = TlsSettings::new(false);
        assert_eq!(strict.versions.len(), 1);
        assert!(strict
            .provider
            .cipher_suites
            .iter()
            .all(|s| s.version() == &rustls::version::TLS13));
        let names: Vec<String> = strict
            .provider
            .cipher_suites
            .iter()
            .map(|s| format!("{:?}", s.suite()))
            .collect();
        assert!(names.iter().any(|n| n.contains("AES_256_GCM")), "{names:?}");
        let relaxed = TlsSettings::new(true);
        assert_eq!(relaxed.versions.len(), 2);
        for suite in &relaxed.provider.cipher_suites {
            let name = format!("{:?}", suite.suite());
            if suite.version() == &rustls::version::TLS12 {
                assert!(name.contains("ECDHE"), "{name} has no forward secrecy");
                assert!(
                    name.contains("GCM") || name.contains("CHACHA20_POLY1305"),
                    "{name} is not an AEAD suite"
                );
            }
        }
        assert!(relaxed
            .provider
            .cipher_suites
            .iter()
            .any(|s| s.version() == &rustls::version::TLS12));
    }

    /// Both tunnel configs build for either setting, speak h2 and, in a `fips` build, pass the
    /// FIPS assertions they carry (`cargo test -p meshlet-agent --features fips --lib tls`).
    #[test]
    fn tunnel_configs_build_and_offer_h2() {
        struct NoCa;
        #[tonic::async_trait]
        impl crate::identity::CaClient for NoCa {
            async fn sign(
                &self,
                identity: &SpiffeId,
                _csr_pem: String,
                _lifetime: std::time::Duration,
            ) -> Result<Vec<String>, crate::identity::CaError> {
                Err(crate::identity::CaError::Refused {
                    identity: identity.clone(),
                    status: tonic::Status::unavailable("no CA in this test"),
                })
            }
        }
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/a").expect("id");
        let peer = SpiffeId::parse("spiffe://td/ns/b/sa/b").expect("id");
        for allow_tls12 in [false, true] {
            let settings = TlsSettings::new(allow_tls12);
            let identities = Arc::new(IdentityStore::new(
                Arc::new(NoCa),
                settings.provider.clone(),
                std::time::Duration::from_secs(3600),
                Arc::new(crate::metrics::Metrics::new("node-1")),
            ));
            let bundle = Arc::new(TrustBundle::default());
            let server = server_config(&settings, bundle.clone(), identities.clone(), id.clone())
                .expect("server config");
            let client = client_config(
                &settings,
                bundle,
                identities,
                id.clone(),
                vec![peer.clone()],
            )
            .expect("client config");
            assert_eq!(server.alpn_protocols, vec![ALPN_H2.to_vec()]);
            assert_eq!(client.alpn_protocols, vec![ALPN_H2.to_vec()]);
            assert_eq!(server.fips(), cfg!(feature = "fips"));
            // No resumption, which would skip verification (and so revocation).
            assert_eq!(server.send_tls13_tickets, 0);
            assert!(!server.session_storage.can_cache());
            assert!(!server.ticketer.enabled());
            assert!(
                format!("{:?}", client.resumption).contains("Disabled"),
                "{:?}",
                client.resumption
            );
            assert_eq!(client.fips(), cfg!(feature = "fips"));
        }
    }
}
