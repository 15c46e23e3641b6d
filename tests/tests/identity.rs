//! Identity in the lab: crafted certificates presented to a real agent's tunnel listener are
//! refused each with its own reason (the attack matrix); CRLs pushed by the control plane
//! refuse new handshakes and close live tunnels; a server with another workload's valid
//! certificate is refused by the client side. Root only; run one at a time (`cargo xtask test`
//! does).
use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use meshlet_lab::{
    pki::{ca_params, LabCa},
    Lab, LabOptions, PodSpec,
};
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

mod common;
use common::{
    bin_dir, eventually, meshlet_cli, metrics, sample, send, ExtraAgent, Ping, Scratch, Server,
};

const FRONTEND: &str = "spiffe://cluster.local/ns/default/sa/frontend";
const BACKEND: &str = "spiffe://cluster.local/ns/default/sa/backend";

fn pods() -> Vec<PodSpec> {
    let mut impostor = PodSpec::new("impostor", "node-2", "db");
    // Known to the control plane as default/impostor (identity …/sa/db), but no agent
    // serves it: the test plays its tunnel endpoint.
    impostor.enrolled = false;
    vec![
        PodSpec::new("web", "node-1", "frontend"),
        PodSpec::new("api", "node-2", "backend"),
        PodSpec::new("attacker", "node-1", "attacker").outside_mesh(),
        impostor,
    ]
}

/// A crafted certificate on disk: leaf, its key, and the chain to send after it.
struct Crafted {
    cert: PathBuf,
    key: PathBuf,
    chain: Option<PathBuf>,
    serial: Vec<u8>,
}

/// Workload-certificate parameters as the real CA makes them, for `sans`.
fn leaf_params(sans: Vec<SanType>) -> CertificateParams {
    let now = OffsetDateTime::now_utc();
    let mut p = CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = sans;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = now - Duration::from_secs(60);
    p.not_after = now + Duration::from_secs(3600);
    p.use_authority_key_identifier_extension = true;
    p
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("uri"))
}

fn random_serial() -> Vec<u8> {
    let mut serial: [u8; 12] = rand::random();
    serial[0] = (serial[0] & 0x7f) | 0x01;
    serial.to_vec()
}

/// Signs `params` with `issuer` for a fresh P-256 key (or `public_key`, for keys rcgen cannot
/// make) and writes the files as `name.*`.
fn craft(
    dir: &Scratch,
    name: &str,
    mut params: CertificateParams,
    issuer: &Issuer<'static, KeyPair>,
    chain: &[&Path],
) -> Crafted {
    let serial = random_serial();
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, issuer).expect("sign");
    write_crafted(dir, name, cert.pem(), key.serialize_pem(), chain, serial)
}

fn write_crafted(
    dir: &Scratch,
    name: &str,
    cert_pem: String,
    key_pem: String,
    chain: &[&Path],
    serial: Vec<u8>,
) -> Crafted {
    let cert = dir.path(&format!("{name}.pem"));
    let key = dir.path(&format!("{name}.key"));
    std::fs::write(&cert, cert_pem).expect("write");
    std::fs::write(&key, key_pem).expect("write");
    let chain = (!chain.is_empty()).then(|| {
        let path = dir.path(&format!("{name}-chain.pem"));
        let text: String = chain
            .iter()
            .map(|p| std::fs::read_to_string(p).expect("chain part"))
            .collect();
        std::fs::write(&path, text).expect("write");
        path
    });
    Crafted {
        cert,
        key,
        chain,
        serial,
    }
}

fn tunnel_endpoint(lab: &Lab, pod: &str) -> String {
    format!("{}:15008", lab.topology.pod(pod).expect("pod").ip)
}

