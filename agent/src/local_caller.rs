//! Who may call the agent on its unix sockets (the node API, the CNI socket, the handover
//! socket): root on this node, by the kernel's word (`SO_PEERCRED`). The sockets are 0600
//! root as well; this check is the second lock, and the one that names a refused caller.
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};

/// Why a local caller was refused.
#[derive(Debug, thiserror::Error)]
pub enum CallerError {
    #[error("the caller (pid {pid}) is not root (uid {uid})")]
    NotRoot { pid: i32, uid: u32 },
    #[error("the caller's credentials cannot be read: {0}")]
    Unknown(#[from] nix::Error),
}

/// Refuses any caller on `socket` but root.
pub fn require_root(socket: &impl AsFd) -> Result<(), CallerError> {
    let cred = getsockopt(socket, PeerCredentials)?;
    if cred.uid() != 0 {
        return Err(CallerError::NotRoot {
            pid: cred.pid(),
            uid: cred.uid(),
        });
    }
    Ok(())
}
