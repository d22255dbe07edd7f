//! A test Kubernetes API server: Pods, Namespaces and Nodes (core/v1), list and watch, the way
//! kube-apiserver answers them, so the agent's real kube-rs client runs against it unchanged.
//!
//! No real kube-apiserver, kind, k3s or envtest binary is available here, so this server
//! implements the parts of the API contract a list-and-watch client depends on:
//!
//! - `GET /api/v1/{pods,namespaces,nodes}` and `GET /api/v1/namespaces/<ns>/pods`: a list with
//!   `metadata.resourceVersion`; `limit` and `continue` paginate a consistent snapshot; an
//!   expired `continue` token, or `resourceVersionMatch=Exact` with a compacted version,
//!   answer HTTP 410 with a `Status` (reason `Expired`).
//! - `?watch=true`: chunked JSON lines `{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, ...}`
//!   with increasing resourceVersions. From a resourceVersion: every change after it; none
//!   or `0`: synthetic ADDED events for the current objects first. A resourceVersion older
//!   than the retained window (after [`KubeApi::compact`] or a restart) gets an ERROR event
//!   with a 410 `Status` and the end of the stream. `allowWatchBookmarks=true` gets BOOKMARK
//!   events; `timeoutSeconds` ends the watch.
//! - `fieldSelector` (`metadata.name`, `metadata.namespace`, and `spec.nodeName` for Pods;
//!   `=`, `==`, `!=`) and `labelSelector` (`=`, `==`, `!=`, `in`, `notin`, `key`, `!key`). An
//!   object that stops matching a watch's selectors is sent as DELETED, one that starts as
//!   ADDED, as kube-apiserver's watch cache does.
//!
//! - `GET /api/v1/namespaces/<ns>/pods/<name>` (and a Namespace or Node by name): the object,
//!   or 404 with a `Status` (reason `NotFound`).
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`: the TokenReview of a ServiceAccount
//!   token the test registered with [`KubeApi::register_token`] (a stand-in for one kubelet
//!   projected into a pod's volume), answered as kube-apiserver's ServiceAccount token
//!   authenticator does (see [`BoundToken`]).
//!
//! Not implemented: other writes over HTTP (tests change objects with [`KubeApi::apply`] and
//! [`KubeApi::delete`]), authentication of the API's own clients, TLS (the kubeconfig names an
//! `http://` server), other resources, `sendInitialEvents`, protobuf, server-side apply, table
//! output, token signatures and expiry (a token is an opaque string the test registered).
//!
//! Reaching it: the agent runs in a node's network namespace, so [`KubeApi::serve_in`] binds a
//! listener on 127.0.0.1 inside that namespace (one per node; all share the objects) and
//! [`KubeApi::kubeconfig`] writes a kubeconfig for it. [`KubeApi::stop`] closes the listeners
//! and every connection (an API outage); [`KubeApi::restart`] binds the same addresses again,
//! with the watch window starting afresh (a restarted kube-apiserver's watch cache starts at
//! the current resourceVersion, so older watches get 410).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::{Body, Frame};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::{Node, Pod};

/// A kind the server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Pod,
    Namespace,
    Node,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pod => "Pod",
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
        }
    }

    fn from_name(name: &str) -> Option<Kind> {
        match name {
            "Pod" => Some(Kind::Pod),
            "Namespace" => Some(Kind::Namespace),
            "Node" => Some(Kind::Node),
            _ => None,
        }
    }

    fn namespaced(self) -> bool {
        self == Kind::Pod
    }
}

type Key = (Kind, String, String);

/// One change in the server's history.
#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: Kind,
    /// The object before (None: created).
    old: Option<Value>,
    /// The object after; for a deletion, the deleted object with the deletion's version.
    new: Value,
    deleted: bool,
}

struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Change>,
    /// Watches from a resourceVersion below this get 410.
    oldest: u64,
    /// Bumped to end every open watch (their connections stay; the streams end).
    generation: u64,
    /// Paginated lists in progress: token -> (resourceVersion, items still to send).
    continues: HashMap<String, (u64, Vec<Value>)>,
    bookmark_every: Duration,
    /// Ends watches after this long even if the client asked for longer.
    max_watch: Option<Duration>,
    /// `METHOD path?query` of every request, in order.
    requests: Vec<String>,
    /// ServiceAccount tokens TokenReview knows.
    tokens: HashMap<String, BoundToken>,
}

