//! The agent's side of the CNI hand-off: `strait-cni` gives the agent each new pod's network
//! namespace (a descriptor), addresses and identity, and waits until the pod is enrolled or
//! decided not to be in the mesh. Protocol: `strait_cni::protocol`; docs/kubernetes.md,
//! "The CNI hand-off protocol".
//!
//! Two parts:
//!
//! - [`Registrations`], owned by the pod source's loop: the pods the plugin handed over, by
//!   container ID, each holding its namespace open (`/proc/self/fd/N` names it for the
//!   reconcile). Each is also written, 0600, to the state folder beside the socket, so an
//!   agent that restarts (or is killed) opens the same namespaces again by the runtime's path
//!   and loses no pod. A pod the plugin handed over needs neither a sandbox process nor
//!   `status.podIPs` yet: the CNI ADD comes before both.
//! - The server: a Unix socket, 0600 in a folder only root may write to, that answers only
//!   root peers (SO_PEERCRED). One thread per connection (bounded); an ADD is answered once the
//!   published `/workloads` state shows the pod enrolled in the namespace it came with (same
//!   inode) or skipped for a reason that does not depend on the sandbox (namespace not in the
//!   mesh, no or several VirtualNodes).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt as _;
use serde::{Deserialize, Serialize};
use strait_cni::protocol::{self, Op, Outcome, PodRef, Reply, Request};
use tokio::sync::mpsc;

use crate::admin;

/// Connections served at once; more are answered `refused` at once.
const MAX_CONNECTIONS: usize = 64;
/// The longest an ADD is held, whatever the plugin asks.
const MAX_WAIT: Duration = Duration::from_secs(120);
/// DEL waits at most this long for the release to show.
const DEL_WAIT: Duration = Duration::from_secs(5);
/// How often the published state is looked at while a request waits.
const POLL: Duration = Duration::from_millis(20);
/// How long a released namespace descriptor stays open (see `kubernetes::RETIRE_AFTER`).
const RETIRE_AFTER: Duration = Duration::from_secs(30);
/// `ioctl(NS_GET_NSTYPE)`: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot serve the CNI socket {path}; check --cni-socket and that its folder is writable"
    )]
    Serve {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the CNI socket's folder {dir} is writable by group or others (mode {mode:03o}): anyone could replace the socket; use a folder only root may write to (`chmod 700`)"
    )]
    UnsafeFolder { dir: PathBuf, mode: u32 },
}

/// One pod the plugin handed over.
#[derive(Debug)]
pub struct Registration {
    pub saved: Saved,
    netns: File,
}

/// What is kept of a registration on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Saved {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    /// The runtime's path of the namespace (`CNI_NETNS`).
    pub netns: String,
    /// The namespace's (device, inode), to recognise it when opened again.
    pub netns_id: (u64, u64),
    pub ips: Vec<IpAddr>,
    pub pod: PodRef,
    /// Order of arrival: the newest registration of a pod wins.
    pub seq: u64,
}

impl Registration {
    /// A path that opens the namespace while the registration lives.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.netns.as_raw_fd()))
    }
}

/// What the server asks of the pod source's loop. Each carries where to say it is done (the
/// snapshot with the change has been published).
pub enum Command {
    Add(Registration, std::sync::mpsc::SyncSender<()>),
    /// Releases a container; answers whether the pod has no registration left.
    Del {
        container_id: String,
        pod: Option<PodRef>,
        done: std::sync::mpsc::SyncSender<bool>,
    },
    /// Forgets every container not listed.
    Gc {
        valid: BTreeSet<String>,
        done: std::sync::mpsc::SyncSender<()>,
    },
    /// Reads the state folder again for hand-overs saved since this agent started: those the
    /// previous agent took during an upgrade, before it handed over.
    Rescan,
}

/// The pod source's view of a pod's CNI hand-over.
#[derive(Debug)]
pub enum View<'a> {
    /// No hand-over: the sandbox is looked for as without the plugin.
    None,
    Registered(&'a Registration),
    /// The plugin's DEL tore the pod's network down: not to be enrolled.
    Released,
}

