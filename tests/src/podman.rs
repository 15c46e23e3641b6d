//! podman as a lab node's container runtime: its own storage, configuration and CNI network
//! folder under the lab's state folder, run inside a node's network namespace (so that the
//! CNI plugins wire containers to that node) with containers in that node's cgroup subtree
//! (so that the node's agent sees their sockets). Debian's podman 4 with its CNI backend and
//! runc (crun refuses this machine's hybrid cgroups).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context;

/// A podman set up for one lab node.
pub struct Podman {
    dir: PathBuf,
    node_netns: String,
    /// The container cgroup parent, relative to the cgroup root (`/meshlet-lab/node-1/podman`).
    cgroup_parent: String,
}

impl Podman {
    /// Sets podman up in `dir` for the node whose netns and cgroup are given; the CNI plugins
    /// are looked for in Debian's folder, then in `plugin_dir` (meshlet-cni).
    pub fn new(
        dir: &Path,
        node_netns: &str,
        node_cgroup: &Path,
        plugin_dir: &Path,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("net.d"))?;
        let conf = format!(
            "[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{}\", \"{}\"]\nnetwork_config_dir = \"{}\"\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
            crate::cni::DEBIAN_PLUGINS,
            plugin_dir.display(),
            dir.join("net.d").display()
        );
        std::fs::write(dir.join("containers.conf"), conf)?;
        let relative = node_cgroup
            .strip_prefix("/sys/fs/cgroup/unified")
            .context("node cgroup outside the unified hierarchy")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            node_netns: node_netns.to_string(),
            cgroup_parent: format!("/{}", relative.join("podman").display()),
        })
    }

    /// Writes a CNI network (conflist) podman can use by its `name`.
    pub fn add_network(&self, conflist: &serde_json::Value) -> anyhow::Result<()> {
        let name = conflist["name"].as_str().context("conflist without name")?;
        std::fs::write(
            self.dir.join("net.d").join(format!("{name}.conflist")),
            serde_json::to_vec_pretty(conflist)?,
        )?;
        Ok(())
    }

    /// A podman command (in the node's netns, with this setup's storage and configuration).
    pub fn command(&self) -> anyhow::Result<Command> {
        let mut cmd = Command::new("podman");
        crate::lab::enter_on_exec(&mut cmd, &self.node_netns, None)?;
        cmd.env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            // vfs: no overlay mounts to leave behind.
            .args(["--storage-driver", "vfs"]);
        Ok(cmd)
    }

    /// `podman run` arguments every container here needs: the node's cgroup subtree, and
    /// limits this machine lets be set (root here lacks CAP_SYS_RESOURCE, and podman's
    /// defaults would raise them).
    pub fn run_args(&self) -> Vec<String> {
        vec![
            "--cgroup-parent".into(),
            self.cgroup_parent.clone(),
            "--ulimit".into(),
            "nofile=4096:4096".into(),
            "--ulimit".into(),
            "nproc=4096:4096".into(),
        ]
    }

    /// Imports a rootfs folder as image `name`.
    pub fn import(&self, rootfs: &Path, name: &str) -> anyhow::Result<()> {
        let tar = Command::new("tar")
            .arg("-C")
            .arg(rootfs)
            .args(["-c", "-f", "-", "."])
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let status = self
            .command()?
            .args(["import", "-", name])
            .stdin(tar.stdout.context("tar stdout")?)
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "podman import {name} failed");
        Ok(())
    }

    /// Removes every container and image of this setup, and the cgroups runc made in the
    /// v1 hierarchies (the unified one goes with the lab).
    pub fn remove_all(&self) {
        for what in [["rm", "-a", "-f"], ["rmi", "-a", "-f"]] {
            if let Ok(mut cmd) = self.command() {
                let _ = cmd.args(what).output();
            }
        }
        let top = self
            .cgroup_parent
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        cleanup(&self.dir, &top);
    }

    /// A busybox rootfs (Debian's static busybox and the applets a test uses).
    pub fn busybox_rootfs(dir: &Path) -> anyhow::Result<PathBuf> {
        let rootfs = dir.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin"))?;
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
            .context("copying /bin/busybox (Debian's busybox-static)")?;
        for applet in ["sh", "nc", "echo", "cat", "sleep", "ip"] {
            let link = rootfs.join("bin").join(applet);
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink("busybox", link)?;
        }
        Ok(rootfs)
    }
}

/// After a crash: removes whatever containers and images a lab's podman under `dir` left,
/// and the v1 cgroups under `/sys/fs/cgroup/<controller>/<top>`.
pub fn cleanup(dir: &Path, top: &str) {
    if dir.join("root").exists() {
        for what in [["rm", "-a", "-f"], ["rmi", "-a", "-f"]] {
            let mut cmd = Command::new("podman");
            let conf = dir.join("containers.conf");
            if conf.exists() {
                cmd.env("CONTAINERS_CONF", conf);
            }
            let _ = cmd
                .args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"])
                .args(["--events-backend", "file"])
                .arg("--root")
                .arg(dir.join("root"))
                .arg("--runroot")
                .arg(dir.join("run"))
                .args(["--storage-driver", "vfs"])
                .args(what)
                .output();
        }
    }
    if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
        for controller in controllers.flatten() {
            if controller.file_name() != "unified" {
                crate::cgroup::remove_tree(&controller.path().join(top));
            }
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        self.remove_all();
    }
}
