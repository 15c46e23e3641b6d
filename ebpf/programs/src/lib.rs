//! meshlet's eBPF programs live in `main.rs` (a `bpfel-unknown-none` binary that
//! `agent/build.rs` builds); this library target only exists so that the agent can name the
//! crate as a build dependency, which makes cargo rebuild the agent when the programs change.
#![no_std]
