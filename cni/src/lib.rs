//! The plugin's logic, apart from the process (environment, stdin, stdout) so that tests can
//! drive it. See `main.rs` for what the plugin does.
use std::{
    collections::BTreeMap,
    os::fd::AsFd,
    path::{Path, PathBuf},
    time::Duration,
};

pub mod install;

use meshlet_proto::{
    cni_socket,
    v1::{cni_reply::Outcome, cni_request::Command, CniReply, CniRequest},
};
use serde::Deserialize;
use serde_json::{json, Value};

/// CNI versions this plugin speaks; the output's version is the configuration's.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];
/// A network configuration larger than this is refused (a conflist entry is a few hundred
/// bytes; prevResult a few kilobytes).
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;
/// Where the agent listens unless the configuration says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/meshlet/cni.sock";
/// Namespaces whose pods never wait for the agent: the cluster's own, and meshlet's (its
/// control plane must start before any agent can decide anything).
pub const DEFAULT_EXCLUDED_NAMESPACES: &[&str] = &["kube-system", "meshlet-system"];

/// Error codes of the CNI specification (section "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// Plugin-specific (100 and up): CHECK found a mesh pod that is not enrolled.
    pub const NOT_ENROLLED: u32 = 100;
}

/// A failure, as the spec's error object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl PluginError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    pub fn io(what: &str, e: std::io::Error) -> Self {
        Self::new(code::IO_FAILURE, what, e.to_string())
    }

    /// The error object, in the version the configuration asked for when it can be read.
    pub fn to_json(&self, _env: &Environment, stdin: &[u8]) -> String {
        let version = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| {
                v.get("cniVersion")
                    .and_then(Value::as_str)
                    .map(String::from)
            })
            .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
            .unwrap_or_else(|| "1.0.0".into());
        json!({
            "cniVersion": version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
        .to_string()
    }
}

/// What the runtime passes in the environment.
#[derive(Debug, Clone, Default)]
pub struct Environment {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
}

impl Environment {
    pub fn from_process() -> Self {
        let var = |name| std::env::var(name).unwrap_or_default();
        Self {
            command: var("CNI_COMMAND"),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: var("CNI_ARGS"),
        }
    }

    /// `CNI_ARGS` as pairs (`K=V;K=V`); malformed pairs are skipped, as runtimes add keys of
    /// their own.
    fn args(&self) -> BTreeMap<&str, &str> {
        self.args
            .split(';')
            .filter_map(|pair| pair.split_once('='))
            .collect()
    }
}

/// This plugin's entry in the conflist.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetConf {
    cni_version: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    prev_result: Option<Value>,
    /// The agent's CNI socket.
    #[serde(default)]
    socket: Option<PathBuf>,
    /// Seconds to wait for the agent on ADD before failing it.
    #[serde(default)]
    timeout_seconds: Option<u64>,
    /// Namespaces whose pods pass without asking the agent.
    #[serde(default)]
    exclude_namespaces: Option<Vec<String>>,
    /// For runtimes outside Kubernetes (no K8S_POD_NAMESPACE in CNI_ARGS): the namespace
    /// their containers belong to.
    #[serde(default)]
    workload_namespace: Option<String>,
}

/// The pod, from `CNI_ARGS` (Kubernetes' K8S_POD_*; podman passes only K8S_POD_NAME, the
/// container's name, which then also serves as its uid).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pod {
    namespace: String,
    name: String,
    uid: String,
}

fn pod(env: &Environment, conf: &NetConf) -> Result<Pod, PluginError> {
    let args = env.args();
    let get = |key| {
        args.get(key)
            .copied()
            .filter(|v| !v.is_empty())
            .map(String::from)
    };
    let name = get("K8S_POD_NAME")
        .or_else(|| (!env.container_id.is_empty()).then(|| env.container_id.clone()))
        .ok_or_else(|| {
            PluginError::new(
                code::INVALID_ENVIRONMENT,
                "no pod name",
                "CNI_ARGS has no K8S_POD_NAME and CNI_CONTAINERID is empty",
            )
        })?;
    let namespace = get("K8S_POD_NAMESPACE")
        .or_else(|| conf.workload_namespace.clone())
        .ok_or_else(|| {
            PluginError::new(
                code::INVALID_ENVIRONMENT,
                "no pod namespace",
                "CNI_ARGS has no K8S_POD_NAMESPACE; outside Kubernetes, set \"workloadNamespace\" in meshlet-cni's conflist entry",
            )
        })?;
    let uid = get("K8S_POD_UID").unwrap_or_else(|| name.clone());
    Ok(Pod {
        namespace,
        name,
        uid,
    })
}

