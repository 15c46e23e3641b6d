//! A peer's CONNECT: method, authority and traceparent as they come off the wire.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let method = parts.next().unwrap_or_default();
    let authority = parts.next().unwrap_or_default();
    let traceparent = parts.next().unwrap_or_default();
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let Ok(request) = http::Request::builder()
        .method(method)
        .uri(authority)
        .header("traceparent", traceparent)
        .body(())
    else {
        return;
    };
    let _ = meshlet_agent::inbound::tunnel::connect_target(&request);
    if let Some(value) = request.headers().get("traceparent") {
        if let Some(valid) = meshlet_agent::tunnel::valid_traceparent(value) {
            assert_eq!(valid.len(), 55);
        }
    }
    // SPIFFE IDs a peer's certificate may carry.
    let _ = meshlet_spiffe::SpiffeId::parse(&text);
    let _ = meshlet_spiffe::node_of(&text, "cluster.local");
});
