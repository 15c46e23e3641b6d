//! The pods on this node: for each, its network namespace (held by fd), the agent's listeners
//! inside it, its enrollment in the redirect map, and its identity.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use meshlet_common::{AGENT_MARK, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT, TUNNEL_PORT};
pub use meshlet_proto::v1::ListenerKind;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use crate::{
    deliver,
    enrolled::{EnrolledFile, Record},
    identity::SpiffeId,
    inbound,
    netns::{Netns, NetnsId},
    node::NodeAgent,
    outbound,
};

#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("pod uid must not be empty")]
    EmptyUid,
    #[error("pod {uid} is already enrolled with netns {existing}; remove it first")]
    Conflict { uid: String, existing: PathBuf },
    #[error("pod {uid} is being enrolled by another request; retry when it has finished")]
    InProgress { uid: String },
    #[error("pod {uid}: this agent is handing the node over to a new agent; retry in a moment (the new one takes it)")]
    HandingOver { uid: String },
    #[error("pod {uid}: {source}")]
    Netns {
        uid: String,
        source: crate::netns::NetnsError,
    },
    #[error("pod {uid}: cannot open the agent's listener {addr} in its netns: {source}")]
    Listen {
        uid: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("pod {uid}: {source}")]
    Routing {
        uid: String,
        source: deliver::DeliverError,
    },
    #[error("pod {uid}: cannot set up inbound capture: {source}")]
    Capture {
        uid: String,
        source: crate::redirect::RedirectError,
    },
    #[error("pod {uid}: cannot enroll in the redirect map: {source}")]
    Enroll {
        uid: String,
        source: crate::redirect::RedirectError,
    },
}

/// What the data path needs of a pod.
pub struct PodHandle {
    pub uid: String,
    pub netns: Netns,
    pub netns_cookie: u64,
    /// The addresses on the pod's interfaces when it was enrolled.
    pub addresses: Vec<IpAddr>,
    /// The tunnel server's TLS config for the pod's identity, built on first use. It reads
    /// the current certificate and trust bundle at every handshake, so it only has to change
    /// when the pod's identity does.
    server_tls: Mutex<Option<(SpiffeId, Arc<rustls::ServerConfig>)>>,
}

impl PodHandle {
    /// The TLS server config for `identity`, reused across connections.
    pub fn server_tls(
        &self,
        agent: &NodeAgent,
        identity: &SpiffeId,
    ) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        let mut cached = self.server_tls.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((id, config)) = cached.as_ref() {
            if id == identity {
                return Ok(config.clone());
            }
        }
        let config = crate::tls::server_config(
            &agent.tls,
            agent.bundle.clone(),
            agent.identities.clone(),
            identity.clone(),
        )?;
        *cached = Some((identity.clone(), config.clone()));
        Ok(config)
    }
}

struct Pod {
    handle: Arc<PodHandle>,
    netns_id: NetnsId,
    /// One accept loop per listener.
    listening: Vec<Listening>,
    identity: Option<SpiffeId>,
    /// Inbound capture as last set, and the workload-wide mode it follows from.
    captured: bool,
    mode: Option<String>,
    /// Kubelet probes let past capture: (exempt source, pod address, probe port).
    exempted: Vec<(IpAddr, IpAddr, u16)>,
}

/// A pod as listed by the node API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PodSummary {
    pub uid: String,
    pub netns_path: String,
    pub netns_cookie: u64,
    pub workload: Option<String>,
    pub identity: Option<String>,
    pub certificate_ready: bool,
}

