//! Where the CA's signing key and the mesh's trust come from: the operator's PEM files
//! (production), or a throwaway root made at start (`--dev`).
//!
//! Production never signs with a self-signed certificate unless the operator says so: the
//! signer is an intermediate from the organisation's own PKI, and the roots that anchor it are
//! what the nodes trust. Before a loaded signer is used, it signs a probe certificate that is
//! verified against the roots exactly as the nodes will verify workload certificates, so a key
//! that does not fit its certificate, a broken chain or a wrong root file is caught at load,
//! not at the first handshake.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, CertificateRevocationListDer};
use time::OffsetDateTime;
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::{leaf_params, CertificateAuthority};

/// Why the PKI files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} holds no PEM certificate")]
    Empty { what: &'static str, path: PathBuf },
    #[error("{what} {path} is not valid: {reason}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "signing certificate {path} is self-signed (a root). Production signs with an \
         intermediate from your PKI whose root the nodes trust; pass \
         --allow-self-signed-signer to use this one anyway, or --dev for a throwaway CA"
    )]
    SelfSigned { path: PathBuf },
    #[error(
        "the signing certificate {cert} does not chain to the trust roots in {roots}: {reason} \
         (check --ca-chain holds every intermediate between the signer and a root in \
         --trust-roots, and that --ca-key is the signer's key)"
    )]
    Chain {
        cert: PathBuf,
        roots: PathBuf,
        reason: String,
    },
    #[error(
        "the signing key {path} can be read by group or others (mode {mode:o}): run \
         `chmod 600 {path}` (and keep it owned by the control plane's user), or pass \
         --allow-insecure-key-permissions to use it anyway"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("generating the dev CA: {0}")]
    Dev(rcgen::Error),
}

/// The operator's PKI files.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    /// The signing certificate (an intermediate CA), PEM.
    pub cert: PathBuf,
    /// Its private key, PKCS#8 PEM.
    pub key: PathBuf,
    /// Intermediates between the signer and the root, PEM, nearest first (optional).
    pub chain: Option<PathBuf>,
    /// The roots the nodes trust, PEM; several during a CA rotation.
    pub roots: PathBuf,
    /// Certificate revocation lists pushed to the nodes, PEM.
    pub crls: Vec<PathBuf>,
    /// Roots of other trust domains (`trust domain → PEM file`), each kept apart.
    pub federated: BTreeMap<String, PathBuf>,
    pub allow_self_signed: bool,
    /// Use a signing key that group or others can read (refused by default).
    pub allow_insecure_key_permissions: bool,
}

/// What signs workload certificates.
pub struct Signer {
    pub issuer: Issuer<'static, KeyPair>,
    /// The signer's certificate, then the rest of the chain up to (not including) the root.
    pub chain_pem: Vec<String>,
    pub not_after: OffsetDateTime,
    /// Subject of the signing certificate, for logs.
    pub subject: String,
}

/// What the nodes trust, pushed to them with every update.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    /// Roots of our trust domain, PEM each.
    pub roots_pem: Vec<String>,
    /// CRLs, PEM each.
    pub crls_pem: Vec<String>,
    /// Roots of federated trust domains.
    pub federated: BTreeMap<String, Vec<String>>,
    /// The current signer's chain (leaf issuer first): nodes renew certificates issued by
    /// another signer, which is how a CA rotation reaches every workload.
    pub signer_chain_pem: Vec<String>,
}

