//! What a peer or a pod can make an agent do, in the lab (issue 12): connection caps and
//! handshake, idle and keepalive timeouts on the tunnel listener, HTTP/2 stream and header
//! limits, a restarted control plane, refused CONNECTs, the agent's own ports, and deliveries
//! to closed ports. Root only; run one at a time (`cargo xtask test` does).
use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use meshlet_lab::{pki::LabCa, Lab, LabOptions, PodSpec};
use serde_json::json;

mod common;
use common::{bin_dir, eventually, metrics, sample, send, wait_version, Server};

fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("web", "node-1", "frontend"),
        PodSpec::new("api", "node-2", "backend"),
        PodSpec::new("attacker", "node-1", "attacker").outside_mesh(),
    ]
}

fn lab_with(agent_args: &[&str]) -> Lab {
    let mut options = LabOptions::new(bin_dir());
    options.agent_args = agent_args.iter().map(|s| s.to_string()).collect();
    Lab::up(&pods(), &options).expect("lab up")
}

fn addr(lab: &Lab, pod: &str, port: u16) -> SocketAddr {
    SocketAddr::from((lab.topology.pod(pod).expect("pod").ip, port))
}

fn netns_of(lab: &Lab, pod: &str) -> String {
    lab.topology.pod(pod).expect("pod").netns.clone()
}

/// Whether the far end still holds `conn` open: a read would block (no EOF, no reset).
fn still_open(conn: &mut TcpStream) -> bool {
    let _ = conn.set_nonblocking(true);
    let mut byte = [0u8; 1];
    matches!(conn.read(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock)
}

/// The agent log lines of `node` written after `offset` bytes.
fn log_since(lab: &Lab, node: &str, offset: usize) -> String {
    lab.agent_log(node).get(offset..).unwrap_or("").to_string()
}

#[test]
fn the_tunnel_listener_sheds_past_its_caps_and_drops_peers_that_never_handshake() {
    let lab = lab_with(&[
        "--tunnel-handshake-timeout=2",
        "--max-connections-per-source=10",
    ]);
    let _server = Server::start(&lab, "api", 8080);
    let tunnel = addr(&lab, "api", 15008);
    let before = metrics(&lab, "node-2");
    // 30 idle TCP connections from one address: the first 10 are held (until the handshake
    // timeout), the newest 20 are shed at once.
    let (open_after_1s, open_after_4s) =
        meshlet_lab::netns::run_in(&netns_of(&lab, "attacker"), move || {
            let mut conns = Vec::new();
            for _ in 0..30 {
                conns.push(TcpStream::connect_timeout(&tunnel, Duration::from_secs(5))?);
                // In order, so that "the newest" is well defined.
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_secs(1));
            let after_1s: Vec<bool> = conns.iter_mut().map(still_open).collect();
            std::thread::sleep(Duration::from_secs(3));
            let after_4s = conns
                .iter_mut()
                .map(still_open)
                .filter(|open| *open)
                .count();
            Ok((after_1s, after_4s))
        })
        .expect("attacker");
    let held: Vec<usize> = (0..30).filter(|i| open_after_1s[*i]).collect();
    assert_eq!(
        held,
        (0..10).collect::<Vec<_>>(),
        "the oldest 10 should be held and the newest 20 shed"
    );
    assert_eq!(
        open_after_4s, 0,
        "connections that never sent a TLS ClientHello outlived the 2 s handshake timeout"
    );
    let after = metrics(&lab, "node-2");
    let delta =
        |name: &str, label: &str| sample(&after, name, &[label]) - sample(&before, name, &[label]);
    assert_eq!(
        delta(
            "meshlet_connections_shed_total",
            "reason=\"per_source_limit\""
        ),
        20.0
    );
    assert_eq!(
        delta("meshlet_tunnel_timeouts_total", "reason=\"handshake\""),
        10.0
    );
    // The mesh's own traffic was never in the way.
    let (ok, report, err) = send(
        &lab,
        "web",
        &addr(&lab, "api", 8080).to_string(),
        4096,
        None,
        None,
    );
    assert!(ok, "web → api after the flood: {err} {report}");
}

/// A client certificate as the mesh CA would issue one to `…/sa/attacker`, so that the
/// attacker gets past TLS and can test what comes after.
fn attacker_tls(lab: &Lab) -> Arc<rustls::ClientConfig> {
    use rcgen::{
        CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
    };
    let pki = lab.pki();
    let issuer = pki.issuer(LabCa::Intermediate).expect("intermediate");
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        "spiffe://cluster.local/ns/default/sa/attacker"
            .try_into()
            .expect("uri"),
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("key");
    let leaf = params.signed_by(&key, &issuer).expect("leaf");
    let intermediate = std::fs::read(pki.cert_path(LabCa::Intermediate)).expect("intermediate pem");
    let intermediate =
        rustls::pki_types::CertificateDer::from_pem_slice(&intermediate).expect("intermediate der");
    let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key der");
    let mut config = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(
            rustls::crypto::aws_lc_rs::default_provider(),
        )))
        .with_client_auth_cert(vec![leaf.der().clone(), intermediate], key)
        .expect("client config");
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

