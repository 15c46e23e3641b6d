//! Verifying a peer's certificate chain: the checks, each with its own reason, and the rustls
//! verifiers for both directions built on them.
//!
//! The order is the order an operator reads: what the leaf says (one SPIFFE ID, not a CA, the
//! right usages, an acceptable key), then whether it chains to a root of *its own* trust
//! domain, is within its validity (60 s of clock skew allowed) and is not revoked by a CRL that
//! is itself current. [`check_chain`] collects every reason (for `meshlet certs verify`); the
//! handshake verifiers refuse on the first.
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use x509_parser::{
    oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
        OID_SIG_ED25519,
    },
    prelude::{FromDer, X509Certificate},
    public_key::PublicKey,
};

use super::bundle::{BundleState, TrustBundle};
use crate::identity::SpiffeId;

/// Clock skew tolerated between nodes when checking validity periods.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);

/// Which side the peer is on: the EKU it must allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The peer is a client (checked by our server side).
    ClientAuth,
    /// The peer is a server (checked by our client side).
    ServerAuth,
}

impl Purpose {
    fn name(self) -> &'static str {
        match self {
            Purpose::ClientAuth => "clientAuth",
            Purpose::ServerAuth => "serverAuth",
        }
    }

    fn usage(self) -> webpki::KeyUsage {
        match self {
            Purpose::ClientAuth => webpki::KeyUsage::client_auth(),
            Purpose::ServerAuth => webpki::KeyUsage::server_auth(),
        }
    }
}

/// Why a peer certificate was refused. [`Rejection::reason`] is the bounded metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("no certificate presented")]
    NoCertificate,
    #[error("certificate is not valid X.509 DER: {0}")]
    Malformed(String),
    #[error("subject alternative names: {0} (a workload certificate has exactly one URI SAN, its SPIFFE ID)")]
    San(String),
    #[error("{0}")]
    SpiffeId(String),
    #[error("no trust bundle for trust domain {0:?}: the control plane federates no such domain")]
    UnknownTrustDomain(String),
    #[error("the leaf is a CA certificate (basicConstraints cA=true)")]
    CaLeaf,
    #[error("the leaf's key usage includes {0}: a workload certificate may not sign certificates or CRLs")]
    LeafKeyUsage(&'static str),
    #[error("the extended key usage does not include {0}")]
    ExtendedKeyUsage(&'static str),
    #[error("{cert} has {what}: only P-256, P-384, Ed25519 or RSA of at least 2048 bits")]
    WeakKey { cert: String, what: String },
    #[error("{cert} expired at {at} (past the {skew} s of allowed clock skew)", skew = CLOCK_SKEW.as_secs())]
    Expired { cert: String, at: String },
    #[error("{cert} is not valid before {at} (past the {skew} s of allowed clock skew)", skew = CLOCK_SKEW.as_secs())]
    NotYetValid { cert: String, at: String },
    #[error("the chain does not lead to a root of trust domain {domain:?}: {detail}")]
    UnknownIssuer { domain: String, detail: String },
    #[error("a certificate in the chain is revoked by a CRL of its issuer")]
    Revoked,
    #[error("the CRL of an issuer in the chain is out of date; its certificates are refused until a fresh CRL comes")]
    CrlExpired,
    #[error("chain rejected: {0}")]
    Chain(String),
    #[error("server presented {got}, but the destination may only be {expected}")]
    IdentityMismatch { got: String, expected: String },
}

impl Rejection {
    /// A short, bounded label for metrics and tests.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::NoCertificate => "no_certificate",
            Rejection::Malformed(_) => "bad_certificate",
            Rejection::San(_) => "bad_san",
            Rejection::SpiffeId(_) => "bad_spiffe_id",
            Rejection::UnknownTrustDomain(_) => "unknown_trust_domain",
            Rejection::CaLeaf => "ca_leaf",
            Rejection::LeafKeyUsage(_) => "leaf_key_usage",
            Rejection::ExtendedKeyUsage(_) => "extended_key_usage",
            Rejection::WeakKey { .. } => "weak_key",
            Rejection::Expired { .. } => "certificate_expired",
            Rejection::NotYetValid { .. } => "certificate_not_yet_valid",
            Rejection::UnknownIssuer { .. } => "unknown_issuer",
            Rejection::Revoked => "revoked",
            Rejection::CrlExpired => "crl_expired",
            Rejection::Chain(_) => "bad_chain",
            Rejection::IdentityMismatch { .. } => "identity_mismatch",
        }
    }

    /// Every label [`Rejection::reason`] answers.
    pub const REASONS: &'static [&'static str] = &[
        "no_certificate",
        "bad_certificate",
        "bad_san",
        "bad_spiffe_id",
        "unknown_trust_domain",
        "ca_leaf",
        "leaf_key_usage",
        "extended_key_usage",
        "weak_key",
        "certificate_expired",
        "certificate_not_yet_valid",
        "unknown_issuer",
        "revoked",
        "crl_expired",
        "bad_chain",
        "identity_mismatch",
    ];

    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// The one URI SAN of a certificate, parsed as a workload SPIFFE ID.
