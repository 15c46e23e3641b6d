//! The state on its own: validation, lookups, routes.

use std::{collections::HashSet, net::IpAddr, sync::Arc};

use meshlet_proto::v1::DiscoveryResponse;

use super::*;
use crate::tls::TrustBundle;
use meshlet_proto::v1::Workload;

fn workload(uid: &str, ip: &str) -> Workload {
    Workload {
        uid: uid.into(),
        namespace: "default".into(),
        name: format!("pod-{uid}"),
        service_account: "web".into(),
        node: "node-1".into(),
        ips: vec![ip.into()],
        labels: Default::default(),
        probe_ports: vec![],
    }
}

fn update(version: u64, workloads: Vec<Workload>) -> DiscoveryResponse {
    DiscoveryResponse {
        version,
        workloads,
        trust_roots_pem: vec![],
        trust_domain: "cluster.local".into(),
        ..Default::default()
    }
}

#[test]
fn validates_whole_updates() {
    let good = MeshState::from_update(&update(1, vec![workload("a", "10.0.0.1")])).expect("valid");
    let ip: IpAddr = "10.0.0.1".parse().expect("ip");
    assert_eq!(
        good.by_ip[&ip].identity.to_string(),
        "spiffe://cluster.local/ns/default/sa/web"
    );
    let bad_ip = MeshState::from_update(&update(
        2,
        vec![workload("a", "10.0.0.1"), workload("b", "10.0.0.300")],
    ));
    assert!(matches!(bad_ip, Err(StateError::BadIp { .. })));
    let dup = MeshState::from_update(&update(
        2,
        vec![workload("a", "10.0.0.1"), workload("b", "10.0.0.1")],
    ));
    assert!(matches!(dup, Err(StateError::DuplicateIp { .. })));
    let mut bad_sa = workload("c", "10.0.0.3");
    bad_sa.service_account = "../x".into();
    assert!(matches!(
        MeshState::from_update(&update(3, vec![bad_sa])),
        Err(StateError::BadIdentity { .. })
    ));
}

#[test]
fn refused_update_keeps_the_last_good_state() {
    let workloads = Store::default();
    let bundle = TrustBundle::default();
    // No roots: refused as a whole, nothing applied.
    assert!(workloads
        .apply(
            &update(1, vec![workload("a", "10.0.0.1")]),
            &bundle,
            StreamPosition::First
        )
        .is_err());
    assert_eq!(workloads.version(), 0);
    assert!(workloads.by_uid("a").is_none());
}

/// An update with a real root, so that it validates.
fn rooted(version: u64, workloads: Vec<Workload>, root_pem: &str) -> DiscoveryResponse {
    let mut u = update(version, workloads);
    u.trust_roots_pem = vec![root_pem.to_string()];
    u
}

fn root_pem() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).expect("root").pem()
}

#[test]
fn a_new_stream_starts_with_a_full_state_whatever_its_version() {
    let workloads = Store::default();
    let bundle = TrustBundle::default();
    let root = root_pem();
    // Stream 1: versions 1..=3.
    workloads
        .apply(&rooted(1, vec![], &root), &bundle, StreamPosition::First)
        .expect("first of stream 1");
    workloads
        .apply(
            &rooted(3, vec![workload("a", "10.0.0.1")], &root),
            &bundle,
            StreamPosition::Later,
        )
        .expect("v3");
    // Within the stream an older or equal version is refused, and changes nothing.
    let old = workloads.apply(&rooted(2, vec![], &root), &bundle, StreamPosition::Later);
    assert!(matches!(
        old,
        Err(StateError::OldVersion { got: 2, applied: 3 })
    ));
    assert!(workloads.by_uid("a").is_some());
    // The control plane restarts and numbers from 1 again: its first update applies...
    workloads
        .apply(
            &rooted(1, vec![workload("b", "10.0.0.2")], &root),
            &bundle,
            StreamPosition::First,
        )
        .expect("first of stream 2");
    assert_eq!(workloads.version(), 1);
    assert!(workloads.by_uid("a").is_none() && workloads.by_uid("b").is_some());
    // ...and so do its later ones.
    workloads
        .apply(&rooted(2, vec![], &root), &bundle, StreamPosition::Later)
        .expect("v2 of stream 2");
    assert_eq!(workloads.version(), 2);
}