fn read(what: &'static str, path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn invalid(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> PkiError {
    PkiError::Invalid {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Every certificate in a PEM file, as single-certificate PEM strings.
fn certificates(what: &'static str, path: &Path) -> Result<Vec<String>, PkiError> {
    let text = read(what, path)?;
    let mut out = Vec::new();
    for der in CertificateDer::pem_slice_iter(text.as_bytes()) {
        let der = der.map_err(|e| invalid(what, path, e))?;
        X509Certificate::from_der(&der).map_err(|e| invalid(what, path, e))?;
        out.push(pem_of("CERTIFICATE", &der));
    }
    Ok(out)
}

fn pem_of(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

fn der_of(pem: &str) -> Result<CertificateDer<'static>, String> {
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| e.to_string())
}

/// Loads and checks everything the CA needs from the operator's files.
pub fn load(files: &PkiFiles, trust_domain: &str) -> Result<(Signer, Trust), PkiError> {
    let signer_pems = certificates("signing certificate", &files.cert)?;
    let Some(signer_pem) = signer_pems.first().cloned() else {
        return Err(PkiError::Empty {
            what: "signing certificate",
            path: files.cert.clone(),
        });
    };
    let signer_der =
        der_of(&signer_pem).map_err(|e| invalid("signing certificate", &files.cert, e))?;
    let (_, signer_cert) = X509Certificate::from_der(&signer_der)
        .map_err(|e| invalid("signing certificate", &files.cert, e))?;
    if !signer_cert.is_ca() {
        return Err(invalid(
            "signing certificate",
            &files.cert,
            "it is not a CA certificate (basicConstraints cA=false); the CA signs with an intermediate CA certificate",
        ));
    }
    if let Ok(Some(ku)) = signer_cert.key_usage() {
        if !ku.value.key_cert_sign() {
            return Err(invalid(
                "signing certificate",
                &files.cert,
                "its key usage lacks keyCertSign",
            ));
        }
    }
    let not_after =
        OffsetDateTime::from_unix_timestamp(signer_cert.validity().not_after.timestamp())
            .map_err(|e| invalid("signing certificate", &files.cert, e))?;
    if !signer_cert.validity().is_valid() {
        return Err(invalid(
            "signing certificate",
            &files.cert,
            format!(
                "it is not valid now (valid {} to {})",
                signer_cert.validity().not_before,
                signer_cert.validity().not_after
            ),
        ));
    }
    if signer_cert.subject().as_raw() == signer_cert.issuer().as_raw() && !files.allow_self_signed {
        return Err(PkiError::SelfSigned {
            path: files.cert.clone(),
        });
    }
    if !files.allow_insecure_key_permissions {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&files.key)
            .map_err(|source| PkiError::Read {
                what: "signing key",
                path: files.key.clone(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(PkiError::KeyPermissions {
                path: files.key.clone(),
                mode: mode & 0o777,
            });
        }
    }
    let key_pem = read("signing key", &files.key)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid("signing key", &files.key, e))?;
    if rcgen::PublicKeyData::subject_public_key_info(&key) != signer_cert.public_key().raw {
        return Err(invalid(
            "signing key",
            &files.key,
            format!(
                "it is not the key of the signing certificate {}",
                files.cert.display()
            ),
        ));
    }
    let subject = signer_cert.subject().to_string();
    let issuer = Issuer::from_ca_cert_der(&signer_der, key)
        .map_err(|e| invalid("signing certificate", &files.cert, e))?;

    let mut chain_pem = vec![signer_pem];
    chain_pem.extend(signer_pems.into_iter().skip(1));
    if let Some(chain) = &files.chain {
        chain_pem.extend(certificates("CA chain", chain)?);
    }
    let roots_pem = certificates("trust roots", &files.roots)?;
    if roots_pem.is_empty() {
        return Err(PkiError::Empty {
            what: "trust roots",
            path: files.roots.clone(),
        });
    }
    let mut crls_pem = Vec::new();
    for path in &files.crls {
        let text = read("CRL", path)?;
        let mut found = 0;
        for der in CertificateRevocationListDer::pem_slice_iter(text.as_bytes()) {
            let der = der.map_err(|e| invalid("CRL", path, e))?;
            let (_, crl) =
                x509_parser::parse_x509_crl(&der).map_err(|e| invalid("CRL", path, e))?;
            if let Some(next) = crl.next_update() {
                if next.timestamp() < OffsetDateTime::now_utc().unix_timestamp() {
                    // Relayed anyway: the nodes treat an out-of-date CRL as an error (fail
                    // closed), which is what the operator must hear about.
                    tracing::error!(path = %path.display(), issuer = %crl.issuer(), next_update = %next, "CRL is out of date: nodes will refuse certificates of its issuer until a fresh one is published");
                }
            }
            crls_pem.push(pem_of("X509 CRL", &der));
            found += 1;
        }
        if found == 0 {
            return Err(invalid("CRL", path, "no PEM X509 CRL in it"));
        }
    }
    let mut federated = BTreeMap::new();
    for (domain, path) in &files.federated {
        if domain == trust_domain {
            return Err(invalid(
                "federated trust roots",
                path,
                format!("{domain} is our own trust domain; its roots go in --trust-roots"),
            ));
        }
        let roots = certificates("federated trust roots", path)?;
        if roots.is_empty() {
            return Err(PkiError::Empty {
                what: "federated trust roots",
                path: path.clone(),
            });
        }
        federated.insert(domain.clone(), roots);
    }

    let signer = Signer {
        issuer,
        chain_pem,
        not_after,
        subject,
    };
    probe(&signer, &roots_pem, trust_domain).map_err(|reason| PkiError::Chain {
        cert: files.cert.clone(),
        roots: files.roots.clone(),
        reason,
    })?;
    let trust = Trust {
        roots_pem,
        crls_pem,
        federated,
        signer_chain_pem: signer.chain_pem.clone(),
    };
    Ok((signer, trust))
}

/// Signs a throwaway workload certificate and verifies it against `roots_pem` the way nodes do.
fn probe(signer: &Signer, roots_pem: &[String], trust_domain: &str) -> Result<(), String> {
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let identity = format!("spiffe://{trust_domain}/ns/meshlet-probe/sa/probe");
    let params = leaf_params(&identity, Duration::from_secs(300), signer.not_after)
        .map_err(|e| e.to_string())?;
    let leaf = params
        .signed_by(&key, &signer.issuer)
        .map_err(|e| e.to_string())?;
    let anchors_der: Vec<CertificateDer<'static>> = roots_pem
        .iter()
        .map(|p| der_of(p))
        .collect::<Result<_, _>>()?;
    let anchors: Vec<_> = anchors_der
        .iter()
        .map(|d| webpki::anchor_from_trusted_cert(d).map(|a| a.to_owned()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("a trust root is unusable: {e}"))?;
    let intermediates: Vec<CertificateDer<'static>> = signer
        .chain_pem
        .iter()
        .map(|p| der_of(p))
        .collect::<Result<_, _>>()?;
    let leaf_der = leaf.der().clone();
    let ee = webpki::EndEntityCert::try_from(&leaf_der).map_err(|e| e.to_string())?;
    let algs = rustls::crypto::aws_lc_rs::default_provider()
        .signature_verification_algorithms
        .all;
    let now = rustls_pki_types::UnixTime::since_unix_epoch(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    ee.verify_for_usage(
        algs,
        &anchors,
        &intermediates,
        now,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// A throwaway root and intermediate for development and the lab's demo.
pub fn generate_dev(trust_domain: &str) -> Result<(Signer, Trust), PkiError> {
    let now = OffsetDateTime::now_utc();
    let root_key = KeyPair::generate().map_err(PkiError::Dev)?;
    let mut root_params = CertificateParams::default();
    root_params.distinguished_name = name(&format!("meshlet dev root ({trust_domain})"));
    root_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    root_params.not_before = now - Duration::from_secs(60);
    root_params.not_after = now + Duration::from_secs(365 * 24 * 3600);
    let root_cert = root_params.self_signed(&root_key).map_err(PkiError::Dev)?;
    let root_issuer = Issuer::new(root_params, root_key);

    let int_key = KeyPair::generate().map_err(PkiError::Dev)?;
    let mut int_params = CertificateParams::default();
    int_params.distinguished_name = name(&format!("meshlet dev intermediate ({trust_domain})"));
    int_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    int_params.not_before = now - Duration::from_secs(60);
    int_params.not_after = now + Duration::from_secs(180 * 24 * 3600);
    int_params.use_authority_key_identifier_extension = true;
    let not_after = int_params.not_after;
    let int_cert = int_params
        .signed_by(&int_key, &root_issuer)
        .map_err(PkiError::Dev)?;
    let chain_pem = vec![int_cert.pem()];
    let trust = Trust {
        roots_pem: vec![root_cert.pem()],
        signer_chain_pem: chain_pem.clone(),
        ..Default::default()
    };
    Ok((
        Signer {
            issuer: Issuer::new(int_params, int_key),
            chain_pem,
            not_after,
            subject: format!("O=meshlet, CN=meshlet dev intermediate ({trust_domain})"),
        },
        trust,
    ))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshlet");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Re-reads the PKI files when any of them changes. A good set replaces the signer and the
/// pushed trust at once (no restart, no dropped stream); a bad set is reported and the last
/// good one stays in force.
pub fn watch_files(
    files: PkiFiles,
    trust_domain: String,
    ca: Arc<CertificateAuthority>,
    trust: watch::Sender<Trust>,
) {
    tokio::spawn(async move {
        let mut last_seen = fingerprint(&files);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = fingerprint(&files);
            if now == last_seen {
                continue;
            }
            last_seen = now;
            match load(&files, &trust_domain) {
                Ok((signer, new_trust)) => {
                    tracing::info!(
                        target: "audit",
                        event = "ca_reloaded",
                        signer = %signer.subject,
                        roots = new_trust.roots_pem.len(),
                        crls = new_trust.crls_pem.len(),
                        "CA files changed: new signer and trust in force"
                    );
                    ca.replace_signer(signer);
                    trust.send_if_modified(|t| {
                        if *t == new_trust {
                            return false;
                        }
                        *t = new_trust;
                        true
                    });
                }
                Err(e) => tracing::error!(
                    target: "audit",
                    event = "ca_reload_refused",
                    "{e}; the CA keeps its last good signer and trust"
                ),
            }
        }
    });
}

type FileStamp = Option<(SystemTime, u64)>;

fn fingerprint(files: &PkiFiles) -> Vec<FileStamp> {
    let stamp = |p: &Path| -> FileStamp {
        let meta = std::fs::metadata(p).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    let mut out = vec![stamp(&files.cert), stamp(&files.key), stamp(&files.roots)];
    if let Some(chain) = &files.chain {
        out.push(stamp(chain));
    }
    out.extend(files.crls.iter().map(|p| stamp(p)));
    out.extend(files.federated.values().map(|p| stamp(p)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ca_params(cn: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = name(cn);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    }

    /// Writes root, intermediate and its key; answers the files.
    fn write_pki(dir: &Path, tag: &str) -> PkiFiles {
        let root_key = KeyPair::generate().expect("key");
        let root = ca_params(&format!("{tag} root"))
            .self_signed(&root_key)
            .expect("root");
        let root_issuer = Issuer::new(ca_params(&format!("{tag} root")), root_key);
        let int_key = KeyPair::generate().expect("key");
        let int = ca_params(&format!("{tag} intermediate"))
            .signed_by(&int_key, &root_issuer)
            .expect("int");
        let files = PkiFiles {
            cert: dir.join(format!("{tag}-int.pem")),
            key: dir.join(format!("{tag}-int.key")),
            chain: None,
            roots: dir.join(format!("{tag}-root.pem")),
            crls: vec![],
            federated: BTreeMap::new(),
            allow_self_signed: false,
            allow_insecure_key_permissions: false,
        };
        std::fs::write(&files.cert, int.pem()).expect("write");
        write_key(&files.key, &int_key.serialize_pem());
        std::fs::write(&files.roots, root.pem()).expect("write");
        // A root's own files, for the self-signed case.
        std::fs::write(dir.join(format!("{tag}-root.key")), "").expect("write");
        files
    }

    /// A private key file as an operator should keep it: 0600.
    fn write_key(path: &Path, pem: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(path, pem).expect("write");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }

    #[test]
    fn refuses_a_key_that_others_can_read_unless_allowed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("perms");
        let mut files = write_pki(&dir.0, "a");
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        let err = load(&files, "cluster.local")
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("chmod 600") && err.contains("mode 644"),
            "{err}"
        );
        files.allow_insecure_key_permissions = true;
        load(&files, "cluster.local").expect("allowed when asked");
    }

    fn temp_dir(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("meshlet-pki-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        Dir(dir)
    }

    #[test]
    fn loads_an_intermediate_that_chains_to_the_roots() {
        let dir = temp_dir("good");
        let files = write_pki(&dir.0, "a");
        let (signer, trust) = load(&files, "cluster.local").expect("load");
        assert_eq!(trust.roots_pem.len(), 1);
        assert_eq!(signer.chain_pem.len(), 1);
        assert_eq!(trust.signer_chain_pem, signer.chain_pem);
    }

    #[test]
    fn refuses_a_self_signed_signer_unless_allowed() {
        let dir = temp_dir("self");
        let key = KeyPair::generate().expect("key");
        let root = ca_params("lonely root").self_signed(&key).expect("root");
        let mut files = write_pki(&dir.0, "a");
        std::fs::write(&files.cert, root.pem()).expect("write");
        write_key(&files.key, &key.serialize_pem());
        std::fs::write(&files.roots, root.pem()).expect("write");
        let err = load(&files, "cluster.local")
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("self-signed") && err.contains("--allow-self-signed-signer"),
            "{err}"
        );
        files.allow_self_signed = true;
        load(&files, "cluster.local").expect("allowed when asked");
    }

    #[test]
    fn refuses_a_key_or_roots_that_do_not_fit() {
        let dir = temp_dir("mismatch");
        let a = write_pki(&dir.0, "a");
        let b = write_pki(&dir.0, "b");
        let wrong_key = PkiFiles {
            key: b.key.clone(),
            ..a.clone()
        };
        let err = load(&wrong_key, "cluster.local")
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("not the key of the signing certificate"),
            "{err}"
        );
        let wrong_roots = PkiFiles {
            roots: b.roots.clone(),
            ..a.clone()
        };
        let err = load(&wrong_roots, "cluster.local")
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("does not chain to the trust roots"), "{err}");
        let leaf_signer = PkiFiles {
            cert: a.roots.clone(),
            ..a.clone()
        };
        // The root file as signer with the intermediate's key: the key does not fit.
        assert!(load(&leaf_signer, "cluster.local").is_err());
        let missing = PkiFiles {
            cert: dir.0.join("nope.pem"),
            ..a
        };
        let err = load(&missing, "cluster.local")
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("cannot read signing certificate"), "{err}");
    }

    /// A Secret as the kubelet mounts it: each key a symlink into `..data`, itself a symlink
    /// to a timestamped folder swapped atomically on update.
    fn mount_secret(dir: &Path, version: &str, from: &PkiFiles) {
        use std::os::unix::fs::PermissionsExt;
        let data = dir.join(version);
        std::fs::create_dir_all(&data).expect("data dir");
        let chain = format!(
            "{}{}",
            std::fs::read_to_string(&from.cert).expect("cert"),
            std::fs::read_to_string(&from.roots).expect("root")
        );
        std::fs::write(data.join("tls.crt"), chain).expect("tls.crt");
        std::fs::copy(&from.key, data.join("tls.key")).expect("tls.key");
        std::fs::set_permissions(data.join("tls.key"), std::fs::Permissions::from_mode(0o400))
            .expect("defaultMode 0400");
        std::fs::copy(&from.roots, data.join("ca.crt")).expect("ca.crt");
        let tmp = dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(version, &tmp).expect("symlink");
        std::fs::rename(&tmp, dir.join("..data")).expect("swap");
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            let link = dir.join(key);
            if !link.exists() {
                std::os::unix::fs::symlink(format!("..data/{key}"), &link).expect("key link");
            }
        }
    }

    #[test]
    fn a_cert_manager_secret_mounted_by_the_kubelet_loads_and_its_updates_are_seen() {
        let dir = Dir(std::env::temp_dir().join(format!("meshlet-secret-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&dir.0);
        let mounted = dir.0.join("ca");
        std::fs::create_dir_all(&mounted).expect("dir");
        let a = write_pki(&dir.0, "a");
        mount_secret(&mounted, "..2026_11_30_00_00_00.1", &a);
        let files = PkiFiles {
            cert: mounted.join("tls.crt"),
            key: mounted.join("tls.key"),
            chain: None,
            roots: mounted.join("ca.crt"),
            crls: vec![],
            federated: BTreeMap::new(),
            allow_self_signed: false,
            allow_insecure_key_permissions: false,
        };
        let (signer, trust) = load(&files, "cluster.local").expect("cert-manager layout loads");
        assert!(signer.subject.contains("a intermediate"));
        assert_eq!(
            signer.chain_pem.len(),
            2,
            "tls.crt's chain follows the signer"
        );
        assert_eq!(trust.roots_pem.len(), 1);
        let before = fingerprint(&files);
        // cert-manager renews into a new intermediate (another key); the kubelet swaps ..data.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = write_pki(&dir.0, "b");
        mount_secret(&mounted, "..2026_11_30_01_00_00.2", &b);
        assert_ne!(fingerprint(&files), before, "the watcher sees the swap");
        let (signer, _) = load(&files, "cluster.local").expect("the new Secret loads");
        assert!(signer.subject.contains("b intermediate"));
    }
}
