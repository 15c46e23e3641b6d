//! `meshlet doctor`: the node's preflight, as `linkerd check` or `cilium status` give it. Each
//! check probes the real thing (the kernel's verifier for BPF program types and helpers, the
//! mounts, the CNI chain on disk, the agent's sockets and admin API) and a failed one says
//! what to do.
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    programs::ProgramType,
    sys::{is_helper_supported, is_program_supported, BpfHelper},
};
use serde::Serialize;

/// Where the checks look.
#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {
    /// The node's CNI configuration folder.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The node's CNI plugin folder.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The agent's node socket (its CNI socket is beside it).
    #[arg(long, default_value = "/run/meshlet/agent.sock")]
    pub node_socket: PathBuf,
    /// The agent's admin API.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// The pods' cgroup folder the agent is given (--pod-cgroup); found when unset.
    #[arg(long)]
    pub pod_cgroup: Option<PathBuf>,
}

/// One check's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
    /// What to do, for a warning or a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn pass(name: &'static str, detail: impl Into<String>) -> Check {
    Check {
        name,
        outcome: Outcome::Pass,
        detail: detail.into(),
        fix: None,
    }
}

fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name,
        outcome: Outcome::Fail,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check {
        name,
        outcome: Outcome::Warn,
        detail: detail.into(),
        fix: Some(fix.into()),
    }
}

/// The program types the agent loads, by the name its code gives them.
const PROGRAM_TYPES: &[(&str, ProgramType)] = &[
    (
        "cgroup/connect, getpeername, bind",
        ProgramType::CgroupSockAddr,
    ),
    ("sock_ops", ProgramType::SockOps),
    ("sk_lookup", ProgramType::SkLookup),
];

/// The helpers the programs call, with the program type that calls each.
const HELPERS: &[(&str, ProgramType, BpfHelper)] = &[
    (
        "bpf_get_netns_cookie",
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_get_netns_cookie,
    ),
    (
        "bpf_get_socket_cookie",
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_get_socket_cookie,
    ),
    (
        "bpf_get_current_cgroup_id",
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_get_current_cgroup_id,
    ),
    (
        "bpf_bind",
        ProgramType::CgroupSockAddr,
        BpfHelper::BPF_FUNC_bind,
    ),
    (
        "bpf_get_socket_cookie",
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_get_socket_cookie,
    ),
    (
        "bpf_sock_hash_update",
        ProgramType::SockOps,
        BpfHelper::BPF_FUNC_sock_hash_update,
    ),
    (
        "bpf_sk_assign",
        ProgramType::SkLookup,
        BpfHelper::BPF_FUNC_sk_assign,
    ),
];

const BPF_PERMISSION_FIX: &str = "run as root with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (the DaemonSet's securityContext), and check that no seccomp profile blocks bpf()";

fn kernel() -> Check {
    let name = "kernel";
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse::<u32>().ok());
    let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if version >= (5, 10) {
        pass(name, format!("Linux {release}"))
    } else {
        fail(
            name,
            format!("Linux {release}"),
            "meshlet needs Linux 5.10 or newer (netns cookies, cgroup BPF links, sk_lookup)",
        )
    }
}

fn program_types() -> Check {
    let name = "bpf program types";
    let mut missing = Vec::new();
    for (what, kind) in PROGRAM_TYPES {
        match is_program_supported(*kind) {
            Ok(true) => {}
            Ok(false) => missing.push(format!("{what} ({kind:?}) not supported")),
            Err(e) => missing.push(format!("{what} ({kind:?}): cannot probe: {e}")),
        }
    }
    if missing.is_empty() {
        pass(name, "cgroup sock_addr, sock_ops and sk_lookup load")
    } else {
        fail(
            name,
            missing.join("; "),
            format!("a kernel built with CONFIG_BPF_SYSCALL, CONFIG_CGROUP_BPF and CONFIG_NET; if the probe itself failed, {BPF_PERMISSION_FIX}"),
        )
    }
}

fn helpers() -> Check {
    let name = "bpf helpers";
    let mut missing = Vec::new();
    for (helper, kind, id) in HELPERS {
        match is_helper_supported(*kind, *id) {
            Ok(true) => {}
            Ok(false) => missing.push(format!("{helper} from {kind:?}")),
            Err(e) => missing.push(format!("{helper} from {kind:?}: cannot probe: {e}")),
        }
    }
    if missing.is_empty() {
        pass(name, format!("{} helpers available", HELPERS.len()))
    } else {
        fail(
            name,
            format!("missing: {}", missing.join(", ")),
            format!("Linux 5.10 or newer with CONFIG_BPF_STREAM_PARSER and CONFIG_NET_SOCK_MSG; if the probe itself failed, {BPF_PERMISSION_FIX}"),
        )
    }
}

