//! Certificates of the service accounts that have pods on this node: fetched when the first
//! pod of a service account arrives, rotated at half-life, dropped when the last pod leaves.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, PublicKeyData, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::{crypto::CryptoProvider, sign::CertifiedKey};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
};

use super::{CaClient, SpiffeId};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot make a key or CSR for {identity}: {source}")]
    Csr {
        identity: SpiffeId,
        source: rcgen::Error,
    },
    #[error(transparent)]
    Ca(#[from] super::CaError),
    #[error("the CA answered an unusable chain for {identity}: {reason}")]
    BadChain { identity: SpiffeId, reason: String },
    #[error("no certificate for {0} yet (the CA has not answered; see the CA errors above)")]
    NotReady(SpiffeId),
    #[error("identity expired: the certificate of {0} is no longer valid and no new one came")]
    Expired(SpiffeId),
    #[error("{0} is not an identity of a pod on this node")]
    Unknown(SpiffeId),
}

/// A certificate and key for one identity, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCertificate {
    pub identity: SpiffeId,
    pub certified_key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
    /// The issuer's name, then each further certificate's subject up the chain.
    pub issuer_chain: Vec<String>,
    /// When the agent will ask for the next certificate (half-life ± 10 %).
    pub renew_at: SystemTime,
    /// The leaf's `tls::fingerprint`, computed once: every new connection compares it with
    /// the pooled tunnels' credentials.
    pub leaf_fingerprint: u64,
}

impl WorkloadCertificate {
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now + Duration::from_secs(60) && now < self.not_after
    }
}

struct Entry {
    pods: usize,
    current: watch::Receiver<Option<Arc<WorkloadCertificate>>>,
    /// Wakes the renewal task before its time (CA rotated, certificate revoked).
    renew_now: Arc<Notify>,
    task: JoinHandle<()>,
}

/// All identities this node holds.
pub struct IdentityStore {
    ca: Arc<dyn CaClient>,
    metrics: Arc<crate::metrics::Metrics>,
    provider: Arc<CryptoProvider>,
    lifetime: Duration,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
}

impl IdentityStore {
    pub fn new(
        ca: Arc<dyn CaClient>,
        provider: Arc<CryptoProvider>,
        lifetime: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Self {
            ca,
            metrics,
            provider,
            lifetime,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// A pod with this identity arrived: fetch its certificate if it is the first.
    pub fn acquire(self: &Arc<Self>, identity: &SpiffeId) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = entries.get_mut(identity) {
            entry.pods += 1;
            return;
        }
        let (tx, rx) = watch::channel(None);
        let store = Arc::downgrade(self);
        let id = identity.clone();
        let renew_now = Arc::new(Notify::new());
        let wake = renew_now.clone();
        let task = tokio::spawn(async move { keep_fresh(store, id, tx, wake).await });
        entries.insert(
            identity.clone(),
            Entry {
                pods: 1,
                current: rx,
                renew_now,
                task,
            },
        );
    }

    /// A pod with this identity left: drop key and certificate with the last one.
    pub fn release(&self, identity: &SpiffeId) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = entries.get_mut(identity) {
            entry.pods = entry.pods.saturating_sub(1);
            if entry.pods == 0 {
                entry.task.abort();
                entries.remove(identity);
                self.metrics.certificate_dropped(&identity.to_string());
                tracing::info!(target: "audit", %identity, "identity dropped: last pod left");
            }
        }
    }

