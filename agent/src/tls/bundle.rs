//! The trust bundle: roots per trust domain, the CRLs, and the CA's current signer; replaced
//! whole when the control plane pushes, and watched by live connections so that a revocation
//! reaches them at once.
use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use meshlet_proto::v1::DiscoveryResponse;
use rustls_pki_types::{pem::PemObject, CertificateDer, CertificateRevocationListDer, TrustAnchor};
use tokio::sync::watch;

use super::TlsError;

/// One CRL as the operator would want to see it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CrlSummary {
    pub issuer: String,
    pub this_update: SystemTime,
    pub next_update: Option<SystemTime>,
    pub revoked: usize,
}

/// One trust domain's roots.
pub struct DomainRoots {
    pub anchors: Vec<TrustAnchor<'static>>,
    /// Subjects of the roots, for display.
    pub subjects: Vec<String>,
}

/// Everything a verifier needs, as of one control-plane version.
#[derive(Default)]
pub struct BundleState {
    /// Our own trust domain.
    pub own_domain: String,
    /// Roots by trust domain: a peer is checked only against its own domain's roots.
    pub domains: BTreeMap<String, DomainRoots>,
    pub crls: Vec<webpki::CertRevocationList<'static>>,
    pub crl_summaries: Vec<CrlSummary>,
    /// The chain the CA signs with now (signer first); empty when the control plane did not
    /// say.
    pub signer_chain: Vec<CertificateDer<'static>>,
    /// The signer's `tls::fingerprint`, computed once (every new connection compares it).
    pub signer_fingerprint: Option<u64>,
    /// What the control plane sent for all of the above (`BundleState::source_of`): an update
    /// that sends the same leaves the bundle, and every live tunnel's watcher, alone.
    pub source: u64,
}

fn to_time(t: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64)
}

fn roots_of(domain: &str, pems: &[String]) -> Result<DomainRoots, TlsError> {
    let bad = |reason: String| TlsError::BadRoot {
        domain: domain.to_string(),
        reason,
    };
    let mut anchors = Vec::new();
    let mut subjects = Vec::new();
    for pem in pems {
        for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let der = der.map_err(|e| bad(e.to_string()))?;
            let anchor = webpki::anchor_from_trusted_cert(&der)
                .map_err(|e| bad(e.to_string()))?
                .to_owned();
            let (_, cert) =
                x509_parser::parse_x509_certificate(&der).map_err(|e| bad(e.to_string()))?;
            subjects.push(cert.subject().to_string());
            anchors.push(anchor);
        }
    }
    if anchors.is_empty() {
        return Err(TlsError::NoRoots(domain.to_string()));
    }
    Ok(DomainRoots { anchors, subjects })
}

impl BundleState {
    /// A digest of the trust part of an update (domain, roots, federated bundles, CRLs,
    /// signer chain), in order.
    pub fn source_of(update: &DiscoveryResponse) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        update.trust_domain.hash(&mut h);
        update.trust_roots_pem.hash(&mut h);
        for b in &update.federated_bundles {
            b.trust_domain.hash(&mut h);
            b.roots_pem.hash(&mut h);
        }
        update.crls_pem.hash(&mut h);
        update.signer_chain_pem.hash(&mut h);
        h.finish()
    }

    /// Validates the trust part of a control-plane update; any bad piece refuses all of it.
    pub fn from_update(update: &DiscoveryResponse) -> Result<Self, TlsError> {
        let own = update.trust_domain.clone();
        let mut domains = BTreeMap::new();
        domains.insert(own.clone(), roots_of(&own, &update.trust_roots_pem)?);
        for bundle in &update.federated_bundles {
            if domains.contains_key(&bundle.trust_domain) {
                return Err(TlsError::DuplicateDomain(bundle.trust_domain.clone()));
            }
            domains.insert(
                bundle.trust_domain.clone(),
                roots_of(&bundle.trust_domain, &bundle.roots_pem)?,
            );
        }
        let mut crls = Vec::new();
        let mut crl_summaries = Vec::new();
        for pem in &update.crls_pem {
            let mut found = false;
            for der in CertificateRevocationListDer::pem_slice_iter(pem.as_bytes()) {
                let der = der.map_err(|e| TlsError::BadCrl(e.to_string()))?;
                let owned = webpki::OwnedCertRevocationList::from_der(&der)
                    .map_err(|e| TlsError::BadCrl(e.to_string()))?;
                let (_, parsed) = x509_parser::parse_x509_crl(&der)
                    .map_err(|e| TlsError::BadCrl(e.to_string()))?;
                crl_summaries.push(CrlSummary {
                    issuer: parsed.issuer().to_string(),
                    this_update: to_time(parsed.last_update().timestamp()),
                    next_update: parsed.next_update().map(|t| to_time(t.timestamp())),
                    revoked: parsed.iter_revoked_certificates().count(),
                });
                crls.push(webpki::CertRevocationList::from(owned));
                found = true;
            }
            if !found {
                return Err(TlsError::BadCrl("a CRL entry holds no PEM X509 CRL".into()));
            }
        }
        let mut signer_chain = Vec::new();
        for pem in &update.signer_chain_pem {
            let der = CertificateDer::from_pem_slice(pem.as_bytes())
                .map_err(|e| TlsError::BadSigner(e.to_string()))?;
            signer_chain.push(der);
        }
        Ok(Self {
            own_domain: own,
            domains,
            crls,
            crl_summaries,
            signer_fingerprint: signer_chain.first().map(|c| super::fingerprint(c)),
            signer_chain,
            source: Self::source_of(update),
        })
    }
}

/// The bundle in force, swapped atomically.
pub struct TrustBundle {
    state: RwLock<Arc<BundleState>>,
    revision: watch::Sender<u64>,
}

impl Default for TrustBundle {
    fn default() -> Self {
        Self {
            state: RwLock::new(Arc::new(BundleState::default())),
            revision: watch::channel(0).0,
        }
    }
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.current();
        write!(
            f,
            "TrustBundle({} domains, {} CRLs)",
            state.domains.len(),
            state.crls.len()
        )
    }
}

impl TrustBundle {
    /// Puts a validated bundle in force and tells every watcher.
    pub fn replace(&self, state: BundleState) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(state);
        self.revision.send_modify(|r| *r += 1);
    }

    /// Whether an update with this `BundleState::source_of` would change the bundle in force.
    /// Discovery skips parsing and replacing an unchanged bundle, so that a policy or workload
    /// change does not make every live tunnel re-verify its peer's chain.
    pub fn differs_from(&self, source: u64) -> bool {
        let current = self.current();
        current.source != source || current.domains.is_empty()
    }

    pub fn current(&self) -> Arc<BundleState> {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Changes with every replacement: live connections re-check their peer then.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }
}