use rustls::pki_types::pem::PemObject;

/// The attacker does not care who the server is.
#[derive(Debug)]
struct AnyServer(rustls::crypto::CryptoProvider);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// One HTTP/2 frame: (type, flags, stream, payload).
type Frame = (u8, u8, u32, Vec<u8>);

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// The next frame, or `None` at EOF or when the connection fails.
fn read_frame(tls: &mut Tls) -> std::io::Result<Option<Frame>> {
    let mut head = [0u8; 9];
    match tls.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Err(e),
        Err(_) => return Ok(None),
    }
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    if tls.read_exact(&mut payload).is_err() {
        return Ok(None);
    }
    Ok(Some((head[3], head[4], stream, payload)))
}

/// An HPACK string length or integer with a 7-bit prefix (no Huffman).
fn hpack_len(n: usize, out: &mut Vec<u8>) {
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    let mut rest = n - 127;
    while rest >= 128 {
        out.push((rest % 128 + 128) as u8);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A CONNECT header block (`:method` and `:authority` by static-table name), plus one
/// header of `extra` bytes when asked.
fn connect_headers(authority: &str, extra: usize) -> Vec<u8> {
    let mut block = vec![0x02];
    hpack_len(7, &mut block);
    block.extend_from_slice(b"CONNECT");
    block.push(0x01);
    hpack_len(authority.len(), &mut block);
    block.extend_from_slice(authority.as_bytes());
    if extra > 0 {
        block.push(0x00);
        hpack_len(5, &mut block);
        block.extend_from_slice(b"x-big");
        hpack_len(extra, &mut block);
        block.extend(std::iter::repeat_n(b'a', extra));
    }
    block
}

/// Sends a header block on `stream` as HEADERS + CONTINUATION frames of 16 KiB.
fn send_headers(tls: &mut Tls, stream: u32, block: &[u8]) -> std::io::Result<()> {
    let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let end = if i + 1 == chunks.len() { 0x4 } else { 0 };
        let kind = if i == 0 { 0x1 } else { 0x9 };
        tls.write_all(&frame(kind, end, stream, chunk))?;
    }
    tls.flush()
}

/// Reads frames until one on `stream` tells its fate: the first byte of a response header
/// block (0x88 is `:status 200` from the static table), a reset, or the connection's end.
fn fate_of(tls: &mut Tls, stream: u32) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        match read_frame(tls) {
            Ok(Some((0x1, _, s, payload))) if s == stream => {
                return format!("headers {:#04x}", payload.first().copied().unwrap_or(0))
            }
            Ok(Some((0x3, _, s, _))) if s == stream => return "reset".into(),
            Ok(Some((0x7, _, _, _))) | Ok(None) => return "connection closed".into(),
            Ok(Some(_)) => {}
            Err(_) => {}
        }
    }
    "no answer".into()
}

