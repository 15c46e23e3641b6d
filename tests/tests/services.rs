//! Services in the lab: a pod dials a cluster IP and gets mTLS to a ready endpoint, spread
//! across endpoints on both nodes, over IPv4 and IPv6; endpoints that stop being ready, apps
//! that are down, no endpoint at all; egress under ALLOW_ANY and REGISTRY_ONLY; plaintext to
//! a STRICT pod's IPv6 and link-local addresses. Root only; one at a time.
use std::time::{Duration, Instant};

use meshlet_lab::{topology::PodInfo, Lab, PodSpec, NAME_PREFIX};
use serde_json::{json, Value};

mod common;
use common::{contains, many, send, up_dual_stack, write_policy, Capture, Ping, Server};

const VIP4: &str = "10.96.0.10";
const VIP6: &str = "fd00:96::10";

fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("web", "node-1", "frontend"),
        PodSpec::new("api-1", "node-1", "api"),
        PodSpec::new("api-2", "node-2", "api"),
        PodSpec::new("api-3", "node-2", "api"),
        PodSpec::new("ext", "node-2", "ext").outside_mesh(),
    ]
}

fn pod(lab: &Lab, name: &str) -> PodInfo {
    lab.topology.pod(name).expect("pod").clone()
}

/// An endpoint of `api` for `pod`, serving `http` on 8080.
fn endpoint(pod: &PodInfo, ready: bool, terminating: bool) -> Value {
    json!({
        "workload_uid": pod.uid,
        "addresses": pod.ips().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "ready": ready, "serving": ready || terminating, "terminating": terminating,
        "ports": {"http": 8080},
    })
}

/// The `api` Service: port 80 → target port `http`, cluster IPs for the lab's families.
fn api_service(lab: &Lab, endpoints: Vec<Value>) -> Value {
    let mut vips = vec![VIP4];
    if lab.topology.dual_stack {
        vips.push(VIP6);
    }
    json!({
        "namespace": "default", "name": "api", "cluster_ips": vips,
        "ports": [{"name": "web", "port": 80, "target_port_name": "http", "protocol": "TCP"}],
        "endpoints": endpoints,
    })
}

/// How many connections each server accepted (it prints one line per accept), and from
/// which sources.
fn accepts(server: &Server) -> Vec<String> {
    server
        .accepted(Duration::from_millis(300))
        .into_iter()
        .filter(|l| l.starts_with("ACCEPT "))
        .collect()
}

