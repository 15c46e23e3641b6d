//! The kernel side of redirection: loads meshlet's eBPF programs, attaches them to this node's
//! pod cgroup subtree, enrolls pods by netns cookie, and answers "where was this connection
//! going?" for the outbound listener. Inbound, it attaches the capture program to each pod's
//! netns and tells it which pod addresses to capture and which agent socket takes them.
use std::{
    net::{IpAddr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    maps::{HashMap, MapData, PerCpuArray, SockHash},
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps},
    Ebpf, EbpfLoader,
};
use meshlet_common::{
    stats, CaptureFlags, ConnectionKey, DeliveryKey, EnrollmentFlags, ExemptKey, OriginalDst,
    CAPTURE, CAPTURE_PASS,
};

/// The eBPF object, built by `build.rs` from `ebpf/programs`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/meshlet-ebpf"));

const CGROUP_PROGRAMS: &[&str] = &[
    "connect4",
    "connect6",
    "getpeername4",
    "getpeername6",
    "bind4",
    "bind6",
];
const CAPTURE_PROGRAM: &str = "inbound_capture";

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error(
        "cannot create the bpffs pin folder {path}: {source} (is bpffs mounted at /sys/fs/bpf?)"
    )]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading meshlet's eBPF programs failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("cannot migrate the entries of eBPF map {name} from {from} (another map layout): {detail}; stop the running agent, then start this one")]
    Migrate {
        name: &'static str,
        from: PathBuf,
        detail: String,
    },
    #[error("eBPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF program {0} was not attached as a bpf_link (kernel older than 5.7?)")]
    NotFdLink(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("cannot open the pod cgroup {path}: {source} (is cgroup v2 mounted there?)")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot tell the agent's own cgroup (v2): {0}; the redirect programs recognise the agent by it")]
    OwnCgroup(String),
    #[error("cannot pin link {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
}

/// Loaded and attached programs plus the maps the agent uses.
pub struct Redirect {
    /// Holds the programs; the capture program is attached per pod netns from here.
    ebpf: Mutex<Ebpf>,
    pin_dir: PathBuf,
    enrolled: Mutex<HashMap<MapData, u64, EnrollmentFlags>>,
    original_dst: Mutex<HashMap<MapData, ConnectionKey, OriginalDst>>,
    capture: Mutex<HashMap<MapData, [u32; 4], CaptureFlags>>,
    listeners: Mutex<SockHash<MapData, [u32; 4]>>,
    exempt: Mutex<HashMap<MapData, ExemptKey, u32>>,
    deliveries: Mutex<HashMap<MapData, DeliveryKey, u32>>,
    stats: PerCpuArray<MapData, u64>,
    /// This agent's cgroup (v2 id), and the programs' copy of it and of a predecessor's.
    agent_cgroup: u64,
    agent_cgroups: Mutex<aya::maps::Array<MapData, u64>>,
    /// Pins of maps of other layout versions, removed once no agent uses them.
    other_layouts: Mutex<Vec<PathBuf>>,
}

/// The maps that outlive the agent (pinned), each with its layout version. A map whose key or
/// value changes gets a new version (and a conversion in [`migrate`]): a new agent then pins
/// a new map beside the old one and copies the entries over; unchanged maps are shared by an
/// agent and its successor, and by an agent and the one restarted after it.
///
/// `DELIVERIES` is not here: its layout is frozen. During a handover the predecessor still
/// delivers (and names each delivery there) while the successor's capture programs are the
/// ones attached, so both must use one map; a new layout of it would need a new map name and
/// an upgrade that stops the old agent first.
const PINNED_MAPS: &[(&str, u32)] = &[
    ("ENROLLED", 1),
    ("INBOUND_CAPTURE", 1),
    ("ORIG_DST_BY_COOKIE_V2", 1),
    ("ORIG_DST_BY_CONN_V2", 1),
    ("STATS", 1),
];
/// The pinned maps' folder in the pin folder.
const MAPS_DIR: &str = "maps";

