//! `meshlet-controlplane`: the reference control plane (CA, workload registry, discovery).
use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::Parser;
use meshlet_proto::v1::{
    certificate_service_server::CertificateServiceServer,
    discovery_service_server::DiscoveryServiceServer,
    node_identity_service_server::NodeIdentityServiceServer,
};

use meshlet_controlplane::{
    ca, emergency, kubernetes, node_auth, pki, publish, registry, services, tokens,
};

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
    /// Join tokens for nodes.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(clap::Subcommand, Debug)]
enum TokenCommand {
    /// Make a single-use join token for one node and print it (it is shown once; only its
    /// hash is kept). Give it to that node's agent with --join-token-file.
    Create {
        /// The node the token is for.
        #[arg(long)]
        node: String,
        /// How long the token stays usable, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// The control plane's state folder (as given to the server).
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
}

const DEFAULT_STATE_DIR: &str = "/var/lib/meshlet-controlplane";

#[derive(clap::Args, Debug)]
struct Args {
    /// Where to serve gRPC: `unix:/path/to.sock` or `HOST:PORT`.
    #[arg(long, default_value = "unix:/run/meshlet/controlplane.sock")]
    listen: String,
    /// JSON file with the workloads and policy ({"workloads": [...], "mesh": {...},
    /// "modes": [...], "policies": [...]}); re-read when it changes.
    #[arg(long, conflicts_with_all = ["kubeconfig", "kubernetes"])]
    workloads: Option<PathBuf>,
    /// Read workloads and Services from a Kubernetes cluster (pods of namespaces labelled
    /// `meshlet.dev/mesh=enabled`), with this kubeconfig.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Read workloads and Services from the Kubernetes cluster this runs in (its service
    /// account, or $KUBECONFIG).
    #[arg(long)]
    kubernetes: bool,
    /// Kubernetes mode: the mesh's root namespace (its selector-less PeerAuthentication is the
    /// mesh default, its AuthorizationPolicies apply mesh-wide, its ConfigMap `meshlet` holds
    /// the mesh settings).
    #[arg(long, default_value = kubernetes::DEFAULT_ROOT_NAMESPACE)]
    root_namespace: String,
    /// Kubernetes mode: also read Istio's `security.istio.io/v1` PeerAuthentications and
    /// AuthorizationPolicies (a cluster moving from Istio keeps its policies).
    #[arg(long)]
    istio_policies: bool,
    /// Kubernetes mode: the agents' service account (`namespace/name`); a node joins with a
    /// projected token of it, bound to an agent pod on that node.
    #[arg(long, default_value = "meshlet-system/meshlet-agent")]
    agent_service_account: String,
    /// Plain-HTTP health endpoint for kubelet probes: `/healthz`, and `/ready` (not ready,
    /// with the reason, while the Kubernetes API cannot be watched).
    #[arg(long)]
    health_addr: Option<std::net::SocketAddr>,
    /// Kubernetes mode: the audience the agents' tokens are made for.
    #[arg(long, default_value = "meshlet")]
    token_audience: String,
    /// The mesh's SPIFFE trust domain.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Generate a throwaway root and intermediate. Never for production.
    #[arg(long, conflicts_with_all = ["ca_cert", "ca_key", "ca_chain", "trust_roots", "ca_secret_dir"])]
    dev: bool,
    /// The CA as a mounted Kubernetes Secret in cert-manager's layout: `tls.crt` (the signing
    /// intermediate, then its chain), `tls.key`, `ca.crt` (the roots nodes trust). Re-read
    /// when the kubelet updates the Secret's files, without a restart.
    #[arg(long, conflicts_with_all = ["ca_cert", "ca_key", "ca_chain", "trust_roots"])]
    ca_secret_dir: Option<PathBuf>,
    /// The signing certificate: an intermediate CA from your PKI (PEM). Re-read when it
    /// changes (with the key, chain, roots and CRLs), without a restart.
    #[arg(long, required_unless_present_any = ["dev", "ca_secret_dir"], requires_all = ["ca_key", "trust_roots"])]
    ca_cert: Option<PathBuf>,
    /// The signing certificate's private key (PKCS#8 PEM).
    #[arg(long)]
    ca_key: Option<PathBuf>,
    /// Intermediates between the signer and the root (PEM, nearest first), when there are any.
    #[arg(long)]
    ca_chain: Option<PathBuf>,
    /// The roots nodes trust (PEM; several during a CA rotation).
    #[arg(long)]
    trust_roots: Option<PathBuf>,
    /// A certificate revocation list to push to the nodes (PEM; repeatable).
    #[arg(long = "crl")]
    crls: Vec<PathBuf>,
    /// Roots of another trust domain, `DOMAIN=FILE` (repeatable); kept apart from ours.
    #[arg(long = "federate", value_parser = parse_federation)]
    federated: Vec<(String, PathBuf)>,
    /// Accept a self-signed signing certificate (a root) outside --dev. Not for production:
    /// a root's key then sits online in the control plane.
    #[arg(long)]
    allow_self_signed_signer: bool,
    /// Use a signing key file that group or others can read (refused by default: `chmod 600`).
    #[arg(long)]
    allow_insecure_key_permissions: bool,
    /// State folder: the join tokens.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Lifetime of node certificates, in seconds (nodes renew them at half-life).
    #[arg(long, default_value_t = 24 * 3600, value_parser = clap::value_parser!(u64).range(60..))]
    node_cert_lifetime: u64,
    /// Longest certificate lifetime the CA grants, in seconds (at least 60).
    #[arg(long, default_value_t = 24 * 3600, value_parser = clap::value_parser!(u64).range(60..))]
    max_cert_lifetime: u64,
}

fn parse_federation(value: &str) -> Result<(String, PathBuf), String> {
    let (domain, file) = value
        .split_once('=')
        .ok_or_else(|| format!("--federate {value:?}: expected DOMAIN=FILE"))?;
    if domain.is_empty() || file.is_empty() {
        return Err(format!("--federate {value:?}: expected DOMAIN=FILE"));
    }
    Ok((domain.to_string(), PathBuf::from(file)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // Logs on stderr: stdout carries answers (`token create` prints the token).
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Mode(mode)) => return emergency::set_mode(&mode),
        Some(Command::Token(TokenCommand::Create {
            node,
            ttl,
            state_dir,
        })) => {
            let token =
                tokens::TokenStore::new(&state_dir).create(&node, Duration::from_secs(ttl))?;
            tracing::info!(target: "audit", event = "join_token_created", %node, ttl_seconds = ttl, "join token created");
            println!("{token}");
            return Ok(());
        }
        None => {}
    }
    let args = cli.serve;
    if args.workloads.is_none() && args.kubeconfig.is_none() && !args.kubernetes {
        anyhow::bail!(
            "a source of workloads is required to serve: --workloads FILE (the registry of workloads and policy), or --kubernetes / --kubeconfig FILE"
        );
    }
    let max_lifetime = Duration::from_secs(args.max_cert_lifetime);
    let (ca, trust, _trust_sender) = if args.dev {
        tracing::warn!(
            "DEV MODE: generated a throwaway root and intermediate; certificates from this \
             control plane must never be trusted in production (use --ca-cert, --ca-key and \
             --trust-roots with an intermediate from your PKI)"
        );
        let (signer, trust) =
            pki::generate_dev(&args.trust_domain).context("generating the dev CA")?;
        // Agents verify the control plane against a root they are given: write the throwaway
        // one where they can be pointed at it.
        std::fs::create_dir_all(&args.state_dir)
            .with_context(|| format!("creating {}", args.state_dir.display()))?;
        let root_file = args.state_dir.join("dev-root.pem");
        std::fs::write(&root_file, trust.roots_pem.concat())
            .with_context(|| format!("writing {}", root_file.display()))?;
        tracing::warn!(root = %root_file.display(), "DEV MODE: agents need --control-plane-roots {}", root_file.display());
        let ca = Arc::new(ca::CertificateAuthority::new(
            &args.trust_domain,
            signer,
            max_lifetime,
        ));
        // The dev CA never changes: its sender lives as long as the server.
        let (tx, rx) = tokio::sync::watch::channel(trust);
        (ca, rx, tx)
    } else {
        let (cert, key, roots) = match &args.ca_secret_dir {
            Some(dir) => (dir.join("tls.crt"), dir.join("tls.key"), dir.join("ca.crt")),
            None => {
                let (Some(cert), Some(key), Some(roots)) = (
                    args.ca_cert.clone(),
                    args.ca_key.clone(),
                    args.trust_roots.clone(),
                ) else {
                    anyhow::bail!(
                        "--ca-cert, --ca-key and --trust-roots (or --ca-secret-dir) are required without --dev"
                    );
                };
                (cert, key, roots)
            }
        };
        let files = pki::PkiFiles {
            cert,
            key,
            chain: args.ca_chain.clone(),
            roots,
            crls: args.crls.clone(),
            federated: args.federated.iter().cloned().collect(),
            allow_self_signed: args.allow_self_signed_signer,
            allow_insecure_key_permissions: args.allow_insecure_key_permissions,
        };
        let (signer, trust) = pki::load(&files, &args.trust_domain)?;
        if args.allow_self_signed_signer {
            tracing::warn!(
                "--allow-self-signed-signer: a self-signed signer is accepted; not for production"
            );
        }
        tracing::info!(
            target: "audit",
            event = "ca_loaded",
            signer = %signer.subject,
            roots = trust.roots_pem.len(),
            crls = trust.crls_pem.len(),
            max_lifetime_seconds = args.max_cert_lifetime,
            "CA loaded from files"
        );
        let ca = Arc::new(ca::CertificateAuthority::new(
            &args.trust_domain,
            signer,
            max_lifetime,
        ));
        let (tx, rx) = tokio::sync::watch::channel(trust);
        pki::watch_files(files, args.trust_domain.clone(), ca.clone(), tx.clone());
        (ca, rx, tx)
    };
    let mut reviewer = None;
    let health = Arc::new(meshlet_controlplane::health::Health::default());
    if let Some(addr) = args.health_addr {
        meshlet_controlplane::health::serve(addr, health.clone())
            .await
            .with_context(|| format!("the health endpoint on {addr}"))?;
    }
    let registry = match &args.workloads {
        Some(file) => registry::watch_file(file.clone())?,
        None => {
            let client = kubernetes::client(args.kubeconfig.as_ref()).await?;
            let (namespace, service_account) = args
                .agent_service_account
                .split_once('/')
                .context("--agent-service-account must be namespace/name")?;
            reviewer = Some(kubernetes::node_auth::TokenReviewer {
                client: client.clone(),
                namespace: namespace.to_string(),
                service_account: service_account.to_string(),
                audience: args.token_audience.clone(),
                deadline: kubernetes::node_auth::REVIEW_DEADLINE,
            });
            kubernetes::watch_cluster(
                client,
                kubernetes::Options {
                    root_namespace: args.root_namespace.clone(),
                    istio_policies: args.istio_policies,
                    trust_domain: args.trust_domain.clone(),
                },
                health.clone(),
            )
            .await
        }
    };
    // The mesh settings' certificate lifetime, as it changes.
    {
        let (mut registry, ca) = (registry.clone(), ca.clone());
        tokio::spawn(async move {
            loop {
                ca.set_mesh_max_lifetime(registry.borrow_and_update().certificate_lifetime);
                if registry.changed().await.is_err() {
                    return;
                }
            }
        });
    }
    let published = publish::merge(registry.clone(), trust.clone());
    let node_identity = services::NodeIdentity {
        ca: ca.clone(),
        tokens: tokens::TokenStore::new(&args.state_dir),
        lifetime: Duration::from_secs(args.node_cert_lifetime),
        reviewer,
        registry: registry.clone(),
    };
    let serving = node_auth::TlsServing {
        ca: ca.clone(),
        trust: trust.clone(),
        trust_domain: args.trust_domain.clone(),
    };
    // Dead nodes are noticed (HTTP/2 PINGs); a node opens few streams; a call that hangs
    // ends.
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .max_concurrent_streams(Some(64))
        .add_service(NodeIdentityServiceServer::new(node_identity))
        .add_service(CertificateServiceServer::new(services::Certificates {
            ca,
            registry,
        }))
        .add_service(DiscoveryServiceServer::new(services::Discovery {
            trust_domain: args.trust_domain.clone(),
            published,
        }));
    // Every connection is TLS; which calls a connection may make depends on the node
    // certificate it presented (see node_auth).
    if let Some(path) = args.listen.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        if let Some(dir) = std::path::Path::new(path).parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let listener = Arc::new(
            tokio::net::UnixListener::bind(path)
                .with_context(|| format!("binding the control-plane socket {path}"))?,
        );
        tracing::info!(%path, trust_domain = %args.trust_domain, "control plane serving (mTLS)");
        let incoming = node_auth::incoming(serving, move || {
            let listener = listener.clone();
            async move { listener.accept().await.map(|(s, _)| s) }
        });
        router.serve_with_incoming(incoming).await?;
    } else {
        let addr: std::net::SocketAddr = args.listen.parse().with_context(|| {
            format!(
                "--listen {:?} is neither unix:PATH nor HOST:PORT",
                args.listen
            )
        })?;
        let listener = Arc::new(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the control-plane address {addr}"))?,
        );
        tracing::info!(%addr, trust_domain = %args.trust_domain, "control plane serving (mTLS)");
        let incoming = node_auth::incoming(serving, move || {
            let listener = listener.clone();
            async move { listener.accept().await.map(|(s, _)| s) }
        });
        router.serve_with_incoming(incoming).await?;
    }
    Ok(())
}