#[test]
fn a_service_vip_spreads_mtls_over_its_endpoints_on_both_nodes_over_ipv4_and_ipv6() {
    let lab = up_dual_stack(&pods());
    let web = pod(&lab, "web");
    let (api1, api2, api3) = (pod(&lab, "api-1"), pod(&lab, "api-2"), pod(&lab, "api-3"));
    let servers: Vec<Server> = ["api-1", "api-2", "api-3"]
        .iter()
        .map(|p| Server::start_on(&lab, p, "::", 8080, 1000, 120))
        .collect();
    let service = api_service(
        &lab,
        vec![
            endpoint(&api1, true, false),
            endpoint(&api2, true, false),
            endpoint(&api3, true, false),
        ],
    );
    write_policy(&lab, json!({ "services": [service] }), 2, false);

    // The endpoint on web's own node is reached through the tunnel too: nothing in
    // plaintext on its veth.
    let node1 = lab.topology.node("node-1").expect("node-1").clone();
    let marker = "MESHLET-SERVICE-MARKER-5d1e";
    let capture = Capture::start(&node1.netns, &format!("{NAME_PREFIX}api-1"));
    let report = many(&lab, "web", &format!("{VIP4}:80"), 300, Some(marker));
    let frames = capture.finish();
    assert_eq!(report["ok"], 300, "{report}");
    assert_eq!(
        report["peers"],
        json!({ format!("{VIP4}:80"): 300 }),
        "getpeername must show the cluster IP dialled"
    );
    let counts: Vec<Vec<String>> = servers.iter().map(accepts).collect();
    for (server, lines) in ["api-1", "api-2", "api-3"].iter().zip(&counts) {
        assert!(
            lines.len() >= 60,
            "{server} got {} of 300 connections (each endpoint should get at least 20 %)",
            lines.len()
        );
        assert!(
            lines
                .iter()
                .all(|l| l.starts_with(&format!("ACCEPT {}:", web.ip))
                    || l.starts_with(&format!("ACCEPT [::ffff:{}]:", web.ip))),
            "{server} must see web's own address: {lines:?}"
        );
    }
    let all = frames.concat();
    assert!(
        !frames.is_empty(),
        "the capture saw nothing on api-1's veth"
    );
    assert!(
        !contains(&all, marker.as_bytes()),
        "plaintext crossed api-1's veth on web's own node"
    );
    assert!(
        contains(&all, &15008u16.to_be_bytes()),
        "no tunnel traffic on api-1's veth"
    );
    // Both agents log the identities.
    let log1 = lab.agent_log("node-1");
    assert!(
        log1.lines().any(|l| l.contains("service=default/api")
            && l.contains("spiffe://cluster.local/ns/default/sa/api")
            && l.contains("outcome=\"mtls\"")),
        "node-1's access log must name the service and the endpoint's identity"
    );
    assert!(lab.agent_log("node-2").contains(&web.identity));

    // The same over the IPv6 cluster IP: endpoints on their IPv6 addresses, web's IPv6
    // address as the source.
    let report = many(&lab, "web", &format!("[{VIP6}]:80"), 60, None);
    assert_eq!(report["ok"], 60, "{report}");
    assert_eq!(report["peers"], json!({ format!("[{VIP6}]:80"): 60 }));
    let web6 = web.ip6.expect("web's IPv6");
    let v6: usize = servers
        .iter()
        .map(|s| {
            accepts(s)
                .iter()
                .filter(|l| l.starts_with(&format!("ACCEPT [{web6}]:")))
                .count()
        })
        .sum();
    assert_eq!(
        v6, 60,
        "every IPv6 connection arrives from web's IPv6 address"
    );
    // A dual-stack socket dialling the IPv4 cluster IP as IPv4-mapped IPv6.
    let report = many(&lab, "web", &format!("[::ffff:{VIP4}]:80"), 10, None);
    assert_eq!(report["ok"], 10, "{report}");

    // `meshlet services` and `meshlet check` show it, from the same decision.
    let (ok, out, err) = common::meshlet_cli(&lab, "node-1", &["services"]);
    assert!(ok, "{err}");
    for needle in [
        "default/api",
        VIP4,
        VIP6,
        "default/api-2",
        "ready",
        "node-2",
    ] {
        assert!(
            out.contains(needle),
            "meshlet services lacks {needle}:\n{out}"
        );
    }
    let (ok, out, err) = common::meshlet_cli(
        &lab,
        "node-1",
        &[
            "check",
            "--from",
            "default/web",
            "--to",
            "svc/default/api:80",
            "-o",
            "json",
        ],
    );
    assert!(ok, "{err}");
    let view: Value = serde_json::from_str(&out).expect("check json");
    assert_eq!(view["route"]["service"], "default/api", "{out}");
    assert_eq!(view["port"], 8080, "the target port `http` of the endpoint");
    assert_eq!(view["transport"], "mtls");
    assert_eq!(view["decision"]["verdict"], "allow", "{out}");
}

/// `ip:port` as a socket address string (`[v6]:port` for IPv6).
fn at(ip: impl Into<std::net::IpAddr>, port: u16) -> String {
    std::net::SocketAddr::new(ip.into(), port).to_string()
}

