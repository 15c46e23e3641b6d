//! The lab's PKI, made the way an operator's would be: a root that stays offline (here: a
//! file the control plane is never given) and an intermediate the control plane signs with.
//! Tests use the same files to craft certificates: right-looking ones from the real
//! intermediate, and the CRLs that revoke them.
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};
use time::OffsetDateTime;

/// Files of the lab's PKI.
#[derive(Debug, Clone)]
pub struct LabPki {
    pub dir: PathBuf,
}

/// A CA of the lab's PKI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabCa {
    Root,
    Intermediate,
}

impl LabCa {
    fn stem(self) -> &'static str {
        match self {
            LabCa::Root => "root",
            LabCa::Intermediate => "intermediate",
        }
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshlet lab");
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Parameters of a CA certificate named `common_name`.
pub fn ca_params(common_name: &str) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(common_name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = now - Duration::from_secs(3600);
    p.not_after = now + Duration::from_secs(30 * 24 * 3600);
    p.use_authority_key_identifier_extension = true;
    p
}

impl LabPki {
    /// Makes a root and an intermediate under `dir` (`<name>.pem` + `<name>.key`), the
    /// roots file the control plane reads (`roots.pem`), and an empty CRL of each CA.
    pub fn create(dir: &Path, trust_domain: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let pki = Self {
            dir: dir.to_path_buf(),
        };
        let root_key = KeyPair::generate()?;
        let root_params = ca_params(&format!("lab root ({trust_domain})"));
        let root = root_params.self_signed(&root_key)?;
        let root_issuer = Issuer::new(root_params, root_key);
        let int_key = KeyPair::generate()?;
        let int = ca_params(&format!("lab intermediate ({trust_domain})"))
            .signed_by(&int_key, &root_issuer)?;
        std::fs::write(pki.cert_path(LabCa::Root), root.pem())?;
        // Keys owner-only, as the control plane demands.
        write_atomically(
            &pki.key_path(LabCa::Root),
            root_issuer.key().serialize_pem().as_bytes(),
        )?;
        std::fs::write(pki.cert_path(LabCa::Intermediate), int.pem())?;
        write_atomically(
            &pki.key_path(LabCa::Intermediate),
            int_key.serialize_pem().as_bytes(),
        )?;
        std::fs::write(pki.roots_path(), root.pem())?;
        let fresh = OffsetDateTime::now_utc() + Duration::from_secs(24 * 3600);
        pki.write_crl(LabCa::Root, &[], fresh)?;
        pki.write_crl(LabCa::Intermediate, &[], fresh)?;
        Ok(pki)
    }

    pub fn cert_path(&self, ca: LabCa) -> PathBuf {
        self.dir.join(format!("{}.pem", ca.stem()))
    }

    pub fn key_path(&self, ca: LabCa) -> PathBuf {
        self.dir.join(format!("{}.key", ca.stem()))
    }

    pub fn crl_path(&self, ca: LabCa) -> PathBuf {
        self.dir.join(format!("{}.crl", ca.stem()))
    }

    /// The trust roots the control plane pushes (rewritten in CA rotation tests).
    pub fn roots_path(&self) -> PathBuf {
        self.dir.join("roots.pem")
    }

    /// The control-plane flags that use these files.
    pub fn controlplane_args(&self) -> Vec<String> {
        let path = |p: PathBuf| p.display().to_string();
        vec![
            "--ca-cert".into(),
            path(self.cert_path(LabCa::Intermediate)),
            "--ca-key".into(),
            path(self.key_path(LabCa::Intermediate)),
            "--trust-roots".into(),
            path(self.roots_path()),
            "--crl".into(),
            path(self.crl_path(LabCa::Intermediate)),
            "--crl".into(),
            path(self.crl_path(LabCa::Root)),
        ]
    }

    /// The CA as a Kubernetes Secret in cert-manager's layout, mounted in `dir` as the
    /// kubelet does (`tls.crt`: the intermediate then the root, `tls.key` 0400, `ca.crt`:
    /// the roots), and the control-plane arguments that read it.
    pub fn secret_args(&self, dir: &Path) -> anyhow::Result<Vec<String>> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        let chain = format!(
            "{}{}",
            std::fs::read_to_string(self.cert_path(LabCa::Intermediate))?,
            std::fs::read_to_string(self.cert_path(LabCa::Root))?
        );
        std::fs::write(dir.join("tls.crt"), chain)?;
        write_atomically(
            &dir.join("tls.key"),
            &std::fs::read(self.key_path(LabCa::Intermediate))?,
        )?;
        std::fs::set_permissions(dir.join("tls.key"), std::fs::Permissions::from_mode(0o400))?;
        std::fs::copy(self.roots_path(), dir.join("ca.crt"))?;
        let path = |p: PathBuf| p.display().to_string();
        Ok(vec![
            "--ca-secret-dir".into(),
            path(dir.to_path_buf()),
            "--crl".into(),
            path(self.crl_path(LabCa::Intermediate)),
            "--crl".into(),
            path(self.crl_path(LabCa::Root)),
        ])
    }

    /// The CA as an rcgen issuer, to sign crafted certificates and CRLs.
    pub fn issuer(&self, ca: LabCa) -> anyhow::Result<Issuer<'static, KeyPair>> {
        let cert = std::fs::read_to_string(self.cert_path(ca))?;
        let key = KeyPair::from_pem(&std::fs::read_to_string(self.key_path(ca))?)?;
        Issuer::from_ca_cert_pem(&cert, key).context("loading a lab CA")
    }

    /// Replaces `ca`'s CRL (read by the control plane, which pushes it) with one revoking
    /// `serials`, valid until `next_update`.
    pub fn write_crl(
        &self,
        ca: LabCa,
        serials: &[Vec<u8>],
        next_update: OffsetDateTime,
    ) -> anyhow::Result<()> {
        let now = OffsetDateTime::now_utc();
        let crl = CertificateRevocationListParams {
            this_update: now - Duration::from_secs(60),
            next_update,
            // Increasing with time, as a CRL number must.
            crl_number: SerialNumber::from(now.unix_timestamp_nanos() as u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(s),
                    revocation_time: now - Duration::from_secs(1),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer(ca)?)?;
        write_atomically(&self.crl_path(ca), crl.pem()?.as_bytes())
    }
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
///
/// Owner-only (0600), as keys must be; the lab's certificates need no more.
pub fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut file, contents)?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    Ok(())
}