/// The audience kube-apiserver gives a token reviewed without `spec.audiences` (its
/// `--api-audiences`, as kubeadm sets them).
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// A ServiceAccount token bound to a pod, as kubelet gets one for a projected
/// `serviceAccountToken` volume (TokenRequest with a `boundObjectRef` to the pod). A review:
///
/// - unknown token: not authenticated, `error` `[invalid bearer token, ...]`;
/// - none of the token's audiences among the review's (`spec.audiences`, else
///   [`API_AUDIENCE`]): not authenticated, `token audiences [..] is invalid for the target
///   audiences [..]`;
/// - the bound pod gone, or replaced by one with another UID: not authenticated;
/// - else `authenticated: true`, `audiences`: the intersection, `user`: username
///   `system:serviceaccount:<ns>:<name>`, the ServiceAccount groups, and `extra` with the
///   pod's name and UID (`authentication.kubernetes.io/pod-name`, `pod-uid`), its node's
///   name (`node-name`, and `node-uid` when the Node object exists), and a `credential-id`.
#[derive(Debug, Clone)]
pub struct BoundToken {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub audiences: Vec<String>,
}

impl BoundToken {
    /// A token of `pod` (a Pod object: its namespace, name, UID and `spec.serviceAccountName`,
    /// `default` when unset) for `audiences`.
    pub fn for_pod(pod: &Value, audiences: &[&str]) -> BoundToken {
        let meta = &pod["metadata"];
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        BoundToken {
            namespace: text(&meta["namespace"]),
            service_account: pod["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or("default")
                .to_owned(),
            pod_name: text(&meta["name"]),
            pod_uid: text(&meta["uid"]),
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
        }
    }
}

impl State {
    fn apply(&mut self, mut object: Value) -> anyhow::Result<u64> {
        let kind = object["kind"]
            .as_str()
            .and_then(Kind::from_name)
            .with_context(|| format!("object without a served kind: {object}"))?;
        object["apiVersion"] = json!("v1");
        let name = object["metadata"]["name"]
            .as_str()
            .context("object without metadata.name")?
            .to_owned();
        let namespace = if kind.namespaced() {
            object["metadata"]["namespace"]
                .as_str()
                .context("Pod without metadata.namespace")?
                .to_owned()
        } else {
            String::new()
        };
        let key = (kind, namespace, name);
        let old = self.objects.get(&key).cloned();
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = match &old {
                Some(old) => old["metadata"]["uid"].clone(),
                None => json!(format!("00000000-0000-4000-8000-{rv:012x}")),
            };
        }
        self.objects.insert(key, object.clone());
        self.history.push_back(Change {
            rv,
            kind,
            old,
            new: object,
            deleted: false,
        });
        Ok(rv)
    }

    fn delete(&mut self, kind: Kind, namespace: &str, name: &str) -> anyhow::Result<u64> {
        let key = (kind, namespace.to_owned(), name.to_owned());
        let Some(old) = self.objects.remove(&key) else {
            bail!("no {} {namespace}/{name} to delete", kind.name());
        };
        self.rv += 1;
        let rv = self.rv;
        let mut new = old.clone();
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.history.push_back(Change {
            rv,
            kind,
            old: Some(old),
            new,
            deleted: true,
        });
        Ok(rv)
    }

    fn compact(&mut self) {
        self.oldest = self.rv;
        self.history.clear();
        let oldest = self.oldest;
        self.continues.retain(|_, (rv, _)| *rv >= oldest);
    }
}

