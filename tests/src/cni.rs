//! The lab as a container runtime: runs a CNI conflist's plugins the way libcni does
//! (environment variables, one plugin's configuration on stdin with `name`, `cniVersion` and
//! the previous plugin's result as `prevResult`; DEL in reverse order), with the real
//! plugins from Debian's containernetworking-plugins and meshlet-cni.
use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// Where Debian's containernetworking-plugins keeps its plugins.
pub const DEBIAN_PLUGINS: &str = "/usr/lib/cni";

/// One plugin run: exit status, stdout parsed when it is JSON, stderr.
#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Outcome {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or(Value::Null)
    }
}

/// What the runtime says about the container.
#[derive(Debug, Clone)]
pub struct Container {
    pub id: String,
    pub netns: String,
    pub ifname: String,
    /// CNI_ARGS.
    pub args: String,
}

/// A conflist and where its plugins are.
pub struct Chain {
    pub conflist: Value,
    pub plugin_dirs: Vec<PathBuf>,
    /// The network namespace the plugins run in (the node's), by lab name.
    pub node_netns: Option<String>,
}

impl Chain {
    fn find(&self, plugin: &str) -> anyhow::Result<PathBuf> {
        self.plugin_dirs
            .iter()
            .map(|d| d.join(plugin))
            .find(|p| p.exists())
            .with_context(|| format!("no CNI plugin {plugin} in {:?}", self.plugin_dirs))
    }

    fn plugins(&self) -> anyhow::Result<&Vec<Value>> {
        self.conflist["plugins"]
            .as_array()
            .context("conflist without plugins")
    }

    /// Runs one plugin with `command`.
    pub fn invoke(
        &self,
        plugin: &Value,
        command: &str,
        container: &Container,
        prev_result: Option<&Value>,
    ) -> anyhow::Result<Outcome> {
        let kind = plugin["type"].as_str().context("plugin without type")?;
        let mut conf = plugin.clone();
        let object = conf.as_object_mut().context("plugin is not an object")?;
        object.insert("name".into(), self.conflist["name"].clone());
        object.insert("cniVersion".into(), self.conflist["cniVersion"].clone());
        if let Some(prev) = prev_result {
            object.insert("prevResult".into(), prev.clone());
        }
        let path = std::env::join_paths(&self.plugin_dirs)?;
        let mut cmd = Command::new(self.find(kind)?);
        if let Some(netns) = &self.node_netns {
            crate::lab::enter_on_exec(&mut cmd, netns, None)?;
        }
        let mut child = cmd
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &container.id)
            .env("CNI_NETNS", &container.netns)
            .env("CNI_IFNAME", &container.ifname)
            .env("CNI_ARGS", &container.args)
            .env("CNI_PATH", path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running CNI plugin {kind}"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&serde_json::to_vec(&conf)?)?;
        }
        let out = child.wait_with_output()?;
        Ok(Outcome {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// ADD through every plugin in order; the last result is the container's.
    pub fn add(&self, container: &Container) -> anyhow::Result<Value> {
        let mut result: Option<Value> = None;
        for plugin in self.plugins()? {
            let out = self.invoke(plugin, "ADD", container, result.as_ref())?;
            if !out.success {
                bail!(
                    "ADD: plugin {} failed: {} {}",
                    plugin["type"],
                    out.stdout,
                    out.stderr
                );
            }
            result = Some(out.json());
        }
        result.context("empty chain")
    }

    /// CHECK through every plugin in order, with the ADD result.
    pub fn check(&self, container: &Container, result: &Value) -> anyhow::Result<()> {
        for plugin in self.plugins()? {
            let out = self.invoke(plugin, "CHECK", container, Some(result))?;
            if !out.success {
                bail!("CHECK: plugin {} failed: {}", plugin["type"], out.stdout);
            }
        }
        Ok(())
    }

    /// DEL through every plugin in reverse order; every one must succeed.
    pub fn del(&self, container: &Container, result: Option<&Value>) -> anyhow::Result<()> {
        for plugin in self.plugins()?.iter().rev() {
            let out = self.invoke(plugin, "DEL", container, result)?;
            if !out.success {
                bail!("DEL: plugin {} failed: {}", plugin["type"], out.stdout);
            }
        }
        Ok(())
    }
}

/// A conflist for a lab node: the real `ptp` plugin with `host-local` IPAM handing out
/// exactly `ip` in the node's pod range (as the cluster's own CNI would), then meshlet-cni
/// talking to the node's agent at `socket`.
pub fn ptp_then_meshlet(ip: std::net::Ipv4Addr, ipam_dir: &Path, socket: &Path) -> Value {
    let [a, b, c, _] = ip.octets();
    json!({
        "cniVersion": "1.0.0",
        "name": "meshlet-lab-ptp",
        "plugins": [
            {
                "type": "ptp",
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_dir,
                    "ranges": [[{
                        "subnet": format!("{a}.{b}.{c}.0/24"),
                        "rangeStart": ip.to_string(),
                        "rangeEnd": ip.to_string(),
                    }]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "meshlet-cni", "socket": socket, "timeoutSeconds": 5},
        ],
    })
}