/// Runs `openssl s_client` from the attacker pod against api's tunnel listener.
fn present(lab: &Lab, crafted: Option<&Crafted>, extra: &[&str]) -> String {
    let mut cmd = lab.command_in("attacker", "timeout").expect("command");
    cmd.args(["10", "openssl", "s_client", "-connect"])
        .arg(tunnel_endpoint(lab, "api"))
        .args(["-alpn", "h2"])
        .args(extra)
        .stdin(Stdio::null());
    if let Some(c) = crafted {
        cmd.arg("-cert").arg(&c.cert).arg("-key").arg(&c.key);
        if let Some(chain) = &c.chain {
            cmd.arg("-cert_chain").arg(chain);
        }
    }
    let out = cmd.output().expect("openssl s_client");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A full handshake with `crafted` whose TLS session (with any tickets the server sent) is
/// saved to `session`: stdin stays open a second so that openssl reads the tickets.
fn save_session(lab: &Lab, crafted: &Crafted, session: &Path) -> String {
    let mut cmd = lab.command_in("attacker", "timeout").expect("command");
    cmd.args(["10", "openssl", "s_client", "-connect"])
        .arg(tunnel_endpoint(lab, "api"))
        .args(["-alpn", "h2", "-sess_out"])
        .arg(session)
        .arg("-cert")
        .arg(&crafted.cert)
        .arg("-key")
        .arg(&crafted.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(chain) = &crafted.chain {
        cmd.arg("-cert_chain").arg(chain);
    }
    let child = cmd.spawn().expect("openssl s_client");
    std::thread::sleep(Duration::from_secs(1));
    let out = child.wait_with_output().expect("openssl s_client");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const FAILURES: &str = "meshlet_tls_handshake_failures_total";

/// Asserts that presenting `crafted` makes node-2 count exactly one inbound handshake
/// failure, with `reason`.
fn refused_with(lab: &Lab, case: &str, crafted: Option<&Crafted>, extra: &[&str], reason: &str) {
    let inbound = "direction=\"inbound\"";
    let reason_label = format!("reason=\"{reason}\"");
    let before = metrics(lab, "node-2");
    let total_before = sample(&before, FAILURES, &[inbound]);
    let reason_before = sample(&before, FAILURES, &[inbound, &reason_label]);
    let output = present(lab, crafted, extra);
    let after = eventually(Duration::from_secs(5), || {
        let m = metrics(lab, "node-2");
        (sample(&m, FAILURES, &[inbound]) > total_before).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "{case}: the agent counted no handshake failure; openssl said:\n{output}\nagent log:\n{}",
            meshlet_lab::lab::log_tail(&lab.topology.node("node-2").expect("node").agent_log, 15)
        )
    });
    let reason_after = sample(&after, FAILURES, &[inbound, &reason_label]);
    let total_after = sample(&after, FAILURES, &[inbound]);
    assert_eq!(
        (reason_after - reason_before, total_after - total_before),
        (1.0, 1.0),
        "{case}: expected one failure with reason {reason}; failures now:\n{}",
        after
            .lines()
            .filter(|l| l.starts_with(FAILURES) && l.contains(inbound) && !l.ends_with(" 0"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!("{case:<48} refused: {reason}");
}

/// Asserts that presenting `crafted` passes the handshake (no failure counted).
fn accepted(lab: &Lab, case: &str, crafted: &Crafted, identity: &str) {
    let before = sample(
        &metrics(lab, "node-2"),
        FAILURES,
        &["direction=\"inbound\""],
    );
    let output = present(lab, Some(crafted), &[]);
    let line = format!("src_identity={identity}");
    let logged = eventually(Duration::from_secs(5), || {
        lab.agent_log("node-2")
            .lines()
            .any(|l| l.contains("accepted mTLS tunnel connection") && l.contains(&line))
            .then_some(())
    });
    assert!(
        logged.is_some(),
        "{case}: not accepted; openssl said:\n{output}"
    );
    let after = sample(
        &metrics(lab, "node-2"),
        FAILURES,
        &["direction=\"inbound\""],
    );
    assert_eq!(after, before, "{case}: a handshake failure was counted");
    println!("{case:<48} accepted");
}

fn lab_with_partner(scratch: &Scratch) -> (Lab, Issuer<'static, KeyPair>) {
    // Another trust domain the mesh federates with: its root is pushed as its own bundle.
    let partner_key = KeyPair::generate().expect("key");
    let partner_params = ca_params("partner root (partner.example)");
    let partner_root = partner_params.self_signed(&partner_key).expect("root");
    let partner_file = scratch.path("partner-root.pem");
    std::fs::write(&partner_file, partner_root.pem()).expect("write");
    let mut options = LabOptions::new(bin_dir());
    options.controlplane_args = vec![
        "--federate".into(),
        format!("partner.example={}", partner_file.display()),
    ];
    let lab = Lab::up(&pods(), &options).expect("lab up");
    (lab, Issuer::new(partner_params, partner_key))
}

#[test]
fn crafted_client_certificates_are_refused_each_with_its_reason() {
    let scratch = Scratch::new("attack");
    let (lab, partner) = lab_with_partner(&scratch);
    let pki = lab.pki();
    let int = pki.issuer(LabCa::Intermediate).expect("intermediate");
    let int_pem = pki.cert_path(LabCa::Intermediate);
    let chain = [int_pem.as_path()];
    let now = OffsetDateTime::now_utc();

    // Control: what the real CA would issue passes; so does a federated domain's workload.
    let good = craft(
        &scratch,
        "good",
        leaf_params(vec![uri(FRONTEND)]),
        &int,
        &chain,
    );
    accepted(
        &lab,
        "valid workload certificate (control)",
        &good,
        FRONTEND,
    );
    let partner_id = "spiffe://partner.example/ns/default/sa/frontend";
    let federated = craft(
        &scratch,
        "federated",
        leaf_params(vec![uri(partner_id)]),
        &partner,
        &[],
    );
    accepted(
        &lab,
        "federated domain, its own root (control)",
        &federated,
        partner_id,
    );

    let mut cases: Vec<(&str, Crafted, &str)> = Vec::new();
    let mut add = |name: &'static str,
                   params: CertificateParams,
                   issuer: &Issuer<'static, KeyPair>,
                   chain: &[&Path],
                   reason: &'static str| {
        let file = name.replace(' ', "-");
        cases.push((name, craft(&scratch, &file, params, issuer, chain), reason));
    };
    add(
        "wrong trust domain",
        leaf_params(vec![uri("spiffe://evil.example/ns/default/sa/frontend")]),
        &int,
        &chain,
        "unknown_trust_domain",
    );
    add(
        "our ID signed by another trust domain's CA",
        leaf_params(vec![uri(FRONTEND)]),
        &partner,
        &[],
        "unknown_issuer",
    );
    let mut p = leaf_params(vec![uri(FRONTEND)]);
    p.not_before = now - Duration::from_secs(7200);
    p.not_after = now - Duration::from_secs(3600);
    add("expired", p, &int, &chain, "certificate_expired");
    let mut p = leaf_params(vec![uri(FRONTEND)]);
    p.not_before = now + Duration::from_secs(3600);
    p.not_after = now + Duration::from_secs(7200);
    add(
        "not yet valid",
        p,
        &int,
        &chain,
        "certificate_not_yet_valid",
    );
    add(
        "two URI SANs",
        leaf_params(vec![uri(FRONTEND), uri(BACKEND)]),
        &int,
        &chain,
        "bad_san",
    );
    add(
        "ID only in a DNS SAN",
        leaf_params(vec![SanType::DnsName(
            "frontend.default.svc".try_into().expect("dns"),
        )]),
        &int,
        &chain,
        "bad_san",
    );
    add(
        "non-spiffe scheme",
        leaf_params(vec![uri("https://cluster.local/ns/default/sa/frontend")]),
        &int,
        &chain,
        "bad_spiffe_id",
    );
    add(
        "root path",
        leaf_params(vec![uri("spiffe://cluster.local/")]),
        &int,
        &chain,
        "bad_spiffe_id",
    );
    add(
        "uppercase trust domain",
        leaf_params(vec![uri("spiffe://Cluster.Local/ns/default/sa/frontend")]),
        &int,
        &chain,
        "bad_spiffe_id",
    );
    add(
        "a .. segment",
        leaf_params(vec![uri("spiffe://cluster.local/ns/../sa/frontend")]),
        &int,
        &chain,
        "bad_spiffe_id",
    );
    let mut p = leaf_params(vec![uri(FRONTEND)]);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    add("leaf with cA=true", p, &int, &chain, "ca_leaf");
    let mut p = leaf_params(vec![uri(FRONTEND)]);
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
    ];
    add("leaf with keyCertSign", p, &int, &chain, "leaf_key_usage");
    let mut p = leaf_params(vec![uri(FRONTEND)]);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::EmailProtection];
    add(
        "EKU emailProtection only",
        p,
        &int,
        &chain,
        "extended_key_usage",
    );
    for (name, crafted, reason) in &cases {
        refused_with(&lab, name, Some(crafted), &[], reason);
    }

    // RSA-1024: rcgen makes no such key, openssl does; the CA signs its public key.
    let rsa_key = scratch.path("rsa1024.key");
    let rsa_pub = scratch.path("rsa1024.pub");
    let ok = std::process::Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&rsa_key)
        .arg("1024")
        .stderr(Stdio::null())
        .status()
        .expect("openssl genrsa")
        .success()
        && std::process::Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&rsa_key)
            .arg("-out")
            .arg(&rsa_pub)
            .status()
            .expect("openssl pkey")
            .success();
    assert!(ok, "openssl could not make an RSA-1024 key");
    let spki =
        rcgen::SubjectPublicKeyInfo::from_pem(&std::fs::read_to_string(&rsa_pub).expect("pub"))
            .expect("spki");
    let cert = leaf_params(vec![uri(FRONTEND)])
        .signed_by(&spki, &int)
        .expect("sign rsa");
    let rsa = write_crafted(
        &scratch,
        "rsa1024",
        cert.pem(),
        std::fs::read_to_string(&rsa_key).expect("key"),
        &chain,
        vec![],
    );
    refused_with(
        &lab,
        "RSA-1024 key",
        Some(&rsa),
        &["-cipher", "DEFAULT:@SECLEVEL=0"],
        "weak_key",
    );
    refused_with(&lab, "no client certificate", None, &[], "no_certificate");
    refused_with(
        &lab,
        "a TLS 1.2 ClientHello",
        Some(&good),
        &["-tls1_2"],
        "tls_version",
    );
    // `meshlet certs verify`: the same verdicts, every reason at once, from a PEM file.
    let bundle = |c: &Crafted, name: &str| {
        let path = scratch.path(&format!("{name}-bundle.pem"));
        let mut text = std::fs::read_to_string(&c.cert).expect("cert");
        if let Some(chain) = &c.chain {
            text.push_str(&std::fs::read_to_string(chain).expect("chain"));
        }
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let (ok, out, err) = meshlet_cli(&lab, "node-2", &["certs", "verify", &bundle(&good, "good")]);
    assert!(
        ok && out.contains(&format!("verdict: TRUSTED as {FRONTEND}")),
        "{out}{err}"
    );
    let mut p = leaf_params(vec![uri(FRONTEND), uri(BACKEND)]);
    p.not_before = now - Duration::from_secs(7200);
    p.not_after = now - Duration::from_secs(3600);
    p.key_usages.push(KeyUsagePurpose::KeyCertSign);
    let flawed = craft(&scratch, "flawed", p, &int, &chain);
    let (ok, out, _) = meshlet_cli(
        &lab,
        "node-2",
        &["certs", "verify", &bundle(&flawed, "flawed")],
    );
    assert!(!ok, "a flawed chain verified:\n{out}");
    for reason in [
        "bad_san",
        "leaf_key_usage",
        "certificate_expired",
        "verdict: REFUSED (3 reasons)",
    ] {
        assert!(
            out.contains(reason),
            "certs verify did not say {reason}:\n{out}"
        );
    }
    println!("$ meshlet certs verify flawed.pem\n{out}");
    let (ok, out, _) = meshlet_cli(
        &lab,
        "node-2",
        &[
            "certs",
            "verify",
            &bundle(&cases[1].1, "partner-signed"),
            "-o",
            "json",
        ],
    );
    let verdict: serde_json::Value = serde_json::from_str(&out).expect("json verdict");
    assert!(
        !ok && verdict["reasons"][0]["reason"] == "unknown_issuer",
        "{out}"
    );

    // The real mesh still works after all that.
    let _server = Server::start(&lab, "api", 8080);
    let api = format!("{}:8080", lab.topology.pod("api").expect("api").ip);
    let (ok, _, err) = send(&lab, "web", &api, 4096, None, None);
    assert!(ok, "web → api failed after the attacks: {err}");
}

fn hex_serial(text: &str) -> Vec<u8> {
    text.split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("hex serial"))
        .collect()
}

