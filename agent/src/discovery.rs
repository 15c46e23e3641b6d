//! Follows the control plane's discovery stream: every version is validated whole into the
//! [`state`](crate::state) and ACKed, or NACKed and changes nothing.
use std::{sync::Arc, time::Duration};

use meshlet_proto::v1::{
    discovery_request, discovery_service_client::DiscoveryServiceClient, Ack, DiscoveryRequest,
    Hello, Nack,
};
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::transport::Channel;

use crate::{
    state::{Store, StreamPosition, MAX_UPDATE_BYTES},
    tls::TrustBundle,
};

/// Follows the control plane's discovery stream for as long as the agent runs; reconnects
/// with backoff and keeps serving the last good state while the control plane is away.
pub async fn follow(
    channel: Channel,
    node: String,
    workloads: Arc<Store>,
    bundle: Arc<TrustBundle>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let mut connected = false;
        let result = follow_once(
            channel.clone(),
            &node,
            &workloads,
            &bundle,
            &metrics,
            &mut connected,
        )
        .await;
        metrics.control_plane_connected.set(0);
        workloads.set_link(
            false,
            Some(match &result {
                Ok(()) => "the discovery stream ended".to_string(),
                Err(e) => format!("{}: {}", e.code(), e.message()),
            }),
        );
        // A stream that got going was a success: the next failure starts from the shortest
        // delay again, not from where a long outage left the backoff.
        if connected {
            backoff.reset();
        }
        let wait = backoff.next_delay();
        match result {
            Ok(()) => tracing::warn!("discovery stream ended; reconnecting in {wait:?}"),
            Err(e) => tracing::warn!("discovery stream failed: {e}; reconnecting in {wait:?}"),
        }
        tokio::time::sleep(wait).await;
    }
}

async fn follow_once(
    channel: Channel,
    node: &str,
    workloads: &Store,
    bundle: &TrustBundle,
    metrics: &crate::metrics::Metrics,
    connected: &mut bool,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    let hello = DiscoveryRequest {
        kind: Some(discovery_request::Kind::Hello(Hello {
            node: node.to_string(),
        })),
    };
    let _ = tx.send(hello).await;
    let mut client =
        DiscoveryServiceClient::new(channel).max_decoding_message_size(MAX_UPDATE_BYTES);
    let mut responses = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    metrics.control_plane_connected.set(1);
    workloads.set_link(true, None);
    *connected = true;
    let mut position = StreamPosition::First;
    while let Some(update) = responses.next().await {
        let update = update.inspect_err(|status| {
            if status.code() == tonic::Code::OutOfRange {
                metrics.control_plane_rejected.inc();
                workloads.set_problem(Some(format!(
                    "update too large (the agent takes up to {MAX_UPDATE_BYTES} bytes): {}",
                    status.message()
                )));
            }
        })?;
        let (version, incremental, bytes) = (
            update.version,
            update.incremental,
            prost::Message::encoded_len(&update),
        );
        let applied = workloads.apply(&update, bundle, position);
        // The decoded message goes before the next one is read: one copy of a large mesh
        // at a time.
        drop(update);
        if applied.is_ok() {
            position = StreamPosition::Later;
        }
        let kind = match applied {
            Ok(()) => {
                metrics.control_plane_version.set(version as i64);
                let state = workloads.current();
                let (count, services) = (state.workloads().count(), state.services().len());
                metrics.mesh_workloads.set(count as i64);
                metrics.mesh_services.set(services as i64);
                tracing::info!(
                    version = version,
                    workloads = count,
                    services,
                    incremental,
                    bytes,
                    "applied control-plane update"
                );
                discovery_request::Kind::Ack(Ack { version })
            }
            Err(e) => {
                metrics.control_plane_rejected.inc();
                workloads.set_problem(Some(format!(
                    "version {} refused (NACK), keeping version {}: {e}",
                    version,
                    workloads.version()
                )));
                tracing::error!(
                    version = version,
                    "refused control-plane update (NACK), keeping version {}: {e}",
                    workloads.version()
                );
                discovery_request::Kind::Nack(Nack {
                    version,
                    error: e.to_string(),
                })
            }
        };
        if tx
            .send(DiscoveryRequest { kind: Some(kind) })
            .await
            .is_err()
        {
            break;
        }
    }
    Ok(())
}