struct Shared {
    state: Mutex<State>,
    /// Tells the watch streams that something changed (the new resourceVersion).
    changed: tokio::sync::watch::Sender<u64>,
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The tasks serving one address (accept loop and connections), to abort on a stop.
type Tasks = Arc<Mutex<Vec<tokio::task::AbortHandle>>>;

/// One bound address, and the tasks serving it.
struct Listener {
    netns: PathBuf,
    addr: SocketAddr,
    tasks: Tasks,
}

/// The test API server. Dropping it stops it.
pub struct KubeApi {
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    listeners: Mutex<Vec<Listener>>,
}

impl KubeApi {
    /// A server with no objects (resourceVersion 1), not yet listening anywhere.
    pub fn new() -> anyhow::Result<KubeApi> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("start the test API server's runtime")?;
        let (changed, _) = tokio::sync::watch::channel(1);
        Ok(KubeApi {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    rv: 1,
                    objects: BTreeMap::new(),
                    history: VecDeque::new(),
                    oldest: 1,
                    generation: 0,
                    continues: HashMap::new(),
                    bookmark_every: Duration::from_secs(1),
                    max_watch: None,
                    requests: Vec::new(),
                    tokens: HashMap::new(),
                }),
                changed,
            }),
            runtime: Some(runtime),
            listeners: Mutex::new(Vec::new()),
        })
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until drop")
    }

    /// Serves the API on 127.0.0.1 (a free port) inside `node`'s network namespace; returns
    /// the address.
    pub fn serve_in(&self, node: &Node) -> anyhow::Result<SocketAddr> {
        let netns = node.netns_path();
        let std_listener = bind_in(&netns, "127.0.0.1:0".parse()?)?;
        let addr = std_listener.local_addr()?;
        let tasks = Arc::new(Mutex::new(Vec::new()));
        self.accept(std_listener, tasks.clone())?;
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Listener { netns, addr, tasks });
        Ok(addr)
    }

    fn accept(&self, std_listener: std::net::TcpListener, tasks: Tasks) -> anyhow::Result<()> {
        let _guard = self.runtime().enter();
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let shared = self.shared.clone();
        let conn_tasks = tasks.clone();
        let accept = self.runtime().spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = shared.clone();
                let handle = tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: Request<hyper::body::Incoming>| {
                            let shared = shared.clone();
                            async move {
                                if request.method() == hyper::Method::POST
                                    && request.uri().path() == TOKEN_REVIEWS
                                {
                                    lock(&shared)
                                        .requests
                                        .push(format!("POST {TOKEN_REVIEWS}?"));
                                    let body =
                                        http_body_util::Limited::new(request.into_body(), 1 << 20)
                                            .collect()
                                            .await
                                            .map(|b| b.to_bytes())
                                            .unwrap_or_default();
                                    return Ok::<_, Infallible>(token_review(&shared, &body));
                                }
                                Ok::<_, Infallible>(answer(&shared, &request))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                let mut tasks = conn_tasks.lock().unwrap_or_else(|e| e.into_inner());
                tasks.retain(|t| !t.is_finished());
                tasks.push(handle.abort_handle());
            }
        });
        tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(accept.abort_handle());
        Ok(())
    }

    /// Writes a kubeconfig for the listener `addr` (from [`KubeApi::serve_in`]) into `dir`.
    pub fn kubeconfig(&self, addr: SocketAddr, dir: &Path) -> anyhow::Result<PathBuf> {
        let path = dir.join(format!("kubeconfig-{}", addr.port()));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: http://{addr}\n\
             users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
             current-context: test\n"
        );
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// An outage: closes every listener and connection (open watches end without a word).
    /// Changes made meanwhile are kept, as etcd keeps them.
    pub fn stop(&self) {
        for listener in self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            for task in listener
                .tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..)
            {
                task.abort();
            }
        }
    }

    /// Serves again on the same addresses. Like a restarted kube-apiserver, whose watch cache
    /// starts at the current resourceVersion: watches from before get 410.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.compact();
        let listeners: Vec<(PathBuf, SocketAddr, Tasks)> = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|l| (l.netns.clone(), l.addr, l.tasks.clone()))
            .collect();
        for (netns, addr, tasks) in listeners {
            // The port was just closed; rebinding it may take a moment (bounded).
            let deadline = Instant::now() + Duration::from_secs(5);
            let std_listener = loop {
                match bind_in(&netns, addr) {
                    Ok(l) => break l,
                    Err(e) if Instant::now() >= deadline => {
                        return Err(e.context(format!("rebind {addr}")));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            };
            self.accept(std_listener, tasks)?;
        }
        Ok(())
    }

    /// Creates or replaces an object (`kind`, `metadata.name`, and `metadata.namespace` for a
    /// Pod, are required); returns its new resourceVersion.
    pub fn apply(&self, object: Value) -> anyhow::Result<u64> {
        let rv = lock(&self.shared).apply(object)?;
        self.shared.changed.send_replace(rv);
        Ok(rv)
    }

    /// Deletes an object; an error if there is none.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> anyhow::Result<u64> {
        let rv = lock(&self.shared).delete(kind, namespace, name)?;
        self.shared.changed.send_replace(rv);
        Ok(rv)
    }

    /// The object as stored, if any.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        lock(&self.shared)
            .objects
            .get(&(kind, namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Forgets the history up to now (etcd compaction): a watch or a list continuation from an
    /// earlier resourceVersion gets 410 Gone. Open watches go on (as with etcd).
    pub fn compact(&self) {
        lock(&self.shared).compact();
    }

    /// Ends every open watch stream now (as when kube-apiserver closes watches on a
    /// restart or a load balancer drops them); clients watch again from their last version.
    pub fn end_watches(&self) {
        lock(&self.shared).generation += 1;
        let rv = lock(&self.shared).rv;
        self.shared.changed.send_replace(rv);
    }

    /// Applies `objects` and deletes `deletions` the way a client misses them: every open
    /// watch ends first, and the history is compacted right after, in one step, so no watch
    /// sees the change; clients watch again from their last version, get 410 Gone, and learn
    /// the change only by listing again.
    pub fn change_behind_expired_watches(
        &self,
        objects: Vec<Value>,
        deletions: &[(Kind, &str, &str)],
    ) -> anyhow::Result<()> {
        let mut state = lock(&self.shared);
        state.generation += 1;
        for object in objects {
            state.apply(object)?;
        }
        for (kind, namespace, name) in deletions {
            state.delete(*kind, namespace, name)?;
        }
        state.compact();
        let rv = state.rv;
        drop(state);
        self.shared.changed.send_replace(rv);
        Ok(())
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK (default 1 s).
    pub fn set_bookmark_interval(&self, every: Duration) {
        lock(&self.shared).bookmark_every = every;
    }

    /// Ends every watch after `limit` at most, whatever its `timeoutSeconds`.
    pub fn set_max_watch(&self, limit: Option<Duration>) {
        lock(&self.shared).max_watch = limit;
    }

    /// `METHOD path?query` of every request so far.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared).requests.clone()
    }

    /// Makes `token` a valid ServiceAccount token bound as `bound` says, for TokenReview.
    pub fn register_token(&self, token: &str, bound: BoundToken) {
        lock(&self.shared).tokens.insert(token.to_owned(), bound);
    }

    /// Makes `token` invalid, as when it expired: TokenReview no longer knows it.
    pub fn revoke_token(&self, token: &str) {
        lock(&self.shared).tokens.remove(token);
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared).rv
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.stop();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// A Pod object for a testbed pod on `node_name`, Running, with the pod's UID, labels,
/// addresses and QoS class (so its cgroup is where kubelet would put it).
pub fn pod_object(pod: &Pod) -> Value {
    json!({
        "kind": "Pod",
        "metadata": {
            "name": pod.name(),
            "namespace": pod.namespace(),
            "uid": pod.uid(),
            "labels": pod.labels(),
        },
        "spec": {
            "nodeName": pod.node_name(),
            "containers": [{"name": "app", "image": "app"}, {"name": "sidecar", "image": "sidecar"}],
        },
        "status": {
            "phase": "Running",
            "podIP": pod.ipv4().to_string(),
            "podIPs": pod.ips().iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
            "qosClass": pod.qos_class().kubernetes_name(),
        },
    })
}

/// A Namespace object.
pub fn namespace_object(name: &str, labels: &[(&str, &str)]) -> Value {
    let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
    json!({"kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// A Node object for a testbed node: its underlay addresses as InternalIP.
pub fn node_object(node: &Node) -> Value {
    json!({
        "kind": "Node",
        "metadata": {"name": node.name(), "labels": {"kubernetes.io/hostname": node.name()}},
        "status": {"addresses": [
            {"type": "InternalIP", "address": node.underlay_ip().to_string()},
            {"type": "InternalIP", "address": node.underlay_ipv6().to_string()},
            {"type": "Hostname", "address": node.name()},
        ]},
    })
}

/// The Pod object of `node`'s strait agent as the DaemonSet makes it (host network, the
/// template's labels), with the `Ready` condition kubelet sets from the agent's `/ready` probe.
pub fn agent_pod_object(node: &Node, ready: bool) -> Value {
    json!({
        "kind": "Pod",
        "metadata": {
            "name": format!("strait-{}", node.name()),
            "namespace": "strait",
            "uid": format!("00000000-0000-4000-8000-0000000000{:02x}", node.index()),
            "labels": {"app.kubernetes.io/name": "strait", "app.kubernetes.io/part-of": "strait"},
        },
        "spec": {
            "nodeName": node.name(),
            "hostNetwork": true,
            "containers": [{"name": "agent", "image": "strait"}],
        },
        "status": {
            "phase": "Running",
            "podIP": node.underlay_ip().to_string(),
            "podIPs": [{"ip": node.underlay_ip().to_string()}],
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    })
}

/// Binds a TCP listener inside the network namespace at `netns` (from a thread that enters
/// it and ends: a socket keeps the namespace it was made in).
fn bind_in(netns: &Path, addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let file = std::fs::File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    let netns = netns.to_path_buf();
    std::thread::spawn(move || -> anyhow::Result<std::net::TcpListener> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: setns on a valid namespace fd; it changes only this thread, which ends here.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("enter {}", netns.display()));
        }
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(64)?;
        socket.set_nonblocking(true)?;
        Ok(socket.into())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread binding the API listener panicked"))?
}

type ResponseBody = BoxBody<Bytes, Infallible>;

/// A streamed response body: the chunks a watch task sends.
struct Chunks(tokio::sync::mpsc::Receiver<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|c| c.map(|b| Ok(Frame::data(b))))
    }
}

fn respond(code: StatusCode, value: &Value) -> Response<ResponseBody> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed())
        .expect("static response parts are valid")
}

/// A `Status` object as kube-apiserver sends it for a failure.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn failure(code: u16, reason: &str, message: &str) -> Response<ResponseBody> {
    respond(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &status(code, reason, message),
    )
}

