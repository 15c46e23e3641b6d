//! Join tokens: how a node first proves it is the node the operator meant. Each token is made
//! for one node, expires, and works once; only its SHA-256 is stored.
use std::{
    io::{Read, Seek, Write},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token store {path} is damaged ({source}); remove it and create new tokens")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "unknown join token (create one with `meshlet-controlplane token create --node NAME`)"
    )]
    Unknown,
    #[error("join token already used at unix {0}; tokens work once: create a new one")]
    Used(u64),
    #[error("join token expired at unix {0}: create a new one")]
    Expired(u64),
    #[error("join token was created for node {issued_for:?}, not {node:?}")]
    WrongNode { issued_for: String, node: String },
    #[error("{0:?} is not a node name (letters, digits, '-', '.', '_')")]
    BadNode(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    node: String,
    sha256: String,
    expires_at: u64,
    used_at: Option<u64>,
}

/// The token file, shared by the serving control plane and the `token create` command;
/// changes are serialised with a file lock.
#[derive(Debug, Clone)]
pub struct TokenStore {
    path: PathBuf,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn digest(token: &str) -> String {
    Sha256::digest(token.trim().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Node names are DNS labels, as in Kubernetes.
pub fn valid_node_name(node: &str) -> bool {
    node.len() <= 253 && meshlet_spiffe::segment_ok(node)
}

impl TokenStore {
    /// The store in `state_dir` (created if missing).
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("join-tokens.json"),
        }
    }

    fn io(&self, source: std::io::Error) -> TokenError {
        TokenError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `change` on the entries under an exclusive lock and writes them back.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut Vec<Entry>) -> Result<T, TokenError>,
    ) -> Result<T, TokenError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| self.io(e))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
            .map_err(|e| self.io(e))?;
        restrict(&self.path).map_err(|e| self.io(e))?;
        file.lock().map_err(|e| self.io(e))?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(|e| self.io(e))?;
        let mut entries: Vec<Entry> = if text.trim().is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&text).map_err(|source| TokenError::Corrupt {
                path: self.path.clone(),
                source,
            })?
        };
        let before = serde_json::to_vec_pretty(&entries).unwrap_or_default();
        let result = change(&mut entries);
        // Tokens dead for a day are forgotten.
        let horizon = now().saturating_sub(24 * 3600);
        entries.retain(|e| e.expires_at > horizon);
        let text = serde_json::to_vec_pretty(&entries).unwrap_or_default();
        // Nothing changed (an unknown, used or expired token was presented): no write, no
        // fsync. Join is the one call anyone can make; it must not cost the disk.
        if text == before {
            return result;
        }
        file.set_len(0).map_err(|e| self.io(e))?;
        file.rewind().map_err(|e| self.io(e))?;
        file.write_all(&text).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        result
    }

    /// Makes a token for `node`, valid for `ttl`; answers the token (shown once).
    pub fn create(&self, node: &str, ttl: Duration) -> Result<String, TokenError> {
        if !valid_node_name(node) {
            return Err(TokenError::BadNode(node.to_string()));
        }
        let secret: [u8; 32] = rand::random();
        let token: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        self.update(|entries| {
            entries.push(Entry {
                node: node.to_string(),
                sha256: digest(&token),
                expires_at: now() + ttl.as_secs(),
                used_at: None,
            });
            Ok(())
        })?;
        Ok(token)
    }

    /// Checks `token` for `node` and uses it up.
    pub fn consume(&self, node: &str, token: &str) -> Result<(), TokenError> {
        let wanted = digest(token);
        self.update(|entries| {
            let entry = entries
                .iter_mut()
                .find(|e| e.sha256 == wanted)
                .ok_or(TokenError::Unknown)?;
            if let Some(at) = entry.used_at {
                return Err(TokenError::Used(at));
            }
            if entry.expires_at <= now() {
                return Err(TokenError::Expired(entry.expires_at));
            }
            if entry.node != node {
                return Err(TokenError::WrongNode {
                    issued_for: entry.node.clone(),
                    node: node.to_string(),
                });
            }
            entry.used_at = Some(now());
            Ok(())
        })
    }
}

/// Only the control plane's user may read the token hashes.
fn restrict(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_works_once_for_its_node_until_it_expires() {
        let dir = std::env::temp_dir().join(format!("meshlet-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = TokenStore::new(&dir);
        let token = store
            .create("node-1", Duration::from_secs(600))
            .expect("create");
        assert!(matches!(
            store.consume("node-2", &token),
            Err(TokenError::WrongNode { .. })
        ));
        store.consume("node-1", &token).expect("first use");
        assert!(matches!(
            store.consume("node-1", &token),
            Err(TokenError::Used(_))
        ));
        assert!(matches!(
            store.consume("node-1", "nope"),
            Err(TokenError::Unknown)
        ));
        let short = store.create("node-1", Duration::ZERO).expect("create");
        assert!(matches!(
            store.consume("node-1", &short),
            Err(TokenError::Expired(_))
        ));
        assert!(matches!(
            store.create("../etc", Duration::from_secs(1)),
            Err(TokenError::BadNode(_))
        ));
        let text = std::fs::read_to_string(dir.join("join-tokens.json")).expect("file");
        assert!(!text.contains(&token), "the token itself is never stored");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