/// All pods of this node.
pub struct PodRegistry {
    agent: Arc<NodeAgent>,
    enrolled: Option<EnrolledFile>,
    pods: Mutex<HashMap<String, Pod>>,
    /// Uids whose enrollment is under way: a second AddPod for one of them is refused until
    /// the first has finished (the check and the insert are far apart: netns, listeners,
    /// routing and capture happen between them).
    adding: Mutex<std::collections::HashSet<String>>,
    /// Whether the listeners accept: false while a successor prepares to take over from a
    /// predecessor (it has their sockets, and accepts once it is ready).
    accepting: tokio::sync::watch::Sender<bool>,
    /// While this agent hands the node over: the pods whose removal was asked meanwhile
    /// (the successor removes them, or this agent does if the handover fails).
    handing_over: Mutex<Option<Vec<String>>>,
    /// After a handover: the pods belong to the successor; nothing here changes the kernel.
    released: std::sync::atomic::AtomicBool,
}

/// One of a pod's listeners and the task that accepts on it. The socket is kept here too, to
/// hand it to a successor.
struct Listening {
    kind: ListenerKind,
    listener: Arc<TcpListener>,
    task: JoinHandle<()>,
}

impl Listening {
    fn stop(&self) {
        self.task.abort();
    }
}

/// A pod as a predecessor hands it over: its namespace and listening sockets.
pub struct HandedPod {
    pub uid: String,
    pub netns_path: PathBuf,
    pub netns: std::fs::File,
    pub listeners: Vec<(ListenerKind, Socket)>,
}

/// Takes a uid out of `PodRegistry::adding` when its enrollment ends, however it ends.
struct Adding<'a> {
    set: &'a Mutex<std::collections::HashSet<String>>,
    uid: String,
}

impl Drop for Adding<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.uid);
    }
}

/// Listeners made inside the pod's netns (or handed over from a predecessor).
struct PodSockets {
    outbound: Vec<Socket>,
    tunnel: Vec<Socket>,
    plaintext: Vec<Socket>,
    cookie: u64,
    addresses: Vec<IpAddr>,
}