pub fn spiffe_id_of(cert: &X509Certificate<'_>) -> Result<SpiffeId, Rejection> {
    let uri = meshlet_spiffe::single_uri_san(cert).map_err(|e| Rejection::San(e.to_string()))?;
    SpiffeId::parse(uri).map_err(|e| Rejection::SpiffeId(e.to_string()))
}

fn describe(index: usize) -> String {
    if index == 0 {
        "the leaf".into()
    } else {
        format!("intermediate #{index}")
    }
}

/// Only keys that the hardening guides accept.
fn check_key(index: usize, cert: &X509Certificate<'_>) -> Result<(), Rejection> {
    let spki = cert.public_key();
    let weak = |what: String| Rejection::WeakKey {
        cert: describe(index),
        what,
    };
    let algorithm = &spki.algorithm.algorithm;
    if *algorithm == OID_SIG_ED25519 {
        return Ok(());
    }
    if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 || c == OID_NIST_EC_P384 => Ok(()),
            Some(c) => Err(weak(format!("an EC key on curve {c}"))),
            None => Err(weak("an EC key without a named curve".into())),
        };
    }
    if *algorithm == OID_PKCS1_RSAENCRYPTION {
        return match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) if rsa.key_size() >= 2048 => Ok(()),
            Ok(PublicKey::RSA(rsa)) => Err(weak(format!("a {}-bit RSA key", rsa.key_size()))),
            _ => Err(weak("an unreadable RSA key".into())),
        };
    }
    Err(weak(format!("a key of algorithm {algorithm}")))
}

/// The leaf's own fields: not a CA, no certificate or CRL signing, the purpose in its EKU.
fn check_leaf_usage(cert: &X509Certificate<'_>, purpose: Purpose, out: &mut Vec<Rejection>) {
    if cert.is_ca() {
        out.push(Rejection::CaLeaf);
    }
    match cert.key_usage() {
        Ok(Some(ku)) if ku.value.key_cert_sign() => {
            out.push(Rejection::LeafKeyUsage("keyCertSign"))
        }
        Ok(Some(ku)) if ku.value.crl_sign() => out.push(Rejection::LeafKeyUsage("cRLSign")),
        Ok(_) => {}
        Err(e) => out.push(Rejection::Malformed(format!("key usage: {e}"))),
    }
    match cert.extended_key_usage() {
        Ok(Some(eku)) => {
            let ok = match purpose {
                Purpose::ClientAuth => eku.value.client_auth,
                Purpose::ServerAuth => eku.value.server_auth,
            };
            if !ok {
                out.push(Rejection::ExtendedKeyUsage(purpose.name()));
            }
        }
        Ok(None) => {}
        Err(e) => out.push(Rejection::Malformed(format!("extended key usage: {e}"))),
    }
}

fn unix(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default())
}

fn rfc3339(t: i64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64))
        .to_string()
}

