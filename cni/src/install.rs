//! `meshlet-cni install` / `uninstall`: what the DaemonSet's init container does on each
//! node, as istio-cni and Linkerd's CNI do: copy the plugin into the node's CNI binary
//! folder and chain it at the end of the node's existing network configuration (the first
//! conflist by name, the one the runtime uses); uninstall takes it out again. Both are
//! idempotent and write files atomically (temporary file, then rename), so a runtime never
//! reads half a configuration.
use std::{
    io::Write,
    path::{Path, PathBuf},
};

use serde_json::{json, Value};

/// The plugin's entry in the chain.
#[derive(Debug, Clone)]
pub struct Entry {
    pub socket: PathBuf,
    pub exclude_namespaces: Vec<String>,
    pub timeout_seconds: u64,
}

impl Entry {
    fn to_json(&self) -> Value {
        json!({
            "type": "meshlet-cni",
            "socket": self.socket,
            "excludeNamespaces": self.exclude_namespaces,
            "timeoutSeconds": self.timeout_seconds,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("no CNI network configuration (*.conflist or *.conf) in {0}: meshlet-cni chains after the cluster's own CNI plugin; install that first (this container retries)")]
    NoNetwork(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid CNI network configuration: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The configuration file the runtime uses: the first `.conflist`/`.conf`/`.json` by name.
pub fn primary_config(conf_dir: &Path) -> Result<PathBuf, InstallError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    files
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::NoNetwork(conf_dir.to_path_buf()))
}

fn read(path: &Path) -> Result<Value, InstallError> {
    let text = std::fs::read(path).map_err(io(path))?;
    serde_json::from_slice(&text).map_err(|e| InstallError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("meshlet-tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Chains `entry` into the node's network configuration (replacing an older meshlet-cni
/// entry) and returns the file written. A single-plugin `.conf` becomes a `.conflist`.
pub fn chain(conf_dir: &Path, entry: &Entry) -> Result<PathBuf, InstallError> {
    let path = primary_config(conf_dir)?;
    let config = read(&path)?;
    let invalid = |reason: &str| InstallError::Invalid {
        path: path.clone(),
        reason: reason.into(),
    };
    let (mut list, target) = if config.get("plugins").is_some() {
        (config, path.clone())
    } else {
        // A single plugin: wrap it in a list with the same name and version.
        let name = config
            .get("name")
            .cloned()
            .ok_or_else(|| invalid("no name"))?;
        let version = config
            .get("cniVersion")
            .cloned()
            .ok_or_else(|| invalid("no cniVersion"))?;
        let mut plugin = config.clone();
        if let Some(object) = plugin.as_object_mut() {
            object.remove("name");
            object.remove("cniVersion");
        }
        (
            json!({"cniVersion": version, "name": name, "plugins": [plugin]}),
            path.with_extension("conflist"),
        )
    };
    let plugins = list["plugins"]
        .as_array_mut()
        .ok_or_else(|| invalid("plugins is not a list"))?;
    plugins.retain(|p| p["type"] != "meshlet-cni");
    if plugins.is_empty() {
        return Err(invalid("no plugin to chain after"));
    }
    plugins.push(entry.to_json());
    let bytes = serde_json::to_vec_pretty(&list).map_err(|e| invalid(&e.to_string()))?;
    write_atomically(&target, &bytes, 0o644)?;
    if target != path {
        std::fs::remove_file(&path).map_err(io(&path))?;
    }
    Ok(target)
}

/// Takes meshlet-cni out of every network configuration in `conf_dir`; returns the files
/// changed.
pub fn unchain(conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    for entry in std::fs::read_dir(conf_dir).map_err(io(conf_dir))?.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("conflist") {
            continue;
        }
        let Ok(mut list) = read(&path) else { continue };
        let Some(plugins) = list["plugins"].as_array_mut() else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|p| p["type"] != "meshlet-cni");
        if plugins.len() != before {
            let bytes = serde_json::to_vec_pretty(&list).map_err(|e| InstallError::Invalid {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            write_atomically(&path, &bytes, 0o644)?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// Copies the running binary into `bin_dir` as `meshlet-cni`.
pub fn copy_binary(bin_dir: &Path) -> Result<PathBuf, InstallError> {
    let me = Path::new("/proc/self/exe");
    let bytes = std::fs::read(me).map_err(io(me))?;
    let target = bin_dir.join("meshlet-cni");
    write_atomically(&target, &bytes, 0o755)?;
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("meshlet-cni-install-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    fn entry() -> Entry {
        Entry {
            socket: "/run/meshlet/cni.sock".into(),
            exclude_namespaces: vec!["kube-system".into()],
            timeout_seconds: 10,
        }
    }

    #[test]
    fn chains_after_the_first_conflist_once_and_unchains() {
        let d = dir("conflist");
        let list = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [
            {"type": "ptp", "ipam": {"type": "host-local"}}, {"type": "portmap"}]});
        std::fs::write(d.join("10-k8s.conflist"), list.to_string()).expect("write");
        std::fs::write(d.join("99-other.conflist"), list.to_string()).expect("write");
        let path = chain(&d, &entry()).expect("chain");
        assert_eq!(path, d.join("10-k8s.conflist"));
        chain(&d, &entry()).expect("again");
        let written = read(&path).expect("read");
        let types: Vec<&str> = written["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .filter_map(|p| p["type"].as_str())
            .collect();
        assert_eq!(types, ["ptp", "portmap", "meshlet-cni"], "{written}");
        assert_eq!(
            written["plugins"][0], list["plugins"][0],
            "the cluster's plugins stay as they were"
        );
        // The other file is not touched.
        assert_eq!(read(&d.join("99-other.conflist")).expect("read"), list);
        assert_eq!(unchain(&d).expect("unchain"), vec![path.clone()]);
        assert_eq!(read(&path).expect("read"), list);
        assert!(unchain(&d).expect("again").is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist_and_an_empty_folder_is_an_error() {
        let d = dir("conf");
        assert!(matches!(
            chain(&d, &entry()),
            Err(InstallError::NoNetwork(_))
        ));
        std::fs::write(
            d.join("10-bridge.conf"),
            json!({"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0"})
                .to_string(),
        )
        .expect("write");
        let path = chain(&d, &entry()).expect("chain");
        assert_eq!(path, d.join("10-bridge.conflist"));
        assert!(!d.join("10-bridge.conf").exists());
        let written = read(&path).expect("read");
        assert_eq!(written["name"], "net");
        assert_eq!(written["cniVersion"], "0.4.0");
        assert_eq!(
            written["plugins"][0],
            json!({"type": "bridge", "bridge": "cni0"})
        );
        assert_eq!(written["plugins"][1]["type"], "meshlet-cni");
        std::fs::write(d.join("00-broken.conflist"), "{").expect("write");
        let e = chain(&d, &entry()).expect_err("broken first file");
        assert!(e.to_string().contains("00-broken.conflist"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
