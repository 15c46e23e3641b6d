//! Named network namespaces (`/run/netns/NAME`, the same place `ip netns` uses).
use std::{fs::File, path::PathBuf};

use anyhow::Context;
use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{setns, unshare, CloneFlags},
};

pub const NETNS_DIR: &str = "/run/netns";

pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Creates a named netns with `lo` down (callers bring it up).
pub fn create(name: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(NETNS_DIR)?;
    let target = path(name);
    File::create(&target).with_context(|| format!("creating {}", target.display()))?;
    let bind_target = target.clone();
    std::thread::spawn(move || -> anyhow::Result<()> {
        // A fresh thread unshares its netns and pins it with a bind mount; the rest of the
        // process is untouched.
        unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &bind_target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .context("bind-mounting the new netns")?;
        Ok(())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))??;
    Ok(target)
}

/// Removes a named netns (its veths go with it).
pub fn delete(name: &str) {
    let target = path(name);
    let _ = umount2(&target, MntFlags::MNT_DETACH);
    let _ = std::fs::remove_file(&target);
}

/// Names of the lab's netns that exist now.
pub fn list_lab() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(crate::NAME_PREFIX))
        .collect()
}

/// Runs `f` on a thread inside the netns.
pub fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let file = File::open(path(name)).with_context(|| format!("opening netns {name}"))?;
    std::thread::spawn(move || -> anyhow::Result<T> {
        setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// Sets a sysctl under /proc/sys/net inside the netns.
pub fn sysctl(name: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let key = key.replace('.', "/");
    let value = value.to_string();
    run_in(name, move || {
        let path = format!("/proc/sys/{key}");
        std::fs::write(&path, &value).with_context(|| format!("writing {path}"))?;
        Ok(())
    })
}