impl PodRegistry {
    /// The node's pods; `enrolled` is where they are recorded for a restarted agent.
    pub fn new(agent: Arc<NodeAgent>, enrolled: Option<EnrolledFile>) -> Arc<Self> {
        let registry = Arc::new(Self {
            agent,
            enrolled,
            pods: Mutex::new(HashMap::new()),
            adding: Mutex::new(std::collections::HashSet::new()),
            accepting: tokio::sync::watch::Sender::new(true),
            handing_over: Mutex::new(None),
            released: std::sync::atomic::AtomicBool::new(false),
        });
        // Identities follow the workloads the control plane describes.
        let weak = Arc::downgrade(&registry);
        let mut changes = registry.agent.state.subscribe();
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(registry) = weak.upgrade() else {
                    return;
                };
                registry.reconcile();
                crate::inbound::reevaluate(&registry.agent);
            }
        });
        registry
    }

    /// Enrolls the pod whose network namespace is at `netns_path` (the node API's AddPod).
    pub async fn add(&self, uid: &str, netns_path: &Path) -> Result<u64, PodError> {
        let file = std::fs::File::open(netns_path).map_err(|source| PodError::Netns {
            uid: uid.to_string(),
            source: crate::netns::NetnsError::Open {
                path: netns_path.to_path_buf(),
                source,
            },
        })?;
        self.add_netns(uid, file, netns_path).await
    }

    /// Enrolls a pod: listeners in its netns, delivery routing, redirect map entry. `netns`
    /// is the open namespace (from the CNI plugin, or opened by path); `netns_path` is where
    /// the runtime keeps it. Enrolling the same pod in the same namespace again is a no-op.
    pub async fn add_netns(
        &self,
        uid: &str,
        netns: std::fs::File,
        netns_path: &Path,
    ) -> Result<u64, PodError> {
        if self.handing_over().is_some() {
            return Err(PodError::HandingOver {
                uid: uid.to_string(),
            });
        }
        let cookie = self.enroll(uid, netns, netns_path, None).await?;
        self.save();
        Ok(cookie)
    }

    /// [`Self::add_netns`] without recording the pods (adoption records them once, at the
    /// end).
    /// `handed` are the pod's listening sockets from a predecessor; without them the agent
    /// opens its own.
    async fn enroll(
        &self,
        uid: &str,
        netns: std::fs::File,
        netns_path: &Path,
        handed: Option<Vec<(ListenerKind, Socket)>>,
    ) -> Result<u64, PodError> {
        if uid.is_empty() {
            return Err(PodError::EmptyUid);
        }
        let netns_error = |source| PodError::Netns {
            uid: uid.to_string(),
            source,
        };
        let id = NetnsId::of(&netns).map_err(|source| {
            netns_error(crate::netns::NetnsError::Open {
                path: netns_path.to_path_buf(),
                source,
            })
        })?;
        // Both checks under the `adding` lock, so that two requests for one uid cannot both
        // pass them.
        let _adding = {
            let mut adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(existing) = self.pods.lock().unwrap_or_else(|e| e.into_inner()).get(uid) {
                if existing.netns_id == id {
                    return Ok(existing.handle.netns_cookie);
                }
                return Err(PodError::Conflict {
                    uid: uid.to_string(),
                    existing: existing.handle.netns.path().to_path_buf(),
                });
            }
            if !adding.insert(uid.to_string()) {
                return Err(PodError::InProgress {
                    uid: uid.to_string(),
                });
            }
            Adding {
                set: &self.adding,
                uid: uid.to_string(),
            }
        };
        let netns = Netns::from_file(netns, netns_path).map_err(netns_error)?;
        deliver::setup_routing(&netns)
            .await
            .map_err(|source| PodError::Routing {
                uid: uid.to_string(),
                source,
            })?;
        let sockets = netns
            .run(move || match handed {
                Some(handed) => adopt_listeners(handed),
                None => open_listeners(),
            })
            .await
            .map_err(|source| PodError::Netns {
                uid: uid.to_string(),
                source,
            })?
            .map_err(|(addr, source)| PodError::Listen {
                uid: uid.to_string(),
                addr,
                source,
            })?;
        // Inbound capture before anything else can reach the pod's apps through the agent:
        // until the control plane says otherwise, the mesh default (STRICT) holds.
        self.capture_inbound(uid, &netns, &sockets)
            .map_err(|source| PodError::Capture {
                uid: uid.to_string(),
                source,
            })?;
        let handle = Arc::new(PodHandle {
            uid: uid.to_string(),
            netns,
            netns_cookie: sockets.cookie,
            addresses: sockets.addresses.clone(),
            server_tls: Mutex::new(None),
        });
        let mut listening = Vec::new();
        let started = self
            .spawn_accept_loops(
                &handle,
                sockets.plaintext,
                ListenerKind::Plaintext,
                inbound::plaintext::handle,
                &mut listening,
            )
            .and_then(|()| {
                self.spawn_accept_loops(
                    &handle,
                    sockets.outbound,
                    ListenerKind::Outbound,
                    outbound::handle,
                    &mut listening,
                )
            })
            .and_then(|()| {
                self.spawn_accept_loops(
                    &handle,
                    sockets.tunnel,
                    ListenerKind::Tunnel,
                    inbound::tunnel::handle_connection,
                    &mut listening,
                )
            });
        if let Err((addr, source)) = started {
            listening.iter().for_each(Listening::stop);
            self.release_capture(&handle, &[]);
            return Err(PodError::Listen {
                uid: uid.to_string(),
                addr,
                source,
            });
        }
        // Enroll last: from here on the pod's connects come to listeners that exist.
        if let Err(source) = self.agent.redirect.enroll(sockets.cookie) {
            listening.iter().for_each(Listening::stop);
            self.release_capture(&handle, &[]);
            return Err(PodError::Enroll {
                uid: uid.to_string(),
                source,
            });
        }
        tracing::info!(pod = %uid, netns = %netns_path.display(), netns_cookie = sockets.cookie, "pod enrolled");
        self.pods.lock().unwrap_or_else(|e| e.into_inner()).insert(
            uid.to_string(),
            Pod {
                handle,
                netns_id: id,
                listening,
                identity: None,
                captured: true,
                mode: None,
                exempted: Vec::new(),
            },
        );
        self.reconcile();
        Ok(sockets.cookie)
    }

    /// The agent the pods belong to.
    pub fn agent(&self) -> &Arc<NodeAgent> {
        &self.agent
    }

    /// The network namespace a pod is enrolled with, if it is.
    pub fn enrolled_netns(&self, uid: &str) -> Option<NetnsId> {
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(uid)
            .map(|p| p.netns_id)
    }

    /// Records the enrolled pods for a restarted agent. A failure is logged: the pods work
    /// on, and only adoption after a restart would miss them (their next CNI call, or a
    /// pod restart, enrolls them again).
    fn save(&self) {
        let Some(file) = &self.enrolled else { return };
        let mut records: Vec<Record> = self
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|p| Record {
                uid: p.handle.uid.clone(),
                netns_path: p.handle.netns.path().to_path_buf(),
                netns: p.netns_id,
                netns_cookie: p.handle.netns_cookie,
            })
            .collect();
        records.sort_by(|a, b| a.uid.cmp(&b.uid));
        if let Err(e) = file.save(&records) {
            tracing::error!("{e}");
        }
    }

    /// At start, before the node socket opens: enrolls again every pod a previous agent
    /// recorded whose network namespace still exists, and forgets the rest (in the redirect
    /// map and the pins). Returns (adopted, gone).
    pub async fn adopt(&self) -> (usize, usize) {
        let Some(file) = &self.enrolled else {
            return (0, 0);
        };
        let records = match file.load() {
            Ok(records) => records,
            Err(e) => {
                tracing::error!("{e}");
                Vec::new()
            }
        };
        let started = std::time::Instant::now();
        let mut keep = std::collections::HashSet::new();
        let (mut adopted, mut gone) = (0, 0);
        for record in records {
            let Some((netns, path)) = crate::enrolled::find_netns(&record, Path::new("/proc"))
            else {
                tracing::info!(pod = %record.uid, netns = %record.netns_path.display(),
                    "pod left while no agent ran; forgotten");
                gone += 1;
                continue;
            };
            match self.enroll(&record.uid, netns, &path, None).await {
                Ok(cookie) => {
                    keep.insert(cookie);
                    adopted += 1;
                }
                Err(e) => {
                    tracing::error!(pod = %record.uid, "cannot adopt the pod again: {e}");
                    gone += 1;
                }
            }
        }
        let forgotten = self.agent.redirect.forget_pods_except(&keep);
        self.save();
        tracing::info!(
            adopted,
            gone,
            forgotten,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "pods of the previous agent adopted"
        );
        (adopted, gone)
    }

    /// Successor: enrolls the pods a predecessor hands over, on its sockets. The listeners
    /// accept only from [`Self::start_accepting`] on (the predecessor accepts meanwhile).
    /// Returns how many pods were taken.
    pub async fn take_over(&self, pods: Vec<HandedPod>) -> usize {
        self.accepting.send_replace(false);
        let started = std::time::Instant::now();
        let mut taken = 0;
        for pod in pods {
            let uid = pod.uid.clone();
            match self
                .enroll(&uid, pod.netns, &pod.netns_path, Some(pod.listeners))
                .await
            {
                Ok(_) => taken += 1,
                Err(e) => tracing::error!(pod = %uid, "cannot take the pod over: {e}"),
            }
        }
        self.save();
        tracing::info!(
            taken,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "pods taken over from the predecessor (not accepting yet)"
        );
        taken
    }

    /// Successor: the listeners start accepting.
    pub fn start_accepting(&self) {
        self.accepting.send_replace(true);
    }

    /// Predecessor: the listeners stop accepting until the handover ends (connections wait
    /// in the sockets' queues for the successor, or for this agent if the handover fails).
    pub fn pause_accepting(&self) {
        self.accepting.send_replace(false);
    }

    /// Predecessor: stops enrolling (new pods are told to retry; removals are kept for the
    /// successor) and lists every pod with copies of its namespace and listening sockets.
    /// Waits (at most `wait`) for enrollments under way to finish, so that none is missed.
    pub async fn begin_handover(
        &self,
        wait: std::time::Duration,
    ) -> Result<Vec<HandedPod>, std::io::Error> {
        *self.handing_over.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
        let deadline = tokio::time::Instant::now() + wait;
        while !self
            .adding
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            if tokio::time::Instant::now() >= deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("pod enrollments still under way after {wait:?}"),
                ));
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        pods.values()
            .map(|pod| {
                let netns = std::fs::File::from(pod.handle.netns.as_fd().try_clone_to_owned()?);
                let listeners = pod
                    .listening
                    .iter()
                    .map(|l| {
                        Ok((
                            l.kind,
                            Socket::from(l.listener.as_fd().try_clone_to_owned()?),
                        ))
                    })
                    .collect::<std::io::Result<_>>()?;
                Ok(HandedPod {
                    uid: pod.handle.uid.clone(),
                    netns_path: pod.handle.netns.path().to_path_buf(),
                    netns,
                    listeners,
                })
            })
            .collect()
    }

    /// Predecessor, the handover failed: enrolls again, and does the removals it held back.
    pub fn abort_handover(&self) {
        self.accepting.send_replace(true);
        let removed = self
            .handing_over
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        for uid in removed {
            self.remove(&uid);
        }
    }

    /// Predecessor, the successor has taken over: stops accepting on every pod listener and
    /// lets go of the pods without touching the kernel (they are the successor's now).
    /// Returns the pods whose removal was asked during the handover, for the successor.
    pub fn release(&self) -> Vec<String> {
        self.released
            .store(true, std::sync::atomic::Ordering::Release);
        let pods: Vec<Pod> = self
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, pod)| pod)
            .collect();
        for pod in &pods {
            pod.listening.iter().for_each(Listening::stop);
            if let Some(identity) = &pod.identity {
                self.agent.identities.release(identity);
            }
        }
        self.handing_over
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default()
    }

    /// Whether this agent is handing the node over to a successor right now.
    pub fn is_handing_over(&self) -> bool {
        self.handing_over().is_some()
    }

    /// Whether this agent is handing the node over (enrollment paused).
    fn handing_over(&self) -> Option<()> {
        self.handing_over
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|_| ())
    }

    /// Forgets a pod: unenrolls it, closes its listeners, lets go of its netns and identity.
    pub fn remove(&self, uid: &str) -> bool {
        if let Some(removed) = self
            .handing_over
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            // The successor has the pod's sockets: it removes the pod when told.
            removed.push(uid.to_string());
            tracing::info!(pod = %uid, "pod removal passed on to the successor");
            return true;
        }
        let pod = self
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
        let Some(pod) = pod else { return false };
        self.agent.redirect.unenroll(pod.handle.netns_cookie);
        let described = self
            .agent
            .state
            .by_uid(uid)
            .map(|w| w.ips.clone())
            .unwrap_or_default();
        self.release_capture(&pod.handle, &described);
        self.set_exemptions(&pod.handle.uid, &pod.exempted, &[]);
        pod.listening.iter().for_each(Listening::stop);
        if let Some(identity) = &pod.identity {
            self.agent.identities.release(identity);
        }
        self.save();
        tracing::info!(pod = %uid, "pod removed");
        true
    }

    pub fn list(&self) -> Vec<PodSummary> {
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<_> = pods
            .values()
            .map(|p| {
                let workload = self.agent.state.by_uid(&p.handle.uid);
                PodSummary {
                    uid: p.handle.uid.clone(),
                    netns_path: p.handle.netns.path().display().to_string(),
                    netns_cookie: p.handle.netns_cookie,
                    workload: workload.as_ref().map(|w| w.display_name()),
                    certificate_ready: workload
                        .as_ref()
                        .is_some_and(|w| self.agent.identities.current(&w.identity).is_ok()),
                    identity: workload.map(|w| w.identity.to_string()),
                }
            })
            .collect();
        list.sort_by(|a, b| a.uid.cmp(&b.uid));
        list
    }

    /// Starts one accept loop per listener socket, each handing connections to `handle`.
    fn spawn_accept_loops<F, Fut>(
        &self,
        pod: &Arc<PodHandle>,
        sockets: Vec<Socket>,
        which: ListenerKind,
        handle: F,
        listening: &mut Vec<Listening>,
    ) -> Result<(), (SocketAddr, std::io::Error)>
    where
        F: Fn(Arc<NodeAgent>, Arc<PodHandle>, TcpStream, SocketAddr) -> Fut + Copy + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        for socket in sockets {
            let listener = Arc::new(into_listener(socket)?);
            let task = tokio::spawn(accept_loop(
                self.agent.clone(),
                pod.clone(),
                listener.clone(),
                self.accepting.subscribe(),
                which.as_str_name(),
                handle,
            ));
            listening.push(Listening {
                kind: which,
                listener,
                task,
            });
        }
        Ok(())
    }

    /// Points the kernel's inbound capture for the pod's addresses at its plaintext listeners.
    fn capture_inbound(
        &self,
        uid: &str,
        netns: &Netns,
        sockets: &PodSockets,
    ) -> Result<(), crate::redirect::RedirectError> {
        let redirect = &self.agent.redirect;
        for ip in &sockets.addresses {
            let listener = sockets.plaintext.iter().find(|s| {
                s.local_addr()
                    .ok()
                    .and_then(|a| a.as_socket())
                    .is_some_and(|a| a.is_ipv4() == ip.is_ipv4())
            });
            match listener {
                Some(listener) => redirect.set_capture_listener(*ip, listener)?,
                // Captured with no listener: the program drops (fail closed).
                None => {
                    tracing::warn!(pod = %uid, %ip, "no plaintext listener of this family; inbound connections to it are dropped")
                }
            }
            redirect.set_captured(*ip, true)?;
        }
        // Attached once the maps it reads are filled: a program attached first would drop
        // the SYNs that come in between (with a predecessor's program still attached, those
        // are connections that would otherwise have been served).
        redirect.attach_capture(netns, sockets.cookie)
    }

    /// Moves a pod's kubelet-probe exemptions from `old` to `new`.
    fn set_exemptions(
        &self,
        uid: &str,
        old: &[(IpAddr, IpAddr, u16)],
        new: &[(IpAddr, IpAddr, u16)],
    ) {
        let redirect = &self.agent.redirect;
        for (source, ip, port) in old.iter().filter(|e| !new.contains(e)) {
            if let Err(e) = redirect.set_probe_exemption(*source, *ip, *port, false) {
                tracing::warn!(pod = %uid, %source, %ip, port, "cannot remove a probe exemption: {e}");
            }
        }
        for (source, ip, port) in new.iter().filter(|e| !old.contains(e)) {
            match redirect.set_probe_exemption(*source, *ip, *port, true) {
                Ok(()) => tracing::info!(target: "audit", event = "probe_exempted", pod = %uid,
                    %source, dst = %SocketAddr::new(*ip, *port),
                    "kubelet probes from this address reach this port without capture"),
                Err(e) => {
                    tracing::warn!(pod = %uid, %source, %ip, port, "cannot exempt a probe port: {e}")
                }
            }
        }
    }

    /// Undoes [`Self::capture_inbound`] for a pod that leaves.
    fn release_capture(&self, pod: &PodHandle, described: &[IpAddr]) {
        let redirect = &self.agent.redirect;
        redirect.detach_capture(pod.netns_cookie);
        for ip in pod.addresses.iter().chain(described) {
            if let Err(e) = redirect.forget_address(*ip) {
                tracing::warn!(pod = %pod.uid, %ip, "cannot clear inbound capture: {e}");
            }
        }
    }

    /// Makes the pods follow what the control plane now says: each holds its workload's
    /// identity, and its inbound capture follows its mTLS mode.
    fn reconcile(&self) {
        if self.released.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let policy = self.agent.state.policy();
        let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        for pod in pods.values_mut() {
            let workload = self.agent.state.by_uid(&pod.handle.uid);
            if let Some(w) = &workload {
                let mode = policy.mode_for(w, 0);
                let summary = format!("{} ({})", mode.mode, mode.source);
                if pod.mode.as_ref() != Some(&summary) {
                    tracing::info!(target: "audit", event = "mode_changed", pod = %pod.handle.uid,
                        workload = %w.display_name(), mode = %mode.mode, mode_source = %mode.source,
                        previous = %pod.mode.as_deref().unwrap_or("none"), "workload mTLS mode");
                    pod.mode = Some(summary);
                }
                let captured = policy.needs_capture(w);
                if captured != pod.captured {
                    let ips: Vec<IpAddr> =
                        pod.handle.addresses.iter().chain(&w.ips).copied().collect();
                    let result = ips
                        .iter()
                        .try_for_each(|ip| self.agent.redirect.set_captured(*ip, captured));
                    match result {
                        Ok(()) => {
                            tracing::info!(target: "audit", event = "capture_changed",
                                pod = %pod.handle.uid, workload = %w.display_name(), captured,
                                "inbound capture");
                            pod.captured = captured;
                        }
                        Err(e) => tracing::error!(pod = %pod.handle.uid,
                            "cannot change inbound capture to {captured}: {e}"),
                    }
                }
            }
            // Kubelet probes: from each exempt node address to each of the pod's addresses, on
            // the probe ports the control plane names; nothing else.
            let mut exempted = Vec::new();
            if let Some(w) = &workload {
                let mut ips: Vec<IpAddr> =
                    pod.handle.addresses.iter().chain(&w.ips).copied().collect();
                ips.sort();
                ips.dedup();
                for source in &self.agent.capture_exempt_sources {
                    for ip in ips.iter().filter(|ip| ip.is_ipv4() == source.is_ipv4()) {
                        for port in &w.probe_ports {
                            exempted.push((*source, *ip, *port));
                        }
                    }
                }
            }
            if exempted != pod.exempted {
                self.set_exemptions(&pod.handle.uid, &pod.exempted, &exempted);
                pod.exempted = exempted;
            }
            let wanted = workload.map(|w| w.identity.clone());
            if wanted == pod.identity {
                continue;
            }
            if let Some(old) = pod.identity.take() {
                self.agent.identities.release(&old);
            }
            if let Some(new) = &wanted {
                tracing::info!(pod = %pod.handle.uid, identity = %new, "pod identity known");
                self.agent.identities.acquire(new);
            }
            pod.identity = wanted;
        }
    }
}