/// The registrations, and the state folder that keeps them across restarts.
pub struct Registrations {
    state_dir: PathBuf,
    by_container: BTreeMap<String, Registration>,
    /// Pods (UID, else `namespace/name`) whose last container was deleted.
    released: BTreeSet<String>,
    retired: Vec<(Instant, Registration)>,
    next_seq: u64,
}

fn pod_key(pod: &PodRef) -> String {
    pod.uid
        .clone()
        .unwrap_or_else(|| format!("{}/{}", pod.namespace, pod.name))
}

/// Whether `registration` is for the API's `pod`.
fn same_pod(registration: &PodRef, pod: &Pod) -> bool {
    registration.namespace == pod.namespace().unwrap_or_default()
        && registration.name == pod.name_any()
        && registration
            .uid
            .as_deref()
            .is_none_or(|uid| Some(uid) == pod.metadata.uid.as_deref())
}

/// A container ID usable as a file name.
fn valid_container_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !id.starts_with('.')
}

fn netns_id(file: &File) -> io::Result<(u64, u64)> {
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// Whether the descriptor is a network namespace.
fn is_netns(fd: &impl std::os::fd::AsRawFd) -> bool {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor's namespace type.
    let kind = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    kind == libc::CLONE_NEWNET
}

/// The state folder for a socket: `<folder>/<socket stem>.pods`.
pub fn state_dir(socket: &Path) -> PathBuf {
    let stem = socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "cni".into());
    socket
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!("{stem}.pods"))
}

impl Registrations {
    /// Opens again every registration a previous agent saved; one whose namespace is gone (or
    /// is another namespace now) is dropped.
    pub fn load(state_dir: PathBuf) -> Registrations {
        let mut registrations = Registrations {
            state_dir,
            by_container: BTreeMap::new(),
            released: BTreeSet::new(),
            retired: Vec::new(),
            next_seq: 0,
        };
        registrations.read_saved();
        registrations
    }

    /// Opens every saved hand-over not known yet.
    fn read_saved(&mut self) {
        let registrations = self;
        let Ok(entries) = std::fs::read_dir(&registrations.state_dir) else {
            return;
        };
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let known = path.file_stem().is_some_and(|id| {
                registrations
                    .by_container
                    .contains_key(&*id.to_string_lossy())
            });
            if known {
                continue;
            }
            let saved: Option<Saved> = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok());
            let reopened = saved.and_then(|saved| {
                let netns = File::open(&saved.netns).ok()?;
                (is_netns(&netns) && netns_id(&netns).ok()? == saved.netns_id)
                    .then_some(Registration { saved, netns })
            });
            match reopened {
                Some(registration) => {
                    tracing::info!(pod = %format!("{}/{}", registration.saved.pod.namespace, registration.saved.pod.name), container = %registration.saved.container_id, netns = %registration.saved.netns, "CNI hand-over kept from before the restart");
                    registrations.next_seq = registrations.next_seq.max(registration.saved.seq + 1);
                    registrations
                        .by_container
                        .insert(registration.saved.container_id.clone(), registration);
                }
                None => {
                    tracing::info!(file = %path.display(), "dropping a saved CNI hand-over whose network namespace is gone");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }

    fn file(&self, container_id: &str) -> PathBuf {
        self.state_dir.join(format!("{container_id}.json"))
    }

    fn save(&self, saved: &Saved) -> io::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.state_dir)?;
        let path = self.file(&saved.container_id);
        let tmp = path.with_extension("tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        file.write_all(&serde_json::to_vec(saved).map_err(io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    fn forget(&mut self, container_id: &str) -> Option<PodRef> {
        let registration = self.by_container.remove(container_id)?;
        let _ = std::fs::remove_file(self.file(container_id));
        let pod = registration.saved.pod.clone();
        self.retired.push((Instant::now(), registration));
        Some(pod)
    }

    fn has_pod(&self, pod: &PodRef) -> bool {
        self.by_container
            .values()
            .any(|r| pod_key(&r.saved.pod) == pod_key(pod))
    }

