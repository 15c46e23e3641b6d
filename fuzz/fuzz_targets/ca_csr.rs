//! A CSR and requested identity as a node sends them to the CA.
#![no_main]
use std::{sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use meshlet_controlplane::{ca::CertificateAuthority, pki};

fn ca() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(|| {
        let (signer, _) = pki::generate_dev("cluster.local").expect("dev CA");
        CertificateAuthority::new("cluster.local", signer, Duration::from_secs(3600))
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (identity, csr) = text.split_once('\n').unwrap_or(("", &text));
    if let Ok(issued) = ca().sign(csr, identity, Duration::from_secs(600)) {
        // Whatever the CSR asked for, the leaf names exactly the identity the CA checked and
        // is no CA.
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.chain_pem[0].as_bytes())
            .expect("the CA's own PEM");
        let (_, leaf) = x509_parser::parse_x509_certificate(&pem.contents).expect("its leaf");
        assert_eq!(meshlet_spiffe::single_uri_san(&leaf), Ok(identity));
        assert!(!leaf.is_ca());
    }
});