/// Runs one CNI command. `Some(output)` is printed on stdout; errors become the spec's
/// error object. `add_timeout` is the default wait for the agent on ADD.
pub fn run(
    env: &Environment,
    stdin: &[u8],
    add_timeout: Duration,
) -> Result<Option<String>, PluginError> {
    if env.command == "VERSION" {
        return Ok(Some(
            json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        ));
    }
    if stdin.len() as u64 > MAX_CONFIG_BYTES {
        return Err(PluginError::new(
            code::DECODE_FAILURE,
            "network configuration too large",
            format!("over {MAX_CONFIG_BYTES} bytes on stdin"),
        ));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        PluginError::new(
            code::DECODE_FAILURE,
            "cannot decode the network configuration on stdin",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(PluginError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {:?} is not supported", conf.cni_version),
            format!("meshlet-cni speaks {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    let socket = conf
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let timeout = conf
        .timeout_seconds
        .map(Duration::from_secs)
        .unwrap_or(add_timeout)
        .clamp(Duration::from_secs(1), Duration::from_secs(120));
    match env.command.as_str() {
        "ADD" => add(env, &conf, &socket, timeout),
        "DEL" => del(env, &conf, &socket).map(|()| None),
        "CHECK" => check(env, &conf, &socket, timeout).map(|()| None),
        "STATUS" => status(&socket).map(|()| None),
        "GC" => Ok(None),
        "" => Err(PluginError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_COMMAND is not set",
            "meshlet-cni is run by a container runtime as a CNI plugin",
        )),
        other => Err(PluginError::new(
            code::INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK, STATUS, GC or VERSION",
        )),
    }
}

fn excluded(conf: &NetConf, namespace: &str) -> bool {
    match &conf.exclude_namespaces {
        Some(list) => list.iter().any(|n| n == namespace),
        None => DEFAULT_EXCLUDED_NAMESPACES.contains(&namespace),
    }
}

/// The previous plugin's result, unchanged, in the configuration's version.
fn pass_through(conf: &NetConf) -> String {
    let mut result = conf.prev_result.clone().unwrap_or_else(|| json!({}));
    if let Some(object) = result.as_object_mut() {
        object.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    }
    result.to_string()
}

fn request(env: &Environment, pod: &Pod, command: Command) -> CniRequest {
    CniRequest {
        command: command.into(),
        container_id: env.container_id.clone(),
        pod_namespace: pod.namespace.clone(),
        pod_name: pod.name.clone(),
        pod_uid: pod.uid.clone(),
        netns_path: env.netns.clone(),
    }
}

fn add(
    env: &Environment,
    conf: &NetConf,
    socket: &Path,
    timeout: Duration,
) -> Result<Option<String>, PluginError> {
    let pod = pod(env, conf)?;
    if excluded(conf, &pod.namespace) {
        return Ok(Some(pass_through(conf)));
    }
    if env.netns.is_empty() {
        return Err(PluginError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_NETNS is not set",
            "ADD needs the pod's network namespace",
        ));
    }
    let netns = std::fs::File::open(&env.netns).map_err(|e| {
        PluginError::new(
            code::IO_FAILURE,
            format!("cannot open the pod's network namespace {}", env.netns),
            e.to_string(),
        )
    })?;
    set_pod_sysctls(&netns).map_err(|e| {
        PluginError::new(
            code::IO_FAILURE,
            format!("cannot set the pod's sysctls in {}", env.netns),
            e.to_string(),
        )
    })?;
    let reply = cni_socket::call(
        socket,
        &request(env, &pod, Command::Add),
        Some(netns.as_fd()),
        timeout,
    )
    .map_err(|e| agent_unreachable(socket, e))?;
    match reply.outcome() {
        Outcome::Enrolled | Outcome::NotInMesh => {
            eprintln!(
                "meshlet-cni: {}/{} ({}): {}",
                pod.namespace, pod.name, conf.name, reply.message
            );
            Ok(Some(pass_through(conf)))
        }
        _ => Err(agent_refused(&reply)),
    }
}

/// Sets the sysctls delivery needs inside the pod's namespace, from a thread that enters it
/// (the plugin's own thread stays in the host's).
fn set_pod_sysctls(netns: &std::fs::File) -> std::io::Result<()> {
    let netns = netns.try_clone()?;
    std::thread::spawn(move || {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        cni_socket::ensure_pod_sysctls()
    })
    .join()
    .map_err(|_| std::io::Error::other("the sysctl thread panicked"))?
}

fn agent_unreachable(socket: &Path, e: std::io::Error) -> PluginError {
    PluginError::new(
        code::TRY_AGAIN_LATER,
        "the meshlet agent did not confirm capture; the pod must wait",
        format!(
            "{} ({e}); is the meshlet agent running on this node?",
            socket.display()
        ),
    )
}

fn agent_refused(reply: &CniReply) -> PluginError {
    PluginError::new(
        code::TRY_AGAIN_LATER,
        "the meshlet agent could not capture the pod; the pod must wait",
        reply.message.clone(),
    )
}

fn del(env: &Environment, conf: &NetConf, socket: &Path) -> Result<(), PluginError> {
    // DEL never fails for want of the agent: the pod is going, and a restarted agent forgets
    // pods whose network namespace is gone. Nor does it wait long.
    let Ok(pod) = pod(env, conf) else {
        return Ok(());
    };
    if excluded(conf, &pod.namespace) {
        return Ok(());
    }
    if let Err(e) = cni_socket::call(
        socket,
        &request(env, &pod, Command::Del),
        None,
        Duration::from_secs(3),
    ) {
        eprintln!(
            "meshlet-cni: DEL of {}/{}: agent not reached ({e}); it forgets the pod when it finds its netns gone",
            pod.namespace, pod.name
        );
    }
    Ok(())
}

fn check(
    env: &Environment,
    conf: &NetConf,
    socket: &Path,
    timeout: Duration,
) -> Result<(), PluginError> {
    if conf.prev_result.is_none() {
        return Err(PluginError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult",
            "the runtime passes the result of the previous ADD",
        ));
    }
    let pod = pod(env, conf)?;
    if excluded(conf, &pod.namespace) {
        return Ok(());
    }
    let netns = std::fs::File::open(&env.netns).ok();
    let reply = cni_socket::call(
        socket,
        &request(env, &pod, Command::Check),
        netns.as_ref().map(|f| f.as_fd()),
        timeout,
    )
    .map_err(|e| agent_unreachable(socket, e))?;
    match reply.outcome() {
        Outcome::Enrolled | Outcome::NotInMesh => Ok(()),
        _ => Err(PluginError::new(
            code::NOT_ENROLLED,
            "the pod is not captured by the meshlet agent",
            reply.message,
        )),
    }
}

fn status(socket: &Path) -> Result<(), PluginError> {
    let probe = CniRequest {
        command: Command::Status.into(),
        ..Default::default()
    };
    match cni_socket::call(socket, &probe, None, Duration::from_secs(3)) {
        Ok(_) => Ok(()),
        Err(e) => Err(PluginError::new(
            code::NOT_AVAILABLE,
            "the meshlet agent is not running on this node; new mesh pods wait",
            format!("{}: {e}", socket.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str, args: &str) -> Environment {
        Environment {
            command: command.into(),
            container_id: "c0ffee".into(),
            netns: "/proc/self/ns/net".into(),
            ifname: "eth0".into(),
            args: args.into(),
        }
    }

    fn conf(extra: Value) -> Vec<u8> {
        let mut conf = json!({"cniVersion": "1.0.0", "name": "k8s", "type": "meshlet-cni",
            "socket": "/nonexistent/meshlet-cni-test.sock", "timeoutSeconds": 1});
        if let (Some(c), Some(e)) = (conf.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        serde_json::to_vec(&conf).expect("json")
    }

    const K8S: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=1234";

    #[test]
    fn version_lists_what_it_speaks() {
        let out = run(&env("VERSION", ""), b"", Duration::from_secs(1))
            .expect("version")
            .expect("output");
        let v: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["supportedVersions"], json!(["0.4.0", "1.0.0", "1.1.0"]));
    }

    #[test]
    fn bad_input_is_the_specs_error_with_a_code() {
        let e = run(&env("ADD", K8S), b"{not json", Duration::from_secs(1)).expect_err("bad");
        assert_eq!(e.code, code::DECODE_FAILURE);
        let e = run(
            &env("ADD", K8S),
            br#"{"cniVersion":"0.1.0","name":"n","type":"meshlet-cni"}"#,
            Duration::from_secs(1),
        )
        .expect_err("old");
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e = run(&env("", K8S), &conf(json!({})), Duration::from_secs(1)).expect_err("no cmd");
        assert_eq!(e.code, code::INVALID_ENVIRONMENT);
        let e = run(
            &env("ADD", "IgnoreUnknown=1"),
            &conf(json!({})),
            Duration::from_secs(1),
        )
        .expect_err("no namespace");
        assert_eq!(e.code, code::INVALID_ENVIRONMENT);
        assert!(e.details.contains("workloadNamespace"), "{e:?}");
        let json: Value =
            serde_json::from_str(&e.to_json(&env("ADD", ""), &conf(json!({})))).expect("json");
        assert_eq!(json["code"], code::INVALID_ENVIRONMENT);
        assert_eq!(json["cniVersion"], "1.0.0");
    }

    #[test]
    fn add_without_an_agent_fails_so_that_the_pod_waits_but_del_succeeds() {
        let e =
            run(&env("ADD", K8S), &conf(json!({})), Duration::from_secs(1)).expect_err("no agent");
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.details.contains("meshlet-cni-test.sock"), "{e:?}");
        assert_eq!(
            run(&env("DEL", K8S), &conf(json!({})), Duration::from_secs(1)),
            Ok(None)
        );
        let e =
            run(&env("STATUS", ""), &conf(json!({})), Duration::from_secs(1)).expect_err("status");
        assert_eq!(e.code, code::NOT_AVAILABLE);
    }

    #[test]
    fn excluded_namespaces_pass_through_the_previous_result_unchanged() {
        let prev = json!({"cniVersion": "1.0.0", "interfaces": [{"name": "eth0"}],
            "ips": [{"address": "10.1.0.5/24", "interface": 0}], "dns": {}});
        let args = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns;K8S_POD_UID=9";
        let out = run(
            &env("ADD", args),
            &conf(json!({"prevResult": prev})),
            Duration::from_secs(1),
        )
        .expect("excluded")
        .expect("output");
        assert_eq!(serde_json::from_str::<Value>(&out).expect("json"), prev);
        // An explicit list replaces the default one.
        let e = run(
            &env("ADD", args),
            &conf(json!({"prevResult": prev, "excludeNamespaces": ["other"]})),
            Duration::from_secs(1),
        )
        .expect_err("not excluded now: asks the agent, which is absent");
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
    }

    #[test]
    fn the_pod_comes_from_cni_args_or_the_runtimes_container_name() {
        let c: NetConf = serde_json::from_slice(&conf(json!({}))).expect("conf");
        assert_eq!(
            pod(&env("ADD", K8S), &c).expect("pod"),
            Pod {
                namespace: "default".into(),
                name: "web-0".into(),
                uid: "1234".into()
            }
        );
        let c: NetConf =
            serde_json::from_slice(&conf(json!({"workloadNamespace": "apps"}))).expect("conf");
        assert_eq!(
            pod(&env("ADD", "IgnoreUnknown=1;K8S_POD_NAME=box"), &c).expect("podman"),
            Pod {
                namespace: "apps".into(),
                name: "box".into(),
                uid: "box".into()
            }
        );
    }
}