#[test]
fn http2_limits_are_advertised_and_enforced_and_idle_or_stuck_connections_close() {
    let lab = lab_with(&["--tunnel-server-idle-timeout=2"]);
    let _server = Server::start(&lab, "api", 8080);
    let tunnel = addr(&lab, "api", 15008);
    let authority = addr(&lab, "api", 8080).to_string();
    let config = attacker_tls(&lab);
    let before = metrics(&lab, "node-2");
    let (settings, fates, idle_closed, stuck_closed) =
        meshlet_lab::netns::run_in(&netns_of(&lab, "attacker"), move || {
            let open = |config: &Arc<rustls::ClientConfig>| -> anyhow::Result<Tls> {
                let tcp = TcpStream::connect_timeout(&tunnel, Duration::from_secs(5))?;
                tcp.set_read_timeout(Some(Duration::from_secs(1)))?;
                let name = rustls::pki_types::ServerName::from(tunnel.ip());
                let conn = rustls::ClientConnection::new(config.clone(), name)?;
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")?;
                tls.write_all(&frame(0x4, 0, 0, &[]))?;
                tls.flush()?;
                Ok(tls)
            };
            // The server's SETTINGS.
            let mut tls = open(&config)?;
            let mut settings = std::collections::BTreeMap::new();
            for _ in 0..10 {
                if let Ok(Some((0x4, flags, 0, payload))) = read_frame(&mut tls) {
                    if flags & 0x1 == 0 {
                        for p in payload.chunks(6) {
                            settings.insert(
                                u16::from_be_bytes([p[0], p[1]]),
                                u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
                            );
                        }
                        break;
                    }
                }
            }
            tls.write_all(&frame(0x4, 0x1, 0, &[]))?;
            // A small CONNECT is answered 200 (the control); one with a 1 MiB header is not.
            send_headers(&mut tls, 1, &connect_headers(&authority, 0))?;
            let small = fate_of(&mut tls, 1);
            // The server may close the connection before it has read all of it.
            let big = match send_headers(&mut tls, 3, &connect_headers(&authority, 1 << 20)) {
                Ok(()) => fate_of(&mut tls, 3),
                Err(e) => format!("connection closed while sending: {e}"),
            };
            drop(tls);
            // A connection that opens no stream is closed after the idle timeout.
            let started = Instant::now();
            let mut idle = open(&config)?;
            let mut idle_closed = None;
            while started.elapsed() < Duration::from_secs(10) {
                if let Ok(None) | Ok(Some((0x7, _, _, _))) = read_frame(&mut idle) {
                    idle_closed = Some(started.elapsed());
                    break;
                }
            }
            // A truncated HEADERS frame (1000 bytes announced, 10 sent) holds no stream: the
            // idle timeout closes it too, instead of waiting for the rest forever.
            let started = Instant::now();
            let mut stuck = open(&config)?;
            let mut truncated = frame(0x1, 0x4, 5, &[0u8; 10]);
            truncated[..3].copy_from_slice(&[0, 0x03, 0xe8]);
            stuck.write_all(&truncated)?;
            stuck.flush()?;
            let mut stuck_closed = None;
            while started.elapsed() < Duration::from_secs(10) {
                if let Ok(None) | Ok(Some((0x7, _, _, _))) = read_frame(&mut stuck) {
                    stuck_closed = Some(started.elapsed());
                    break;
                }
            }
            Ok((settings, (small, big), idle_closed, stuck_closed))
        })
        .expect("attacker");
    assert_eq!(
        settings.get(&0x3),
        Some(&200),
        "SETTINGS_MAX_CONCURRENT_STREAMS: {settings:?}"
    );
    assert_eq!(
        settings.get(&0x6),
        Some(&65536),
        "SETTINGS_MAX_HEADER_LIST_SIZE: {settings:?}"
    );
    assert_eq!(
        fates.0, "headers 0x88",
        "the small CONNECT was not answered 200"
    );
    assert_ne!(
        fates.1, "headers 0x88",
        "a CONNECT with a 1 MiB header list was accepted"
    );
    assert!(
        idle_closed.is_some(),
        "a tunnel connection with no stream outlived the 2 s idle timeout"
    );
    assert!(
        stuck_closed.is_some(),
        "a connection stuck in a truncated HEADERS frame was held open"
    );
    let after = metrics(&lab, "node-2");
    let idle = |m: &str| sample(m, "meshlet_tunnel_timeouts_total", &["reason=\"idle\""]);
    assert!(
        idle(&after) - idle(&before) >= 2.0,
        "idle closes not counted"
    );
}