/// Whether an agent with `layout_bump` would pin any map in another layout version than the
/// maps pinned under `pin_dir` now (a predecessor's or a previous agent's).
pub fn layout_changes(pin_dir: &Path, layout_bump: u32) -> bool {
    PINNED_MAPS.iter().any(|&(name, version)| {
        let version = version + layout_bump;
        !map_pin(pin_dir, name, version).exists()
            && !other_layout_pins(pin_dir, name, version).is_empty()
    })
}

/// Where version `version` of map `name` is pinned.
fn map_pin(pin_dir: &Path, name: &str, version: u32) -> PathBuf {
    pin_dir.join(MAPS_DIR).join(format!("{name}-v{version}"))
}

/// The pins of map `name` in other versions than `current`, newest first: versioned ones,
/// and the unversioned pin in the pin folder itself (agents from before map versions).
fn other_layout_pins(pin_dir: &Path, name: &str, current: u32) -> Vec<PathBuf> {
    let prefix = format!("{name}-v");
    let mut pins: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(pin_dir.join(MAPS_DIR))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|v| v.parse::<u32>().ok())
                .is_some_and(|v| v != current)
        })
        .map(|e| e.path())
        .chain(Some(pin_dir.join(name)).filter(|p| p.exists()))
        .map(|p| {
            let modified = std::fs::metadata(&p)
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (modified, p)
        })
        .collect();
    pins.sort_by_key(|p| std::cmp::Reverse(p.0));
    pins.into_iter().map(|(_, p)| p).collect()
}

/// Copies the entries of the newest other-layout pin of map `name` into `into` (the map of
/// this agent's layout). The kernel checks the key and value sizes when the old map is opened
/// as this layout's types: a layout whose entries differ needs its conversion written here,
/// and until it is, the agent refuses to start (the running agent, or the pinned programs
/// that refuse the pods' connects, keep the node fail-closed).
///
/// `others` are the other-layout pins of every pinned map, as found once at the start.
fn migrate<K: aya::Pod, V: aya::Pod>(
    others: &[(&'static str, Vec<PathBuf>)],
    name: &'static str,
    into: &mut HashMap<MapData, K, V>,
) -> Result<(), RedirectError> {
    let Some(from) = others
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, pins)| pins.first())
    else {
        return Ok(());
    };
    let error = |detail: String| RedirectError::Migrate {
        name,
        from: from.clone(),
        detail,
    };
    let data = MapData::from_pin(from).map_err(|e| error(e.to_string()))?;
    let old: HashMap<MapData, K, V> =
        HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(|e| error(e.to_string()))?;
    let mut copied = 0usize;
    for entry in old.iter() {
        let (key, value) = entry.map_err(|e| error(e.to_string()))?;
        into.insert(key, value, 0)
            .map_err(|e| error(format!("copying an entry: {e}")))?;
        copied += 1;
    }
    tracing::info!(map = name, from = %from.display(), copied, "map entries migrated from another layout");
    Ok(())
}

/// A delivery let past inbound capture; the pass ends when this drops.
pub struct DeliveryPass<'a> {
    redirect: &'a Redirect,
    key: DeliveryKey,
}

impl Drop for DeliveryPass<'_> {
    fn drop(&mut self) {
        let mut map = self
            .redirect
            .deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let _ = map.remove(&self.key);
    }
}

/// The kernel's per-CPU redirect counters, summed (see `meshlet_common::stats`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RedirectStats {
    pub redirected: u64,
    pub skipped_agent: u64,
    pub original_dst_recorded: u64,
    pub refused_no_space: u64,
    pub peername_rewritten: u64,
    pub inbound_captured: u64,
    pub inbound_dropped: u64,
    pub bind_refused: u64,
    pub original_dst_lost: u64,
    pub inbound_unknown_address: u64,
}

/// A pod's pinned inbound-capture link is `<pin dir>/capture_<netns cookie>`.
const CAPTURE_PIN_PREFIX: &str = "capture_";

