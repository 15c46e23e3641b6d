//! Where an outbound connection goes: the one decision, made from the state alone, that the
//! outbound path follows and `meshlet check` shows.
//!
//! In order: a Service's cluster IP → a ready endpoint of it (power of two choices on open
//! connections, then the others as retries), on the endpoint's target port; a mesh workload's
//! address → that workload; anything else is egress, which the mesh's outbound traffic
//! policy lets through in plaintext (ALLOW_ANY, or a listed external service) or refuses
//! (REGISTRY_ONLY). A mesh workload is reached through the tunnel unless its own mode on that
//! port is DISABLE.
use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use rand::{seq::SliceRandom, Rng};

use super::{
    policy::{Mode, Transport},
    Health, MeshState, OutboundTrafficPolicy, Service, WorkloadInfo,
};

/// How many endpoints one connection to a Service tries before it fails: the pick and two
/// more, so that one endpoint whose app is down costs a retry, not the app's connection.
pub const MAX_ENDPOINT_ATTEMPTS: usize = 3;

/// One way to reach the destination.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Upstream {
    /// The address dialled (through the tunnel: the CONNECT authority).
    pub address: SocketAddr,
    /// The mesh workload there, if it is one.
    #[serde(serialize_with = "super::workload::serialize_name")]
    pub workload: Option<Arc<WorkloadInfo>>,
    pub kind: UpstreamKind,
    /// Why this way, for the access log and `meshlet check`: "mesh workload", "destination
    /// mode DISABLE (…)", "endpoint outside the mesh", "external service x",
    /// "outbound_traffic_policy=ALLOW_ANY".
    pub why: std::borrow::Cow<'static, str>,
}

/// What is at the other end, which decides the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamKind {
    /// A mesh workload: through the mTLS tunnel to its agent.
    MeshWorkload,
    /// A mesh workload whose mode on that port is DISABLE: plaintext, directly.
    DisabledWorkload,
    /// A Service endpoint that is no mesh workload: plaintext, directly.
    OutsideEndpoint,
    /// Egress listed as an external service: plaintext, directly.
    ExternalService,
    /// Egress under ALLOW_ANY: plaintext, directly.
    AllowAny,
}

impl UpstreamKind {
    pub fn transport(self) -> Transport {
        match self {
            Self::MeshWorkload => Transport::Mtls,
            _ => Transport::Plaintext,
        }
    }

    /// The access log's and metrics' outcome of a connection carried this way: `mtls`,
    /// `plaintext` (to a known destination that is not in mTLS) or `passthrough` (egress).
    pub fn outcome(self) -> &'static str {
        match self {
            Self::MeshWorkload => "mtls",
            Self::DisabledWorkload | Self::OutsideEndpoint => "plaintext",
            Self::ExternalService | Self::AllowAny => "passthrough",
        }
    }

    /// A short code for metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Self::MeshWorkload => "mesh_workload",
            Self::DisabledWorkload => "destination_mode_disable",
            Self::OutsideEndpoint => "endpoint_outside_mesh",
            Self::ExternalService => "external_service",
            Self::AllowAny => "allow_any",
        }
    }
}

impl Upstream {
    pub fn transport(&self) -> Transport {
        self.kind.transport()
    }
}

/// Where it goes, or why not.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteOutcome {
    /// To the first of these; on a refused or unreachable endpoint, to the next.
    Upstreams(Vec<Upstream>),
    /// Refused before anything is dialled. `reason` is a short code for metrics and logs
    /// (`no_healthy_endpoint`, `unknown_service_port`, `registry_only`).
    Refuse {
        reason: &'static str,
        detail: String,
    },
}

/// The decision for one outbound connection, with its explanation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Route {
    pub destination: SocketAddr,
    /// The Service dialled (`namespace/name`), when the destination is a cluster IP.
    pub service: Option<String>,
    pub outcome: RouteOutcome,
    /// Each step of the decision, for `meshlet check`.
    pub steps: Vec<String>,
}

