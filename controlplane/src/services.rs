//! The gRPC services: certificates and discovery.
use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use meshlet_proto::v1::{
    certificate_service_server::CertificateService, discovery_request,
    discovery_service_server::DiscoveryService, CreateCertificateRequest,
    CreateCertificateResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    ca::{parse_identity, CertificateAuthority},
    publish::Published,
    registry::Snapshot,
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
        let req = request.into_inner();
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
        let mut inbound = request.into_inner();
        let node =
            match inbound.next().await {
                Some(Ok(DiscoveryRequest {
                    kind: Some(discovery_request::Kind::Hello(hello)),
                })) if !hello.node.is_empty() => hello.node,
                _ => return Err(Status::invalid_argument(
                    "the first message on the discovery stream must be Hello with the node name",
                )),
            };
        tracing::info!(%node, "node connected to discovery");
        let (tx, rx) = mpsc::channel(4);
        let mut published = self.published.clone();
        let trust_domain = self.trust_domain.clone();
        let push_node = node.clone();
        tokio::spawn(async move {
            loop {
                let response = published.borrow_and_update().response(&trust_domain);
                if tx.send(Ok(response)).await.is_err() {
                    break;
                }
                if published.changed().await.is_err() {
                    break;
                }
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
                        tracing::warn!(%node, version = nack.version, error = %nack.error, "node refused version")
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
