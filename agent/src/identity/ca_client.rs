//! Talking to the control plane's CA. A trait, so that tests can inject a fake CA.
use std::time::Duration;

use meshlet_proto::v1::{
    certificate_service_client::CertificateServiceClient, CreateCertificateRequest,
};
use tonic::transport::Channel;

use super::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CA refused {identity}: {status}")]
    Refused {
        identity: SpiffeId,
        status: tonic::Status,
    },
}

/// Signs CSRs. Answers the chain, leaf first, PEM each.
#[tonic::async_trait]
pub trait CaClient: Send + Sync + 'static {
    async fn sign(
        &self,
        identity: &SpiffeId,
        csr_pem: String,
        lifetime: Duration,
    ) -> Result<Vec<String>, CaError>;
}

/// How long one certificate request may take, end to end.
pub const CALL_DEADLINE: Duration = Duration::from_secs(30);

/// The control plane's `CertificateService` over gRPC.
pub struct GrpcCaClient {
    client: CertificateServiceClient<Channel>,
    node: String,
}

impl GrpcCaClient {
    pub fn new(channel: Channel, node: String) -> Self {
        Self {
            client: CertificateServiceClient::new(channel),
            node,
        }
    }
}

#[tonic::async_trait]
impl CaClient for GrpcCaClient {
    async fn sign(
        &self,
        identity: &SpiffeId,
        csr_pem: String,
        lifetime: Duration,
    ) -> Result<Vec<String>, CaError> {
        let request = CreateCertificateRequest {
            csr_pem,
            identity: identity.to_string(),
            lifetime_seconds: lifetime.as_secs(),
            node: self.node.clone(),
        };
        // A CA that hangs must not stall renewal: the call has a deadline, and a failure is
        // retried with backoff.
        let mut request = tonic::Request::new(request);
        request.set_timeout(CALL_DEADLINE);
        let response = self
            .client
            .clone()
            .create_certificate(request)
            .await
            .map_err(|status| CaError::Refused {
                identity: identity.clone(),
                status,
            })?;
        Ok(response.into_inner().chain_pem)
    }
}