/// What the route needs beyond the state: the node's local override of the outbound traffic
/// policy, and the open connections per upstream address (for load balancing).
pub struct RouteInputs<'a> {
    pub outbound_override: Option<OutboundTrafficPolicy>,
    pub load: &'a dyn Fn(SocketAddr) -> usize,
    /// Write the steps of the decision (for `meshlet check`); the data path does not, and so
    /// spends nothing on sentences no one reads.
    pub explain: bool,
}

/// The explanation being written, when one is asked for.
struct Steps(Option<Vec<String>>);

impl Steps {
    fn push(&mut self, step: impl FnOnce() -> String) {
        if let Some(steps) = &mut self.0 {
            steps.push(step());
        }
    }

    fn done(self) -> Vec<String> {
        self.0.unwrap_or_default()
    }
}

impl MeshState {
    /// Decides where a connection to `destination` goes.
    pub fn route(
        &self,
        destination: SocketAddr,
        inputs: &RouteInputs<'_>,
        rng: &mut impl Rng,
    ) -> Route {
        let ip = destination.ip().to_canonical();
        let destination = SocketAddr::new(ip, destination.port());
        let mut steps = Steps(inputs.explain.then(Vec::new));
        if let Some(service) = self.service_by_vip(ip) {
            steps.push(|| format!("{ip} is a cluster IP of service {}", service.display_name()));
            let outcome = self.to_service(service, destination, inputs, rng, &mut steps);
            return Route {
                destination,
                service: Some(service.display_name()),
                outcome,
                steps: steps.done(),
            };
        }
        if let Some(workload) = self.by_ip(ip) {
            steps.push(|| format!("{ip} is mesh workload {}", workload.display_name()));
            let upstream = self.to_workload(workload, destination, &mut steps);
            return Route {
                destination,
                service: None,
                outcome: RouteOutcome::Upstreams(vec![upstream]),
                steps: steps.done(),
            };
        }
        steps.push(|| format!("{ip} is neither a mesh workload nor a Service"));
        let outcome = self.egress(destination, inputs, &mut steps);
        Route {
            destination,
            service: None,
            outcome,
            steps: steps.done(),
        }
    }

    fn to_workload(
        &self,
        workload: &Arc<WorkloadInfo>,
        address: SocketAddr,
        steps: &mut Steps,
    ) -> Upstream {
        let mode = self.policy.mode_for(workload, address.port());
        let (kind, why) = if mode.mode == Mode::Disable {
            (
                UpstreamKind::DisabledWorkload,
                format!("destination mode DISABLE ({})", mode.source).into(),
            )
        } else {
            (UpstreamKind::MeshWorkload, "mesh workload".into())
        };
        steps.push(|| {
            format!(
                "{} port {}: mode {} ({}): {}",
                workload.display_name(),
                address.port(),
                mode.mode,
                mode.source,
                match kind.transport() {
                    Transport::Mtls => "mTLS tunnel to its agent",
                    Transport::Plaintext => "plaintext, directly",
                }
            )
        });
        Upstream {
            address,
            workload: Some(workload.clone()),
            kind,
            why,
        }
    }