#[test]
fn labels_are_shared_sorted_and_read_like_a_map() {
    let mut strings = HashSet::new();
    let a: std::collections::HashMap<String, String> =
        [("app".into(), "api".into()), ("tier".into(), "back".into())].into();
    let b: std::collections::HashMap<String, String> = [("app".into(), "api".into())].into();
    let la = Labels::interned(a.iter(), &mut strings);
    let lb = Labels::interned(b.iter(), &mut strings);
    assert_eq!(la.get("app"), Some("api"));
    assert_eq!(la.get("tier"), Some("back"));
    assert_eq!(la.get("nope"), None);
    assert_eq!(strings.len(), 4, "each distinct string once");
    assert!(
        Arc::ptr_eq(&la.0[0].1, &lb.0[0].1),
        "one copy of a repeated value"
    );
    assert_eq!(
        serde_json::to_value(&la).expect("json"),
        serde_json::json!({"app": "api", "tier": "back"})
    );
}

#[test]
fn the_applied_update_is_kept_for_dumps_as_it_came() {
    let workloads = Store::default();
    let bundle = TrustBundle::default();
    let mut update = rooted(7, vec![workload("a", "10.0.0.1")], &root_pem());
    update.workloads[0].labels = [("app".to_string(), "a".to_string())].into();
    workloads
        .apply(&update, &bundle, StreamPosition::First)
        .expect("applied");
    assert_eq!(workloads.last_update(), Some(update));
}

#[test]
fn the_bundle_changes_only_when_its_roots_or_crls_do() {
    let workloads = Store::default();
    let bundle = TrustBundle::default();
    let revisions = bundle.subscribe();
    let root = root_pem();
    workloads
        .apply(&rooted(1, vec![], &root), &bundle, StreamPosition::First)
        .expect("v1");
    assert_eq!(*revisions.borrow(), 1);
    // Workloads and policies change; roots do not: live tunnels are not woken.
    workloads
        .apply(
            &rooted(2, vec![workload("a", "10.0.0.1")], &root),
            &bundle,
            StreamPosition::Later,
        )
        .expect("v2");
    assert_eq!(*revisions.borrow(), 1);
    // A second root (a CA rotation) is a change.
    let mut rotated = rooted(3, vec![], &root);
    rotated.trust_roots_pem.push(root_pem());
    workloads
        .apply(&rotated, &bundle, StreamPosition::Later)
        .expect("v3");
    assert_eq!(*revisions.borrow(), 2);
    assert_eq!(bundle.current().domains["cluster.local"].anchors.len(), 2);
}

mod services {
    use std::net::SocketAddr;

    use meshlet_proto::v1::{self, Workload};
    use rand::SeedableRng;

    use super::super::*;

