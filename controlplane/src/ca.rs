//! The control plane's certificate authority: signs workload certificates with an
//! intermediate, deciding every field itself.
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

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
    let rest = identity.strip_prefix("spiffe://")?;
    let rest = rest.strip_prefix(trust_domain)?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["", "ns", ns, "sa", sa] if valid_segment(ns) && valid_segment(sa) => {
            Some((ns.to_string(), sa.to_string()))
        }
        _ => None,
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

/// A signing intermediate, its chain and the roots that anchor it.
pub struct CertificateAuthority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// Intermediate (PEM), appended after every leaf.
    intermediate_pem: String,
    roots_pem: Vec<String>,
    max_lifetime: Duration,
}

impl CertificateAuthority {
    /// A throwaway root and intermediate for development and the lab.
    pub fn generate_dev(trust_domain: &str, max_lifetime: Duration) -> Result<Self, CaError> {
        let now = OffsetDateTime::now_utc();
        let root_key = KeyPair::generate().map_err(CaError::Signing)?;
        let mut root_params = CertificateParams::default();
        root_params.distinguished_name = name(&format!("meshlet dev root ({trust_domain})"));
        root_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        root_params.not_before = now - Duration::from_secs(60);
        root_params.not_after = now + Duration::from_secs(365 * 24 * 3600);
        let root_cert = root_params
            .self_signed(&root_key)
            .map_err(CaError::Signing)?;
        let root_issuer = Issuer::new(root_params, root_key);

        let int_key = KeyPair::generate().map_err(CaError::Signing)?;
        let mut int_params = CertificateParams::default();
        int_params.distinguished_name = name(&format!("meshlet dev intermediate ({trust_domain})"));
        int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        int_params.not_before = now - Duration::from_secs(60);
        int_params.not_after = now + Duration::from_secs(180 * 24 * 3600);
        int_params.use_authority_key_identifier_extension = true;
        let int_cert = int_params
            .signed_by(&int_key, &root_issuer)
            .map_err(CaError::Signing)?;
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            issuer: Issuer::new(int_params, int_key),
            intermediate_pem: int_cert.pem(),
            roots_pem: vec![root_cert.pem()],
            max_lifetime,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn roots_pem(&self) -> &[String] {
        &self.roots_pem
    }

    /// Signs `csr_pem` for `identity`. Only the CSR's public key is used; the identity, key
    /// usages, CA flag and lifetime are the CA's own decision.
    pub fn sign(
        &self,
        csr_pem: &str,
        identity: &str,
        requested: Duration,
    ) -> Result<Vec<String>, CaError> {
        if parse_identity(&self.trust_domain, identity).is_none() {
            return Err(CaError::BadIdentity {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)?;
        let lifetime = if requested.is_zero() {
            self.max_lifetime
        } else {
            requested.min(self.max_lifetime)
        };
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = identity.to_string().try_into().map_err(CaError::Signing)?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // A little backdating absorbs clock skew between nodes.
        params.not_before = now - Duration::from_secs(60);
        params.not_after = now + lifetime;
        params.serial_number = Some(SerialNumber::from_slice(&rand_serial()));
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(CaError::Signing)?;
        Ok(vec![cert.pem(), self.intermediate_pem.clone()])
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshlet");
    dn.push(DnType::CommonName, common_name);
    dn
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
        let ca = CertificateAuthority::generate_dev("cluster.local", Duration::from_secs(3600))
            .expect("ca");
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
            .expect("sign");
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
