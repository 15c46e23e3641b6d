//! What each node is sent: the registry (workloads, policy) and the CA's trust (roots, CRLs,
//! signer), merged into one versioned stream. Either side changing is a new version.
use meshlet_proto::v1::{DiscoveryResponse, FederatedBundle};
use tokio::sync::watch;

use crate::{pki::Trust, registry::Snapshot};

/// One version of the mesh as the nodes see it.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub version: u64,
    pub registry: Snapshot,
    pub trust: Trust,
}

impl Published {
    pub fn response(&self, trust_domain: &str) -> DiscoveryResponse {
        DiscoveryResponse {
            version: self.version,
            workloads: self.registry.workloads.clone(),
            trust_roots_pem: self.trust.roots_pem.clone(),
            trust_domain: trust_domain.to_string(),
            mesh: Some(self.registry.mesh.clone()),
            modes: self.registry.modes.clone(),
            policies: self.registry.policies.clone(),
            crls_pem: self.trust.crls_pem.clone(),
            federated_bundles: self
                .trust
                .federated
                .iter()
                .map(|(domain, roots)| FederatedBundle {
                    trust_domain: domain.clone(),
                    roots_pem: roots.clone(),
                })
                .collect(),
            signer_chain_pem: self.trust.signer_chain_pem.clone(),
            services: self.registry.services.clone(),
            external_services: self.registry.external_services.clone(),
            incremental: false,
            removed_workloads: Vec::new(),
            removed_services: Vec::new(),
            scope: Some(self.registry.scope.clone()),
        }
    }
}

/// Follows both sources and publishes every change under the next version number.
pub fn merge(
    mut registry: watch::Receiver<Snapshot>,
    mut trust: watch::Receiver<Trust>,
) -> watch::Receiver<Published> {
    let first = Published {
        version: 1,
        registry: registry.borrow_and_update().clone(),
        trust: trust.borrow_and_update().clone(),
    };
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = registry.changed() => if changed.is_err() { return },
                changed = trust.changed() => if changed.is_err() { return },
            }
            let registry = registry.borrow_and_update().clone();
            let trust = trust.borrow_and_update().clone();
            tx.send_modify(|p| {
                p.version += 1;
                p.registry = registry;
                p.trust = trust;
            });
        }
    });
    rx
}

/// What changed from `previous` (the last version a stream sent) to `next`, as an
/// incremental update: added or changed workloads and Services, the keys of removed ones, and
/// every other field complete. `None` when a full update is no larger.
pub fn delta(previous: &DiscoveryResponse, next: &DiscoveryResponse) -> Option<DiscoveryResponse> {
    use std::collections::HashMap;
    let service_key = |s: &meshlet_proto::v1::Service| format!("{}/{}", s.namespace, s.name);
    let before: HashMap<&str, &meshlet_proto::v1::Workload> = previous
        .workloads
        .iter()
        .map(|w| (w.uid.as_str(), w))
        .collect();
    let after: HashMap<&str, &meshlet_proto::v1::Workload> =
        next.workloads.iter().map(|w| (w.uid.as_str(), w)).collect();
    let services_before: HashMap<String, &meshlet_proto::v1::Service> = previous
        .services
        .iter()
        .map(|s| (service_key(s), s))
        .collect();
    let services_after: HashMap<String, &meshlet_proto::v1::Service> =
        next.services.iter().map(|s| (service_key(s), s)).collect();
    let mut update = DiscoveryResponse {
        workloads: next
            .workloads
            .iter()
            .filter(|w| before.get(w.uid.as_str()) != Some(w))
            .cloned()
            .collect(),
        services: next
            .services
            .iter()
            .filter(|s| services_before.get(&service_key(s)) != Some(s))
            .cloned()
            .collect(),
        removed_workloads: previous
            .workloads
            .iter()
            .filter(|w| !after.contains_key(w.uid.as_str()))
            .map(|w| w.uid.clone())
            .collect(),
        removed_services: previous
            .services
            .iter()
            .map(service_key)
            .filter(|k| !services_after.contains_key(k))
            .collect(),
        incremental: true,
        ..next.clone()
    };
    // Keep the order of the full update for what is sent.
    update.removed_workloads.sort();
    update.removed_services.sort();
    let full = prost::Message::encoded_len(next);
    (prost::Message::encoded_len(&update) < full).then_some(update)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet_proto::v1::{Service, Workload};

    fn workload(uid: &str, ip: &str) -> Workload {
        Workload {
            uid: uid.into(),
            namespace: "default".into(),
            name: uid.into(),
            service_account: "sa".into(),
            node: "node-1".into(),
            ips: vec![ip.into()],
            ..Default::default()
        }
    }

    #[test]
    fn one_pod_changed_is_a_small_delta() {
        let workloads: Vec<Workload> = (0..1000)
            .map(|i| {
                workload(
                    &format!("uid-{i}"),
                    &format!("10.244.{}.{}", i / 250, i % 250 + 1),
                )
            })
            .collect();
        let service = |name: &str| Service {
            namespace: "default".into(),
            name: name.into(),
            cluster_ips: vec!["10.96.0.1".into()],
            ..Default::default()
        };
        let previous = DiscoveryResponse {
            version: 1,
            workloads: workloads.clone(),
            services: vec![service("a"), service("b")],
            trust_domain: "cluster.local".into(),
            ..Default::default()
        };
        let mut next = previous.clone();
        next.version = 2;
        next.workloads.remove(10);
        next.workloads[20].ips = vec!["10.244.9.9".into()];
        next.workloads.push(workload("uid-new", "10.244.9.10"));
        next.services.remove(0);
        let update = delta(&previous, &next).expect("smaller than the full state");
        assert!(update.incremental);
        assert_eq!(update.version, 2);
        let uids: Vec<&str> = update.workloads.iter().map(|w| w.uid.as_str()).collect();
        assert_eq!(uids, ["uid-21", "uid-new"]);
        assert_eq!(update.removed_workloads, ["uid-10"]);
        assert_eq!(update.removed_services, ["default/a"]);
        assert!(update.services.is_empty());
        let (small, full) = (
            prost::Message::encoded_len(&update),
            prost::Message::encoded_len(&next),
        );
        assert!(small * 50 < full, "{small} bytes against {full}");
        // Everything changed: the full update goes.
        let other = DiscoveryResponse {
            version: 3,
            workloads: vec![workload("x", "10.0.0.1")],
            ..Default::default()
        };
        assert!(delta(&previous, &other).is_none());
    }
}
