//! Workload identity: SPIFFE IDs, the CA client, and the store of certificates per service
//! account.
mod ca_client;
mod store;

pub use ca_client::{CaClient, CaError, GrpcCaClient, CALL_DEADLINE};
pub use meshlet_spiffe::{SpiffeId, SpiffeIdError};
pub use store::{IdentityError, IdentityStore, WorkloadCertificate};