    /// Applies a command; its answer is sent by the caller once the snapshot is out.
    pub fn apply(&mut self, command: Command) -> Done {
        self.retired.retain(|(at, _)| at.elapsed() < RETIRE_AFTER);
        match command {
            Command::Add(mut registration, done) => {
                registration.saved.seq = self.next_seq;
                self.next_seq += 1;
                if let Err(error) = self.save(&registration.saved) {
                    tracing::warn!(folder = %self.state_dir.display(), %error, "cannot save the CNI hand-over: a restarted agent finds this pod through its sandbox process instead");
                }
                self.released.remove(&pod_key(&registration.saved.pod));
                let id = registration.saved.container_id.clone();
                if let Some(previous) = self.by_container.insert(id, registration) {
                    self.retired.push((Instant::now(), previous));
                }
                Done::Add(done)
            }
            Command::Del {
                container_id,
                pod,
                done,
            } => {
                let pod = self.forget(&container_id).or(pod);
                let released = match pod {
                    Some(pod) if !self.has_pod(&pod) => {
                        self.released.insert(pod_key(&pod));
                        true
                    }
                    Some(_) => false,
                    None => true,
                };
                Done::Del(done, released)
            }
            Command::Gc { valid, done } => {
                let stale: Vec<String> = self
                    .by_container
                    .keys()
                    .filter(|id| !valid.contains(*id))
                    .cloned()
                    .collect();
                for id in stale {
                    if let Some(pod) = self.forget(&id)
                        && !self.has_pod(&pod)
                    {
                        self.released.insert(pod_key(&pod));
                    }
                }
                Done::Gc(done)
            }
            Command::Rescan => {
                self.read_saved();
                Done::None
            }
        }
    }

    /// The hand-over of the API's `pod`: its newest registration, or its release.
    pub fn view(&self, pod: &Pod) -> View<'_> {
        let newest = self
            .by_container
            .values()
            .filter(|r| same_pod(&r.saved.pod, pod))
            .max_by_key(|r| r.saved.seq);
        if let Some(registration) = newest {
            return View::Registered(registration);
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
        if self.released.contains(&uid) || self.released.contains(&name) {
            View::Released
        } else {
            View::None
        }
    }

    /// Forgets releases of pods the API no longer lists.
    pub fn prune_released(&mut self, listed: &BTreeSet<String>) {
        self.released.retain(|key| listed.contains(key));
    }
}

/// A command's answer, sent once the snapshot it changed is published.
pub enum Done {
    Add(std::sync::mpsc::SyncSender<()>),
    Del(std::sync::mpsc::SyncSender<bool>, bool),
    Gc(std::sync::mpsc::SyncSender<()>),
    None,
}

impl Done {
    pub fn send(self) {
        match self {
            Done::Add(tx) | Done::Gc(tx) => {
                let _ = tx.try_send(());
            }
            Done::Del(tx, released) => {
                let _ = tx.try_send(released);
            }
            Done::None => {}
        }
    }
}

/// What the agent needs to serve the socket: where, and the way into the pod source.
#[derive(Clone)]
pub struct Handle {
    pub socket: PathBuf,
    pub commands: mpsc::UnboundedSender<Command>,
    pub stop: Stop,
}

/// Stops serving the plugin when a new agent takes over (an upgrade): the listener refuses new
/// connections (the plugin retries them until the new agent's socket is there) and requests
/// in progress are closed unanswered (the plugin asks the new agent again). Answering them
/// would mean answering from a pod list this agent no longer maintains.
#[derive(Clone, Default)]
pub struct Stop {
    stopped: Arc<std::sync::atomic::AtomicBool>,
    listener: Arc<std::sync::Mutex<Option<UnixListener>>>,
}