/// Validity of every certificate in the chain, with [`CLOCK_SKEW`] either side.
fn check_validity(certs: &[X509Certificate<'_>], now: SystemTime, out: &mut Vec<Rejection>) {
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let skew = CLOCK_SKEW.as_secs() as i64;
    for (i, cert) in certs.iter().enumerate() {
        let validity = cert.validity();
        if validity.not_after.timestamp() + skew < now {
            out.push(Rejection::Expired {
                cert: describe(i),
                at: rfc3339(validity.not_after.timestamp()),
            });
        } else if validity.not_before.timestamp() - skew > now {
            out.push(Rejection::NotYetValid {
                cert: describe(i),
                at: rfc3339(validity.not_before.timestamp()),
            });
        }
    }
}

const OUTSIDE_VALIDITY: &str = "a certificate is outside its validity period";

/// The path to a root of `domain`, with revocation against the bundle's CRLs.
fn check_path(
    provider: &CryptoProvider,
    bundle: &BundleState,
    domain: &str,
    chain: &[CertificateDer<'_>],
    now: SystemTime,
    purpose: Purpose,
) -> Result<(), Rejection> {
    let Some(roots) = bundle.domains.get(domain) else {
        return Err(Rejection::UnknownTrustDomain(domain.to_string()));
    };
    let ee = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| Rejection::Malformed(e.to_string()))?;
    let crl_refs: Vec<&webpki::CertRevocationList<'_>> = bundle.crls.iter().collect();
    let verify_at = |at: SystemTime| {
        let revocation = webpki::RevocationOptionsBuilder::new(&crl_refs)
            .ok()
            .map(|b| {
                b.with_depth(webpki::RevocationCheckDepth::Chain)
                    .with_status_policy(webpki::UnknownStatusPolicy::Allow)
                    .with_expiration_policy(webpki::ExpirationPolicy::Enforce)
                    .build()
            });
        ee.verify_for_usage(
            provider.signature_verification_algorithms.all,
            &roots.anchors,
            &chain[1..],
            unix(at),
            purpose.usage(),
            revocation,
            None,
        )
        .map(|_| ())
    };
    // Validity (with skew) is checked on its own; here a certificate just outside its period
    // is retried at the edge of the allowed skew, so only the path itself decides.
    let result = match verify_at(now) {
        Err(webpki::Error::CertExpired { .. }) => verify_at(now - CLOCK_SKEW),
        Err(webpki::Error::CertNotValidYet { .. }) => verify_at(now + CLOCK_SKEW),
        other => other,
    };
    result.map_err(|e| match e {
        webpki::Error::UnknownIssuer => Rejection::UnknownIssuer {
            domain: domain.to_string(),
            detail: format!(
                "no path from the presented chain to {}",
                roots.subjects.join(" or ")
            ),
        },
        webpki::Error::CertRevoked => Rejection::Revoked,
        webpki::Error::CrlExpired { .. } => Rejection::CrlExpired,
        webpki::Error::CaUsedAsEndEntity => Rejection::CaLeaf,
        webpki::Error::RequiredEkuNotFoundContext(_) => Rejection::ExtendedKeyUsage(purpose.name()),
        webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
            Rejection::Chain(OUTSIDE_VALIDITY.into())
        }
        other => Rejection::Chain(other.to_string()),
    })
}

