//! The registry file (workloads, mesh settings, modes, policies) as the control plane reads
//! it, published with a real trust bundle and validated by an agent as a whole update.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use meshlet_agent::{
    state::{Store, StreamPosition},
    tls::TrustBundle,
};
use meshlet_controlplane::{pki, publish::Published, registry::RegistryFile};

fn trust() -> &'static pki::Trust {
    static TRUST: OnceLock<pki::Trust> = OnceLock::new();
    TRUST.get_or_init(|| pki::generate_dev("cluster.local").expect("dev CA").1)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = RegistryFile::parse(text) else {
        return;
    };
    let published = Published {
        version: 1,
        registry: file.into_snapshot(1),
        trust: trust().clone(),
    };
    let update = published.response("cluster.local");
    let workloads = Store::default();
    if workloads
        .apply(&update, &TrustBundle::default(), StreamPosition::First)
        .is_ok()
    {
        assert_eq!(workloads.version(), 1);
    }
});
