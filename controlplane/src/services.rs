//! The gRPC services: certificates and discovery.
use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use meshlet_proto::v1::{
    certificate_service_server::CertificateService, discovery_request,
    discovery_service_server::DiscoveryService, node_identity_service_server::NodeIdentityService,
    CreateCertificateRequest, CreateCertificateResponse, DiscoveryRequest, DiscoveryResponse,
    JoinRequest, NodeCertificateResponse, RenewNodeCertificateRequest,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    ca::{parse_identity, CertificateAuthority},
    node_auth::node_of,
    publish::Published,
    registry::Snapshot,
    tokens::{TokenError, TokenStore},
};

/// Issues workload certificates to nodes.
pub struct Certificates {
    pub ca: Arc<CertificateAuthority>,
    pub registry: watch::Receiver<Snapshot>,
}

#[tonic::async_trait]
impl CertificateService for Certificates {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        // The node is the one its certificate names, never what the request says.
        let node = node_of(&request)?;
        let mut req = request.into_inner();
        req.node = node;
        let Some((namespace, service_account)) =
            parse_identity(self.ca.trust_domain(), &req.identity)
        else {
            tracing::warn!(target: "audit", event = "certificate_refused", node = %req.node, identity = %req.identity, "certificate refused: not a workload identity of this trust domain");
            return Err(Status::invalid_argument(format!(
                "identity {:?} is not spiffe://{}/ns/<ns>/sa/<sa>",
                req.identity,
                self.ca.trust_domain()
            )));
        };
        if let Err(e) = self.registry.borrow().admits_node(&req.node) {
            tracing::warn!(target: "audit", event = "certificate_refused", node = %req.node, identity = %req.identity, error = %e, "certificate refused: not a node of the cluster");
            return Err(Status::permission_denied(e));
        }
        // A node may only obtain identities of pods that run on it.
        if !self
            .registry
            .borrow()
            .has_pod(&req.node, &namespace, &service_account)
        {
            tracing::warn!(target: "audit", event = "certificate_refused", node = %req.node, identity = %req.identity, "certificate refused: no pod with this service account on the node");
            return Err(Status::permission_denied(format!(
                "node {:?} runs no pod with service account {namespace}/{service_account}",
                req.node
            )));
        }
        match self.ca.sign(
            &req.csr_pem,
            &req.identity,
            Duration::from_secs(req.lifetime_seconds),
        ) {
            Ok(issued) => {
                tracing::info!(
                    target: "audit",
                    event = "certificate_issued",
                    node = %req.node,
                    identity = %req.identity,
                    serial = %issued.serial,
                    requested_seconds = req.lifetime_seconds,
                    lifetime_seconds = issued.lifetime.as_secs(),
                    "certificate issued"
                );
                Ok(Response::new(CreateCertificateResponse {
                    chain_pem: issued.chain_pem,
                }))
            }
            Err(e) => {
                tracing::warn!(target: "audit", event = "certificate_refused", node = %req.node, identity = %req.identity, error = %e, "certificate refused");
                Err(Status::invalid_argument(e.to_string()))
            }
        }
    }
}

/// Node certificates: the first by join token, renewals by the current node certificate.
pub struct NodeIdentity {
    pub ca: Arc<CertificateAuthority>,
    pub tokens: TokenStore,
    pub lifetime: Duration,
    /// In Kubernetes mode: agents join with their pod's service account token.
    pub reviewer: Option<crate::kubernetes::node_auth::TokenReviewer>,
    /// Which nodes the cluster has ([`Snapshot::admits_node`]).
    pub registry: watch::Receiver<Snapshot>,
}