    /// The current certificate, if valid now.
    pub fn current(&self, identity: &SpiffeId) -> Result<Arc<WorkloadCertificate>, IdentityError> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let entry = entries
            .get(identity)
            .ok_or_else(|| IdentityError::Unknown(identity.clone()))?;
        let current = entry.current.borrow().clone();
        match current {
            None => Err(IdentityError::NotReady(identity.clone())),
            Some(cert) if cert.is_valid_at(SystemTime::now()) => Ok(cert),
            Some(_) => Err(IdentityError::Expired(identity.clone())),
        }
    }

    /// Follows the certificate of `identity` (None unless a pod holds it): changes whenever
    /// it is issued or renewed, for callers that wait for one rather than poll.
    pub fn watch(
        &self,
        identity: &SpiffeId,
    ) -> Option<watch::Receiver<Option<Arc<WorkloadCertificate>>>> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.get(identity).map(|entry| entry.current.clone())
    }

    /// After the trust bundle changed: renews at once every certificate that was issued by
    /// another signer than the CA's current one (a CA rotation) or that no longer passes our
    /// own verifier (revoked, its root withdrawn). Peers would refuse it.
    pub fn recheck(&self, bundle: &crate::tls::BundleState) {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for (identity, entry) in entries.iter() {
            let Some(cert) = entry.current.borrow().clone() else {
                continue;
            };
            let chain = &cert.certified_key.cert;
            let why =
                if !bundle.signer_chain.is_empty() && chain.get(1) != bundle.signer_chain.first() {
                    Some("the CA signs with a new signer".to_string())
                } else {
                    crate::tls::verify::still_trusted(
                        &self.provider,
                        bundle,
                        chain,
                        crate::tls::Purpose::ClientAuth,
                    )
                    .err()
                    .map(|r| format!("our certificate no longer passes: {r}"))
                };
            if let Some(why) = why {
                tracing::info!(target: "audit", event = "certificate_renewal_forced", %identity,
                    serial = %cert.serial, reason = %why, "renewing the certificate now");
                entry.renew_now.notify_one();
            }
        }
    }

    /// Every identity held, with its state and current certificate (if any).
    pub fn list(&self) -> Vec<(SpiffeId, usize, Option<Arc<WorkloadCertificate>>)> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<_> = entries
            .iter()
            .map(|(id, e)| (id.clone(), e.pods, e.current.borrow().clone()))
            .collect();
        list.sort_by_key(|a| a.0.to_string());
        list
    }

    /// Makes a fresh key and CSR, has the CA sign it, and checks the answer.
    async fn fetch(&self, identity: &SpiffeId) -> Result<WorkloadCertificate, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| {
            IdentityError::Csr {
                identity: identity.clone(),
                source,
            }
        })?;
        let csr_pem = csr_for(identity, &key).map_err(|source| IdentityError::Csr {
            identity: identity.clone(),
            source,
        })?;
        let chain_pem = self.ca.sign(identity, csr_pem, self.lifetime).await?;
        self.accept_chain(identity, &key, &chain_pem)
    }

    /// Checks that a chain from the CA is for `identity` and `key` before it is ever used.
    fn accept_chain(
        &self,
        identity: &SpiffeId,
        key: &KeyPair,
        chain_pem: &[String],
    ) -> Result<WorkloadCertificate, IdentityError> {
        let bad = |reason: String| IdentityError::BadChain {
            identity: identity.clone(),
            reason,
        };
        let mut chain: Vec<CertificateDer<'static>> = Vec::new();
        for pem in chain_pem {
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(cert.map_err(|e| bad(format!("not PEM certificates: {e}")))?);
            }
        }
        let leaf = chain.first().ok_or_else(|| bad("empty chain".into()))?;
        let info = crate::tls::leaf_info(leaf).map_err(|e| bad(e.to_string()))?;
        if info.identity.as_ref() != Some(identity) {
            return Err(bad(format!(
                "leaf names {:?}, not the identity asked for",
                info.identity.map(|i| i.to_string())
            )));
        }
        if info.public_key != key.subject_public_key_info() {
            return Err(bad("leaf public key is not the key we generated".into()));
        }
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = self
            .provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| bad(format!("key not usable by rustls: {e}")))?;
        let mut issuer_chain = vec![info.issuer.clone()];
        for cert in chain.iter().skip(1) {
            if let Ok(i) = crate::tls::leaf_info(cert) {
                issuer_chain.push(i.issuer);
            }
        }
        // Half of the life left from now (not from not_before, which the CA backdates for
        // clock skew: with short certificates that would renew far too early).
        let now = SystemTime::now();
        let remaining = info
            .not_after
            .duration_since(now)
            .unwrap_or(Duration::from_secs(1));
        let leaf_fingerprint = chain
            .first()
            .map(|leaf| crate::tls::fingerprint(leaf))
            .unwrap_or_default();
        Ok(WorkloadCertificate {
            leaf_fingerprint,
            identity: identity.clone(),
            certified_key: Arc::new(CertifiedKey::new(chain, signer)),
            not_before: info.not_before,
            not_after: info.not_after,
            serial: info.serial,
            issuer_chain,
            renew_at: now + remaining.mul_f64(0.5 * jitter()),
        })
    }
}

