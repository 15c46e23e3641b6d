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
