//! `meshlet-cni`: a chained CNI plugin (spec 1.0.0; 0.4.0 and 1.1.0 accepted).
//!
//! Placed after the cluster's own plugins in the node's conflist. On ADD it opens the pod's
//! network namespace and hands the descriptor, with the pod's namespace, name and uid, to the
//! node's meshlet agent over the CNI socket, then waits for the agent's answer: capture is in
//! place, or the pod is not in the mesh. Anything else fails the ADD, and the runtime retries
//! the sandbox later: a mesh pod never runs uncaptured. The plugin keeps no state; the
//! previous plugin's result passes through unchanged.
use std::{io::Read, process::ExitCode, time::Duration};

use meshlet_cni::{run, Environment, PluginError};

fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let env = Environment::from_process();
    let result = std::io::stdin()
        .take(meshlet_cni::MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut stdin)
        .map_err(|e| PluginError::io("reading the network configuration from stdin", e))
        .and_then(|_| run(&env, &stdin, Duration::from_secs(10)));
    match result {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            println!("{}", e.to_json(&env, &stdin));
            ExitCode::FAILURE
        }
    }
}
