//! The emergency switch: an operator sets one workload's mTLS mode in the registry, and the
//! running control plane pushes it to every node within a moment. The change is a mode rule
//! named `emergency-<workload>`, which beats every other rule for that workload; `--clear`
//! removes it. Every switch is an audit line.
use std::path::{Path, PathBuf};

use anyhow::Context;
use meshlet_proto::v1::ModeRule;

use crate::registry::RegistryFile;

#[derive(clap::Args, Debug)]
pub struct ModeArgs {
    /// The control plane's registry file (its --workloads).
    #[arg(long)]
    pub workloads: PathBuf,
    #[arg(long)]
    pub namespace: String,
    /// The workload's name.
    #[arg(long)]
    pub workload: String,
    /// STRICT, PERMISSIVE or DISABLE.
    #[arg(long, required_unless_present = "clear")]
    pub mode: Option<String>,
    /// Remove the emergency override: the workload's regular rules apply again.
    #[arg(long)]
    pub clear: bool,
    /// Why (kept in the audit line).
    #[arg(long, default_value = "")]
    pub reason: String,
}

pub fn set_mode(args: &ModeArgs) -> anyhow::Result<()> {
    let mut file = RegistryFile::read(&args.workloads)?;
    if !file
        .workloads
        .iter()
        .any(|w| w.namespace == args.namespace && w.name == args.workload)
    {
        anyhow::bail!(
            "no workload {}/{} in {}; check the namespace and name",
            args.namespace,
            args.workload,
            args.workloads.display()
        );
    }
    let name = format!("emergency-{}", args.workload);
    file.modes
        .retain(|r| !(r.namespace == args.namespace && r.name == name));
    if let Some(mode) = &args.mode {
        if !["STRICT", "PERMISSIVE", "DISABLE"].contains(&mode.as_str()) {
            anyhow::bail!("--mode {mode:?} is not STRICT, PERMISSIVE or DISABLE");
        }
        if !args.clear {
            file.modes.push(ModeRule {
                name: name.clone(),
                namespace: args.namespace.clone(),
                workload: args.workload.clone(),
                mode: mode.clone(),
                ..Default::default()
            });
        }
    }
    write_atomically(&args.workloads, &file)?;
    tracing::warn!(target: "audit", event = "emergency_mode",
        workload = %format!("{}/{}", args.namespace, args.workload),
        mode = %if args.clear { "cleared" } else { args.mode.as_deref().unwrap_or("") },
        rule = %name, reason = %args.reason, "emergency mode switch written");
    Ok(())
}

/// Writes the whole file next to itself and renames it over, so that the watching control
/// plane never reads half a file.
fn write_atomically(path: &Path, file: &RegistryFile) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(file)?;
    let tmp = path.with_extension("tmp-emergency");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}
