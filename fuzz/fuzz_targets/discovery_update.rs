//! A whole control-plane update, as protobuf bytes: validated as the agent does, applied as
//! the first of a stream and then as a later one.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshlet_agent::{state::StreamPosition, state::Store as Workloads, tls::TrustBundle};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(update) = meshlet_proto::v1::DiscoveryResponse::decode(data) else {
        return;
    };
    let workloads = Workloads::default();
    let bundle = TrustBundle::default();
    if workloads
        .apply(&update, &bundle, StreamPosition::First)
        .is_ok()
    {
        // An applied update is readable everywhere the agent reads it.
        let _ = workloads.list();
        let _ = workloads.policy();
        // The same version again within the stream is refused.
        assert!(workloads
            .apply(&update, &bundle, StreamPosition::Later)
            .is_err());
    } else {
        assert_eq!(workloads.version(), 0, "a refused update changed the state");
    }
});