#[test]
fn endpoints_that_stop_being_ready_get_no_new_connections_and_failed_ones_are_retried() {
    let lab = up_dual_stack(&pods());
    let (api1, api2, api3) = (pod(&lab, "api-1"), pod(&lab, "api-2"), pod(&lab, "api-3"));
    // api-3's app is down.
    let s1 = Server::start_on(&lab, "api-1", "::", 8080, 1000, 120);
    let s2 = Server::start_on(&lab, "api-2", "::", 8080, 1000, 120);
    let mut version = 2;
    let mut publish = |endpoints: Vec<Value>| {
        write_policy(
            &lab,
            json!({ "services": [api_service(&lab, endpoints)] }),
            version,
            false,
        );
        version += 1;
    };
    // The same suite over each cluster IP.
    for (family, vip) in [
        (
            "IPv4",
            at(VIP4.parse::<std::net::Ipv4Addr>().expect("v4"), 80),
        ),
        (
            "IPv6",
            at(VIP6.parse::<std::net::Ipv6Addr>().expect("v6"), 80),
        ),
    ] {
        let api3_address = if family == "IPv4" {
            at(api3.ip, 8080)
        } else {
            at(api3.ip6.expect("api-3 v6"), 8080)
        };
        publish(vec![
            endpoint(&api1, true, false),
            endpoint(&api2, true, false),
            endpoint(&api3, true, false),
        ]);
        let report = many(&lab, "web", &vip, 40, None);
        assert_eq!(
            report["ok"], 40,
            "{family}: a down endpoint must cost a retry, not the app's connection: {report}"
        );
        let log = lab.agent_log("node-1");
        assert!(
            log.lines().any(|l| l.contains("outcome=\"retry\"")
                && l.contains(&format!("endpoint={api3_address}"))),
            "{family}: the access log must name the retry of api-3 ({api3_address})"
        );
        let _ = (accepts(&s1), accepts(&s2));

        // Only api-2 ready: a long-lived connection lands there.
        publish(vec![
            endpoint(&api1, false, false),
            endpoint(&api2, true, false),
            endpoint(&api3, false, false),
        ]);
        let ping = Ping::start(&lab, "web", &vip, 60);
        assert_eq!(
            ping.next(Duration::from_secs(10)).as_deref(),
            Some("CONNECTED")
        );
        assert_eq!(
            accepts(&s2).len(),
            1,
            "{family}: the long-lived connection went to api-2"
        );
        // api-2 terminating, api-1 ready: new connections go to api-1 only; the live one
        // runs on.
        publish(vec![
            endpoint(&api1, true, false),
            endpoint(&api2, false, true),
            endpoint(&api3, false, false),
        ]);
        let report = many(&lab, "web", &vip, 20, None);
        assert_eq!(report["ok"], 20, "{family}: {report}");
        assert_eq!(
            accepts(&s1).len(),
            20,
            "{family}: every new connection goes to the ready endpoint"
        );
        assert!(
            accepts(&s2).is_empty(),
            "{family}: a terminating endpoint got a new connection"
        );
        // Removed from the slice altogether: still no new connections, the live one runs on.
        publish(vec![endpoint(&api1, true, false)]);
        let report = many(&lab, "web", &vip, 10, None);
        assert_eq!(report["ok"], 10, "{family}: {report}");
        assert!(accepts(&s2).is_empty());
        assert_eq!(
            ping.next(Duration::from_millis(500)),
            None,
            "{family}: the live connection to the terminating endpoint must run on"
        );

        // No ready endpoint: the app's connection fails at once, and the log says why.
        publish(vec![endpoint(&api1, false, false)]);
        let refused_before = common::sample(
            &common::metrics(&lab, "node-1"),
            "meshlet_outbound_connections_total",
            &["outcome=\"refused\"", "reason=\"no_healthy_endpoint\""],
        );
        let started = Instant::now();
        let (ok, report, _) = send(&lab, "web", &vip, 64, None, None);
        assert!(
            !ok,
            "{family}: a Service without a ready endpoint must refuse: {report}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{family}: refused after {:?}, not at once",
            started.elapsed()
        );
        assert!(lab
            .agent_log("node-1")
            .lines()
            .any(|l| l.contains("outcome=\"refused\"")
                && l.contains("reason=\"no_healthy_endpoint\"")
                && l.contains(&format!("dst={vip}"))));
        assert_eq!(
            common::sample(
                &common::metrics(&lab, "node-1"),
                "meshlet_outbound_connections_total",
                &["outcome=\"refused\"", "reason=\"no_healthy_endpoint\""]
            ),
            refused_before + 1.0
        );
    }
    assert!(
        common::sample(
            &common::metrics(&lab, "node-1"),
            "meshlet_endpoint_retries_total",
            &[]
        ) >= 2.0
    );
}