/// Decodes `application/x-www-form-urlencoded` query parameters.
fn query_params(query: &str) -> HashMap<String, String> {
    fn decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(b) => {
                            out.push(b);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

/// Which objects a request is about.
struct Filter {
    kind: Kind,
    namespace: Option<String>,
    fields: Vec<(String, bool, String)>,
    labels: Vec<LabelRequirement>,
}

enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        let field_ok = self.fields.iter().all(|(field, equal, value)| {
            let actual = match field.as_str() {
                "metadata.name" => meta["name"].as_str(),
                "metadata.namespace" => meta["namespace"].as_str(),
                "spec.nodeName" => object["spec"]["nodeName"].as_str(),
                _ => None,
            }
            .unwrap_or("");
            (actual == value) == *equal
        });
        let labels = &meta["labels"];
        let label = |k: &str| labels[k].as_str();
        field_ok
            && self.labels.iter().all(|r| match r {
                LabelRequirement::Equals(k, v) => label(k) == Some(v),
                LabelRequirement::NotEquals(k, v) => label(k) != Some(v),
                LabelRequirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
                LabelRequirement::NotIn(k, vs) => {
                    label(k).is_none_or(|l| !vs.iter().any(|v| v == l))
                }
                LabelRequirement::Exists(k) => label(k).is_some(),
                LabelRequirement::NotExists(k) => label(k).is_none(),
            })
    }
}

