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