    fn pod(uid: &str, ips: &[&str], node: &str) -> Workload {
        Workload {
            uid: uid.into(),
            namespace: "default".into(),
            name: uid.into(),
            service_account: "api".into(),
            node: node.into(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn endpoint(uid: &str, addresses: &[&str], http: u32) -> v1::Endpoint {
        v1::Endpoint {
            workload_uid: uid.into(),
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            ready: true,
            serving: true,
            terminating: false,
            ports: [("http".to_string(), http)].into(),
        }
    }

    /// `api`: 10.96.0.10 and fd00:96::10, port 80 → `http`, three endpoints (one serving
    /// `http` on 9090), and a v4-only `db` on 5432 with an endpoint outside the mesh.
    fn mesh() -> v1::DiscoveryResponse {
        v1::DiscoveryResponse {
            version: 1,
            trust_domain: "cluster.local".into(),
            workloads: vec![
                pod("api-1", &["10.244.1.2", "fd00:10:244:1::2"], "node-1"),
                pod("api-2", &["10.244.2.2", "fd00:10:244:2::2"], "node-2"),
                pod("api-3", &["10.244.2.3", "fd00:10:244:2::3"], "node-2"),
                pod("web", &["10.244.1.3"], "node-1"),
            ],
            services: vec![
                v1::Service {
                    namespace: "default".into(),
                    name: "api".into(),
                    cluster_ips: vec!["10.96.0.10".into(), "fd00:96::10".into()],
                    ports: vec![v1::ServicePort {
                        name: "web".into(),
                        port: 80,
                        target_port_name: "http".into(),
                        ..Default::default()
                    }],
                    endpoints: vec![
                        endpoint("api-1", &["10.244.1.2", "fd00:10:244:1::2"], 8080),
                        endpoint("api-2", &["10.244.2.2", "fd00:10:244:2::2"], 8080),
                        endpoint("api-3", &[], 9090),
                    ],
                },
                v1::Service {
                    namespace: "default".into(),
                    name: "db".into(),
                    cluster_ips: vec!["10.96.0.20".into()],
                    ports: vec![v1::ServicePort {
                        port: 5432,
                        ..Default::default()
                    }],
                    endpoints: vec![v1::Endpoint {
                        addresses: vec!["192.0.2.7".into()],
                        ready: true,
                        ..Default::default()
                    }],
                },
            ],
            ..Default::default()
        }
    }

    fn no_load(_: SocketAddr) -> usize {
        0
    }

    fn route(state: &MeshState, to: &str) -> Route {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        state.route(
            to.parse().expect("address"),
            &RouteInputs {
                outbound_override: None,
                load: &no_load,
                explain: true,
            },
            &mut rng,
        )
    }

    fn upstreams(route: &Route) -> &[Upstream] {
        match &route.outcome {
            RouteOutcome::Upstreams(u) => u,
            RouteOutcome::Refuse { detail, .. } => panic!("refused: {detail}"),
        }
    }

    fn refusal(route: &Route) -> &'static str {
        match &route.outcome {
            RouteOutcome::Refuse { reason, .. } => reason,
            RouteOutcome::Upstreams(u) => panic!("not refused: {u:?}"),
        }
    }

    #[test]
    fn a_vip_spreads_over_ready_endpoints_on_their_own_target_ports() {
        let state = MeshState::from_update(&mesh()).expect("valid");
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut picks: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..300 {
            let r = state.route(
                "10.96.0.10:80".parse().expect("vip"),
                &RouteInputs {
                    outbound_override: None,
                    load: &no_load,
                    explain: true,
                },
                &mut rng,
            );
            assert_eq!(r.service.as_deref(), Some("default/api"));
            let u = upstreams(&r);
            assert_eq!(u.len(), 3, "the pick and two retries");
            assert!(u.iter().all(|u| u.kind == UpstreamKind::MeshWorkload));
            *picks.entry(u[0].address).or_default() += 1;
        }
        let want: Vec<SocketAddr> = ["10.244.1.2:8080", "10.244.2.2:8080", "10.244.2.3:9090"]
            .iter()
            .map(|a| a.parse().expect("addr"))
            .collect();
        for address in &want {
            let n = picks.get(address).copied().unwrap_or(0);
            assert!(n >= 60, "{address} got {n} of 300: {picks:?}");
        }
        assert_eq!(picks.len(), 3);
        // The v6 cluster IP leads to the endpoints' v6 addresses; a v4-mapped v4 VIP (a
        // dual-stack socket) is the v4 VIP.
        let v6 = route(&state, "[fd00:96::10]:80");
        assert!(upstreams(&v6).iter().all(|u| u.address.is_ipv6()));
        let mapped = route(&state, "[::ffff:10.96.0.10]:80");
        assert_eq!(mapped.service.as_deref(), Some("default/api"));
        assert!(upstreams(&mapped).iter().all(|u| u.address.is_ipv4()));
    }

    #[test]
    fn the_less_loaded_of_two_draws_is_picked() {
        let state = MeshState::from_update(&mesh()).expect("valid");
        let busy: SocketAddr = "10.244.1.2:8080".parse().expect("addr");
        let load = |a: SocketAddr| if a == busy { 100 } else { 0 };
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for _ in 0..100 {
            let r = state.route(
                "10.96.0.10:80".parse().expect("vip"),
                &RouteInputs {
                    outbound_override: None,
                    load: &load,
                    explain: true,
                },
                &mut rng,
            );
            assert_ne!(
                upstreams(&r)[0].address,
                busy,
                "the busy endpoint was picked"
            );
        }
    }

    #[test]
    fn only_ready_endpoints_get_new_connections() {
        let mut update = mesh();
        let api = &mut update.services[0];
        api.endpoints[0].ready = false;
        api.endpoints[1].terminating = true;
        api.endpoints[1].ready = false;
        let state = MeshState::from_update(&update).expect("valid");
        let r = route(&state, "10.96.0.10:80");
        let u = upstreams(&r);
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].address, "10.244.2.3:9090".parse().expect("addr"));
        assert!(r.steps.iter().any(|s| s.contains("terminating")));
        // None ready: refused at once, with the reason the access log and metrics use.
        update.services[0].endpoints[2].ready = false;
        let state = MeshState::from_update(&update).expect("valid");
        assert_eq!(
            refusal(&route(&state, "10.96.0.10:80")),
            "no_healthy_endpoint"
        );
        // A port the Service does not have.
        assert_eq!(
            refusal(&route(&state, "10.96.0.10:81")),
            "unknown_service_port"
        );
    }