/// Every reason `chain` (leaf first) fails for `purpose` against `bundle`, or the leaf's
/// SPIFFE ID when none does.
pub fn check_chain(
    provider: &CryptoProvider,
    bundle: &BundleState,
    chain: &[CertificateDer<'_>],
    now: SystemTime,
    purpose: Purpose,
) -> Result<SpiffeId, Vec<Rejection>> {
    if chain.is_empty() {
        return Err(vec![Rejection::NoCertificate]);
    }
    let mut parsed = Vec::with_capacity(chain.len());
    for der in chain {
        match X509Certificate::from_der(der) {
            Ok((_, cert)) => parsed.push(cert),
            Err(e) => return Err(vec![Rejection::Malformed(e.to_string())]),
        }
    }
    let mut out = Vec::new();
    let id = spiffe_id_of(&parsed[0]).map_err(|e| out.push(e)).ok();
    check_leaf_usage(&parsed[0], purpose, &mut out);
    for (i, cert) in parsed.iter().enumerate() {
        if let Err(e) = check_key(i, cert) {
            out.push(e);
        }
    }
    check_validity(&parsed, now, &mut out);
    if let Some(id) = &id {
        if let Err(e) = check_path(provider, bundle, id.trust_domain(), chain, now, purpose) {
            let validity_said = out
                .iter()
                .any(|r| matches!(r, Rejection::Expired { .. } | Rejection::NotYetValid { .. }));
            let repeats = out.contains(&e)
                || (validity_said && e == Rejection::Chain(OUTSIDE_VALIDITY.into()));
            if !repeats {
                out.push(e);
            }
        }
    }
    match id {
        Some(id) if out.is_empty() => Ok(id),
        _ => Err(out),
    }
}

fn verify_for_handshake(
    provider: &CryptoProvider,
    bundle: &TrustBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    purpose: Purpose,
) -> Result<SpiffeId, rustls::Error> {
    let mut chain = Vec::with_capacity(1 + intermediates.len());
    chain.push(end_entity.clone());
    chain.extend(intermediates.iter().cloned());
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now.as_secs());
    check_chain(provider, &bundle.current(), &chain, now, purpose).map_err(|mut reasons| {
        reasons
            .drain(..)
            .next()
            .unwrap_or(Rejection::NoCertificate)
            .into_rustls()
    })
}

/// Whether the peer chain of a live connection still passes (after the bundle changed).
pub fn still_trusted(
    provider: &CryptoProvider,
    bundle: &BundleState,
    chain: &[CertificateDer<'static>],
    purpose: Purpose,
) -> Result<(), Rejection> {
    check_chain(provider, bundle, chain, SystemTime::now(), purpose)
        .map(|_| ())
        .map_err(|mut reasons| reasons.drain(..).next().unwrap_or(Rejection::NoCertificate))
}

/// Resolves when a live connection's peer chain stops passing: at every bundle change (a
/// new CRL, roots taken away) and when a certificate of the chain runs out. The connection
/// that awaits this closes then, so a revocation reaches tunnels that are already open.
pub async fn until_untrusted(
    provider: Arc<CryptoProvider>,
    bundle: Arc<TrustBundle>,
    chain: Vec<CertificateDer<'static>>,
    purpose: Purpose,
) -> Rejection {
    let mut revisions = bundle.subscribe();
    revisions.borrow_and_update();
    let expiry = chain
        .iter()
        .filter_map(|c| X509Certificate::from_der(c).ok())
        .map(|(_, c)| c.validity().not_after.timestamp())
        .min()
        .map(|t| SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64) + CLOCK_SKEW);
    loop {
        let wait = expiry
            .map(|t| {
                t.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO)
            })
            .unwrap_or(Duration::from_secs(24 * 3600))
            + Duration::from_millis(10);
        tokio::select! {
            changed = revisions.changed() => {
                if changed.is_err() {
                    // The agent is shutting down; nothing will change any more.
                    std::future::pending::<()>().await;
                }
            }
            _ = tokio::time::sleep(wait) => {}
        }
        if let Err(rejection) = still_trusted(&provider, &bundle.current(), &chain, purpose) {
            return rejection;
        }
    }
}

/// The [`Rejection`] inside a failed handshake's error, when a verifier made it.
pub fn rejection_of(error: &rustls::Error) -> Option<&Rejection> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<Rejection>()
        }
        _ => None,
    }
}

fn verify_signature(
    provider: &CryptoProvider,
    tls12: bool,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if tls12 {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider.signature_verification_algorithms,
        )
    } else {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider.signature_verification_algorithms,
        )
    }
}

