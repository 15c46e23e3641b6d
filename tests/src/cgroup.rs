//! cgroup v2 folders for nodes and pods.
use std::path::{Path, PathBuf};

use anyhow::Context;

pub fn node_dir(node: &str) -> PathBuf {
    Path::new(crate::CGROUP_ROOT).join(node)
}

pub fn pod_dir(node: &str, pod: &str) -> PathBuf {
    node_dir(node).join(pod)
}

pub fn create(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| {
        format!(
            "creating cgroup {} (is cgroup v2 mounted at /sys/fs/cgroup/unified?)",
            path.display()
        )
    })
}

/// Kills every process in the subtree, then removes the folders, deepest first.
pub fn remove_tree(root: &Path) {
    if !root.exists() {
        return;
    }
    let mut dirs = Vec::new();
    collect(root, &mut dirs);
    for dir in &dirs {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in dirs {
        for _ in 0..50 {
            if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect(&e.path(), out);
            }
        }
    }
}