/// The mount point of `fstype` in /proc/self/mountinfo.
fn mount_of(fstype: &str) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == fstype)
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

fn bpffs() -> Check {
    let name = "bpffs";
    match mount_of("bpf") {
        Some(path) => pass(name, format!("mounted at {}", path.display())),
        None => fail(
            name,
            "no bpf filesystem is mounted",
            "mount -t bpf bpf /sys/fs/bpf (and mount it into the agent's container)",
        ),
    }
}

fn cgroup(pod_cgroup: Option<&Path>) -> Check {
    let name = "cgroup v2";
    let Some(root) = mount_of("cgroup2") else {
        return fail(
            name,
            "no cgroup2 filesystem is mounted",
            "boot with cgroup v2 (systemd.unified_cgroup_hierarchy=1) or mount it, e.g. at /sys/fs/cgroup/unified",
        );
    };
    if let Some(path) = pod_cgroup {
        return if path.starts_with(&root) && path.is_dir() {
            pass(
                name,
                format!("at {}; pods under {}", root.display(), path.display()),
            )
        } else {
            fail(
                name,
                format!(
                    "{} is not a folder under the cgroup2 mount {}",
                    path.display(),
                    root.display()
                ),
                "set the agent's --pod-cgroup (Helm: agent.podCgroup) to where kubelet puts pods",
            )
        };
    }
    let found = ["kubepods.slice", "kubepods"]
        .iter()
        .map(|d| root.join(d))
        .find(|p| p.is_dir());
    match found {
        Some(path) => pass(
            name,
            format!(
                "at {}; pods under {} ({} cgroup driver)",
                root.display(),
                path.display(),
                if path.ends_with("kubepods.slice") {
                    "systemd"
                } else {
                    "cgroupfs"
                }
            ),
        ),
        None => warn(
            name,
            format!(
                "at {}; no kubepods.slice or kubepods folder under it",
                root.display()
            ),
            "give the agent --pod-cgroup (Helm: agent.podCgroup) explicitly",
        ),
    }
}

fn cni_chain(args: &DoctorArgs) -> Check {
    let name = "cni chain";
    let config = match meshlet_cni::install::primary_config(&args.cni_conf_dir) {
        Ok(path) => path,
        Err(e) => return fail(name, e.to_string(), "install the cluster's CNI plugin, then restart the meshlet agent pod (its init container chains meshlet-cni)"),
    };
    let list: serde_json::Value = match std::fs::read(&config).map(|b| serde_json::from_slice(&b)) {
        Ok(Ok(v)) => v,
        _ => {
            return fail(
                name,
                format!("{} cannot be read as JSON", config.display()),
                "fix or remove that file",
            )
        }
    };
    let types: Vec<&str> = list["plugins"]
        .as_array()
        .map(|p| p.iter().filter_map(|p| p["type"].as_str()).collect())
        .unwrap_or_default();
    let binary = args.cni_bin_dir.join("meshlet-cni");
    match types.iter().position(|t| *t == "meshlet-cni") {
        Some(0) => fail(name, format!("{}: meshlet-cni is first ({types:?})", config.display()), "meshlet-cni chains after the cluster's plugin; run `meshlet-cni install`"),
        Some(_) if !binary.exists() => fail(name, format!("{} is chained but {} is missing", config.display(), binary.display()), "run `meshlet-cni install` (the agent pod's init container)"),
        Some(_) => pass(name, format!("{}: {}", config.display(), types.join(" → "))),
        None => fail(name, format!("{}: {} (no meshlet-cni)", config.display(), types.join(" → ")), "run `meshlet-cni install` (the agent pod's init container); until then new pods start outside the mesh"),
    }
}

