//! `meshlet-controlplane`: the reference control plane (CA, workload registry, discovery).
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use meshlet_proto::v1::{
    certificate_service_server::CertificateServiceServer,
    discovery_service_server::DiscoveryServiceServer,
};

mod ca;
mod emergency;
mod registry;
mod services;

#[derive(Parser, Debug)]
#[command(
    name = "meshlet-controlplane",
    about = "meshlet's reference control plane",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: Args,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Emergency switch: set one workload's mTLS mode (e.g. PERMISSIVE while a broken client
    /// is fixed). The running control plane pushes it to every node at once.
    Mode(emergency::ModeArgs),
}

#[derive(clap::Args, Debug)]
struct Args {
    /// Where to serve gRPC: `unix:/path/to.sock` or `HOST:PORT`.
    #[arg(long, default_value = "unix:/run/meshlet/controlplane.sock")]
    listen: String,
    /// JSON file with the workloads and policy ({"workloads": [...], "mesh": {...},
    /// "modes": [...], "policies": [...]}); re-read when it changes.
    #[arg(long)]
    workloads: Option<PathBuf>,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Generate a throwaway root and intermediate. Never for production.
    #[arg(long)]
    dev: bool,
    /// Longest certificate lifetime the CA grants, in seconds.
    #[arg(long, default_value_t = 24 * 3600)]
    max_cert_lifetime: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let cli = Cli::parse();
    if let Some(Command::Mode(mode)) = cli.command {
        return emergency::set_mode(&mode);
    }
    let args = cli.serve;
    let Some(workloads) = args.workloads.clone() else {
        anyhow::bail!(
            "--workloads FILE is required to serve: the registry of workloads and policy"
        );
    };
    if !args.dev {
        anyhow::bail!(
            "meshlet-controlplane needs a signing intermediate from your PKI; loading one from \
             files is not built yet. Use --dev for a throwaway CA (development and the lab only)."
        );
    }
    tracing::warn!(
        "DEV MODE: generated a throwaway root and intermediate; certificates from this control \
         plane must never be trusted in production"
    );
    let ca = Arc::new(
        ca::CertificateAuthority::generate_dev(
            &args.trust_domain,
            Duration::from_secs(args.max_cert_lifetime),
        )
        .context("generating the dev CA")?,
    );
    let registry = registry::watch_file(workloads)?;
    let router = tonic::transport::Server::builder()
        .add_service(CertificateServiceServer::new(services::Certificates {
            ca: ca.clone(),
            registry: registry.clone(),
        }))
        .add_service(DiscoveryServiceServer::new(services::Discovery {
            ca,
            registry,
        }));
    if let Some(path) = args.listen.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        if let Some(dir) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let listener = tokio::net::UnixListener::bind(path)
            .with_context(|| format!("binding the control-plane socket {path}"))?;
        tracing::info!(%path, trust_domain = %args.trust_domain, "control plane serving");
        router
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await?;
    } else {
        let addr = args.listen.parse().with_context(|| {
            format!(
                "--listen {:?} is neither unix:PATH nor HOST:PORT",
                args.listen
            )
        })?;
        tracing::info!(%addr, trust_domain = %args.trust_domain, "control plane serving");
        router.serve(addr).await?;
    }
    Ok(())
}