#[test]
fn a_dead_path_drops_the_tunnel_and_the_next_connection_dials_afresh() {
    let lab = lab_with(&[
        "--tunnel-keepalive-interval=1",
        "--tunnel-keepalive-timeout=2",
    ]);
    let _server = Server::start(&lab, "api", 8080);
    let api = addr(&lab, "api", 8080).to_string();
    // A pooled tunnel web → api exists.
    let (ok, _, err) = send(&lab, "web", &api, 1024, None, None);
    assert!(ok, "web → api: {err}");
    // The path between the nodes silently drops everything, both ways (blackhole routes on
    // each node for the other's pods: no ICMP, no reset).
    let node1 = lab.topology.node("node-1").expect("node-1").clone();
    let node2 = lab.topology.node("node-2").expect("node-2").clone();
    let route = |netns: &str, kind: &[&str]| {
        let status = std::process::Command::new("ip")
            .args(["-n", netns, "route", "replace"])
            .args(kind)
            .status()
            .expect("ip route");
        assert!(status.success(), "ip route replace {kind:?}");
    };
    let offset = lab.agent_log("node-1").len();
    route(&node1.netns, &["blackhole", &node2.pod_cidr]);
    route(&node2.netns, &["blackhole", &node1.pod_cidr]);
    let cut = Instant::now();
    // The PING every second goes unanswered for 2 s: node-1 drops the pooled tunnel.
    let dropped = eventually(Duration::from_secs(15), || {
        log_since(&lab, "node-1", offset)
            .lines()
            .find(|l| l.contains("event=\"tunnel_closed\" direction=\"outbound\""))
            .map(str::to_string)
    });
    let noticed_after = cut.elapsed();
    route(
        &node1.netns,
        &[&node2.pod_cidr, "via", &node2.link_ip.to_string()],
    );
    route(
        &node2.netns,
        &[&node1.pod_cidr, "via", &node1.link_ip.to_string()],
    );
    let line = dropped.unwrap_or_else(|| {
        panic!(
            "node-1 kept a tunnel over a dead path:\n{}",
            meshlet_lab::lab::log_tail(&node1.agent_log, 20)
        )
    });
    assert!(line.contains("PING"), "{line}");
    println!("path cut → tunnel dropped after {noticed_after:?}");
    // The path is back: a new connection works at once, on a fresh tunnel (the dead one is
    // not reused).
    let (ok, report, err) = send(&lab, "web", &api, 4096, None, None);
    assert!(ok, "web → api after the path came back: {err} {report}");
}

#[test]
fn a_restarted_control_plane_is_followed_at_once() {
    let mut lab = lab_with(&[]);
    let _server = Server::start(&lab, "api", 8080);
    let api = addr(&lab, "api", 8080).to_string();
    // The running control plane reaches version 3.
    for (version, mode) in [(2, "PERMISSIVE"), (3, "STRICT")] {
        common::write_policy(&lab, json!({"mesh": {"mode": mode}}), version, false);
    }
    let offsets: Vec<usize> = ["node-1", "node-2"]
        .iter()
        .map(|n| lab.agent_log(n).len())
        .collect();
    lab.restart_controlplane().expect("restart");
    // The new process numbers from 1: its first update is a full state, applied at once.
    for (node, offset) in ["node-1", "node-2"].iter().zip(&offsets) {
        let applied = eventually(Duration::from_secs(15), || {
            log_since(&lab, node, *offset)
                .contains("applied control-plane update version=1 ")
                .then_some(())
        });
        assert!(
            applied.is_some(),
            "{node} did not apply the restarted control plane's version 1:\n{}",
            log_since(&lab, node, *offset)
        );
    }
    // And what it says next is enforced: a DENY for web.
    common::write_policy(
        &lab,
        json!({"policies": [{"name": "cut-web", "namespace": "default",
            "selector": {"app": "api"}, "action": "DENY",
            "rules": [{"from": [{"principals": ["*/sa/frontend"]}]}]}]}),
        2,
        false,
    );
    let (ok, _, _) = send(&lab, "web", &api, 256, None, None);
    assert!(!ok, "the restarted control plane's DENY was not enforced");
    for (node, offset) in ["node-1", "node-2"].iter().zip(&offsets) {
        assert!(
            !log_since(&lab, node, *offset).contains("is not newer than"),
            "{node} NACKed the restarted control plane"
        );
    }
}

