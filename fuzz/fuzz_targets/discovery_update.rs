//! A whole control-plane update, as protobuf bytes: validated as the agent does, applied as
//! the first of a stream and then as a later one.
#![no_main]
use libfuzzer_sys::fuzz_target;
use meshlet_agent::{
    state::{RouteInputs, Store, StreamPosition},
    tls::TrustBundle,
};
use prost::Message;
use rand::SeedableRng;

fuzz_target!(|data: &[u8]| {
    let Ok(update) = meshlet_proto::v1::DiscoveryResponse::decode(data) else {
        return;
    };
    let workloads = Store::default();
    let bundle = TrustBundle::default();
    if workloads
        .apply(&update, &bundle, StreamPosition::First)
        .is_ok()
    {
        // An applied update is readable everywhere the agent reads it.
        let _ = workloads.list();
        let _ = workloads.policy();
        // Every Service port routes without a panic, over any load.
        let state = workloads.current();
        let inputs = RouteInputs {
            outbound_override: None,
            load: &|address| usize::from(address.port() % 3),
            explain: data.len() % 2 == 0,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(data.len() as u32));
        for service in state.services() {
            for vip in &service.vips {
                for port in service.ports.iter().map(|p| p.port).chain([1]) {
                    let _ = state.route(std::net::SocketAddr::new(*vip, port), &inputs, &mut rng);
                }
            }
        }
        // The same version again within the stream is refused.
        assert!(workloads
            .apply(&update, &bundle, StreamPosition::Later)
            .is_err());
    } else {
        assert_eq!(workloads.version(), 0, "a refused update changed the state");
    }
});