/// Accepts connections on one of the pod's listeners until the task is aborted (pod
/// removed), each handled on its own task.
async fn accept_loop<F, Fut>(
    agent: Arc<NodeAgent>,
    pod: Arc<PodHandle>,
    listener: Arc<TcpListener>,
    mut accepting: tokio::sync::watch::Receiver<bool>,
    which: &'static str,
    handle: F,
) where
    F: Fn(Arc<NodeAgent>, Arc<PodHandle>, TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        // A successor waits until it is ready (meanwhile its predecessor accepts); a
        // predecessor pauses while its successor switches the map layout.
        if !*accepting.borrow_and_update() && accepting.wait_for(|a| *a).await.is_err() {
            return;
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            changed = accepting.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handle(agent.clone(), pod.clone(), stream, peer));
            }
            Err(e) => {
                tracing::warn!(pod = %pod.uid, "{which} accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

fn listener_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_mark(AGENT_MARK)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket)
}

/// Runs inside the pod's netns.
fn open_listeners() -> Result<PodSockets, (SocketAddr, std::io::Error)> {
    let out4 = SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT));
    let tun4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, TUNNEL_PORT));
    let outbound4 = listener_socket(out4).map_err(|e| (out4, e))?;
    let cookie = crate::netns::socket_netns_cookie(outbound4.as_fd()).map_err(|e| (out4, e))?;
    let tunnel4 = listener_socket(tun4).map_err(|e| (tun4, e))?;
    let plain4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT));
    let plaintext4 = listener_socket(plain4).map_err(|e| (plain4, e))?;
    let mut outbound = vec![outbound4];
    let mut tunnel = vec![tunnel4];
    let mut plaintext = vec![plaintext4];
    // IPv6 when the pod has it; an IPv4-only pod is fine.
    let out6 = SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT));
    let tun6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, TUNNEL_PORT));
    if let Ok(s) = listener_socket(out6) {
        outbound.push(s);
    }
    if let Ok(s) = listener_socket(tun6) {
        tunnel.push(s);
    }
    let plain6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, INBOUND_PLAINTEXT_PORT));
    if let Ok(s) = listener_socket(plain6) {
        plaintext.push(s);
    }
    Ok(PodSockets {
        outbound,
        tunnel,
        plaintext,
        cookie,
        addresses: pod_addresses(),
    })
}