    #[test]
    fn endpoints_outside_the_mesh_and_disabled_workloads_are_dialled_in_plaintext() {
        let mut update = mesh();
        update.modes = vec![v1::ModeRule {
            name: "off".into(),
            namespace: "default".into(),
            workload: "api-2".into(),
            mode: "DISABLE".into(),
            ..Default::default()
        }];
        let state = MeshState::from_update(&update).expect("valid");
        let db = route(&state, "10.96.0.20:5432");
        let u = upstreams(&db);
        assert_eq!(u[0].kind, UpstreamKind::OutsideEndpoint);
        assert_eq!(u[0].address, "192.0.2.7:5432".parse().expect("addr"));
        let direct = route(&state, "10.244.2.2:8080");
        assert_eq!(upstreams(&direct)[0].kind, UpstreamKind::DisabledWorkload);
        let tunnel = route(&state, "10.244.1.2:8080");
        assert_eq!(upstreams(&tunnel)[0].kind, UpstreamKind::MeshWorkload);
        // An endpoint that gives a mesh workload's address but no uid is that workload: never
        // plaintext because a slice left out the reference.
        update.services[1].endpoints[0].addresses = vec!["10.244.1.2".into()];
        let state = MeshState::from_update(&update).expect("valid");
        let db = route(&state, "10.96.0.20:5432");
        assert_eq!(upstreams(&db)[0].kind, UpstreamKind::MeshWorkload);
    }

    #[test]
    fn egress_follows_the_outbound_traffic_policy() {
        let mut update = mesh();
        let state = MeshState::from_update(&update).expect("valid");
        let out = route(&state, "203.0.113.9:443");
        assert_eq!(
            upstreams(&out)[0].kind,
            UpstreamKind::AllowAny,
            "ALLOW_ANY is the default"
        );
        update.mesh = Some(v1::MeshPolicy {
            outbound_traffic_policy: "REGISTRY_ONLY".into(),
            ..Default::default()
        });
        update.external_services = vec![v1::ExternalService {
            name: "payments".into(),
            addresses: vec!["203.0.113.0/24".into()],
            ports: vec![443],
        }];
        let state = MeshState::from_update(&update).expect("valid");
        assert_eq!(
            upstreams(&route(&state, "203.0.113.9:443"))[0].kind,
            UpstreamKind::ExternalService
        );
        assert_eq!(refusal(&route(&state, "203.0.113.9:80")), "registry_only");
        assert_eq!(refusal(&route(&state, "198.51.100.1:443")), "registry_only");
        // A node's override beats the mesh.
        let r = state.route(
            "198.51.100.1:443".parse().expect("addr"),
            &RouteInputs {
                outbound_override: Some(OutboundTrafficPolicy::AllowAny),
                load: &no_load,
                explain: true,
            },
            &mut rand::thread_rng(),
        );
        assert_eq!(upstreams(&r)[0].kind, UpstreamKind::AllowAny);
    }

