//! The control plane's certificate authority: signs workload certificates with an
//! intermediate, deciding every field itself.
use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, ExtendedKeyUsagePurpose,
    IsCa, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::pki::Signer;

/// Why a certificate was not issued.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CSR is not a valid, self-signed PKCS#10 request: {0}")]
    BadCsr(rcgen::Error),
    #[error("requested identity {identity:?} is not a SPIFFE ID of trust domain {trust_domain:?} (expected spiffe://{trust_domain}/ns/<ns>/sa/<sa>)")]
    BadIdentity {
        identity: String,
        trust_domain: String,
    },
    #[error("signing failed: {0}")]
    Signing(rcgen::Error),
}

/// Namespace and service account named by a workload SPIFFE ID of our trust domain.
pub fn parse_identity(trust_domain: &str, identity: &str) -> Option<(String, String)> {
    let id = meshlet_spiffe::SpiffeId::parse(identity).ok()?;
    id.is_in(trust_domain)
        .then(|| (id.namespace().to_string(), id.service_account().to_string()))
}

/// Signs workload certificates with the current signer (swapped in place when the operator's
/// files change).
pub struct CertificateAuthority {
    trust_domain: String,
    signer: RwLock<Arc<Signer>>,
    max_lifetime: Duration,
    /// The mesh settings' cap (Kubernetes ConfigMap `meshlet`, `certificateLifetime`), in
    /// seconds; 0: none. Never above `max_lifetime`.
    mesh_max_lifetime: std::sync::atomic::AtomicU64,
}

/// A certificate the CA issued.
pub struct Issued {
    /// Leaf first, then the signer's chain; PEM each.
    pub chain_pem: Vec<String>,
    /// Hex serial of the leaf.
    pub serial: String,
    pub lifetime: Duration,
}

/// The shortest certificate the CA issues.
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);

/// The fields of every workload certificate: decided here, never taken from a CSR. One
/// critical URI SAN (the subject is empty), not a CA, digitalSignature only, serverAuth +
/// clientAuth, and a lifetime that does not outlive the signer.
pub fn leaf_params(
    identity: &str,
    lifetime: Duration,
    signer_not_after: OffsetDateTime,
) -> Result<CertificateParams, rcgen::Error> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    // A little backdating absorbs clock skew between nodes.
    params.not_before = now - Duration::from_secs(60);
    params.not_after = (now + lifetime).min(signer_not_after);
    params.serial_number = Some(SerialNumber::from_slice(&rand_serial()));
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