#[test]
fn refused_connects_reset_the_app_and_one_traceparent_joins_both_nodes_lines() {
    let lab = lab_with(&[]);
    let _server = Server::start(&lab, "api", 8080);
    let api = addr(&lab, "api", 8080).to_string();
    // One connection's traceparent is in both nodes' access lines.
    let (ok, _, err) = send(&lab, "web", &api, 1024, None, None);
    assert!(ok, "web → api: {err}");
    let node1 = lab.agent_log("node-1");
    let traceparent = node1
        .lines()
        .filter(|l| l.contains("direction=\"outbound\"") && l.contains("connection closed"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("traceparent="))
                .map(|t| t.trim_matches('"').to_string())
        })
        .expect("node-1 logged no traceparent");
    assert!(traceparent.starts_with("00-") && traceparent.len() == 55);
    let found = eventually(Duration::from_secs(5), || {
        lab.agent_log("node-2")
            .lines()
            .any(|l| l.contains("direction=\"inbound\"") && l.contains(&traceparent))
            .then_some(())
    });
    assert!(
        found.is_some(),
        "node-2 did not log traceparent {traceparent}"
    );

    // An authorization denial is answered 401 (as ztunnel does), and the app sees a reset,
    // not a clean end as if the server had answered nothing.
    common::write_policy(
        &lab,
        json!({"policies": [{"name": "cut-web", "namespace": "default",
            "selector": {"app": "api"}, "action": "DENY",
            "rules": [{"from": [{"principals": ["*/sa/frontend"]}]}]}]}),
        2,
        false,
    );
    let (ok, report, err) = send(&lab, "web", &api, 1024, None, None);
    assert!(!ok, "a denied connection got through: {report}");
    assert!(
        err.contains("reset"),
        "the app was not reset on a refused CONNECT: {err} {report}"
    );
    assert!(
        lab.agent_log("node-1").contains("HTTP 401 Unauthorized"),
        "node-1 did not log the peer's 401"
    );
}

#[test]
fn the_agents_own_ports_are_never_a_delivery_target_and_closed_ports_refuse_at_once() {
    let lab = lab_with(&[]);
    common::write_policy(&lab, json!({"mesh": {"mode": "PERMISSIVE"}}), 2, false);
    // Plaintext straight to api's plaintext listener: refused, not delivered back to the agent.
    let listener = addr(&lab, "api", 15006).to_string();
    let (ok, report, _) = send(&lab, "attacker", &listener, 64, None, None);
    assert!(
        !ok,
        "plaintext to the agent's port 15006 was answered: {report}"
    );
    let refused = eventually(Duration::from_secs(5), || {
        lab.agent_log("node-2")
            .contains("destination is one of the agent's own ports")
            .then_some(())
    });
    assert!(
        refused.is_some(),
        "node-2 did not refuse plaintext to 15006"
    );
    // A CONNECT to a port where nothing listens: the app's RST comes back to the agent (it is
    // not sent out of the pod towards the client's address), so the delivery fails at once
    // with "refused", not after the connect times out.
    let closed = addr(&lab, "api", 7777).to_string();
    let (ok, _, _) = send(&lab, "web", &closed, 64, None, None);
    assert!(!ok);
    let line = eventually(Duration::from_secs(15), || {
        lab.agent_log("node-2")
            .lines()
            .find(|l| l.contains(":7777") && l.contains("outcome=\"failed\""))
            .map(str::to_string)
    })
    .expect("node-2 logged no failed delivery to :7777");
    assert!(
        line.contains("refused"),
        "the delivery to a closed port did not fail with a refusal: {line}"
    );
    wait_version(&lab, 2, false);
}

