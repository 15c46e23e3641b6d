//! Builds meshlet's eBPF programs (ebpf/programs) with the nightly toolchain and bpf-linker,
//! so that `include_bytes_aligned!` can embed them in the `meshlet` binary.
use std::process::Command;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=PATH");
    let missing = missing_toolchain();
    if !missing.is_empty() {
        anyhow::bail!(
            "cannot build meshlet's eBPF programs: {}. Run `cargo xtask setup` once on this \
             machine (it installs nightly's rust-src and bpf-linker 0.13.0).",
            missing.join("; ")
        );
    }
    let package = aya_build::Package {
        name: "meshlet-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/programs"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}

/// What the eBPF build needs and this machine lacks, each said in words.
fn missing_toolchain() -> Vec<String> {
    let mut missing = Vec::new();
    let has_bpf_linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|out| out.status.success())
        .unwrap_or(false);
    if !has_bpf_linker {
        missing.push("bpf-linker is not on PATH".to_string());
    }
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output();
    match sysroot {
        Ok(out) if out.status.success() => {
            let root = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let src = std::path::Path::new(&root).join("lib/rustlib/src/rust/library/core");
            if !src.exists() {
                missing.push("the nightly toolchain has no rust-src component".to_string());
            }
        }
        _ => missing.push("no `nightly` toolchain (rustup run nightly rustc failed)".to_string()),
    }
    missing
}