impl CertificateAuthority {
    pub fn new(trust_domain: &str, signer: Signer, max_lifetime: Duration) -> Self {
        Self {
            trust_domain: trust_domain.to_string(),
            signer: RwLock::new(Arc::new(signer)),
            max_lifetime,
            mesh_max_lifetime: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The mesh settings' certificate lifetime, when they set one (it only ever shortens the
    /// operator's `--max-cert-lifetime`).
    pub fn set_mesh_max_lifetime(&self, lifetime: Option<Duration>) {
        let secs = lifetime
            .map(|l| l.as_secs().max(MIN_LIFETIME.as_secs()))
            .unwrap_or(0);
        self.mesh_max_lifetime
            .store(secs, std::sync::atomic::Ordering::Relaxed);
    }

    fn max_lifetime(&self) -> Duration {
        match self
            .mesh_max_lifetime
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => self.max_lifetime,
            secs => self.max_lifetime.min(Duration::from_secs(secs)),
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    fn signer(&self) -> Arc<Signer> {
        self.signer
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Puts a newly loaded signer in force; certificates already issued stay valid.
    pub fn replace_signer(&self, signer: Signer) {
        *self.signer.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(signer);
    }

    /// The lifetime granted for a request: the operator's maximum caps it, zero asks for the
    /// maximum, and nothing is shorter than [`MIN_LIFETIME`].
    pub fn granted_lifetime(&self, requested: Duration) -> Duration {
        let max = self.max_lifetime();
        if requested.is_zero() {
            max
        } else {
            requested.min(max).max(MIN_LIFETIME)
        }
    }

    /// Signs `csr_pem` for `identity`. Only the CSR's public key is used; the identity, key
    /// usages, CA flag and lifetime are the CA's own decision.
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &str,
        requested: Duration,
    ) -> Result<Issued, CaError> {
        if parse_identity(&self.trust_domain, identity).is_none() {
            return Err(CaError::BadIdentity {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)?;
        self.issue(identity, &csr.public_key, self.granted_lifetime(requested))
    }

    /// The chain the CA signs with now (signer first).
    pub fn signer_chain_pem(&self) -> Vec<String> {
        self.signer().chain_pem.clone()
    }

    /// The identity of a node's own certificate (not a workload ID: it cannot pass a tunnel's
    /// verifier, and a workload certificate cannot pass as a node).
    pub fn node_identity(&self, node: &str) -> String {
        meshlet_spiffe::node_id(&self.trust_domain, node)
    }

    /// The identity in the control plane's serving certificate.
    pub fn controlplane_identity(&self) -> String {
        meshlet_spiffe::control_plane_id(&self.trust_domain)
    }

    /// A node certificate for `node` from the CSR's public key.
    pub fn sign_node(
        &self,
        csr_pem: &str,
        node: &str,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)?;
        self.issue(&self.node_identity(node), &csr.public_key, lifetime)
    }

    /// The control plane's own serving certificate for `key`.
    pub fn sign_serving(
        &self,
        key: &rcgen::KeyPair,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        self.issue(&self.controlplane_identity(), key, lifetime)
    }

    fn issue(
        &self,
        identity: &str,
        public_key: &impl rcgen::PublicKeyData,
        lifetime: Duration,
    ) -> Result<Issued, CaError> {
        let signer = self.signer();
        let params = leaf_params(identity, lifetime, signer.not_after).map_err(CaError::Signing)?;
        let serial = params
            .serial_number
            .as_ref()
            .map(|s| hex(s.as_ref()))
            .unwrap_or_default();
        let cert = params
            .signed_by(public_key, &signer.issuer)
            .map_err(CaError::Signing)?;
        let mut chain_pem = vec![cert.pem()];
        chain_pem.extend(signer.chain_pem.iter().cloned());
        Ok(Issued {
            chain_pem,
            serial,
            lifetime,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// 16 random bytes with the top bit clear (serials are positive integers).
fn rand_serial() -> [u8; 16] {
    let mut serial = [0u8; 16];
    for chunk in serial.chunks_mut(8) {
        let n = random_u64();
        chunk.copy_from_slice(&n.to_le_bytes()[..chunk.len()]);
    }
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    serial
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS RNG per instance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, KeyPair};

    #[test]
    fn identity_parsing() {
        assert_eq!(
            parse_identity("cluster.local", "spiffe://cluster.local/ns/default/sa/web"),
            Some(("default".into(), "web".into()))
        );
        assert!(parse_identity("cluster.local", "spiffe://other/ns/default/sa/web").is_none());
        assert!(parse_identity("cluster.local", "spiffe://cluster.local/ns/../sa/web").is_none());
        assert!(parse_identity("cluster.local", "spiffe://cluster.local/ns/a/sa/b/c").is_none());
    }

    #[test]
    fn signs_only_what_the_ca_decides() {
        let (signer, _) = crate::pki::generate_dev("cluster.local").expect("dev pki");
        let ca = CertificateAuthority::new("cluster.local", signer, Duration::from_secs(3600));
        let key = KeyPair::generate().expect("key");
        // The CSR asks for CA:true and an extra DNS name; neither may appear.
        let mut req = CertificateParams::new(vec!["evil.example".to_string()]).expect("params");
        req.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let csr = req
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let chain = ca
            .sign(
                &csr,
                "spiffe://cluster.local/ns/default/sa/web",
                Duration::from_secs(10 * 365 * 24 * 3600),
            )
            .expect("sign")
            .chain_pem;
        assert_eq!(chain.len(), 2);
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(chain[0].as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c)
            .expect("pem");
        let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
        assert!(!cert.is_ca());
        let san = cert
            .subject_alternative_name()
            .expect("san ext")
            .expect("san");
        assert_eq!(san.value.general_names.len(), 1);
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert!(lifetime <= 3600 + 60, "lifetime capped, got {lifetime}");
        assert!(ca
            .sign(
                &csr,
                "spiffe://other.domain/ns/default/sa/web",
                Duration::ZERO
            )
            .is_err());
        assert!(ca
            .sign(
                "not a csr",
                "spiffe://cluster.local/ns/default/sa/web",
                Duration::ZERO
            )
            .is_err());
    }
}

#[cfg(test)]
mod lifetime_tests {
    use super::*;

    #[test]
    fn the_mesh_settings_only_ever_shorten_the_operators_maximum() {
        let (signer, _) = crate::pki::generate_dev("cluster.local").expect("dev CA");
        let ca = CertificateAuthority::new("cluster.local", signer, Duration::from_secs(3600));
        assert_eq!(
            ca.granted_lifetime(Duration::from_secs(7200)).as_secs(),
            3600
        );
        ca.set_mesh_max_lifetime(Some(Duration::from_secs(600)));
        assert_eq!(
            ca.granted_lifetime(Duration::from_secs(3600)).as_secs(),
            600
        );
        assert_eq!(ca.granted_lifetime(Duration::ZERO).as_secs(), 600);
        ca.set_mesh_max_lifetime(Some(Duration::from_secs(86_400)));
        assert_eq!(
            ca.granted_lifetime(Duration::from_secs(7200)).as_secs(),
            3600
        );
        ca.set_mesh_max_lifetime(None);
        assert_eq!(ca.granted_lifetime(Duration::ZERO).as_secs(), 3600);
    }
}