/// A CSR for `identity`: one URI SAN, empty subject. The CA decides everything else.
pub fn csr_for(identity: &SpiffeId, key: &KeyPair) -> Result<String, rcgen::Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    params.serialize_request(key)?.pem()
}

/// Fetches the certificate, then renews it at half-life (±10 % jitter), retrying failures with
/// capped exponential backoff. The current certificate keeps serving while it is valid.
async fn keep_fresh(
    store: std::sync::Weak<IdentityStore>,
    identity: SpiffeId,
    tx: watch::Sender<Option<Arc<WorkloadCertificate>>>,
    renew_now: Arc<Notify>,
) {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(120));
    loop {
        let Some(this) = store.upgrade() else { return };
        match this.fetch(&identity).await {
            Ok(cert) => {
                tracing::info!(target: "audit", %identity, serial = %cert.serial,
                    not_after = %rfc3339(cert.not_after), "certificate issued to node");
                let renew_at = cert.renew_at;
                this.metrics.certificate_installed(
                    &identity.to_string(),
                    cert.not_before,
                    cert.not_after,
                );
                let cert = Arc::new(cert);
                tx.send_replace(Some(cert));
                backoff.reset();
                drop(this);
                let wait = renew_at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::from_secs(1));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = renew_now.notified() => {}
                }
            }
            Err(e) => {
                let retry = backoff.next_delay();
                let reason = match &e {
                    IdentityError::Ca(super::CaError::Refused { status, .. }) => {
                        match status.code() {
                            tonic::Code::Unavailable => "unavailable",
                            tonic::Code::PermissionDenied => "permission_denied",
                            tonic::Code::Unauthenticated => "unauthenticated",
                            tonic::Code::InvalidArgument => "invalid_argument",
                            tonic::Code::DeadlineExceeded => "deadline_exceeded",
                            _ => "ca_error",
                        }
                        .into()
                    }
                    IdentityError::BadChain { .. } => "bad_chain".into(),
                    IdentityError::Csr { .. } => "csr".into(),
                    _ => "other".into(),
                };
                this.metrics
                    .ca_failures
                    .get_or_create(&crate::metrics::ReasonLabels { reason })
                    .inc();
                tracing::warn!(target: "audit", event = "certificate_request_failed", %identity, error = %e, retry_in = ?retry, "certificate request failed");
                drop(this);
                tokio::time::sleep(retry).await;
            }
        }
    }
}

/// 0.9 ..= 1.1
fn jitter() -> f64 {
    0.9 + rand::random::<f64>() * 0.2
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t.max(SystemTime::UNIX_EPOCH)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csr_carries_only_the_identity() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").expect("id");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let pem = csr_for(&id, &key).expect("csr");
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&pem).expect("parse");
        assert_eq!(
            parsed.params.subject_alt_names,
            vec![SanType::URI(id.to_string().try_into().expect("uri"))]
        );
        assert_eq!(parsed.params.distinguished_name.iter().count(), 0);
        assert_eq!(parsed.public_key.der_bytes(), key.der_bytes());
    }
}