impl Redirect {
    /// Loads the programs, pins maps and links under `pin_dir`, and attaches to `cgroup`
    /// (this node's pod cgroup subtree; never the root, so that nodes sharing a kernel in the
    /// lab stay apart).
    ///
    /// `max_connections` sizes the original-destination maps: redirected connections the node
    /// can have open at once (past it, new connects are refused and counted).
    ///
    /// `predecessor_cgroup` is the cgroup of an agent this one takes over from (see
    /// `handover`): until [`Self::forget_predecessor`], its sockets are not redirected either,
    /// so that it can finish delivering what it accepted.
    pub fn attach(
        cgroup: &Path,
        pin_dir: &Path,
        max_connections: u32,
        predecessor_cgroup: Option<u64>,
        layout_bump: u32,
    ) -> Result<Self, RedirectError> {
        let maps_dir = pin_dir.join(MAPS_DIR);
        std::fs::create_dir_all(&maps_dir).map_err(|source| RedirectError::PinDir {
            path: maps_dir.clone(),
            source,
        })?;
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(&maps_dir)
            .map_max_entries("ORIG_DST_BY_COOKIE_V2", max_connections)
            .map_max_entries("ORIG_DST_BY_CONN_V2", max_connections);
        // Each pinned map at the path of its layout version; pins of other versions (a
        // predecessor's, or a previous agent's) are migrated from and removed once unused.
        let mut others: Vec<(&'static str, Vec<PathBuf>)> = Vec::new();
        for &(name, version) in PINNED_MAPS {
            let version = version + layout_bump;
            loader.map_pin_path(name, map_pin(pin_dir, name, version));
            others.push((name, other_layout_pins(pin_dir, name, version)));
        }
        let mut ebpf = loader.load(PROGRAMS)?;
        start_kernel_log(&mut ebpf);
        // Before anything is attached: the programs know the agent by its cgroup.
        let agent_cgroup = own_cgroup_id()?;
        {
            let map = ebpf
                .map_mut("AGENT_CGROUP")
                .ok_or(RedirectError::MissingMap("AGENT_CGROUP"))?;
            let mut array: aya::maps::Array<&mut MapData, u64> = aya::maps::Array::try_from(map)
                .map_err(|source| RedirectError::Map {
                    name: "AGENT_CGROUP",
                    source,
                })?;
            for (slot, id) in [(0, agent_cgroup), (1, predecessor_cgroup.unwrap_or(0))] {
                array
                    .set(slot, id, 0)
                    .map_err(|source| RedirectError::Map {
                        name: "AGENT_CGROUP",
                        source,
                    })?;
            }
        }
        let mut enrolled: HashMap<MapData, u64, EnrollmentFlags> = take_map(&mut ebpf, "ENROLLED")?;
        let mut capture: HashMap<MapData, [u32; 4], CaptureFlags> =
            take_map(&mut ebpf, "INBOUND_CAPTURE")?;
        let mut by_cookie: HashMap<MapData, u64, OriginalDst> =
            take_map(&mut ebpf, "ORIG_DST_BY_COOKIE_V2")?;
        let mut original_dst: HashMap<MapData, ConnectionKey, OriginalDst> =
            take_map(&mut ebpf, "ORIG_DST_BY_CONN_V2")?;
        // A new layout starts where the old one is: which pods are enrolled and which
        // addresses captured, before the new programs are attached (no moment in which an
        // enrolled pod's connects leave unredirected).
        migrate(&others, "ENROLLED", &mut enrolled)?;
        migrate(&others, "INBOUND_CAPTURE", &mut capture)?;
        let cgroup_file = std::fs::File::open(cgroup).map_err(|source| RedirectError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        // Attached as bpf_links, which always coexist with other programs on the same cgroup
        // (multi-attach). The kernel refuses the BPF_F_ALLOW_MULTI flag on link creation, so
        // the mode here is aya's "Single" (flags 0), which for links still means "alongside".
        let mode = CgroupAttachMode::Single;
        // CgroupSockAddr and SockOps share these methods but no trait, hence a macro.
        macro_rules! attach_link {
            ($kind:ty, $name:expr) => {{
                let name: &'static str = $name;
                let program: &mut $kind = program_mut(&mut ebpf, name)?;
                let id = program
                    .load()
                    .and_then(|()| program.attach(&cgroup_file, mode))
                    .map_err(|source| RedirectError::Program { name, source })?;
                let link = program
                    .take_link(id)
                    .map_err(|source| RedirectError::Program { name, source })?;
                let link: FdLink = link
                    .try_into()
                    .map_err(|_| RedirectError::NotFdLink(name))?;
                (name, link)
            }};
        }
        let mut links = Vec::new();
        for &name in CGROUP_PROGRAMS {
            links.push(attach_link!(CgroupSockAddr, name));
        }
        links.push(attach_link!(SockOps, "sock_ops"));
        let capture_program: &mut SkLookup = program_mut(&mut ebpf, CAPTURE_PROGRAM)?;
        capture_program
            .load()
            .map_err(|source| RedirectError::Program {
                name: CAPTURE_PROGRAM,
                source,
            })?;
        // Pinned links outlive the agent: while it is gone, enrolled pods' connects still go
        // to 127.0.0.1:15001, where nothing listens, so they are refused rather than leaving in
        // plaintext. A new agent replaces the old pins (the new links are attached first, so
        // there is no moment without redirection).
        for (name, link) in links {
            let path = pin_dir.join(format!("link_{name}"));
            let _ = std::fs::remove_file(&path);
            link.pin(&path)
                .map_err(|source| RedirectError::Pin { path, source })?;
        }
        // The old programs are detached now: the original destinations they recorded (the
        // connections that wait to be accepted) are copied over. Nothing accepts on this
        // agent's side yet; a predecessor reads its own maps.
        migrate(&others, "ORIG_DST_BY_COOKIE_V2", &mut by_cookie)?;
        migrate(&others, "ORIG_DST_BY_CONN_V2", &mut original_dst)?;
        let listeners = take_map(&mut ebpf, "INBOUND_LISTENERS")?;
        let exempt: HashMap<MapData, ExemptKey, u32> = take_map(&mut ebpf, "CAPTURE_EXEMPT_V2")?;
        let deliveries = take_map(&mut ebpf, "DELIVERIES")?;
        let stats = take_map(&mut ebpf, "STATS")?;
        let agent_cgroups = take_map(&mut ebpf, "AGENT_CGROUP")?;
        tracing::info!(cgroup = %cgroup.display(), pins = %pin_dir.display(), "eBPF redirect attached");
        Ok(Self {
            ebpf: Mutex::new(ebpf),
            pin_dir: pin_dir.to_path_buf(),
            enrolled: Mutex::new(enrolled),
            original_dst: Mutex::new(original_dst),
            capture: Mutex::new(capture),
            listeners: Mutex::new(listeners),
            exempt: Mutex::new(exempt),
            deliveries: Mutex::new(deliveries),
            stats,
            agent_cgroup,
            agent_cgroups: Mutex::new(agent_cgroups),
            other_layouts: Mutex::new(others.into_iter().flat_map(|(_, pins)| pins).collect()),
        })
    }

    /// This agent's cgroup (v2 id), which its programs know it by; a successor is told it.
    pub fn agent_cgroup(&self) -> u64 {
        self.agent_cgroup
    }

    /// Removes the pins of maps of other layout versions (no agent uses them any more: the
    /// predecessor has gone, or there was none).
    pub fn forget_other_layouts(&self) {
        let pins =
            std::mem::take(&mut *self.other_layouts.lock().unwrap_or_else(|e| e.into_inner()));
        for pin in pins {
            match std::fs::remove_file(&pin) {
                Ok(()) => tracing::info!(pin = %pin.display(), "map of another layout unpinned"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(pin = %pin.display(), "cannot unpin a map of another layout: {e}")
                }
            }
        }
    }

    /// Stops exempting the predecessor's cgroup (it has finished and gone).
    pub fn forget_predecessor(&self) {
        let mut map = self.agent_cgroups.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = map.set(1, 0, 0) {
            tracing::warn!("cannot clear the predecessor's cgroup from the programs: {e}");
        }
    }

    /// Attaches inbound capture to a pod's netns. The link is pinned (by netns cookie), so
    /// that while the agent is away the pod's captured addresses stay captured: with no agent
    /// listener in the map, the program drops instead of letting plaintext reach the app.
    pub fn attach_capture(&self, netns: impl AsFd, netns_cookie: u64) -> Result<(), RedirectError> {
        let name = CAPTURE_PROGRAM;
        let mut ebpf = self.ebpf.lock().unwrap_or_else(|e| e.into_inner());
        let program: &mut SkLookup = program_mut(&mut ebpf, name)?;
        let id = program
            .attach(netns)
            .map_err(|source| RedirectError::Program { name, source })?;
        let link: FdLink = program
            .take_link(id)
            .map_err(|source| RedirectError::Program { name, source })?
            .into();
        let path = self.capture_pin(netns_cookie);
        // A previous agent's link for this netns goes once the new one is in place.
        let _ = std::fs::remove_file(&path);
        link.pin(&path)
            .map_err(|source| RedirectError::Pin { path, source })?;
        Ok(())
    }

    /// Detaches inbound capture from a pod's netns (the pod is leaving the node).
    pub fn detach_capture(&self, netns_cookie: u64) {
        let _ = std::fs::remove_file(self.capture_pin(netns_cookie));
    }

    fn capture_pin(&self, netns_cookie: u64) -> PathBuf {
        self.pin_dir
            .join(format!("{CAPTURE_PIN_PREFIX}{netns_cookie}"))
    }

    /// Points inbound capture for `ip` at the agent's plaintext listener `listener` (a
    /// listening socket of the same family in the pod's netns).
    pub fn set_capture_listener(
        &self,
        ip: IpAddr,
        listener: &impl AsRawFd,
    ) -> Result<(), RedirectError> {
        let mut map = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(ip_key(ip), listener.as_raw_fd(), 0)
            .map_err(|source| RedirectError::Map {
                name: "INBOUND_LISTENERS",
                source,
            })
    }

    /// Captures (or stops capturing) inbound connections to the pod address `ip`.
    ///
    /// An address the map does not hold is one the agent does not know (added to the pod
    /// after enrollment, link-local): the capture program drops connections to it, so a
    /// released address is forgotten with [`Self::forget_address`], never left out.
    pub fn set_captured(&self, ip: IpAddr, captured: bool) -> Result<(), RedirectError> {
        let mut map = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        let flags = if captured { CAPTURE } else { CAPTURE_PASS };
        map.insert(ip_key(ip), flags, 0)
            .map_err(|source| RedirectError::Map {
                name: "INBOUND_CAPTURE",
                source,
            })
    }

    /// Forgets a pod address (the pod left).
    pub fn forget_address(&self, ip: IpAddr) -> Result<(), RedirectError> {
        let mut map = self.capture.lock().unwrap_or_else(|e| e.into_inner());
        match map.remove(&ip_key(ip)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(RedirectError::Map {
                name: "INBOUND_CAPTURE",
                source,
            }),
        }
    }

    /// Lets connections from `source` to `destination:port` (a kubelet probe) past inbound
    /// capture, or stops letting them (`allowed` false).
    pub fn set_probe_exemption(
        &self,
        source: IpAddr,
        destination: IpAddr,
        port: u16,
        allowed: bool,
    ) -> Result<(), RedirectError> {
        let key = ExemptKey {
            source: ip_key(source),
            destination: ip_key(destination),
            port,
            _pad: 0,
        };
        let mut map = self.exempt.lock().unwrap_or_else(|e| e.into_inner());
        let result = if allowed {
            map.insert(key, 0, 0)
        } else {
            match map.remove(&key) {
                Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                other => other,
            }
        };
        result.map_err(|source| RedirectError::Map {
            name: "CAPTURE_EXEMPT_V2",
            source,
        })
    }

    /// Lets the agent's delivery `from` → `to` (inside the pod) past inbound capture until
    /// the returned pass drops; drop it once the connection is established.
    pub fn delivery_pass(
        &self,
        from: SocketAddr,
        to: SocketAddr,
    ) -> Result<DeliveryPass<'_>, RedirectError> {
        let key = DeliveryKey {
            local_ip: ip_key(to.ip()),
            remote_ip: ip_key(from.ip()),
            local_port: to.port(),
            remote_port: from.port(),
        };
        let mut map = self.deliveries.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(key, 0, 0).map_err(|source| RedirectError::Map {
            name: "DELIVERIES",
            source,
        })?;
        Ok(DeliveryPass {
            redirect: self,
            key,
        })
    }

    /// The kernel-side counters, summed over CPUs.
    pub fn stats(&self) -> RedirectStats {
        let read = |index: u32| -> u64 {
            self.stats
                .get(&index, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        RedirectStats {
            redirected: read(stats::REDIRECTED),
            skipped_agent: read(stats::SKIPPED_AGENT),
            original_dst_recorded: read(stats::ORIGINAL_DST_RECORDED),
            refused_no_space: read(stats::REFUSED_NO_SPACE),
            peername_rewritten: read(stats::PEERNAME_REWRITTEN),
            inbound_captured: read(stats::INBOUND_CAPTURED),
            inbound_dropped: read(stats::INBOUND_DROPPED),
            bind_refused: read(stats::BIND_REFUSED),
            original_dst_lost: read(stats::ORIGINAL_DST_LOST),
            inbound_unknown_address: read(stats::INBOUND_UNKNOWN_ADDRESS),
        }
    }

    /// Starts capturing the connects of the pod whose netns has this cookie.
    pub fn enroll(&self, netns_cookie: u64) -> Result<(), RedirectError> {
        let mut map = self.enrolled.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(netns_cookie, 0, 0)
            .map_err(|source| RedirectError::Map {
                name: "ENROLLED",
                source,
            })
    }

    /// Stops capturing the pod's connects.
    pub fn unenroll(&self, netns_cookie: u64) {
        let mut map = self.enrolled.lock().unwrap_or_else(|e| e.into_inner());
        let _ = map.remove(&netns_cookie);
    }

    /// After adoption: forgets every enrolled netns not in `keep` (pods that left while no
    /// agent ran), in the redirect map and their pinned capture links.
    pub fn forget_pods_except(&self, keep: &std::collections::HashSet<u64>) -> usize {
        let mut forgotten = 0;
        {
            let mut map = self.enrolled.lock().unwrap_or_else(|e| e.into_inner());
            let stale: Vec<u64> = map
                .keys()
                .filter_map(Result::ok)
                .filter(|cookie| !keep.contains(cookie))
                .collect();
            for cookie in stale {
                if map.remove(&cookie).is_ok() {
                    forgotten += 1;
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(&self.pin_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let cookie = name
                    .to_str()
                    .and_then(|n| n.strip_prefix(CAPTURE_PIN_PREFIX))
                    .and_then(|c| c.parse::<u64>().ok());
                if cookie.is_some_and(|c| !keep.contains(&c)) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        forgotten
    }

    /// Where the connection that the outbound listener accepted from `peer` (inside the netns
    /// with this cookie) was going. Consumes the entry.
    pub fn take_original_dst(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = connection_key(netns_cookie, peer);
        let mut map = self.original_dst.lock().unwrap_or_else(|e| e.into_inner());
        let original = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(original_to_socket_addr(&original))
    }
}

/// The program `name` of the object, as program type `P`.
fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, RedirectError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(RedirectError::MissingProgram(name))?
        .try_into()
        .map_err(|source| RedirectError::Program { name, source })
}

/// Takes map `name` out of the object as the typed map `M`.
fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, RedirectError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(RedirectError::MissingMap(name))?;
    M::try_from(map).map_err(|source| RedirectError::Map { name, source })
}

/// Forwards the programs' aya-log records into `log` (bridged to tracing). The logger must
/// live as long as the programs: dropping it closes the log map.
fn start_kernel_log(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        // SAFETY: the AsyncFd owns the logger, so the ring buffer's fd stays open for as long
        // as it is registered.
        Ok(logger) => match unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        } {
            Ok(mut fd) => {
                tokio::spawn(async move {
                    loop {
                        let Ok(mut guard) = fd.readable_mut().await else {
                            return;
                        };
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                });
            }
            Err(e) => tracing::warn!("eBPF log reader not started: {e}"),
        },
        Err(e) => tracing::warn!("eBPF programs log nothing: {e}"),
    }
}

/// A pod address as the capture maps key it: IPv4-mapped for IPv4, in kernel word order.
fn ip_key(ip: IpAddr) -> [u32; 4] {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    octets_to_words(v6.octets())
}

/// The key the sock_ops program files the original destination under.
pub fn connection_key(netns_cookie: u64, peer: SocketAddr) -> ConnectionKey {
    let v6 = match peer.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    ConnectionKey::new(netns_cookie, octets_to_words(v6.octets()), peer.port())
}

/// Network-order bytes into the four `u32` words the kernel uses (memory order kept).
fn octets_to_words(octets: [u8; 16]) -> [u32; 4] {
    let mut words = [0u32; 4];
    for (word, chunk) in words.iter_mut().zip(octets.chunks_exact(4)) {
        *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    words
}

fn words_to_octets(words: [u32; 4]) -> [u8; 16] {
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(words) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    octets
}

/// An original destination as a socket address; IPv4-mapped addresses become IPv4.
pub fn original_to_socket_addr(original: &OriginalDst) -> SocketAddr {
    let v6 = Ipv6Addr::from(words_to_octets(original.ip));
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    SocketAddr::new(ip, original.port)
}

/// The cgroup v2 id of this process (the inode of its cgroup folder in the cgroup2 mount), as
/// `bpf_get_current_cgroup_id()` reports it for the agent's own threads.
fn own_cgroup_id() -> Result<u64, RedirectError> {
    use std::os::unix::fs::MetadataExt;
    let err = |reason: String| RedirectError::OwnCgroup(reason);
    let cgroups = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| err(format!("reading /proc/self/cgroup: {e}")))?;
    let path = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| err("no cgroup v2 line (0::) in /proc/self/cgroup".into()))?;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| err(format!("reading /proc/self/mountinfo: {e}")))?;
    // mountinfo: ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS... - FSTYPE SOURCE SUPER
    let mount = mounts
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split(' ').nth(4).map(str::to_string))?
        })
        .ok_or_else(|| err("no cgroup2 mount in /proc/self/mountinfo".into()))?;
    let dir = PathBuf::from(mount).join(path.trim_start_matches('/'));
    std::fs::metadata(&dir)
        .map(|m| m.ino())
        .map_err(|e| err(format!("{}: {e}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshlet_common::ipv4_mapped;

    #[test]
    fn connection_key_matches_kernel_layout() {
        let peer: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let key = connection_key(7, peer);
        // The kernel side builds the key from local_ip4 (network order) and local_port (host).
        let kernel = ConnectionKey::new(7, ipv4_mapped(u32::from_ne_bytes([127, 0, 0, 1])), 40000);
        assert_eq!(key, kernel);
        let v6: SocketAddr = "[::1]:5".parse().expect("addr");
        assert_eq!(
            connection_key(1, v6).ip,
            [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]
        );
    }

    #[test]
    fn original_destination_round_trip() {
        let original = OriginalDst {
            ip: ipv4_mapped(u32::from_ne_bytes([10, 244, 2, 2])),
            port: 8080,
            _pad: 0,
            _pad2: 0,
            netns_cookie: 3,
        };
        assert_eq!(
            original_to_socket_addr(&original),
            "10.244.2.2:8080".parse::<SocketAddr>().expect("addr")
        );
        let v6: Ipv6Addr = "fd00::7".parse().expect("v6");
        let original = OriginalDst {
            ip: octets_to_words(v6.octets()),
            ..original
        };
        assert_eq!(
            original_to_socket_addr(&original),
            SocketAddr::new(IpAddr::V6(v6), 8080)
        );
    }
}