impl Stop {
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        let listener = self.listener.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(listener) = listener.as_ref() {
            // Only this agent holds the socket (it is never handed over): shutting it down
            // makes connects to it fail with ECONNREFUSED and wakes the accept loop.
            let _ =
                nix::sys::socket::shutdown(listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        tracing::info!("CNI socket: a new agent takes over; requests in progress go to it");
    }

    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

/// Makes the socket's folder (0700) or checks an existing one is not writable by others.
fn prepare_folder(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    let fail = |source| Error::Serve {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(fail)?;
    }
    let mode = std::fs::metadata(dir).map_err(fail)?.permissions().mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(Error::UnsafeFolder {
            dir: dir.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

impl Handle {
    /// Binds the socket (0600; a stale one is replaced) and answers the plugin from threads.
    /// `published` is the reconciled state the answers are read from.
    pub fn serve(&self, published: Arc<admin::State>) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = &self.socket;
        let fail = |source| Error::Serve {
            path: path.clone(),
            source,
        };
        if self.stop.stopped() {
            // Handed over before it ever served: the socket is the new agent's.
            return Ok(());
        }
        prepare_folder(path.parent().unwrap_or(Path::new("/")))?;
        // Hand-overs the previous agent took after this one read the state folder.
        let _ = self.commands.send(Command::Rescan);
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(fail(e)),
            _ => {}
        }
        let listener = UnixListener::bind(path).map_err(fail)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        tracing::info!(socket = %path.display(), "serving the CNI plugin");
        *self.stop.listener.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(listener.try_clone().map_err(fail)?);
        let commands = self.commands.clone();
        let stop = self.stop.clone();
        let busy = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("cni-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stop.stopped() {
                        // Closed unanswered: the plugin asks the new agent.
                        return;
                    }
                    let stream = match stream {
                        Ok(stream) => stream,
                        Err(error) => {
                            tracing::warn!(%error, "CNI socket: accept failed");
                            std::thread::sleep(Duration::from_millis(100));
                            continue;
                        }
                    };
                    if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                        busy.fetch_sub(1, Ordering::AcqRel);
                        let _ = protocol::send(
                            &stream,
                            &Reply::new(Outcome::Refused, "too many CNI requests at once"),
                            None,
                        );
                        continue;
                    }
                    let (commands, published, busy, stop) = (
                        commands.clone(),
                        published.clone(),
                        busy.clone(),
                        stop.clone(),
                    );
                    let spawned = std::thread::Builder::new()
                        .name("cni-request".into())
                        .spawn(move || {
                            serve_one(&stream, &commands, &published, &stop);
                            busy.fetch_sub(1, Ordering::AcqRel);
                        });
                    if let Err(error) = spawned {
                        tracing::warn!(%error, "CNI socket: cannot start a thread");
                    }
                }
            })
            .map_err(fail)?;
        Ok(())
    }
}

/// Why a peer of the CNI socket is refused.
#[derive(Debug, thiserror::Error)]
enum PeerRefused {
    #[error("cannot read the peer's credentials")]
    Credentials(#[source] nix::Error),
    #[error("the peer (pid {pid}) runs as uid {uid}, not as uid {ours}")]
    OtherUser { pid: i32, uid: u32, ours: u32 },
}

/// Only root (the runtime runs CNI plugins as root) may hand pods over.
fn check_peer(stream: &UnixStream) -> Result<(), PeerRefused> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials).map_err(PeerRefused::Credentials)?;
    // SAFETY: geteuid has no arguments and cannot fail.
    let ours = unsafe { libc::geteuid() };
    if cred.uid() != ours {
        return Err(PeerRefused::OtherUser {
            pid: cred.pid(),
            uid: cred.uid(),
            ours,
        });
    }
    Ok(())
}

fn serve_one(
    stream: &UnixStream,
    commands: &mpsc::UnboundedSender<Command>,
    published: &admin::State,
    stop: &Stop,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let reply = match check_peer(stream) {
        Err(reason) => {
            let reason = crate::logging::Chain(&reason).to_string();
            tracing::warn!("CNI socket: refused: {reason}");
            Reply::new(Outcome::Refused, reason)
        }
        Ok(()) => match protocol::receive::<Request>(stream) {
            Err(error) => Reply::new(
                Outcome::Refused,
                format!("cannot read the request: {error}"),
            ),
            Ok((request, fds)) => handle(request, fds, commands, published, stop),
        },
    };
    if stop.stopped() {
        tracing::info!("CNI socket: a request in progress is left to the new agent");
        return;
    }
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    if let Err(error) = protocol::send(stream, &reply, None) {
        tracing::warn!(%error, "CNI socket: cannot answer the plugin (it gave up?)");
    }
}