fn parse_fields(kind: Kind, selector: &str) -> Result<Vec<(String, bool, String)>, String> {
    let mut fields = Vec::new();
    for term in selector.split(',').filter(|t| !t.is_empty()) {
        let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
            (f, false, v)
        } else if let Some((f, v)) = term.split_once("==") {
            (f, true, v)
        } else if let Some((f, v)) = term.split_once('=') {
            (f, true, v)
        } else {
            return Err(format!(
                "invalid selector: '{selector}'; can't understand '{term}'"
            ));
        };
        let supported = matches!(field, "metadata.name")
            || (kind.namespaced() && field == "metadata.namespace")
            || (kind == Kind::Pod && field == "spec.nodeName");
        if !supported {
            return Err(format!("field label not supported: {field}"));
        }
        fields.push((field.to_owned(), equal, value.to_owned()));
    }
    Ok(fields)
}

fn parse_labels(selector: &str) -> Result<Vec<LabelRequirement>, String> {
    // Split on commas outside parentheses.
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    let set = |rest: &str| -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| format!("invalid label selector set in '{selector}'"))?;
        Ok(inner.split(',').map(|v| v.trim().to_owned()).collect())
    };
    let mut requirements = Vec::new();
    for term in terms.into_iter().map(str::trim).filter(|t| !t.is_empty()) {
        let requirement = if let Some((k, v)) = term.split_once("!=") {
            LabelRequirement::NotEquals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once("==") {
            LabelRequirement::Equals(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = term.split_once('=') {
            LabelRequirement::Equals(k.trim().into(), v.trim().into())
        } else if let Some((k, rest)) = term.split_once(" notin ") {
            LabelRequirement::NotIn(k.trim().into(), set(rest)?)
        } else if let Some((k, rest)) = term.split_once(" in ") {
            LabelRequirement::In(k.trim().into(), set(rest)?)
        } else if let Some(k) = term.strip_prefix('!') {
            LabelRequirement::NotExists(k.trim().into())
        } else if term
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            LabelRequirement::Exists(term.into())
        } else {
            return Err(format!("unable to parse requirement: '{term}'"));
        };
        requirements.push(requirement);
    }
    Ok(requirements)
}

/// The object as a list item: kube-apiserver leaves out `kind` and `apiVersion` there.
fn list_item(object: &Value) -> Value {
    let mut item = object.clone();
    if let Some(map) = item.as_object_mut() {
        map.remove("kind");
        map.remove("apiVersion");
    }
    item
}

/// Where TokenReviews are posted.
const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// Answers a TokenReview as kube-apiserver does (see [`BoundToken`]): 201 with the review and
/// its `status`; 400 for a body that is not a TokenReview or has no token.
fn token_review(shared: &Shared, body: &[u8]) -> Response<ResponseBody> {
    let Ok(review) = serde_json::from_slice::<Value>(body) else {
        return failure(400, "BadRequest", "the body is not a TokenReview object");
    };
    if review["kind"] != "TokenReview" || review["apiVersion"] != "authentication.k8s.io/v1" {
        return failure(
            400,
            "BadRequest",
            &format!(
                "the body is a {} {}, not a TokenReview authentication.k8s.io/v1",
                review["kind"], review["apiVersion"]
            ),
        );
    }
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    if token.is_empty() {
        return failure(
            400,
            "BadRequest",
            "token is required for TokenReview in authentication",
        );
    }
    let wanted: Vec<String> = match review["spec"]["audiences"].as_array() {
        Some(list) if !list.is_empty() => list
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect(),
        _ => vec![API_AUDIENCE.to_owned()],
    };
    let state = lock(shared);
    let status = match state.tokens.get(token) {
        None => json!({"user": {}, "error": "[invalid bearer token, token lookup failed]"}),
        Some(bound) => {
            let common: Vec<&String> = bound
                .audiences
                .iter()
                .filter(|a| wanted.contains(a))
                .collect();
            let pod =
                state
                    .objects
                    .get(&(Kind::Pod, bound.namespace.clone(), bound.pod_name.clone()));
            if common.is_empty() {
                json!({"user": {}, "error": format!(
                    "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                    bound.audiences, wanted
                )})
            } else if pod.is_none_or(|p| p["metadata"]["uid"] != bound.pod_uid.as_str()) {
                json!({"user": {}, "error": format!(
                    "[invalid bearer token, pod \"{}\" (uid {}) is not found, token has been invalidated]",
                    bound.pod_name, bound.pod_uid
                )})
            } else {
                let node = pod
                    .and_then(|p| p["spec"]["nodeName"].as_str())
                    .unwrap_or_default()
                    .to_owned();
                let mut extra = json!({
                    "authentication.kubernetes.io/credential-id": [format!("JTI={}", token.len())],
                    "authentication.kubernetes.io/pod-name": [bound.pod_name],
                    "authentication.kubernetes.io/pod-uid": [bound.pod_uid],
                });
                if !node.is_empty() {
                    extra["authentication.kubernetes.io/node-name"] = json!([node]);
                    if let Some(n) = state
                        .objects
                        .get(&(Kind::Node, String::new(), node.clone()))
                    {
                        extra["authentication.kubernetes.io/node-uid"] =
                            json!([n["metadata"]["uid"].as_str().unwrap_or_default()]);
                    }
                }
                json!({
                    "authenticated": true,
                    "user": {
                        "username": format!("system:serviceaccount:{}:{}", bound.namespace, bound.service_account),
                        "uid": format!("00000000-0000-4000-9000-{:012x}", bound.service_account.len()),
                        "groups": [
                            "system:serviceaccounts",
                            format!("system:serviceaccounts:{}", bound.namespace),
                            "system:authenticated",
                        ],
                        "extra": extra,
                    },
                    "audiences": common,
                })
            }
        }
    };
    drop(state);
    respond(
        StatusCode::CREATED,
        &json!({
            "kind": "TokenReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": null},
            "spec": review["spec"],
            "status": status,
        }),
    )
}