    #[test]
    fn bad_services_are_named() {
        type Breakage = Box<dyn Fn(&mut v1::DiscoveryResponse)>;
        let cases: Vec<(Breakage, &str)> = vec![
            (
                Box::new(|u| u.services[0].cluster_ips[0] = "10.96.0.300".into()),
                "cluster IP \"10.96.0.300\"",
            ),
            (
                Box::new(|u| u.services[1].cluster_ips[0] = "10.244.1.3".into()),
                "belongs to both default/web and service default/db",
            ),
            (
                Box::new(|u| u.services[1].cluster_ips[0] = "10.96.0.10".into()),
                "belongs to both service default/api and service default/db",
            ),
            (
                Box::new(|u| u.services[0].ports[0].target_port = 8080),
                "both 8080 and \"http\"",
            ),
            (
                Box::new(|u| u.services[0].ports[0].target_port_name = "HTTP_".into()),
                "is not a port name",
            ),
            (
                Box::new(|u| u.services[0].ports[0].protocol = "QUIC".into()),
                "not TCP, UDP or SCTP",
            ),
            (
                Box::new(|u| u.services[0].endpoints[0].addresses[0] = "10.244.2.2".into()),
                "is not an address of workload default/api-1",
            ),
            (
                Box::new(|u| {
                    u.mesh = Some(v1::MeshPolicy {
                        outbound_traffic_policy: "DENY_ALL".into(),
                        ..Default::default()
                    })
                }),
                "not ALLOW_ANY or REGISTRY_ONLY",
            ),
            (
                Box::new(|u| {
                    u.external_services = vec![v1::ExternalService {
                        name: "x".into(),
                        addresses: vec!["10.0.0.1/8".into()],
                        ports: vec![],
                    }]
                }),
                "external service \"x\": address \"10.0.0.1/8\"",
            ),
        ];
        for (break_it, expected) in cases {
            let mut update = mesh();
            break_it(&mut update);
            let error = MeshState::from_update(&update)
                .expect_err(expected)
                .to_string();
            assert!(
                error.contains(expected),
                "{error:?} should say {expected:?}"
            );
        }
        // An endpoint naming a workload the update does not describe is kept, gets no
        // connection, and says why.
        let mut update = mesh();
        update.services[0].endpoints[0].workload_uid = "gone".into();
        let state = MeshState::from_update(&update).expect("valid");
        let api = state.service("default/api").expect("api");
        assert_eq!(api.endpoints[0].health(), Health::UnknownWorkload);
    }
}

mod incremental {
    use meshlet_proto::v1::{DiscoveryResponse, Workload};

    use super::super::*;
    use super::{root_pem, workload};
    use crate::tls::TrustBundle;

    #[test]
    fn deltas_apply_to_the_state_held_and_are_validated_as_a_whole() {
        let store = Store::default();
        let bundle = TrustBundle::default();
        let full = DiscoveryResponse {
            version: 1,
            trust_domain: "cluster.local".into(),
            trust_roots_pem: vec![root_pem()],
            workloads: vec![workload("a", "10.0.0.1"), workload("b", "10.0.0.2")],
            ..Default::default()
        };
        let delta = |version: u64, upsert: Vec<Workload>, removed: &[&str]| DiscoveryResponse {
            version,
            incremental: true,
            workloads: upsert,
            removed_workloads: removed.iter().map(|s| s.to_string()).collect(),
            ..full.clone()
        };
        // A stream never starts with a delta.
        assert!(matches!(
            store.apply(&delta(1, vec![], &[]), &bundle, StreamPosition::First),
            Err(StateError::IncrementalFirst)
        ));
        store
            .apply(&full, &bundle, StreamPosition::First)
            .expect("full");
        store
            .apply(
                &delta(
                    2,
                    vec![workload("c", "10.0.0.3"), workload("a", "10.0.0.9")],
                    &["b"],
                ),
                &bundle,
                StreamPosition::Later,
            )
            .expect("delta");
        assert!(store.by_uid("b").is_none());
        assert!(store.by_uid("c").is_some());
        let ip: std::net::IpAddr = "10.0.0.9".parse().expect("ip");
        assert_eq!(store.by_ip(ip).map(|w| w.uid.clone()).as_deref(), Some("a"));
        // Kept whole for dumps and the next delta.
        assert_eq!(store.last_update().map(|u| u.workloads.len()), Some(2));
        assert!(!store.last_update().expect("kept").incremental);
        // Removing what is not there, or a delta that breaks the whole (a duplicate IP):
        // refused, nothing changes.
        assert!(matches!(
            store.apply(&delta(3, vec![], &["zz"]), &bundle, StreamPosition::Later),
            Err(StateError::Incremental(_))
        ));
        assert!(matches!(
            store.apply(
                &delta(3, vec![workload("d", "10.0.0.3")], &[]),
                &bundle,
                StreamPosition::Later
            ),
            Err(StateError::DuplicateIp { .. })
        ));
        assert_eq!(store.version(), 2);
        assert!(store.by_uid("d").is_none());
    }
}