#[test]
fn two_add_pods_for_one_uid_never_both_enroll() {
    let mut specs = pods();
    for name in ["spare-a", "spare-b"] {
        specs.push(PodSpec::new(name, "node-1", "spare").outside_mesh());
    }
    let lab = Lab::up(&specs, &LabOptions::new(bin_dir())).expect("lab up");
    let socket = lab
        .topology
        .node("node-1")
        .expect("node-1")
        .agent_socket
        .clone();
    let paths: Vec<String> = ["spare-a", "spare-b"]
        .iter()
        .map(|p| lab.topology.pod(p).expect("pod").netns_path.clone())
        .collect();
    // The same uid with two network namespaces, at the same moment.
    let results: Vec<anyhow::Result<u64>> = std::thread::scope(|scope| {
        let handles: Vec<_> = paths
            .iter()
            .map(|path| {
                let (lab, socket) = (&lab, &socket);
                scope.spawn(move || {
                    lab.add_pod(
                        socket,
                        meshlet_proto::v1::AddPodRequest {
                            uid: "uid-twice".into(),
                            netns_path: path.clone(),
                        },
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "one uid enrolled twice: {results:?}");
    let refused = results
        .iter()
        .find_map(|r| r.as_ref().err())
        .expect("one refusal")
        .to_string();
    assert!(
        refused.contains("being enrolled") || refused.contains("already enrolled"),
        "{refused}"
    );
}

#[test]
fn a_mesh_larger_than_grpcs_default_message_is_applied() {
    let lab = lab_with(&[]);
    let _server = Server::start(&lab, "api", 8080);
    // 60 000 more workloads elsewhere: a full state of ~5 MB, past tonic's 4 MiB default.
    let mut registry = lab.topology.workloads_json();
    let list = registry["workloads"].as_array_mut().expect("list");
    for i in 0..60_000u32 {
        list.push(json!({
            "uid": format!("uid-bulk-{i}"), "namespace": "bulk", "name": format!("bulk-{i}"),
            "service_account": "bulk", "node": "node-far",
            "ips": [format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)],
            "labels": {"app": "bulk"},
        }));
    }
    let bytes = serde_json::to_vec(&registry).expect("json").len();
    assert!(bytes > 4 << 20, "the registry is only {bytes} bytes");
    lab.write_workloads(&registry).expect("write registry");
    for node in ["node-1", "node-2"] {
        let applied = eventually(Duration::from_secs(60), || {
            lab.agent_log(node)
                .contains("applied control-plane update version=2 workloads=60002")
                .then_some(())
        });
        assert!(
            applied.is_some(),
            "{node} did not apply the large update:\n{}",
            meshlet_lab::lab::log_tail(&lab.topology.node(node).expect("node").agent_log, 10)
        );
    }
    let (ok, _, err) = send(
        &lab,
        "web",
        &addr(&lab, "api", 8080).to_string(),
        1024,
        None,
        None,
    );
    assert!(ok, "web → api in the large mesh: {err}");
}

/// Runs `ip -n NETNS ARGS…`.
fn ip(netns: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", netns])
        .args(args)
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip -n {netns} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Tries a plaintext connection from `netns` to `to`; true when it was established.
fn plaintext_connects(netns: &str, to: SocketAddr) -> bool {
    meshlet_lab::netns::run_in(netns, move || {
        Ok(TcpStream::connect_timeout(&to, Duration::from_secs(2)).is_ok())
    })
    .expect("client")
}

#[test]
fn plaintext_never_reaches_a_strict_app_at_an_address_the_agent_was_not_told_of() {
    let lab = lab_with(&[]);
    let api = lab.topology.pod("api").expect("api").clone();
    let node2 = lab.topology.node("node-2").expect("node-2").clone();
    // An app on [::]:8080, in a STRICT pod (the mesh default).
    let mut child = lab
        .command_in("api", common::PROBE)
        .expect("command")
        .env("PROBE_LISTEN", "::")
        .args(["serve", "8080", "10", "60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("server");
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).expect("server line");
    assert!(first.starts_with("LISTENING"), "{first}");
    let before = metrics(&lab, "node-2");

    // A ULA address added to the pod after it was enrolled, routed both ways, with an address
    // of the node's own on that link as the source.
    let node_if = format!("ml-{}", api.name);
    for (netns, args) in [
        (
            &api.netns,
            ["addr", "add", "fd00:beef::2/128", "dev", "eth0", "nodad"],
        ),
        (
            &api.netns,
            ["route", "add", "fd00:beef::1/128", "dev", "eth0", ""],
        ),
        (
            &node2.netns,
            ["addr", "add", "fd00:beef::1/128", "dev", &node_if, "nodad"],
        ),
        (
            &node2.netns,
            ["route", "add", "fd00:beef::2/128", "dev", &node_if, ""],
        ),
    ] {
        let mut all = vec!["-6"];
        all.extend(args.iter().copied().filter(|a| !a.is_empty()));
        ip(netns, &all);
    }
    let ula: SocketAddr = "[fd00:beef::2]:8080".parse().expect("addr");
    let reached_ula = plaintext_connects(&node2.netns, ula);
    let ula_counts = (before, metrics(&lab, "node-2"));

    // The pod's link-local address, from the other end of its veth.
    let link_local = eventually(Duration::from_secs(5), || {
        let text = ip(
            &api.netns,
            &["-6", "-o", "addr", "show", "dev", "eth0", "scope", "link"],
        );
        (!text.contains("tentative"))
            .then(|| {
                text.split_whitespace()
                    .find(|w| w.starts_with("fe80:"))
                    .and_then(|w| w.split('/').next())
                    .map(str::to_string)
            })
            .flatten()
    })
    .expect("api has a link-local address");
    let index: u32 = std::fs::read_to_string(format!("/sys/class/net/{node_if}/ifindex"))
        .ok()
        .or_else(|| {
            let out = ip(&node2.netns, &["-o", "link", "show", "dev", &node_if]);
            out.split(':').next().map(|s| s.trim().to_string())
        })
        .and_then(|s| s.trim().parse().ok())
        .expect("ifindex of the node side of api's veth");
    let scoped = SocketAddr::V6(std::net::SocketAddrV6::new(
        link_local.parse().expect("fe80 address"),
        8080,
        0,
        index,
    ));
    let before_link_local = metrics(&lab, "node-2");
    let reached_link_local = plaintext_connects(&node2.netns, scoped);
    let link_local_counts = (before_link_local, metrics(&lab, "node-2"));

    // Control: the same app does answer in its own pod, over IPv6 loopback.
    let reached_loopback = plaintext_connects(&api.netns, "[::1]:8080".parse().expect("addr"));
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !reached_ula,
        "plaintext reached a STRICT app at an address added after enrollment"
    );
    assert!(
        !reached_link_local,
        "plaintext reached a STRICT app at its link-local address"
    );
    assert!(
        reached_loopback,
        "the pod's own loopback traffic was dropped"
    );
    let dropped = |(before, after): &(String, String)| {
        let count = |m: &str| {
            sample(
                m,
                "meshlet_redirect_events_total",
                &["event=\"inbound_unknown_address\""],
            )
        };
        count(after) - count(before)
    };
    // Each attempt's SYN reached the capture program (the path works; a SYN that never got
    // to the pod would prove nothing) and was dropped there.
    assert!(
        dropped(&ula_counts) >= 1.0,
        "the ULA SYN never reached capture"
    );
    assert!(
        dropped(&link_local_counts) >= 1.0,
        "the link-local SYN never reached capture"
    );
}

#[test]
fn one_pods_connections_never_evict_anothers_and_a_full_map_refuses_loudly() {
    let lab = lab_with(&["--max-redirected-connections=64"]);
    // api keeps whatever it accepts open.
    let mut holder_server = lab
        .command_in("api", common::PROBE)
        .expect("command")
        .args(["hold-server", "8080", "200", "60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("hold-server");
    let mut stdout = std::io::BufReader::new(holder_server.stdout.take().expect("stdout"));
    let mut first = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut first).expect("server line");
    assert!(first.starts_with("LISTENING"), "{first}");
    let _echo = Server::start(&lab, "api", 9090);
    let api = addr(&lab, "api", 8080).to_string();
    let echo = addr(&lab, "api", 9090).to_string();
    let refused = |lab: &Lab| {
        common::sample(
            &metrics(lab, "node-1"),
            "meshlet_redirect_events_total",
            &["event=\"refused_no_space\""],
        )
    };
    let refused_before = refused(&lab);
    // web fills the node's map with 64 idle connections...
    let mut holder = lab
        .command_in("web", common::PROBE)
        .expect("command")
        .args(["hold", &api, "64", "30"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("hold");
    let mut held = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().expect("stdout")),
        &mut held,
    )
    .expect("hold line");
    assert_eq!(held.trim(), "HELD 64");
    // ...so the next connect is refused at once and counted (an LRU would have evicted one
    // of the held connections' entries instead, silently).
    let (ok, _, _) = send(&lab, "web", &echo, 64, None, None);
    assert!(!ok, "a connect past the map's size was not refused");
    assert!(
        refused(&lab) > refused_before,
        "the refusal was not counted"
    );
    // When the held connections close, their entries go with them: connections work again.
    let _ = holder.kill();
    let _ = holder.wait();
    let back = eventually(Duration::from_secs(10), || {
        send(&lab, "web", &echo, 64, None, None).0.then_some(())
    });
    let _ = holder_server.kill();
    let _ = holder_server.wait();
    assert!(
        back.is_some(),
        "closed connections left their entries behind: connects stay refused"
    );
}