fn handle(
    request: Request,
    fds: Vec<OwnedFd>,
    commands: &mpsc::UnboundedSender<Command>,
    published: &admin::State,
    stop: &Stop,
) -> Reply {
    if request.version != protocol::VERSION {
        return Reply::new(
            Outcome::Refused,
            format!(
                "protocol version {} is not spoken by this agent (it speaks {}): install strait-cni from the same release as the agent",
                request.version,
                protocol::VERSION
            ),
        );
    }
    if stop.stopped() {
        return Reply::new(Outcome::Failed, "the agent handed over");
    }
    let wait =
        Duration::from_millis(request.timeout_ms).clamp(Duration::from_millis(100), MAX_WAIT);
    let deadline = Instant::now() + wait;
    match request.op {
        Op::Status => Reply::new(Outcome::Ready, "the agent takes pods"),
        Op::Gc => {
            let (done, wait_done) = std::sync::mpsc::sync_channel(1);
            let valid = request
                .valid_attachments
                .iter()
                .map(|a| a.container_id.clone())
                .collect();
            if commands.send(Command::Gc { valid, done }).is_err() {
                return Reply::new(Outcome::Failed, "the agent is stopping");
            }
            let _ = wait_done.recv_timeout(wait);
            Reply::new(Outcome::Released, "")
        }
        Op::Del => {
            let (done, wait_done) = std::sync::mpsc::sync_channel(1);
            let pod = request.pod.clone();
            let del = Command::Del {
                container_id: request.container_id.clone(),
                pod: pod.clone(),
                done,
            };
            if commands.send(del).is_err() {
                return Reply::new(Outcome::Failed, "the agent is stopping");
            }
            let released = wait_done.recv_timeout(wait).unwrap_or(false);
            if let (true, Some(pod)) = (released, pod) {
                let key = format!("{}/{}", pod.namespace, pod.name);
                let deadline = Instant::now() + wait.min(DEL_WAIT);
                while status(published, &key).is_some_and(|s| s.enrolled) {
                    if Instant::now() >= deadline || stop.stopped() {
                        return Reply::new(
                            Outcome::Released,
                            format!("{key} is still being released"),
                        );
                    }
                    std::thread::sleep(POLL);
                }
                tracing::info!(pod = %key, container = %request.container_id, "CNI DEL: pod released");
            }
            Reply::new(Outcome::Released, "")
        }
        Op::Add | Op::Check => {
            let Some(pod) = request.pod.clone() else {
                return Reply::new(
                    Outcome::Refused,
                    "the request names no pod (K8S_POD_NAMESPACE, K8S_POD_NAME)",
                );
            };
            let Some(netns) = fds.into_iter().next().map(File::from) else {
                return Reply::new(
                    Outcome::Refused,
                    "no network namespace descriptor came with the request",
                );
            };
            if !is_netns(&netns) {
                return Reply::new(
                    Outcome::Refused,
                    "the descriptor that came with the request is not a network namespace",
                );
            }
            let Ok(id) = netns_id(&netns) else {
                return Reply::new(
                    Outcome::Refused,
                    "cannot stat the network namespace descriptor",
                );
            };
            let key = format!("{}/{}", pod.namespace, pod.name);
            if request.op == Op::Check {
                return decide(published, &key, id.1)
                    .unwrap_or_else(|reason| Reply::new(Outcome::Failed, reason));
            }
            if !valid_container_id(&request.container_id) {
                return Reply::new(
                    Outcome::Refused,
                    format!(
                        "container ID `{}` is not a runtime's container ID ([A-Za-z0-9_.-])",
                        request.container_id
                    ),
                );
            }
            let registration = Registration {
                saved: Saved {
                    container_id: request.container_id.clone(),
                    ifname: request.ifname.clone(),
                    netns: request.netns.clone(),
                    netns_id: id,
                    ips: request.ips.clone(),
                    pod: pod.clone(),
                    seq: 0,
                },
                netns,
            };
            let (done, wait_done) = std::sync::mpsc::sync_channel(1);
            if commands.send(Command::Add(registration, done)).is_err() {
                return Reply::new(Outcome::Failed, "the agent is stopping");
            }
            let _ = wait_done.recv_timeout(wait);
            tracing::info!(pod = %key, container = %request.container_id, ips = ?request.ips, "CNI ADD: waiting for the pod to be enrolled");
            let started = Instant::now();
            loop {
                if stop.stopped() {
                    return Reply::new(Outcome::Failed, "the agent handed over");
                }
                let decision = decide(published, &key, id.1);
                match decision {
                    Ok(reply) => {
                        tracing::info!(pod = %key, outcome = ?reply.outcome, waited_ms = started.elapsed().as_millis() as u64, "CNI ADD answered");
                        return reply;
                    }
                    Err(reason) if Instant::now() >= deadline => {
                        tracing::warn!(pod = %key, "CNI ADD: not enrolled in time: {reason}");
                        return Reply::new(Outcome::Failed, reason);
                    }
                    Err(_) => std::thread::sleep(POLL),
                }
            }
        }
    }
}