/// One object by name: `GET /api/v1/namespaces/<ns>/pods/<name>`, `/api/v1/namespaces/<name>`,
/// `/api/v1/nodes/<name>`.
fn get_one(shared: &Shared, kind: Kind, namespace: &str, name: &str) -> Response<ResponseBody> {
    match lock(shared)
        .objects
        .get(&(kind, namespace.to_owned(), name.to_owned()))
    {
        Some(object) => respond(StatusCode::OK, object),
        None => {
            let plural = match kind {
                Kind::Pod => "pods",
                Kind::Namespace => "namespaces",
                Kind::Node => "nodes",
            };
            let mut body = status(404, "NotFound", &format!("{plural} \"{name}\" not found"));
            body["details"] = json!({"name": name, "kind": plural});
            respond(StatusCode::NOT_FOUND, &body)
        }
    }
}

fn answer<B>(shared: &Arc<Shared>, request: &Request<B>) -> Response<ResponseBody> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    lock(shared)
        .requests
        .push(format!("{} {path}?{query}", request.method()));
    if request.method() != hyper::Method::GET {
        return failure(405, "MethodNotAllowed", "the test API server only reads");
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", "v1", "namespaces", ns, "pods", name] => {
            return get_one(shared, Kind::Pod, ns, name);
        }
        ["api", "v1", "namespaces", name] => return get_one(shared, Kind::Namespace, "", name),
        ["api", "v1", "nodes", name] => return get_one(shared, Kind::Node, "", name),
        _ => {}
    }
    let (kind, namespace) = match segments.as_slice() {
        ["api", "v1", "pods"] => (Kind::Pod, None),
        ["api", "v1", "namespaces", ns, "pods"] => (Kind::Pod, Some((*ns).to_owned())),
        ["api", "v1", "namespaces"] => (Kind::Namespace, None),
        ["api", "v1", "nodes"] => (Kind::Node, None),
        _ => {
            return failure(
                404,
                "NotFound",
                &format!("the server could not find the requested resource ({path})"),
            );
        }
    };
    let params = query_params(&query);
    let filter = match (
        parse_fields(kind, params.get("fieldSelector").map_or("", String::as_str)),
        parse_labels(params.get("labelSelector").map_or("", String::as_str)),
    ) {
        (Ok(fields), Ok(labels)) => Filter {
            kind,
            namespace,
            fields,
            labels,
        },
        (Err(message), _) | (_, Err(message)) => return failure(400, "BadRequest", &message),
    };
    if params.get("watch").is_some_and(|w| w == "true" || w == "1") {
        watch(shared, filter, &params)
    } else {
        list(shared, &filter, &params)
    }
}

