//! gRPC channels to these APIs (the control plane, or an agent's node socket): `unix:/path` or an
//! `http://host:port` address.
use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{address:?} is neither unix:/path nor http(s)://host:port: {source}")]
    BadAddress {
        address: String,
        source: tonic::transport::Error,
    },
}

/// A lazily connecting channel: the agent starts (and keeps its state) while the far end is
/// down, and the channel reconnects by itself.
pub fn connect_lazy(address: &str) -> Result<Channel, ChannelError> {
    if let Some(path) = address.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        // The URI is a placeholder; the connector below decides where to go.
        let endpoint = Endpoint::from_static("http://[::1]:50051");
        Ok(
            endpoint.connect_with_connector_lazy(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            })),
        )
    } else {
        let endpoint = Endpoint::from_shared(address.to_string()).map_err(|source| {
            ChannelError::BadAddress {
                address: address.to_string(),
                source,
            }
        })?;
        Ok(endpoint.connect_lazy())
    }
}
