//! Files the agent keeps on the node (its key and certificate, the enrolled pods): written
//! whole or not at all — a temporary file, synced, then renamed over the old one — so that a
//! crash leaves the old contents or the new, never half of either.
use std::{io, path::Path};

/// Replaces `path` with `contents`, readable by root only (0600).
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}