fn list(
    shared: &Shared,
    filter: &Filter,
    params: &HashMap<String, String>,
) -> Response<ResponseBody> {
    let mut state = lock(shared);
    let list_kind = format!("{}List", filter.kind.name());
    let limit: usize = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let (rv, mut items) = if let Some(token) = params.get("continue").filter(|t| !t.is_empty()) {
        match state.continues.remove(token) {
            Some((rv, items)) if rv >= state.oldest => (rv, items),
            _ => {
                return failure(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                );
            }
        }
    } else {
        let requested = params.get("resourceVersion").map(String::as_str);
        if params.get("resourceVersionMatch").map(String::as_str) == Some("Exact")
            && let Some(rv) = requested.and_then(|r| r.parse::<u64>().ok())
            && rv < state.oldest
        {
            return failure(
                410,
                "Expired",
                &format!("too old resource version: {rv} ({})", state.oldest),
            );
        }
        let items: Vec<Value> = state
            .objects
            .iter()
            .filter(|((k, _, _), o)| *k == filter.kind && filter.matches(o))
            .map(|(_, o)| list_item(o))
            .collect();
        (state.rv, items)
    };
    // resourceVersion=0 is served from the watch cache, which ignores limit.
    let from_cache = params.get("resourceVersion").is_some_and(|r| r == "0");
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if limit > 0 && !from_cache && items.len() > limit {
        let rest = items.split_off(limit);
        let token = format!("{rv}-{}", state.continues.len() + state.requests.len());
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(rest.len());
        state.continues.insert(token, (rv, rest));
    }
    respond(
        StatusCode::OK,
        &json!({"kind": list_kind, "apiVersion": "v1", "metadata": metadata, "items": items}),
    )
}

