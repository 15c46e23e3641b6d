//! meshlet's node agent: every TCP connection between pods, mutually authenticated and
//! encrypted, without sidecars.
//!
//! The data path, top to bottom: [`redirect`] (eBPF steers a pod's connects to the agent) →
//! [`outbound`] (find the destination, pick the tunnel) → [`tunnel`] (mTLS + HTTP/2 CONNECT,
//! pooled) → [`inbound`] (authenticate, check the target) → [`deliver`] (connect to the app
//! with the client's address).
pub mod admin;
pub mod backoff;
pub mod cli;
pub mod cni;
pub mod connections;
pub mod control_plane;
pub mod deliver;
pub mod discovery;
pub mod doctor;
pub mod drain;
pub mod enrolled;
pub mod files;
pub mod handover;
pub mod identity;
pub mod inbound;
pub mod limits;
pub mod local_caller;
pub mod logging;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod node_api;
pub mod outbound;
pub mod pods;

pub mod redirect;
pub mod run;
pub mod state;
pub mod tls;
pub mod tunnel;
