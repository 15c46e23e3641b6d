//! meshlet's reference control plane, as a library: the CA, node authentication, the
//! workload registry, discovery. The `meshlet-controlplane` binary runs it; the fuzz targets
//! feed it untrusted input.
pub mod ca;
pub mod emergency;
pub mod health;
pub mod kubernetes;
pub mod node_auth;
pub mod pki;
pub mod publish;
pub mod registry;
pub mod services;
pub mod tokens;
