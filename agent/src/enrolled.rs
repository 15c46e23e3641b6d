//! What the agent keeps on the node so that a restarted agent adopts every enrolled pod again
//! without the CNI plugin running again: one record per pod (uid, where the runtime keeps its
//! network namespace, the namespace's identity, its cookie), written atomically after every
//! change. The pinned maps and links hold the rest, and keep the pods fail-closed while no
//! agent runs.
//!
//! The file lives beside the node socket (a tmpfs): it should outlive the agent, not the
//! node, since no pod outlives a reboot.
use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::netns::NetnsId;

/// Most records the file may hold (far above the pods one node can run; a larger file is
/// refused rather than read into memory).
const MAX_RECORDS: usize = 4096;
const MAX_FILE_BYTES: u64 = MAX_RECORDS as u64 * 512;

#[derive(Debug, thiserror::Error)]
pub enum EnrolledError {
    #[error("cannot read the enrolled pods file {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("the enrolled pods file {path} is larger than {MAX_FILE_BYTES} bytes; remove it (pods not adopted are enrolled again by their next CNI call)")]
    TooLarge { path: PathBuf },
    #[error("the enrolled pods file {path} is not valid: {source}; remove it (pods not adopted are enrolled again by their next CNI call)")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write the enrolled pods file {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// One enrolled pod, as a restarted agent needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub uid: String,
    /// Where the runtime keeps the pod's network namespace (CNI_NETNS), looked at first.
    pub netns_path: PathBuf,
    /// The namespace itself: a path is only trusted if it still names this one.
    pub netns: NetnsId,
    pub netns_cookie: u64,
}

/// The enrolled pods file.
#[derive(Debug, Clone)]
pub struct EnrolledFile {
    path: PathBuf,
}

impl EnrolledFile {
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The records; none when there is no file (first start on this node).
    pub fn load(&self) -> Result<Vec<Record>, EnrolledError> {
        let path = &self.path;
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(EnrolledError::Read {
                    path: path.clone(),
                    source,
                })
            }
        };
        let size = file
            .metadata()
            .map_err(|source| EnrolledError::Read {
                path: path.clone(),
                source,
            })?
            .len();
        if size > MAX_FILE_BYTES {
            return Err(EnrolledError::TooLarge { path: path.clone() });
        }
        serde_json::from_reader(io::BufReader::new(file)).map_err(|source| EnrolledError::Parse {
            path: path.clone(),
            source,
        })
    }

    /// Replaces the file's records (write to a temporary file, then rename: a crash leaves
    /// the old records or the new ones, never half of either).
    pub fn save(&self, records: &[Record]) -> Result<(), EnrolledError> {
        let error = |source| EnrolledError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(error)?;
        }
        let text = serde_json::to_vec_pretty(records)
            .map_err(io::Error::other)
            .map_err(error)?;
        crate::files::write_private(&self.path, &text).map_err(error)
    }
}

/// Opens a recorded pod's network namespace again: at its recorded path if that still names
/// the same namespace, else at `/proc/<pid>/ns/net` of any process inside it (the pod's pause
/// process holds it). `None` when the namespace is gone: the pod left while no agent ran.
pub fn find_netns(record: &Record, proc_root: &Path) -> Option<(File, PathBuf)> {
    let same = |file: &File| NetnsId::of(file).is_ok_and(|id| id == record.netns);
    if let Ok(file) = File::open(&record.netns_path) {
        if same(&file) {
            return Some((file, record.netns_path.clone()));
        }
    }
    let entries = std::fs::read_dir(proc_root).ok()?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = entry.path().join("ns/net");
        // stat first: opening every process's namespace would be a syscall more each.
        let matches = std::fs::metadata(&path).is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.dev() == record.netns.dev && m.ino() == record.netns.ino
        });
        if matches {
            if let Ok(file) = File::open(&path) {
                if same(&file) {
                    return Some((file, path));
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("meshlet-enrolled-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir
    }

    #[test]
    fn records_survive_a_save_and_load_and_a_missing_file_is_empty() {
        let dir = scratch("roundtrip");
        let file = EnrolledFile::new(dir.join("pods.json"));
        assert_eq!(file.load().expect("no file"), Vec::new());
        let own = File::open("/proc/self/ns/net").expect("own netns");
        let records = vec![Record {
            uid: "uid-a".into(),
            netns_path: "/proc/self/ns/net".into(),
            netns: NetnsId::of(&own).expect("id"),
            netns_cookie: 7,
        }];
        file.save(&records).expect("save");
        assert_eq!(file.load().expect("load"), records);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(file.path())
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_file_is_named_and_not_read_whole() {
        let dir = scratch("bad");
        let file = EnrolledFile::new(dir.join("pods.json"));
        std::fs::write(file.path(), "{not json").expect("write");
        let e = file.load().expect_err("bad json");
        assert!(e.to_string().contains("pods.json is not valid"), "{e}");
        std::fs::write(file.path(), vec![b' '; MAX_FILE_BYTES as usize + 1]).expect("write");
        assert!(matches!(file.load(), Err(EnrolledError::TooLarge { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_namespace_is_found_by_its_path_or_by_a_process_inside_it_and_never_by_a_reused_path() {
        let own = File::open("/proc/self/ns/net").expect("own netns");
        let id = NetnsId::of(&own).expect("id");
        let record = |path: &str, id| Record {
            uid: "u".into(),
            netns_path: path.into(),
            netns: id,
            netns_cookie: 1,
        };
        // By its path.
        let (_, path) =
            find_netns(&record("/proc/self/ns/net", id), Path::new("/proc")).expect("by path");
        assert_eq!(path, Path::new("/proc/self/ns/net"));
        // The path now names something else: found through a process instead.
        let (_, path) =
            find_netns(&record("/dev/null", id), Path::new("/proc")).expect("by process");
        assert!(
            path.starts_with("/proc/") && path.ends_with("ns/net"),
            "{path:?}"
        );
        // A namespace no process holds and no path names: gone.
        let gone = NetnsId {
            dev: id.dev,
            ino: 1,
        };
        assert!(find_netns(&record("/proc/self/ns/net", gone), Path::new("/proc")).is_none());
    }
}