/// The serial of `identity`'s current certificate on `node`, from `meshlet certs -o json`.
fn serial_on(lab: &Lab, node: &str, identity: &str) -> String {
    let (ok, out, err) = meshlet_cli(lab, node, &["certs", "-o", "json"]);
    assert!(ok, "meshlet certs: {err}");
    let certs: serde_json::Value = serde_json::from_str(&out).expect("json");
    certs
        .as_array()
        .expect("array")
        .iter()
        .find(|c| c["identity"] == identity)
        .and_then(|c| c["serial"].as_str())
        .expect("serial")
        .to_string()
}

#[test]
fn crls_refuse_new_handshakes_and_close_live_tunnels() {
    let scratch = Scratch::new("revoke");
    let lab = meshlet_lab::Lab::up(&pods(), &LabOptions::new(bin_dir())).expect("lab up");
    let pki = lab.pki();
    let int = pki.issuer(LabCa::Intermediate).expect("intermediate");
    let root = pki.issuer(LabCa::Root).expect("root");
    let int_pem = pki.cert_path(LabCa::Intermediate);

    // A second intermediate under the same root, and a leaf from it.
    let mut int2_params = ca_params("lab intermediate 2");
    let int2_serial = random_serial();
    int2_params.serial_number = Some(SerialNumber::from_slice(&int2_serial));
    let int2_key = KeyPair::generate().expect("key");
    let int2_cert = int2_params.signed_by(&int2_key, &root).expect("int2");
    let int2_file = scratch.path("int2.pem");
    std::fs::write(&int2_file, int2_cert.pem()).expect("write");
    let int2 = Issuer::new(int2_params, int2_key);
    let under_int2 = craft(
        &scratch,
        "under-int2",
        leaf_params(vec![uri(FRONTEND)]),
        &int2,
        &[&int2_file],
    );
    let revoked_leaf = craft(
        &scratch,
        "revoked",
        leaf_params(vec![uri(FRONTEND)]),
        &int,
        &[&int_pem],
    );
    let good = craft(
        &scratch,
        "good",
        leaf_params(vec![uri(FRONTEND)]),
        &int,
        &[&int_pem],
    );
    accepted(
        &lab,
        "leaf from intermediate 2 before its revocation",
        &under_int2,
        FRONTEND,
    );
    // The attacker keeps the session of a handshake made before the revocation, to resume it
    // after (a resumed TLS 1.3 session skips certificate verification, and so the CRL).
    let session = scratch.path("revoked.session");
    let first = save_session(&lab, &revoked_leaf, &session);
    assert!(
        first.contains("New, TLSv1.3"),
        "the first handshake failed:\n{first}"
    );
    // TLS 1.3 resumes only with a ticket, and openssl saves a session only when it got one:
    // the tunnel server must issue none (before the fix it sent two, and a revoked client
    // resumed on them).
    assert!(
        !session.exists() && !first.contains("TLS session ticket:"),
        "the tunnel server issued a session ticket; a resumed session would skip the CRL:\n{first}"
    );

    // A live tunneled connection web → api, authenticated with web's real certificate.
    let _server = Server::start(&lab, "api", 8080);
    let api = format!("{}:8080", lab.topology.pod("api").expect("api").ip);
    let ping = Ping::start(&lab, "web", &api, 60);
    assert_eq!(
        ping.next(Duration::from_secs(10)).as_deref(),
        Some("CONNECTED")
    );
    let web_serial = serial_on(&lab, "node-1", FRONTEND);

    // Revoke web's live certificate and the crafted leaf (intermediate's CRL), and
    // intermediate 2 (root's CRL).
    let fresh = OffsetDateTime::now_utc() + Duration::from_secs(3600);
    let written = Instant::now();
    pki.write_crl(
        LabCa::Intermediate,
        &[hex_serial(&web_serial), revoked_leaf.serial.clone()],
        fresh,
    )
    .expect("crl");
    pki.write_crl(LabCa::Root, std::slice::from_ref(&int2_serial), fresh)
        .expect("root crl");
    let line = ping.next(Duration::from_secs(5));
    let closed_after = written.elapsed();
    assert_eq!(
        line.as_deref(),
        Some("CLOSED"),
        "the live tunnel of a revoked certificate stayed open"
    );
    println!("CRL written → live tunnel of the revoked certificate closed after {closed_after:?}");
    assert!(
        closed_after < Duration::from_secs(2),
        "closing took {closed_after:?}; the control plane polls its files every 200 ms and the agents close at once"
    );
    let log = lab.agent_log("node-2");
    assert!(
        log.contains("event=\"tunnel_closed\"") && log.contains("reason=\"revoked\""),
        "node-2 did not log the close:\n{log}"
    );
    refused_with(&lab, "revoked leaf", Some(&revoked_leaf), &[], "revoked");
    refused_with(
        &lab,
        "leaf of a revoked intermediate",
        Some(&under_int2),
        &[],
        "revoked",
    );

    // web's agent renews its revoked certificate at once; new connections work again.
    let renewed = eventually(Duration::from_secs(10), || {
        let serial = serial_on(&lab, "node-1", FRONTEND);
        (serial != web_serial).then_some(serial)
    });
    assert!(
        renewed.is_some(),
        "web's revoked certificate was not renewed"
    );
    assert!(lab
        .agent_log("node-1")
        .contains("event=\"certificate_renewal_forced\""));
    let (ok, _, err) = send(&lab, "web", &api, 4096, None, None);
    assert!(ok, "web → api after renewal: {err}");

    // An out-of-date CRL fails closed: the CRL publisher stopped and its next update passed.
    pki.write_crl(
        LabCa::Intermediate,
        std::slice::from_ref(&revoked_leaf.serial),
        OffsetDateTime::now_utc() + Duration::from_secs(2),
    )
    .expect("short crl");
    std::thread::sleep(Duration::from_secs(3));
    refused_with(
        &lab,
        "a CRL past its next update",
        Some(&good),
        &[],
        "crl_expired",
    );
    pki.write_crl(
        LabCa::Intermediate,
        std::slice::from_ref(&revoked_leaf.serial),
        fresh,
    )
    .expect("fresh crl");
    let back = eventually(Duration::from_secs(5), || {
        let m = metrics(&lab, "node-2");
        let before = sample(&m, FAILURES, &["direction=\"inbound\""]);
        let output = present(&lab, Some(&good), &[]);
        let after = sample(
            &metrics(&lab, "node-2"),
            FAILURES,
            &["direction=\"inbound\""],
        );
        (after == before).then_some(output)
    });
    assert!(back.is_some(), "a fresh CRL did not restore trust");
}

