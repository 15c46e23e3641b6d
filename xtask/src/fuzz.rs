//! The fuzz targets in `fuzz/` (cargo-fuzz, nightly, libFuzzer with ASan): a few seconds of
//! each inside `cargo xtask test`, as long as one likes with `cargo xtask fuzz`.
use std::{path::Path, process::Command, time::Duration};

use anyhow::Context;

use crate::{root, run};

/// Every target: what it feeds untrusted bytes to.
pub const TARGETS: &[&str] = &[
    "hbone_request",
    "discovery_update",
    "registry_json",
    "ca_csr",
    "dump_reader",
];

/// The cargo-fuzz version `setup` installs.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// How the targets are built: `Smoke` unoptimised (it builds in half the time, 4½ instead
/// of 8½ minutes on two cores, and a 10 s smoke run needs no speed), `Long` optimised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    Smoke,
    Long,
}

impl Build {
    fn flag(self) -> &'static str {
        match self {
            Build::Smoke => "--dev",
            Build::Long => "-O",
        }
    }
}

/// Builds the targets and runs each (or only `only`) for `each`; a crash or leak fails.
/// New corpus entries go under `target/fuzz-corpus/<target>`; the committed seeds in
/// `fuzz/seeds/<target>` are read, never written.
pub fn run_targets(only: Option<&str>, each: Duration, build: Build) -> anyhow::Result<()> {
    let fuzz_dir = root().join("fuzz");
    run(Command::new("cargo").current_dir(&fuzz_dir).args([
        "+nightly",
        "fuzz",
        "build",
        build.flag(),
    ]))?;
    for target in TARGETS.iter().filter(|t| only.is_none_or(|o| o == **t)) {
        let corpus = root().join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let seeds = fuzz_dir.join("seeds").join(target);
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&fuzz_dir)
            .args(["+nightly", "fuzz", "run", build.flag(), target])
            .arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        cmd.arg("--")
            .arg(format!("-max_total_time={}", each.as_secs().max(1)))
            .arg("-rss_limit_mb=2048")
            .arg("-print_final_stats=1");
        run(&mut cmd).with_context(|| {
            format!(
                "fuzz target {target} failed; the input is under {}",
                Path::new("fuzz/artifacts").join(target).display()
            )
        })?;
    }
    Ok(())
}