#[test]
fn egress_passes_under_allow_any_and_only_listed_destinations_under_registry_only() {
    let lab = up_dual_stack(&pods());
    let web = pod(&lab, "web");
    let ext = pod(&lab, "ext");
    let api2 = pod(&lab, "api-2");
    let server = Server::start_on(&lab, "ext", "::", 9090, 100, 120);
    let _other = Server::start_on(&lab, "ext", "::", 9091, 10, 120);
    let _api = Server::start_on(&lab, "api-2", "::", 8080, 10, 120);
    let mut version = 2;
    for (family, ext_ip, web_ip, api_ip) in [
        ("IPv4", ext.ip.into(), web.ip.into(), api2.ip.into()),
        (
            "IPv6",
            std::net::IpAddr::from(ext.ip6.expect("ext v6")),
            std::net::IpAddr::from(web.ip6.expect("web v6")),
            std::net::IpAddr::from(api2.ip6.expect("api-2 v6")),
        ),
    ] {
        let to = at(ext_ip, 9090);
        // ALLOW_ANY (the default): directly, from web's own address, logged as passthrough.
        write_policy(&lab, json!({}), version, false);
        version += 1;
        let passed_before = common::sample(
            &common::metrics(&lab, "node-1"),
            "meshlet_outbound_connections_total",
            &["outcome=\"passthrough\"", "reason=\"allow_any\""],
        );
        let (ok, report, err) = send(&lab, "web", &to, 1024, None, None);
        assert!(
            ok,
            "{family}: ALLOW_ANY must let web reach a destination outside the mesh: {err} {report}"
        );
        // The server listens on `::`: IPv4 peers show IPv4-mapped.
        let web_shown = match web_ip {
            std::net::IpAddr::V4(v4) => format!("ACCEPT [::ffff:{v4}]:"),
            std::net::IpAddr::V6(v6) => format!("ACCEPT [{v6}]:"),
        };
        let seen = accepts(&server);
        assert!(
            seen.iter().any(|l| l.starts_with(&web_shown)),
            "{family}: egress leaves from the pod's own address: {seen:?}"
        );
        assert!(lab
            .agent_log("node-1")
            .lines()
            .any(|l| l.contains("outcome=\"passthrough\"")
                && l.contains("ALLOW_ANY")
                && l.contains(&format!("dst={to}"))));
        assert_eq!(
            common::sample(
                &common::metrics(&lab, "node-1"),
                "meshlet_outbound_connections_total",
                &["outcome=\"passthrough\"", "reason=\"allow_any\""]
            ),
            passed_before + 1.0
        );
        // REGISTRY_ONLY: refused.
        write_policy(
            &lab,
            json!({"mesh": {"outbound_traffic_policy": "REGISTRY_ONLY"}}),
            version,
            false,
        );
        version += 1;
        let (ok, report, _) = send(&lab, "web", &to, 1024, None, None);
        assert!(
            !ok,
            "{family}: REGISTRY_ONLY must refuse an unlisted destination: {report}"
        );
        assert!(
            accepts(&server).is_empty(),
            "{family}: ext got a connection under REGISTRY_ONLY"
        );
        assert!(lab
            .agent_log("node-1")
            .lines()
            .any(|l| l.contains("reason=\"registry_only\"") && l.contains(&format!("dst={to}"))));
        // ...except a listed external service, and only on its ports; and a Service whose
        // endpoints are outside the mesh (as `kubernetes.default` is), in plaintext.
        let prefix = if ext_ip.is_ipv4() { 32 } else { 128 };
        write_policy(
            &lab,
            json!({
                "mesh": {"outbound_traffic_policy": "REGISTRY_ONLY"},
                "external_services": [{"name": "partner", "addresses": [format!("{ext_ip}/{prefix}")], "ports": [9090]}],
                "services": [{"namespace": "default", "name": "kubernetes",
                              "cluster_ips": ["10.96.0.1", "fd00:96::1"], "ports": [{"port": 443, "target_port": 9090}],
                              "endpoints": [{"addresses": [ext_ip.to_string()], "ready": true}]}],
            }),
            version,
            false,
        );
        version += 1;
        let (ok, report, err) = send(&lab, "web", &to, 1024, None, None);
        assert!(
            ok,
            "{family}: a listed external service must pass: {err} {report}"
        );
        assert!(lab
            .agent_log("node-1")
            .lines()
            .any(|l| l.contains("outcome=\"passthrough\"")
                && l.contains("external service partner")
                && l.contains(&format!("dst={to}"))));
        let (ok, _, _) = send(&lab, "web", &at(ext_ip, 9091), 64, None, None);
        assert!(!ok, "{family}: an external service opens only its ports");
        let vip = if ext_ip.is_ipv4() {
            "10.96.0.1:443"
        } else {
            "[fd00:96::1]:443"
        };
        let (ok, report, err) = send(&lab, "web", vip, 1024, None, None);
        assert!(
            ok,
            "{family}: a Service with endpoints outside the mesh: {err} {report}"
        );
        assert_eq!(report["peer"], vip, "getpeername shows the cluster IP");
        assert!(lab
            .agent_log("node-1")
            .lines()
            .any(|l| l.contains("service=default/kubernetes")
                && l.contains("outcome=\"plaintext\"")
                && l.contains("endpoint outside the mesh")));
        // A mesh workload is never reached in plaintext by egress rules: web → api-2 is mTLS.
        let (ok, report, err) = send(&lab, "web", &at(api_ip, 8080), 64, None, None);
        assert!(ok, "{family}: {err} {report}");
        assert!(lab
            .agent_log("node-1")
            .lines()
            .any(|l| l.contains(&format!("dst={}", at(api_ip, 8080)))
                && l.contains("outcome=\"mtls\"")));
        let _ = accepts(&server);
    }
}