/// Runs inside the pod's netns: takes the listening sockets a predecessor handed over, after
/// checking that each is a listening TCP socket of this namespace on its kind's port.
fn adopt_listeners(
    handed: Vec<(ListenerKind, Socket)>,
) -> Result<PodSockets, (SocketAddr, std::io::Error)> {
    let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
    let here = Socket::new(Domain::IPV4, Type::STREAM, None)
        .and_then(|s| crate::netns::socket_netns_cookie(s.as_fd()))
        .map_err(|e| (unspecified, e))?;
    let (mut outbound, mut tunnel, mut plaintext) = (Vec::new(), Vec::new(), Vec::new());
    for (kind, socket) in handed {
        let addr = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(unspecified);
        let (port, list) = match kind {
            ListenerKind::Outbound => (OUTBOUND_PORT, &mut outbound),
            ListenerKind::Tunnel => (TUNNEL_PORT, &mut tunnel),
            ListenerKind::Plaintext => (INBOUND_PLAINTEXT_PORT, &mut plaintext),
            _ => continue,
        };
        let invalid = |what: String| {
            (
                addr,
                std::io::Error::new(std::io::ErrorKind::InvalidInput, what),
            )
        };
        if addr.port() != port || !socket.is_listener().unwrap_or(false) {
            return Err(invalid(format!(
                "the handed-over {} socket is not a listener on port {port}",
                kind.as_str_name()
            )));
        }
        let cookie = crate::netns::socket_netns_cookie(socket.as_fd()).map_err(|e| (addr, e))?;
        if cookie != here {
            return Err(invalid(format!(
                "the handed-over {} socket belongs to another network namespace",
                kind.as_str_name()
            )));
        }
        socket.set_nonblocking(true).map_err(|e| (addr, e))?;
        list.push(socket);
    }
    if outbound.is_empty() || tunnel.is_empty() || plaintext.is_empty() {
        return Err((
            unspecified,
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the predecessor handed over no outbound, tunnel or plaintext listener",
            ),
        ));
    }
    Ok(PodSockets {
        outbound,
        tunnel,
        plaintext,
        cookie: here,
        addresses: pod_addresses(),
    })
}

/// The pod's own addresses (runs inside its netns): everything but loopback and IPv6
/// link-local.
fn pod_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        })
        .filter(|ip| match ip {
            IpAddr::V4(v4) => !v4.is_loopback(),
            IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unicast_link_local(),
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

fn into_listener(socket: Socket) -> Result<TcpListener, (SocketAddr, std::io::Error)> {
    let addr = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
    TcpListener::from_std(socket.into()).map_err(|e| (addr, e))
}
