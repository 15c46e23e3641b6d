//! `meshlet-cni`: a chained CNI plugin (spec 1.0.0; 0.4.0 and 1.1.0 accepted).
//!
//! Placed after the cluster's own plugins in the node's conflist. On ADD it opens the pod's
//! network namespace and hands the descriptor, with the pod's namespace, name and uid, to the
//! node's meshlet agent over the CNI socket, then waits for the agent's answer: capture is in
//! place, or the pod is not in the mesh. Anything else fails the ADD, and the runtime retries
//! the sandbox later: a mesh pod never runs uncaptured. The plugin keeps no state; the
//! previous plugin's result passes through unchanged.
//!
//! Run with arguments (`install`, `uninstall`) it is the DaemonSet's CNI installer instead.
use std::{io::Read, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use meshlet_cni::{install, run, Environment, PluginError};

#[derive(Parser)]
#[command(
    name = "meshlet-cni",
    about = "meshlet's chained CNI plugin and its installer"
)]
struct Cli {
    #[command(subcommand)]
    command: Installer,
}

#[derive(Subcommand)]
enum Installer {
    /// Copy this binary into the node's CNI folder and chain it into the node's network
    /// configuration (the DaemonSet's init container).
    Install {
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        /// The agent's CNI socket, as the node sees it.
        #[arg(long, default_value = meshlet_cni::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Namespaces whose pods never wait for the agent (comma-separated).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "kube-system,meshlet-system"
        )]
        exclude_namespaces: Vec<String>,
        /// Seconds ADD waits for the agent.
        #[arg(long, default_value_t = 10)]
        timeout_seconds: u64,
    },
    /// Take meshlet-cni out of the node's network configuration and remove the binary.
    Uninstall {
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    if std::env::var_os("CNI_COMMAND").is_none() && std::env::args_os().len() > 1 {
        return installer(Cli::parse().command);
    }
    let mut stdin = Vec::new();
    let env = Environment::from_process();
    let result = std::io::stdin()
        .take(meshlet_cni::MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut stdin)
        .map_err(|e| PluginError::io("reading the network configuration from stdin", e))
        .and_then(|_| run(&env, &stdin, Duration::from_secs(10)));
    match result {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", e.to_json(&env, &stdin));
            ExitCode::FAILURE
        }
    }
}

fn installer(command: Installer) -> ExitCode {
    let result = match command {
        Installer::Install {
            cni_bin_dir,
            cni_conf_dir,
            socket,
            exclude_namespaces,
            timeout_seconds,
        } => install::copy_binary(&cni_bin_dir).and_then(|binary| {
            let entry = install::Entry {
                socket,
                exclude_namespaces,
                timeout_seconds,
            };
            let conf = install::chain(&cni_conf_dir, &entry)?;
            println!(
                "meshlet-cni installed: {} and chained in {}",
                binary.display(),
                conf.display()
            );
            Ok(())
        }),
        Installer::Uninstall {
            cni_bin_dir,
            cni_conf_dir,
        } => install::unchain(&cni_conf_dir).map(|changed| {
            let _ = std::fs::remove_file(cni_bin_dir.join("meshlet-cni"));
            println!(
                "meshlet-cni removed from {changed:?} and {}",
                cni_bin_dir.display()
            );
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshlet-cni: {e}");
            ExitCode::FAILURE
        }
    }
}