    fn to_service(
        &self,
        service: &Service,
        destination: SocketAddr,
        inputs: &RouteInputs<'_>,
        rng: &mut impl Rng,
        steps: &mut Steps,
    ) -> RouteOutcome {
        let Some(port) = service.port(destination.port()) else {
            let detail = format!(
                "service {} has no TCP port {}",
                service.display_name(),
                destination.port()
            );
            steps.push(|| detail.clone());
            return RouteOutcome::Refuse {
                reason: "unknown_service_port",
                detail,
            };
        };
        steps.push(|| format!("port {} → target port {}", port.port, port.target));
        // The endpoints that take new connections, each at its own target port.
        let mut ready: Vec<(SocketAddr, &super::Endpoint)> = Vec::new();
        for endpoint in &service.endpoints {
            let health = endpoint.health();
            let target = endpoint.target_port(&port.target);
            let address = endpoint.address_for(destination.ip());
            match (health, target, address) {
                (Health::Ready, Some(target), Some(address)) => {
                    ready.push((SocketAddr::new(address, target), endpoint))
                }
                (Health::Ready, None, _) => steps.push(|| {
                    format!(
                        "endpoint {}: no port named {}: skipped",
                        endpoint.display_name(),
                        port.target
                    )
                }),
                (Health::Ready, _, None) => steps
                    .push(|| format!("endpoint {}: no address: skipped", endpoint.display_name())),
                (health, _, _) => steps.push(|| {
                    format!(
                        "endpoint {}: {}: no new connections",
                        endpoint.display_name(),
                        serde_json::to_value(health)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default()
                    )
                }),
            }
        }
        if ready.is_empty() {
            let detail = format!(
                "service {} has no ready endpoint for port {}",
                service.display_name(),
                port.port
            );
            steps.push(|| detail.clone());
            return RouteOutcome::Refuse {
                reason: "no_healthy_endpoint",
                detail,
            };
        }
        // Power of two choices: of two endpoints drawn at random, the one with fewer open
        // connections; then the rest, shuffled, as retries.
        ready.shuffle(rng);
        if ready.len() >= 2 && (inputs.load)(ready[1].0) < (inputs.load)(ready[0].0) {
            ready.swap(0, 1);
        }
        steps.push(|| format!(
            "{} ready endpoint(s); picked {} (fewer open connections of two drawn at random), then up to {} more on failure",
            ready.len(),
            ready[0].1.display_name(),
            MAX_ENDPOINT_ATTEMPTS - 1
        ));
        let upstreams = ready
            .into_iter()
            .take(MAX_ENDPOINT_ATTEMPTS)
            .map(|(address, endpoint)| match &endpoint.workload {
                Some(w) => self.to_workload(w, address, steps),
                None => {
                    steps.push(|| {
                        format!("endpoint {address} is outside the mesh: plaintext, directly")
                    });
                    Upstream {
                        address,
                        workload: None,
                        kind: UpstreamKind::OutsideEndpoint,
                        why: "endpoint outside the mesh".into(),
                    }
                }
            })
            .collect();
        RouteOutcome::Upstreams(upstreams)
    }

    fn egress(
        &self,
        destination: SocketAddr,
        inputs: &RouteInputs<'_>,
        steps: &mut Steps,
    ) -> RouteOutcome {
        let ip: IpAddr = destination.ip();
        let direct = |kind: UpstreamKind, why: std::borrow::Cow<'static, str>| {
            RouteOutcome::Upstreams(vec![Upstream {
                address: destination,
                workload: None,
                kind,
                why,
            }])
        };
        if let Some(external) = self
            .external_services
            .iter()
            .find(|e| e.matches(ip, destination.port()))
        {
            steps.push(|| {
                format!(
                    "external service {} lists it: plaintext, directly",
                    external.name
                )
            });
            return direct(
                UpstreamKind::ExternalService,
                format!("external service {}", external.name).into(),
            );
        }
        let policy = inputs
            .outbound_override
            .unwrap_or(self.outbound_traffic_policy);
        let source = if inputs.outbound_override.is_some() {
            "this node's --outbound-traffic-policy"
        } else {
            "the mesh's outbound_traffic_policy"
        };
        match policy {
            OutboundTrafficPolicy::AllowAny => {
                steps.push(|| format!("{source} is ALLOW_ANY: plaintext, directly"));
                direct(
                    UpstreamKind::AllowAny,
                    "outbound_traffic_policy=ALLOW_ANY".into(),
                )
            }
            OutboundTrafficPolicy::RegistryOnly => {
                let detail = format!(
                    "{source} is REGISTRY_ONLY and no external service lists {destination}"
                );
                steps.push(|| detail.clone());
                RouteOutcome::Refuse {
                    reason: "registry_only",
                    detail,
                }
            }
        }
    }
}