async fn agent_sockets(args: &DoctorArgs) -> Check {
    let name = "agent sockets";
    let cni = args.node_socket.with_file_name("cni.sock");
    let probe = meshlet_proto::v1::CniRequest {
        command: meshlet_proto::v1::cni_request::Command::Status.into(),
        ..Default::default()
    };
    let path = cni.clone();
    let answered = tokio::task::spawn_blocking(move || {
        meshlet_proto::cni_socket::call(&path, &probe, None, Duration::from_secs(3))
    })
    .await;
    let pods =
        match meshlet_proto::channel::connect_lazy(&format!("unix:{}", args.node_socket.display()))
        {
            Ok(channel) => meshlet_proto::v1::node_service_client::NodeServiceClient::new(channel)
                .list_pods(meshlet_proto::v1::ListPodsRequest {})
                .await
                .map(|r| r.into_inner().pods.len())
                .map_err(|s| s.message().to_string()),
            Err(e) => Err(e.to_string()),
        };
    match (answered, pods) {
        (Ok(Ok(_)), Ok(pods)) => pass(
            name,
            format!(
                "{} and {} answer; {pods} pods enrolled",
                args.node_socket.display(),
                cni.display()
            ),
        ),
        (answered, pods) => fail(
            name,
            format!(
                "node socket: {}; CNI socket: {}",
                pods.err().unwrap_or_else(|| "ok".into()),
                match answered {
                    Ok(Ok(_)) => "ok".into(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                }
            ),
            "start the agent (new mesh pods wait until it answers); run doctor as root on the node",
        ),
    }
}

async fn agent_state(admin: SocketAddr) -> Vec<Check> {
    let status = match crate::cli::admin_get(admin, "/status").await {
        Ok(status) => status,
        Err(e) => {
            return vec![fail(
                "agent readiness",
                e.to_string(),
                "start the agent, or pass --admin",
            )]
        }
    };
    let mut checks = Vec::new();
    let ready = &status["ready"];
    checks.push(if ready["ready"].as_bool() == Some(true) {
        pass(
            "agent readiness",
            format!("ready; control-plane version {}", status["control_plane_version"]),
        )
    } else {
        fail(
            "agent readiness",
            ready["reasons"]
                .as_array()
                .map(|r| r.iter().filter_map(|r| r.as_str()).collect::<Vec<_>>().join("; "))
                .unwrap_or_default(),
            "see `meshlet status`; check that the control plane is reachable from the node and that the node's token or join token is valid",
        )
    });
    checks.push(match crate::cli::admin_get(admin, "/certs").await {
        Ok(certs) => certificates(&certs),
        Err(e) => fail("certificates", e.to_string(), "see `meshlet certs`"),
    });
    checks
}

/// Every identity's certificate: valid with time left, or why not.
fn certificates(certs: &serde_json::Value) -> Check {
    let name = "certificates";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut problems = Vec::new();
    let mut shortest: Option<u64> = None;
    let list = certs.as_array().cloned().unwrap_or_default();
    for cert in &list {
        let identity = cert["identity"].as_str().unwrap_or("?");
        match (cert["state"].as_str(), cert["not_after"].as_u64()) {
            (Some("valid"), Some(not_after)) => {
                let left = not_after.saturating_sub(now);
                shortest = Some(shortest.map_or(left, |s| s.min(left)));
                if cert["rotation_in_seconds"]
                    .as_i64()
                    .is_some_and(|r| r < -60)
                {
                    problems.push(format!("{identity}: rotation overdue"));
                }
            }
            (state, _) => problems.push(format!("{identity}: {}", state.unwrap_or("unknown"))),
        }
    }
    if !problems.is_empty() {
        return fail(
            name,
            problems.join("; "),
            "see `meshlet certs` and the agent's log; the control plane's CA must be reachable",
        );
    }
    match shortest {
        Some(left) => pass(
            name,
            format!(
                "{} identities valid; the shortest has {} left",
                list.len(),
                humantime::format_duration(Duration::from_secs(left))
            ),
        ),
        None => pass(name, "no identities yet (no mesh pods on this node)"),
    }
}

/// Runs every check.
pub async fn run(args: &DoctorArgs) -> Vec<Check> {
    let mut checks = vec![
        kernel(),
        program_types(),
        helpers(),
        bpffs(),
        cgroup(args.pod_cgroup.as_deref()),
        cni_chain(args),
        agent_sockets(args).await,
    ];
    checks.extend(agent_state(args.admin).await);
    checks
}

/// Prints the checks as a table.
pub fn print(checks: &[Check]) {
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|c| {
            let mark = match c.outcome {
                Outcome::Pass => "ok",
                Outcome::Warn => "WARN",
                Outcome::Fail => "FAIL",
            };
            let detail = match &c.fix {
                Some(fix) => format!("{} — fix: {fix}", c.detail),
                None => c.detail.clone(),
            };
            vec![c.name.to_string(), mark.to_string(), detail]
        })
        .collect();
    crate::cli::print_table(&["CHECK", "RESULT", "DETAIL"], &rows);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_report_time_left_and_name_what_is_wrong() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let good = serde_json::json!([{"identity": "spiffe://td/ns/a/sa/b", "state": "valid",
            "not_after": now + 7200, "rotation_in_seconds": 3000}]);
        let c = certificates(&good);
        assert_eq!(c.outcome, Outcome::Pass);
        assert!(c.detail.contains("1 identities valid"), "{c:?}");
        let bad = serde_json::json!([{"identity": "spiffe://td/ns/a/sa/b", "state": "pending"}]);
        let c = certificates(&bad);
        assert_eq!(c.outcome, Outcome::Fail);
        assert!(c.detail.contains("spiffe://td/ns/a/sa/b: pending"), "{c:?}");
    }

    #[test]
    fn the_kernel_and_mounts_of_this_machine_are_read() {
        assert_eq!(kernel().outcome, Outcome::Pass);
        assert!(mount_of("proc").is_some());
    }
}