/// Which request a node certificate answers: what the audit log calls its outcomes.
enum NodeRequest {
    /// A first certificate, by join token or by the agent pod's service account token.
    Join { method: &'static str },
    /// A renewal, by the current node certificate.
    Renewal,
}

impl NodeIdentity {
    /// Signs a node certificate for a node whose claim was checked, if the node is (still) one
    /// of the cluster: the one place that decides it for joins and renewals alike.
    fn issue(
        &self,
        node: &str,
        csr_pem: &str,
        request: NodeRequest,
    ) -> Result<Response<NodeCertificateResponse>, Status> {
        let (issued_event, refused_event, method) = match request {
            NodeRequest::Join { method } => ("node_joined", "node_join_refused", method),
            NodeRequest::Renewal => (
                "node_certificate_renewed",
                "node_certificate_refused",
                "node_certificate",
            ),
        };
        if let Err(e) = self.registry.borrow().admits_node(node) {
            tracing::warn!(target: "audit", event = refused_event, %node, method, error = %e,
                "node certificate refused");
            return Err(Status::permission_denied(e));
        }
        match self.ca.sign_node(csr_pem, node, self.lifetime) {
            Ok(issued) => {
                tracing::info!(target: "audit", event = issued_event, %node, method,
                    serial = %issued.serial, lifetime_seconds = issued.lifetime.as_secs(),
                    "node certificate issued");
                Ok(Response::new(NodeCertificateResponse {
                    chain_pem: issued.chain_pem,
                }))
            }
            Err(e) => {
                tracing::warn!(target: "audit", event = refused_event, %node, method, error = %e,
                    "node certificate refused");
                Err(Status::invalid_argument(e.to_string()))
            }
        }
    }
}

#[tonic::async_trait]
impl NodeIdentityService for NodeIdentity {
    async fn join(
        &self,
        request: Request<JoinRequest>,
    ) -> Result<Response<NodeCertificateResponse>, Status> {
        let req = request.into_inner();
        if !req.service_account_token.is_empty() {
            let Some(reviewer) = &self.reviewer else {
                tracing::warn!(target: "audit", event = "node_join_refused", node = %req.node,
                    error = "service account token, but this control plane does not read Kubernetes", "join refused");
                return Err(Status::unauthenticated(
                    "this control plane does not read Kubernetes: join with a join token",
                ));
            };
            // The pod runs on the node it claims; `issue` checks that the node is (still) one
            // of the cluster.
            return match reviewer.check(&req.service_account_token, &req.node).await {
                Ok(()) => self.issue(
                    &req.node,
                    &req.csr_pem,
                    NodeRequest::Join {
                        method: "kubernetes",
                    },
                ),
                Err(
                    e @ (crate::kubernetes::node_auth::NodeAuthError::Api(_)
                    | crate::kubernetes::node_auth::NodeAuthError::Timeout(_)),
                ) => {
                    tracing::error!(target: "audit", event = "node_join_refused", node = %req.node,
                        method = "kubernetes", error = %e, "join failed");
                    Err(Status::unavailable(e.to_string()))
                }
                Err(e) => {
                    tracing::warn!(target: "audit", event = "node_join_refused", node = %req.node,
                        method = "kubernetes", error = %e, "join refused");
                    Err(Status::permission_denied(e.to_string()))
                }
            };
        }
        let tokens = self.tokens.clone();
        let (node, token) = (req.node.clone(), req.token.clone());
        let consumed = tokio::task::spawn_blocking(move || tokens.consume(&node, &token))
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        match consumed {
            Ok(()) => self.issue(
                &req.node,
                &req.csr_pem,
                NodeRequest::Join {
                    method: "join_token",
                },
            ),
            Err(e @ TokenError::Io { .. }) | Err(e @ TokenError::Corrupt { .. }) => {
                tracing::error!(target: "audit", event = "node_join_refused", node = %req.node, error = %e, "join failed");
                Err(Status::unavailable(e.to_string()))
            }
            Err(e) => {
                tracing::warn!(target: "audit", event = "node_join_refused", node = %req.node, error = %e, "join refused");
                Err(Status::unauthenticated(e.to_string()))
            }
        }
    }