fn watch(
    shared: &Arc<Shared>,
    filter: Filter,
    params: &HashMap<String, String>,
) -> Response<ResponseBody> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true" || b == "1");
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs);
    let from = params
        .get("resourceVersion")
        .and_then(|r| r.parse::<u64>().ok())
        .filter(|r| *r != 0);
    let shared = shared.clone();
    tokio::spawn(async move {
        let line = |value: Value| {
            let mut text = value.to_string();
            text.push('\n');
            Bytes::from(text)
        };
        let mut changed = shared.changed.subscribe();
        let (mut cursor, generation, bookmark_every, deadline) = {
            let state = lock(&shared);
            let limit = match (timeout, state.max_watch) {
                (Some(t), Some(m)) => Some(t.min(m)),
                (t, m) => t.or(m),
            };
            (
                from,
                state.generation,
                state.bookmark_every,
                limit.map(|l| tokio::time::Instant::now() + l),
            )
        };
        // No resourceVersion (or 0): the current objects first, as ADDED.
        if cursor.is_none() {
            let (rv, initial) = {
                let state = lock(&shared);
                let objects: Vec<Value> = state
                    .objects
                    .iter()
                    .filter(|((k, _, _), o)| *k == filter.kind && filter.matches(o))
                    .map(|(_, o)| o.clone())
                    .collect();
                (state.rv, objects)
            };
            for object in initial {
                if tx
                    .send(line(json!({"type": "ADDED", "object": object})))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            cursor = Some(rv);
        }
        let mut cursor = cursor.unwrap_or(0);
        let mut next_bookmark = tokio::time::Instant::now() + bookmark_every;
        loop {
            let events: Result<Vec<Value>, Value> = {
                let state = lock(&shared);
                if state.generation != generation {
                    return;
                }
                if cursor < state.oldest {
                    Err(status(
                        410,
                        "Expired",
                        &format!("too old resource version: {cursor} ({})", state.oldest),
                    ))
                } else {
                    let mut out = Vec::new();
                    for change in state.history.iter().filter(|c| c.rv > cursor) {
                        if change.kind != filter.kind {
                            continue;
                        }
                        let was = change.old.as_ref().is_some_and(|o| filter.matches(o));
                        let is = filter.matches(&change.new);
                        let kind = match (change.deleted, was, is) {
                            (true, true, _) => "DELETED",
                            (true, false, _) => continue,
                            (false, false, true) => "ADDED",
                            (false, true, true) => "MODIFIED",
                            (false, true, false) => "DELETED",
                            (false, false, false) => continue,
                        };
                        out.push(json!({"type": kind, "object": change.new}));
                    }
                    cursor = state.rv;
                    Ok(out)
                }
            };
            match events {
                Err(expired) => {
                    let _ = tx
                        .send(line(json!({"type": "ERROR", "object": expired})))
                        .await;
                    return;
                }
                Ok(events) => {
                    for event in events {
                        if tx.send(line(event)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let sleep_until = match deadline {
                Some(d) if d < next_bookmark || !bookmarks => d,
                _ if bookmarks => next_bookmark,
                _ => tokio::time::Instant::now() + Duration::from_secs(3600),
            };
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep_until(sleep_until) => {}
                _ = tx.closed() => return,
            }
            let now = tokio::time::Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return;
            }
            if bookmarks && now >= next_bookmark {
                let rv = lock(&shared).rv.max(cursor);
                let bookmark = json!({"type": "BOOKMARK", "object": {
                    "kind": filter.kind.name(),
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": rv.to_string()},
                }});
                if tx.send(line(bookmark)).await.is_err() {
                    return;
                }
                next_bookmark = now + bookmark_every;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(Chunks(rx).boxed())
        .expect("static response parts are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_follow_the_api_rules() {
        let pod = json!({"metadata": {"name": "a", "namespace": "shop", "labels": {"app": "cart", "v": "1"}},
                         "spec": {"nodeName": "n1"}});
        let filter = |fields: &str, labels: &str| Filter {
            kind: Kind::Pod,
            namespace: None,
            fields: parse_fields(Kind::Pod, fields).unwrap(),
            labels: parse_labels(labels).unwrap(),
        };
        assert!(filter("spec.nodeName=n1", "").matches(&pod));
        assert!(!filter("spec.nodeName=n2", "").matches(&pod));
        assert!(filter("spec.nodeName!=n2,metadata.namespace=shop", "app=cart").matches(&pod));
        assert!(filter("", "app in (cart,web),v notin (2),app,!missing").matches(&pod));
        assert!(!filter("", "app in (web)").matches(&pod));
        assert!(parse_fields(Kind::Node, "spec.nodeName=n1").is_err());
        assert!(parse_fields(Kind::Pod, "status.phase=Running").is_err());
    }

    #[test]
    fn query_parameters_are_decoded() {
        let p = query_params(
            "fieldSelector=spec.nodeName%3Dn1&labelSelector=a+in+%28x%2Cy%29&watch=true",
        );
        assert_eq!(p["fieldSelector"], "spec.nodeName=n1");
        assert_eq!(p["labelSelector"], "a in (x,y)");
        assert_eq!(p["watch"], "true");
    }
}