/// Server side: demands a client certificate that passes [`check_chain`]. Which IDs may
/// connect is policy, decided after the handshake.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    pub(super) bundle: Arc<TrustBundle>,
    pub(super) provider: Arc<CryptoProvider>,
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
        verify_for_handshake(
            &self.provider,
            &self.bundle,
            end_entity,
            intermediates,
            now,
            Purpose::ClientAuth,
        )
        .map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(&self.provider, true, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(&self.provider, false, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Client side: the server must pass [`check_chain`] and present one of the identities the
/// control plane says the destination may have.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    pub(super) bundle: Arc<TrustBundle>,
    pub(super) provider: Arc<CryptoProvider>,
    pub(super) expected: Vec<SpiffeId>,
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
        let id = verify_for_handshake(
            &self.provider,
            &self.bundle,
            end_entity,
            intermediates,
            now,
            Purpose::ServerAuth,
        )?;
        if !self.expected.contains(&id) {
            return Err(Rejection::IdentityMismatch {
                got: id.to_string(),
                expected: self
                    .expected
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
            .into_rustls());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(&self.provider, true, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_signature(&self.provider, false, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet_proto::v1::{DiscoveryResponse, FederatedBundle};
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
        ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
        RevokedCertParams, SanType, SerialNumber,
    };
    use time::OffsetDateTime;

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(cn: &str, parent: Option<&Ca>) -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::default();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = match parent {
            Some(parent) => p.signed_by(&key, &parent.issuer).expect("sign"),
            None => p.self_signed(&key).expect("self-sign"),
        };
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    fn leaf_params(uri: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(uri.try_into().expect("uri"))];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.serial_number = Some(SerialNumber::from(7u64));
        p
    }

    fn issue(p: &CertificateParams, by: &Ca) -> CertificateDer<'static> {
        let key = KeyPair::generate().expect("key");
        p.signed_by(&key, &by.issuer).expect("sign").der().clone()
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem")
    }

    const ID: &str = "spiffe://cluster.local/ns/default/sa/web";

    struct World {
        root: Ca,
        int: Ca,
        partner: Ca,
    }

    fn world() -> World {
        let root = ca("root", None);
        let int = ca("int", Some(&root));
        World {
            partner: ca("partner root", None),
            root,
            int,
        }
    }

    fn bundle(w: &World, crls: Vec<String>) -> BundleState {
        BundleState::from_update(&DiscoveryResponse {
            trust_domain: "cluster.local".into(),
            trust_roots_pem: vec![w.root.pem.clone()],
            federated_bundles: vec![FederatedBundle {
                trust_domain: "partner.example".into(),
                roots_pem: vec![w.partner.pem.clone()],
            }],
            crls_pem: crls,
            ..Default::default()
        })
        .expect("bundle")
    }

    fn reasons(w: &World, b: &BundleState, leaf: CertificateDer<'static>) -> Vec<&'static str> {
        let provider = crate::tls::provider(false);
        match check_chain(
            &provider,
            b,
            &[leaf, der(&w.int.pem)],
            SystemTime::now(),
            Purpose::ClientAuth,
        ) {
            Ok(_) => vec![],
            Err(r) => r.iter().map(|r| r.reason()).collect(),
        }
    }

    fn crl(by: &Ca, serials: &[u64], next_update: OffsetDateTime) -> String {
        let now = OffsetDateTime::now_utc();
        CertificateRevocationListParams {
            this_update: now - Duration::from_secs(3600),
            next_update,
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - Duration::from_secs(60),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&by.issuer)
        .expect("crl")
        .pem()
        .expect("pem")
    }

    #[test]
    fn a_good_chain_passes_and_each_flaw_has_its_reason() {
        let w = world();
        let b = bundle(&w, vec![]);
        assert!(reasons(&w, &b, issue(&leaf_params(ID), &w.int)).is_empty());

        let now = OffsetDateTime::now_utc();
        let mut p = leaf_params(ID);
        p.not_before = now - Duration::from_secs(7200);
        p.not_after = now - Duration::from_secs(3600);
        assert_eq!(reasons(&w, &b, issue(&p, &w.int)), ["certificate_expired"]);
        let mut p = leaf_params(ID);
        p.not_after = now - Duration::from_secs(30);
        p.not_before = now - Duration::from_secs(3600);
        assert!(
            reasons(&w, &b, issue(&p, &w.int)).is_empty(),
            "within the 60 s skew"
        );
        let mut p = leaf_params(ID);
        p.not_before = now + Duration::from_secs(3600);
        p.not_after = now + Duration::from_secs(7200);
        assert_eq!(
            reasons(&w, &b, issue(&p, &w.int)),
            ["certificate_not_yet_valid"]
        );

        let mut p = leaf_params(ID);
        p.subject_alt_names.push(SanType::URI(
            "spiffe://cluster.local/ns/default/sa/db"
                .try_into()
                .expect("uri"),
        ));
        assert_eq!(reasons(&w, &b, issue(&p, &w.int)), ["bad_san"]);
        let mut p = leaf_params(ID);
        p.subject_alt_names = vec![SanType::DnsName("web.default".try_into().expect("dns"))];
        assert_eq!(reasons(&w, &b, issue(&p, &w.int)), ["bad_san"]);
        for bad in [
            "https://cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/",
            "spiffe://Cluster.Local/ns/default/sa/web",
            "spiffe://cluster.local/ns/../sa/web",
        ] {
            assert_eq!(
                reasons(&w, &b, issue(&leaf_params(bad), &w.int)),
                ["bad_spiffe_id"],
                "{bad}"
            );
        }
        assert_eq!(
            reasons(
                &w,
                &b,
                issue(
                    &leaf_params("spiffe://elsewhere.org/ns/default/sa/web"),
                    &w.int
                )
            ),
            ["unknown_trust_domain"]
        );
        // A cluster.local ID signed by the partner domain's root: not our roots.
        let leaf = issue(&leaf_params(ID), &w.partner);
        let provider = crate::tls::provider(false);
        let got = check_chain(
            &provider,
            &b,
            &[leaf],
            SystemTime::now(),
            Purpose::ClientAuth,
        )
        .expect_err("refused");
        assert_eq!(got[0].reason(), "unknown_issuer");

        let mut p = leaf_params(ID);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        assert!(reasons(&w, &b, issue(&p, &w.int)).contains(&"ca_leaf"));
        let mut p = leaf_params(ID);
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
        assert!(reasons(&w, &b, issue(&p, &w.int)).contains(&"leaf_key_usage"));
        let mut p = leaf_params(ID);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
        assert!(reasons(&w, &b, issue(&p, &w.int)).contains(&"extended_key_usage"));
    }

    #[test]
    fn crls_revoke_and_an_out_of_date_crl_fails_closed() {
        let w = world();
        let leaf = issue(&leaf_params(ID), &w.int);
        let fresh = OffsetDateTime::now_utc() + Duration::from_secs(3600);
        let b = bundle(&w, vec![crl(&w.int, &[7], fresh)]);
        assert_eq!(reasons(&w, &b, leaf.clone()), ["revoked"]);
        let b = bundle(&w, vec![crl(&w.int, &[8], fresh)]);
        assert!(reasons(&w, &b, leaf.clone()).is_empty());
        let stale = OffsetDateTime::now_utc() - Duration::from_secs(10);
        let b = bundle(&w, vec![crl(&w.int, &[8], stale)]);
        assert_eq!(reasons(&w, &b, leaf), ["crl_expired"]);
    }

    #[test]
    fn bundles_refuse_bad_pieces_whole() {
        let w = world();
        let bad_root = BundleState::from_update(&DiscoveryResponse {
            trust_domain: "cluster.local".into(),
            trust_roots_pem: vec![
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            ],
            ..Default::default()
        });
        assert!(bad_root.is_err());
        let own_again = BundleState::from_update(&DiscoveryResponse {
            trust_domain: "cluster.local".into(),
            trust_roots_pem: vec![w.root.pem.clone()],
            federated_bundles: vec![FederatedBundle {
                trust_domain: "cluster.local".into(),
                roots_pem: vec![w.partner.pem.clone()],
            }],
            ..Default::default()
        });
        assert!(matches!(
            own_again,
            Err(crate::tls::TlsError::DuplicateDomain(_))
        ));
    }
}