fn status(published: &admin::State, key: &str) -> Option<admin::WorkloadStatus> {
    published
        .workloads
        .load()
        .iter()
        .find(|s| s.pod == key)
        .cloned()
}

/// The answer the published state gives for the pod in namespace `inode`, or why there is
/// none yet.
fn decide(published: &admin::State, key: &str, inode: u64) -> Result<Reply, String> {
    let Some(status) = status(published, key) else {
        return Err(format!(
            "the Pod object {key} is not in the API (or not on this node) yet"
        ));
    };
    if status.enrolled && status.netns_inode == Some(inode) {
        let mut reply = Reply::new(Outcome::Enrolled, "");
        reply.virtual_node = status.virtual_node;
        return Ok(reply);
    }
    // No VirtualNode was chosen: the mesh's rules decided, whatever the sandbox.
    if !status.enrolled
        && status.virtual_node.is_none()
        && status.error.is_none()
        && let Some(reason) = status.reason
    {
        return Ok(Reply::new(Outcome::NotInMesh, reason));
    }
    Err(if status.enrolled {
        "enrolled in another network namespace (an older sandbox); waiting for the new one"
            .to_string()
    } else {
        status
            .error
            .or(status.reason)
            .unwrap_or_else(|| "not enrolled yet".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn registration(container: &str, uid: Option<&str>) -> Registration {
        let netns = File::open("/proc/self/ns/net").unwrap();
        Registration {
            saved: Saved {
                container_id: container.into(),
                ifname: "eth0".into(),
                netns: "/proc/self/ns/net".into(),
                netns_id: netns_id(&netns).unwrap(),
                ips: vec!["10.0.0.2".parse().unwrap()],
                pod: PodRef {
                    namespace: "shop".into(),
                    name: "cart".into(),
                    uid: uid.map(str::to_owned),
                },
                seq: 0,
            },
            netns,
        }
    }

    #[test]
    fn a_rescan_takes_the_hand_overs_the_previous_agent_saved_after_this_one_started() {
        // During a surge upgrade the old agent still takes ADDs after the new one read the
        // state folder; the new one reads it again when it starts serving the plugin.
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("cni.pods");
        let cart = pod(
            serde_json::json!({"metadata": {"name": "cart", "namespace": "shop", "uid": "u1"}}),
        );
        let mut old = Registrations::load(state.clone());
        let mut new = Registrations::load(state.clone());
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        old.apply(Command::Add(registration("aaa", Some("u1")), tx))
            .send();
        assert!(matches!(new.view(&cart), View::None));
        new.apply(Command::Rescan).send();
        assert!(matches!(new.view(&cart), View::Registered(r) if r.saved.container_id == "aaa"));
        // Known ones stay as they are (not opened twice).
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        new.apply(Command::Add(registration("bbb", Some("u1")), tx))
            .send();
        new.apply(Command::Rescan).send();
        assert_eq!(new.by_container.len(), 2);
        assert!(matches!(new.view(&cart), View::Registered(r) if r.saved.container_id == "bbb"));
    }

    #[test]
    fn registrations_survive_a_restart_and_del_releases_the_pod() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("cni.pods");
        let cart = pod(
            serde_json::json!({"metadata": {"name": "cart", "namespace": "shop", "uid": "u1"}}),
        );
        let other_uid = pod(
            serde_json::json!({"metadata": {"name": "cart", "namespace": "shop", "uid": "u0"}}),
        );
        let mut regs = Registrations::load(state.clone());
        assert!(matches!(regs.view(&cart), View::None));
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        regs.apply(Command::Add(registration("aaa", Some("u1")), tx))
            .send();
        assert!(matches!(regs.view(&cart), View::Registered(r) if r.saved.container_id == "aaa"));
        // An older pod of the same name is not this one.
        assert!(matches!(regs.view(&other_uid), View::None));
        // A newer sandbox of the same pod wins.
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        regs.apply(Command::Add(registration("bbb", Some("u1")), tx))
            .send();
        assert!(matches!(regs.view(&cart), View::Registered(r) if r.saved.container_id == "bbb"));
        assert!(state.join("bbb.json").exists());
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(
            std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            std::fs::metadata(state.join("bbb.json"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );

        // A restarted agent opens both again, in the same order.
        let mut again = Registrations::load(state.clone());
        assert!(matches!(again.view(&cart), View::Registered(r) if r.saved.container_id == "bbb"));
        // A saved namespace that is gone is dropped.
        let mut stale = registration("ccc", None).saved;
        stale.netns = "/nonexistent/netns".into();
        std::fs::write(state.join("ccc.json"), serde_json::to_vec(&stale).unwrap()).unwrap();
        let reloaded = Registrations::load(state.clone());
        assert_eq!(reloaded.by_container.len(), 2);
        assert!(!state.join("ccc.json").exists());

        // DEL of the old sandbox keeps the pod; DEL of the last one releases it.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        again
            .apply(Command::Del {
                container_id: "aaa".into(),
                pod: None,
                done: tx,
            })
            .send();
        assert!(!rx.recv().unwrap());
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        again
            .apply(Command::Del {
                container_id: "bbb".into(),
                pod: None,
                done: tx,
            })
            .send();
        assert!(rx.recv().unwrap());
        assert!(matches!(again.view(&cart), View::Released));
        assert!(!state.join("bbb.json").exists());
        // DEL again: idempotent.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        again
            .apply(Command::Del {
                container_id: "bbb".into(),
                pod: None,
                done: tx,
            })
            .send();
        assert!(rx.recv().unwrap());
        // A new ADD for the pod clears the release; GC drops what the runtime no longer has.
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        again
            .apply(Command::Add(registration("ddd", Some("u1")), tx))
            .send();
        assert!(matches!(again.view(&cart), View::Registered(_)));
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        again
            .apply(Command::Gc {
                valid: BTreeSet::new(),
                done: tx,
            })
            .send();
        assert!(matches!(again.view(&cart), View::Released));
        again.prune_released(&BTreeSet::new());
        assert!(matches!(again.view(&cart), View::None));
    }

    /// Connects to `socket` as `uid` (a real process through setpriv), waits for the agent's
    /// side to be accepted, and returns what the peer check says about it.
    fn peer_check_for(uid: u32) -> Result<(), PeerRefused> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        // Open to everyone only for this test: the peer check is the layer under test.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let socket = dir.path().join("cni.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
        let script = format!(
            "import socket,time; s=socket.socket(socket.AF_UNIX); s.connect('{}'); time.sleep(2)",
            socket.display()
        );
        let mut client = std::process::Command::new("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                "/usr/bin/python3".into(),
                "-c".into(),
                script,
            ])
            .spawn()
            .expect("setpriv (util-linux) and /usr/bin/python3 are needed; run as root");
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(_) if Instant::now() < deadline => std::thread::sleep(POLL),
                Err(e) => panic!("the client never connected (are the tests run as root?): {e}"),
            }
        };
        let result = check_peer(&stream);
        let _ = client.kill();
        let _ = client.wait();
        result
    }

    #[test]
    fn only_root_may_hand_pods_over() {
        let refused = peer_check_for(65534).unwrap_err();
        assert!(refused.to_string().contains("uid 65534"), "{refused}");
        peer_check_for(0).unwrap();
    }

    #[test]
    fn only_network_namespaces_are_taken() {
        assert!(is_netns(&File::open("/proc/self/ns/net").unwrap()));
        assert!(!is_netns(&File::open("/proc/self/ns/mnt").unwrap()));
        assert!(!is_netns(&File::open("/dev/null").unwrap()));
        assert!(valid_container_id("3f4e_a-1.b"));
        assert!(!valid_container_id("../etc/passwd"));
        assert!(!valid_container_id(""));
        assert_eq!(
            state_dir(Path::new("/run/strait/cni.sock")),
            PathBuf::from("/run/strait/cni.pods")
        );
    }
}
