//! `meshlet`: the node agent and its command line.
use clap::{Parser, Subcommand};
use meshlet_agent::{
    cli::{self, Output},
    logging::LogFormat,
    run,
};
use meshlet_proto::channel;
use meshlet_proto::v1::{node_service_client::NodeServiceClient, ListPodsRequest};

#[derive(Parser)]
#[command(
    name = "meshlet",
    version,
    about = "meshlet: mTLS for every pod, no sidecars"
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Agent(Box<run::AgentConfig>),
    /// List the pods the agent on this node has enrolled.
    Pods {
        /// The agent's node socket.
        #[arg(long, default_value = "/run/meshlet/agent.sock")]
        node_socket: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The agent's health, control-plane version and counts.
    Status {
        #[command(flatten)]
        view: ViewArgs,
    },
    /// The mesh's workloads as this node knows them.
    Workloads {
        #[command(flatten)]
        view: ViewArgs,
    },
    /// The mesh's Services: cluster IPs, ports, endpoints with their health and node.
    Services {
        #[command(flatten)]
        view: ViewArgs,
    },
    /// This node's identities: serial, validity, rotation, issuer chain, state.
    Certs {
        #[command(subcommand)]
        action: Option<CertsAction>,
        #[command(flatten)]
        view: ViewArgs,
    },
    /// Live connections: identities, addresses, age and bytes.
    Connections {
        #[command(flatten)]
        view: ViewArgs,
    },
    /// Everything at once; save it with `-o json > FILE` and read it back with `--file FILE`.
    ConfigDump {
        #[command(flatten)]
        view: ViewArgs,
    },
    /// Show the mTLS mode and authorization policies of each local workload.
    Policies {
        #[command(flatten)]
        view: ViewArgs,
    },
    /// Preflight of this node: kernel, BPF program types and helpers (probed), bpffs,
    /// cgroup v2 and the pods' cgroups, the CNI chain, the agent's sockets, readiness and
    /// certificates. Each failed check says the fix; exits 1 when one failed.
    Doctor {
        #[command(flatten)]
        args: meshlet_agent::doctor::DoctorArgs,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Explain how a connection would be decided, step by step, without sending it.
    Check {
        /// The source: a pod (namespace/name or uid), a SPIFFE ID, or an IP address.
        #[arg(long)]
        from: String,
        /// The destination: <pod>:<port> (pod: namespace/name, a uid or an IP; [v6]:port),
        /// <cluster-ip>:<port>, or svc/<namespace>/<name>:<port>.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        view: ViewArgs,
    },
}

#[derive(Subcommand)]
enum CertsAction {
    /// Check a PEM chain (leaf first) against this node's current trust bundle and CRLs, as
    /// a peer's chain would be, and print every reason it fails. Exits 1 when refused.
    Verify {
        /// The PEM file: the chain, leaf first.
        chain: std::path::PathBuf,
        #[command(flatten)]
        view: ViewArgs,
    },
}

/// Options of every command that reads the agent's admin API.
#[derive(clap::Args)]
struct ViewArgs {
    /// The agent's admin API.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: std::net::SocketAddr,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Answer from a saved config dump instead of a live agent.
    #[arg(long)]
    file: Option<std::path::PathBuf>,
}

impl ViewArgs {
    fn print(
        &self,
        value: &serde_json::Value,
        table: fn(&serde_json::Value),
    ) -> anyhow::Result<()> {
        match self.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
            Output::Yaml => print!("{}", serde_norway::to_string(value)?),
            Output::Table => table(value),
        }
        Ok(())
    }

    /// A view: the live agent's `endpoint`, or `section` of the saved dump.
    async fn fetch(
        &self,
        endpoint: &str,
        section: Option<&str>,
    ) -> anyhow::Result<serde_json::Value> {
        match &self.file {
            Some(path) => {
                let dump = cli::read_dump(path)?;
                Ok(match section {
                    Some(key) => dump[key].clone(),
                    None => dump,
                })
            }
            None => cli::admin_get(self.admin, endpoint).await,
        }
    }

    async fn show(
        &self,
        endpoint: &str,
        section: Option<&str>,
        table: fn(&serde_json::Value),
    ) -> anyhow::Result<()> {
        let value = self.fetch(endpoint, section).await?;
        self.print(&value, table)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let agent = matches!(cli.command, Command::Agent(_));
    meshlet_agent::logging::init(cli.log_format, agent);
    // The agent's runtime has `--worker-threads` threads (one: single-threaded, no wake-ups
    // between threads); the CLI commands make one request each and need no more than one.
    let runtime = match &cli.command {
        Command::Agent(config) => match config.runtime_threads() {
            1 => tokio::runtime::Builder::new_current_thread(),
            n => {
                let mut builder = tokio::runtime::Builder::new_multi_thread();
                builder.worker_threads(n);
                builder
            }
        },
        _ => tokio::runtime::Builder::new_current_thread(),
    }
    .enable_all()
    .build()?;
    let result = runtime.block_on(dispatch(cli));
    meshlet_agent::logging::flush();
    result
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(config) => run::run(*config).await,
        Command::Status { view } => {
            view.show("/status", Some("status"), cli::print_status)
                .await
        }
        Command::Workloads { view } => {
            view.show("/workloads", Some("workloads"), cli::print_workloads)
                .await
        }
        Command::Services { view } => {
            view.show("/services", Some("services"), cli::print_services)
                .await
        }
        Command::Certs {
            action: Some(CertsAction::Verify { chain: file, view }),
            ..
        } => {
            let pem = std::fs::read_to_string(&file).map_err(|e| {
                anyhow::anyhow!("cannot read the certificate chain {}: {e}", file.display())
            })?;
            let verdict = cli::admin_post(view.admin, "/certs/verify", pem).await?;
            view.print(&verdict, cli::print_chain_verdict)?;
            if verdict["trusted"].as_bool() != Some(true) {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Certs { action: None, view } => {
            view.show("/certs", Some("certs"), cli::print_certs).await
        }
        Command::Connections { view } => {
            view.show("/connections", Some("connections"), cli::print_connections)
                .await
        }
        Command::ConfigDump { view } => {
            view.show("/config_dump", None, cli::print_config_dump)
                .await
        }
        Command::Policies { view } => {
            view.show("/policies", Some("policies"), cli::print_policies)
                .await
        }
        Command::Check { from, to, view } => {
            let value = match &view.file {
                Some(path) => cli::check_from_dump(&cli::read_dump(path)?, &from, &to)?,
                None => {
                    let path = format!(
                        "/check?from={}&to={}",
                        cli::query_value(&from),
                        cli::query_value(&to)
                    );
                    cli::admin_get(view.admin, &path).await?
                }
            };
            view.print(&value, cli::print_check)
        }
        Command::Doctor { args, output } => {
            let checks = meshlet_agent::doctor::run(&args).await;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&checks)?),
                Output::Yaml => print!("{}", serde_norway::to_string(&checks)?),
                Output::Table => meshlet_agent::doctor::print(&checks),
            }
            if checks
                .iter()
                .any(|c| c.outcome == meshlet_agent::doctor::Outcome::Fail)
            {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Pods { node_socket, json } => {
            let channel = channel::connect_lazy(&format!("unix:{node_socket}"))?;
            let pods = NodeServiceClient::new(channel)
                .list_pods(ListPodsRequest {})
                .await
                .map_err(|s| {
                    anyhow::anyhow!(
                        "no agent answered on {node_socket}: {} (is `meshlet agent` running on this node?)",
                        s.message()
                    )
                })?
                .into_inner()
                .pods;
            if json {
                let rows: Vec<_> = pods
                    .iter()
                    .map(|p| {
                        serde_json::json!({"uid": p.uid, "netns": p.netns_path,
                            "netns_cookie": p.netns_cookie, "workload": p.workload,
                            "identity": p.identity})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<20} {:<24} {:<50} NETNS", "UID", "WORKLOAD", "IDENTITY");
                for p in pods {
                    println!(
                        "{:<20} {:<24} {:<50} {}",
                        p.uid, p.workload, p.identity, p.netns_path
                    );
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
