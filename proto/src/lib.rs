//! meshlet's gRPC APIs, generated from `proto/meshlet.proto` by tonic.
#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

pub mod channel;
pub mod cni_socket;

/// Version 1 of the API: certificates, discovery, and the node-local pod API.
pub mod v1 {
    tonic::include_proto!("meshlet.v1");
}