#[test]
fn over_ipv6_pods_talk_mtls_and_plaintext_to_a_strict_pods_v6_and_link_local_addresses_is_refused()
{
    let lab = up_dual_stack(&pods());
    let web = pod(&lab, "web");
    let api2 = pod(&lab, "api-2");
    let (web6, api6) = (web.ip6.expect("web v6"), api2.ip6.expect("api-2 v6"));
    let server = Server::start_on(&lab, "api-2", "::", 8080, 100, 120);
    // Mesh pod to mesh pod over IPv6: the tunnel, web's IPv6 source, the dialled peer.
    let (ok, report, err) = send(&lab, "web", &format!("[{api6}]:8080"), 4096, None, None);
    assert!(ok, "IPv6 through the mesh failed: {err} {report}");
    assert_eq!(report["peer"], format!("[{api6}]:8080"));
    assert!(accepts(&server)
        .iter()
        .any(|l| l.starts_with(&format!("ACCEPT [{web6}]:"))));
    assert!(lab
        .agent_log("node-2")
        .lines()
        .any(|l| l.contains(&format!("[{api6}]:8080")) && l.contains(&web.identity)));
    // The bind6 ratchet: no pod binds the agent's ports over IPv6 either.
    for port in ["15001", "15006", "15008"] {
        let bind = lab
            .command_in("web", common::PROBE)
            .expect("command")
            .env("PROBE_LISTEN", "::")
            .args(["bind", port])
            .output()
            .expect("probe bind");
        assert!(
            !bind.status.success(),
            "web bound the agent's port [::]:{port}: {}",
            String::from_utf8_lossy(&bind.stdout)
        );
    }
    let bind = lab
        .command_in("web", common::PROBE)
        .expect("command")
        .env("PROBE_LISTEN", "::")
        .args(["bind", "9999"])
        .output()
        .expect("probe bind");
    assert!(bind.status.success(), "an app port binds over IPv6");
    // Plaintext from outside the mesh to the STRICT pod's IPv6 address: refused.
    let (ok, _, _) = send(&lab, "ext", &format!("[{api6}]:8080"), 64, None, None);
    assert!(!ok, "plaintext reached a STRICT pod over IPv6");
    // And to its link-local address, from the node across the veth.
    let out = lab
        .command_in("api-2", "ip")
        .expect("command")
        .args(["-j", "-6", "addr", "show", "dev", "eth0", "scope", "link"])
        .output()
        .expect("ip addr");
    let addrs: Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    let link_local = addrs[0]["addr_info"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|a| a["local"].as_str())
        .unwrap_or_else(|| panic!("api-2's link-local address: {addrs}"))
        .to_string();
    let node2 = lab.topology.node("node-2").expect("node-2").clone();
    let ifname = format!("{NAME_PREFIX}api-2");
    let index = meshlet_lab::netns::run_in(&node2.netns, move || {
        let name = std::ffi::CString::new(ifname)?;
        // SAFETY: a NUL-terminated name.
        Ok(unsafe { libc::if_nametoindex(name.as_ptr()) })
    })
    .expect("ifindex");
    assert!(index > 0);
    // Reachable at all: the node's own probe of the address answers at the TCP level only
    // because the agent's passthrough listener takes it (and refuses it).
    let (ok, report, _) = send(
        &lab,
        "node-2",
        &format!("[{link_local}%{index}]:8080"),
        64,
        None,
        None,
    );
    assert!(
        !ok,
        "plaintext reached a STRICT pod on its link-local address: {report}"
    );
    assert!(
        accepts(&server).is_empty(),
        "the STRICT pod's app saw a plaintext connection"
    );
}