#[test]
fn a_server_with_another_workloads_valid_certificate_is_refused() {
    let scratch = Scratch::new("impostor");
    let lab = meshlet_lab::Lab::up(&pods(), &LabOptions::new(bin_dir())).expect("lab up");
    let pki = lab.pki();
    let int = pki.issuer(LabCa::Intermediate).expect("intermediate");
    let int_pem = pki.cert_path(LabCa::Intermediate);
    // A perfectly valid certificate, but of backend: the impostor pod is default/impostor,
    // whose workloads present …/sa/db.
    let stolen = craft(
        &scratch,
        "backend",
        leaf_params(vec![uri(BACKEND)]),
        &int,
        &[&int_pem],
    );
    let mut server = lab
        .command_in("impostor", "timeout")
        .expect("command")
        .args([
            "30", "openssl", "s_server", "-accept", "15008", "-tls1_3", "-alpn", "h2",
        ])
        .arg("-cert")
        .arg(&stolen.cert)
        .arg("-key")
        .arg(&stolen.key)
        .arg("-cert_chain")
        .arg(stolen.chain.as_ref().expect("chain"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    std::thread::sleep(Duration::from_millis(500));
    let outbound = "direction=\"outbound\"";
    let before = sample(
        &metrics(&lab, "node-1"),
        FAILURES,
        &[outbound, "reason=\"identity_mismatch\""],
    );
    let impostor = format!("{}:8080", lab.topology.pod("impostor").expect("pod").ip);
    let (ok, _, _) = send(&lab, "web", &impostor, 64, None, None);
    let _ = server.kill();
    let _ = server.wait();
    assert!(!ok, "web reached an impostor");
    let after = sample(
        &metrics(&lab, "node-1"),
        FAILURES,
        &[outbound, "reason=\"identity_mismatch\""],
    );
    assert_eq!(
        after - before,
        1.0,
        "the client side did not refuse the impostor's identity"
    );
    let log = lab.agent_log("node-1");
    assert!(
        log.contains("server presented spiffe://cluster.local/ns/default/sa/backend, but the destination may only be spiffe://cluster.local/ns/default/sa/db"),
        "{log}"
    );
    println!(
        "{:<48} refused: identity_mismatch",
        "outbound: another workload's valid certificate"
    );
}

/// The flag that hands an agent a join token.
fn join_token(path: &Path) -> [std::ffi::OsString; 2] {
    ["--join-token-file".into(), path.into()]
}

#[test]
fn join_tokens_work_once_for_their_node_until_they_expire() {
    let scratch = Scratch::new("join");
    let lab = meshlet_lab::Lab::up(&pods()[..2], &LabOptions::new(bin_dir())).expect("lab up");
    let token = lab.create_join_token("node-x", 600).expect("token");
    {
        let first = ExtraAgent::start(&lab, &scratch, "node-x", &join_token(&token), 15101);
        first.wait_for("event=\"node_joined\"");
        first.wait_for("applied control-plane update");
        println!("{:<48} joined", "fresh token for its node");
    }
    // The same token again (a new identity folder, so the agent must join): refused.
    let again = ExtraAgent::start(&lab, &scratch, "node-x", &join_token(&token), 15102);
    again.wait_for("join token already used");
    println!("{:<48} refused: already used", "reused token");
    drop(again);
    let short = lab.create_join_token("node-x", 1).expect("token");
    std::thread::sleep(Duration::from_secs(2));
    let late = ExtraAgent::start(&lab, &scratch, "node-x", &join_token(&short), 15103);
    late.wait_for("join token expired");
    println!("{:<48} refused: expired", "expired token");
    drop(late);
    let other = lab.create_join_token("node-y", 600).expect("token");
    let wrong = ExtraAgent::start(&lab, &scratch, "node-x", &join_token(&other), 15104);
    wrong.wait_for("join token was created for node \\\"node-y\\\"");
    println!("{:<48} refused: another node's", "another node's token");
    drop(wrong);
    let cp_log = std::fs::read_to_string(&lab.topology.controlplane_log).expect("log");
    assert!(
        cp_log.contains("event=\"node_join_refused\"") && cp_log.contains("event=\"node_joined\""),
        "the control plane did not audit the joins"
    );
}

/// Roots in the trust bundle that `node`'s agent applied.
fn roots_on(lab: &Lab, node: &str) -> usize {
    let (status, body) = common::admin_get(lab, node, 15000, "/config_dump");
    assert_eq!(status, 200);
    let dump: serde_json::Value = serde_json::from_str(&body).expect("json");
    dump["discovery"]["trust_roots_pem"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(0)
}

/// The issuer of `node`'s workload certificate.
fn issuer_on(lab: &Lab, node: &str) -> String {
    let (ok, out, _) = meshlet_cli(lab, node, &["certs", "-o", "json"]);
    assert!(ok);
    let certs: serde_json::Value = serde_json::from_str(&out).expect("json");
    certs[0]["issuer_chain"][0]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[test]
fn ca_rotation_a_to_a_and_b_to_b_without_a_failed_connection() {
    use std::sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Mutex,
    };
    let lab = meshlet_lab::Lab::up(&pods()[..2], &LabOptions::new(bin_dir())).expect("lab up");
    let pki = lab.pki();
    let _server = Server::start_with(&lab, "api", 8080, 2000, 120);
    let api = format!("{}:8080", lab.topology.pod("api").expect("api").ip);
    let ping = Ping::start(&lab, "web", &api, 100);
    assert_eq!(
        ping.next(Duration::from_secs(10)).as_deref(),
        Some("CONNECTED")
    );

    // CA B: a new root and an intermediate under it.
    let root_b_key = KeyPair::generate().expect("key");
    let root_b_params = ca_params("lab root B");
    let root_b = root_b_params.self_signed(&root_b_key).expect("root B");
    let root_b_issuer = Issuer::new(root_b_params, root_b_key);
    let int_b_key = KeyPair::generate().expect("key");
    let int_b = ca_params("lab intermediate B")
        .signed_by(&int_b_key, &root_b_issuer)
        .expect("intermediate B");
    let root_a = std::fs::read_to_string(pki.cert_path(LabCa::Root)).expect("root A");

    let stop = AtomicBool::new(false);
    let sent = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Acquire) {
                let (ok, _, err) = send(&lab, "web", &api, 512, None, None);
                sent.fetch_add(1, Ordering::AcqRel);
                if !ok {
                    failures.lock().expect("lock").push(err);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let wait = |what: &str, done: &dyn Fn() -> bool| {
            let reached = eventually(Duration::from_secs(20), || done().then_some(()));
            if reached.is_none() {
                stop.store(true, Ordering::Release);
            }
            assert!(reached.is_some(), "never reached: {what}");
            println!("{what}");
        };
        std::thread::sleep(Duration::from_secs(1));
        // 1. Trust A and B.
        meshlet_lab::pki::write_atomically(
            &pki.roots_path(),
            format!("{root_a}{}", root_b.pem()).as_bytes(),
        )
        .expect("roots A+B");
        wait("1. both nodes trust A and B", &|| {
            roots_on(&lab, "node-1") == 2 && roots_on(&lab, "node-2") == 2
        });
        // 2. Issue from B: the operator swaps the intermediate on disk.
        meshlet_lab::pki::write_atomically(
            &pki.key_path(LabCa::Intermediate),
            int_b_key.serialize_pem().as_bytes(),
        )
        .expect("key B");
        meshlet_lab::pki::write_atomically(
            &pki.cert_path(LabCa::Intermediate),
            int_b.pem().as_bytes(),
        )
        .expect("intermediate B");
        wait(
            "2. both nodes hold certificates from intermediate B",
            &|| {
                issuer_on(&lab, "node-1").contains("lab intermediate B")
                    && issuer_on(&lab, "node-2").contains("lab intermediate B")
            },
        );
        assert_eq!(
            ping.next(Duration::ZERO),
            None,
            "adding a root or a signer dropped a live connection"
        );
        std::thread::sleep(Duration::from_secs(2));
        // 3. Trust B only.
        meshlet_lab::pki::write_atomically(&pki.roots_path(), root_b.pem().as_bytes())
            .expect("roots B");
        wait("3. both nodes trust B only", &|| {
            roots_on(&lab, "node-1") == 1 && roots_on(&lab, "node-2") == 1
        });
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Release);
    });
    let failures = failures.into_inner().expect("lock");
    let sent = sent.load(Ordering::Acquire);
    println!(
        "{sent} connections during the rotation, {} failed",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "connections failed during the CA rotation:\n{}",
        failures.join("\n")
    );
    assert!(sent > 20, "too little traffic to tell");
    let cp_log = std::fs::read_to_string(&lab.topology.controlplane_log).expect("log");
    assert!(cp_log.contains("event=\"ca_reloaded\""));
    // The connection opened under A is closed once A is no longer trusted (logged), never
    // kept on a chain the mesh no longer trusts.
    assert_eq!(ping.next(Duration::from_secs(3)).as_deref(), Some("CLOSED"));
}