    async fn renew_node_certificate(
        &self,
        request: Request<RenewNodeCertificateRequest>,
    ) -> Result<Response<NodeCertificateResponse>, Status> {
        let node = node_of(&request)?;
        self.issue(&node, &request.into_inner().csr_pem, NodeRequest::Renewal)
    }
}

/// Streams each node its view of the mesh.
pub struct Discovery {
    pub trust_domain: String,
    pub published: watch::Receiver<Published>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DiscoveryService for Discovery {
    type StreamStream = ResponseStream;

    async fn stream(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let node = node_of(&request)?;
        let mut inbound = request.into_inner();
        match inbound.next().await {
            Some(Ok(DiscoveryRequest {
                kind: Some(discovery_request::Kind::Hello(hello)),
            })) if hello.node == node => {}
            Some(Ok(DiscoveryRequest {
                kind: Some(discovery_request::Kind::Hello(hello)),
            })) => {
                return Err(Status::permission_denied(format!(
                    "this node's certificate names {node:?}, not {:?}",
                    hello.node
                )))
            }
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on the discovery stream must be Hello with the node name",
                ))
            }
        }
        let mut published = self.published.clone();
        let trust_domain = self.trust_domain.clone();
        // What the node may see now: nothing once it is no node of the cluster. The one check,
        // for the stream's start and for every later version alike.
        let view = move |published: &mut watch::Receiver<Published>, node: &str| {
            let published = published.borrow_and_update();
            published
                .registry
                .admits_node(node)
                .map(|()| published.response(&trust_domain))
        };
        let first = match view(&mut published, &node) {
            Ok(first) => first,
            Err(e) => {
                tracing::warn!(target: "audit", event = "discovery_refused", %node, error = %e, "discovery refused");
                return Err(Status::permission_denied(e));
            }
        };
        tracing::info!(%node, "node connected to discovery");
        let (tx, rx) = mpsc::channel(4);
        let push_node = node.clone();
        // Set by a NACK: the node could not apply what it was sent, so the next update is
        // the full state, whatever it holds.
        let resync = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let nacked = resync.clone();
        tokio::spawn(async move {
            // The last version this stream sent, as sent in full: the base of the next delta.
            let mut sent: Option<DiscoveryResponse> = None;
            let mut next = Some(first);
            loop {
                let full = match next.take() {
                    Some(full) => full,
                    None => {
                        if published.changed().await.is_err() {
                            break;
                        }
                        // A node removed from the cluster is cut off here, whatever it was sent.
                        match view(&mut published, &push_node) {
                            Ok(full) => full,
                            Err(e) => {
                                tracing::warn!(target: "audit", event = "discovery_refused", node = %push_node, error = %e, "discovery stream ended: not a node of the cluster");
                                let _ = tx.send(Err(Status::permission_denied(e))).await;
                                break;
                            }
                        }
                    }
                };
                let base = sent
                    .take()
                    .filter(|_| !resync.swap(false, std::sync::atomic::Ordering::AcqRel));
                // The first update of a stream is the whole state; then what changed.
                let response = match base.as_ref().and_then(|b| crate::publish::delta(b, &full)) {
                    Some(delta) => delta,
                    None => full.clone(),
                };
                tracing::debug!(node = %push_node, version = response.version,
                    incremental = response.incremental,
                    bytes = prost::Message::encoded_len(&response), "sending an update");
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
                sent = Some(full);
            }
            tracing::info!(node = %push_node, "discovery stream closed");
        });
        tokio::spawn(async move {
            while let Some(message) = inbound.next().await {
                match message {
                    Ok(DiscoveryRequest {
                        kind: Some(discovery_request::Kind::Ack(ack)),
                    }) => tracing::info!(%node, version = ack.version, "node applied version"),
                    Ok(DiscoveryRequest {
                        kind: Some(discovery_request::Kind::Nack(nack)),
                    }) => {
                        nacked.store(true, std::sync::atomic::Ordering::Release);
                        tracing::warn!(%node, version = nack.version, error = %nack.error, "node refused version; the next update is the full state")
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::info!(%node, "discovery stream ended: {e}");
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet_proto::v1::Workload;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose, SanType};
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn service(max_lifetime: Duration) -> Certificates {
        let (signer, _) = crate::pki::generate_dev("cluster.local").expect("dev pki");
        let ca = Arc::new(CertificateAuthority::new(
            "cluster.local",
            signer,
            max_lifetime,
        ));
        let snapshot = Snapshot {
            version: 1,
            workloads: vec![Workload {
                uid: "uid-web".into(),
                namespace: "default".into(),
                name: "web".into(),
                service_account: "web".into(),
                node: "node-1".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (_tx, registry) = watch::channel(snapshot);
        Certificates { ca, registry }
    }

    /// A CSR that asks for everything the CA must not grant.
    fn greedy_csr() -> String {
        let key = KeyPair::generate().expect("key");
        let mut req = CertificateParams::new(vec!["evil.example".to_string()]).expect("params");
        req.subject_alt_names.push(SanType::URI(
            "spiffe://cluster.local/ns/kube-system/sa/admin"
                .try_into()
                .expect("uri"),
        ));
        req.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        req.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        req.serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem")
    }

    /// A request from `node`, as its node certificate names it.
    fn request(node: &str, identity: &str, lifetime: u64) -> Request<CreateCertificateRequest> {
        let mut request = Request::new(CreateCertificateRequest {
            csr_pem: greedy_csr(),
            identity: identity.into(),
            lifetime_seconds: lifetime,
            node: String::new(),
        });
        request.extensions_mut().insert(crate::node_auth::NodePeer {
            node: Some(node.into()),
        });
        request
    }

    #[tokio::test]
    async fn a_greedy_csr_gets_only_the_policy_values() {
        let certs = service(Duration::from_secs(3600));
        let ten_years = 10 * 365 * 24 * 3600;
        let chain = certs
            .create_certificate(request(
                "node-1",
                "spiffe://cluster.local/ns/default/sa/web",
                ten_years,
            ))
            .await
            .expect("issued")
            .into_inner()
            .chain_pem;
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(chain[0].as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c)
            .expect("pem");
        let (_, cert) = X509Certificate::from_der(&der).expect("x509");
        assert!(!cert.is_ca(), "CA flag copied from the CSR");
        assert!(
            cert.subject().iter().next().is_none(),
            "subject must be empty"
        );
        let san = cert.subject_alternative_name().expect("ext").expect("san");
        assert!(san.critical, "the SAN of an empty subject is critical");
        assert_eq!(san.value.general_names.len(), 1, "SANs copied from the CSR");
        assert_eq!(
            format!("{}", san.value.general_names[0]),
            "URI(spiffe://cluster.local/ns/default/sa/web)"
        );
        let ku = cert.key_usage().expect("ext").expect("ku").value;
        assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.crl_sign());
        let eku = cert.extended_key_usage().expect("ext").expect("eku").value;
        assert!(eku.server_auth && eku.client_auth && !eku.any);
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(
            lifetime,
            3600 + 60,
            "the operator's maximum (and 60 s backdating)"
        );
        // Five minutes works too.
        let chain = certs
            .create_certificate(request(
                "node-1",
                "spiffe://cluster.local/ns/default/sa/web",
                300,
            ))
            .await
            .expect("issued")
            .into_inner()
            .chain_pem;
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(chain[0].as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c)
            .expect("pem");
        let (_, cert) = X509Certificate::from_der(&der).expect("x509");
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert_eq!(lifetime, 300 + 60);
    }

    #[tokio::test]
    async fn identities_without_a_pod_on_the_calling_node_are_refused() {
        let certs = service(Duration::from_secs(3600));
        let refused = certs
            .create_certificate(request(
                "node-2",
                "spiffe://cluster.local/ns/default/sa/web",
                0,
            ))
            .await
            .expect_err("node-2 runs no web pod");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused
            .message()
            .contains("runs no pod with service account default/web"));
        let refused = certs
            .create_certificate(request(
                "node-1",
                "spiffe://cluster.local/ns/kube-system/sa/admin",
                0,
            ))
            .await
            .expect_err("no admin pod anywhere");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        let refused = certs
            .create_certificate(request(
                "node-1",
                "spiffe://other.domain/ns/default/sa/web",
                0,
            ))
            .await
            .expect_err("another trust domain");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        // Without a node certificate nothing is issued, whatever the request claims.
        let mut anonymous = request("node-1", "spiffe://cluster.local/ns/default/sa/web", 0);
        anonymous.extensions_mut().clear();
        anonymous.get_mut().node = "node-1".into();
        let refused = certs
            .create_certificate(anonymous)
            .await
            .expect_err("no node certificate");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        // The certificate's node wins over the request's field.
        let mut lying = request("node-2", "spiffe://cluster.local/ns/default/sa/web", 0);
        lying.get_mut().node = "node-1".into();
        let refused = certs
            .create_certificate(lying)
            .await
            .expect_err("node-2 lies");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    }

    #[tokio::test]
    async fn a_node_removed_from_the_cluster_gets_no_certificate() {
        let mut certs = service(Duration::from_secs(3600));
        let mut snapshot = certs.registry.borrow().clone();
        let (tx, registry) = watch::channel(snapshot.clone());
        certs.registry = registry;
        let ask = || request("node-1", "spiffe://cluster.local/ns/default/sa/web", 0);
        // Kubernetes mode, node-1 a Node of the cluster: issued.
        snapshot.nodes = Some(["node-1".to_string(), "node-2".to_string()].into());
        tx.send(snapshot.clone()).expect("send");
        certs.create_certificate(ask()).await.expect("issued");
        // `kubectl delete node node-1`: its pod is still listed, but the node is not served.
        snapshot.nodes = Some(["node-2".to_string()].into());
        tx.send(snapshot).expect("send");
        let refused = certs
            .create_certificate(ask())
            .await
            .expect_err("node-1 is gone");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(
            refused.message().contains("not a node of the cluster"),
            "{}",
            refused.message()
        );
    }
}
