//! The registry file (workloads, mesh settings, modes, policies) as the control plane reads
//! it, then pushed to an agent that validates it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshlet_agent::{discovery::StreamPosition, discovery::Workloads, tls::TrustBundle};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = meshlet_controlplane::registry::RegistryFile::parse(text) else {
        return;
    };
    let snapshot = file.into_snapshot(1);
    let update = snapshot.response("cluster.local");
    let _ = Workloads::default().apply(&update, &TrustBundle::default(), StreamPosition::First);
});
