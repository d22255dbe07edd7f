//! The CNI side of `strait-cni`: what the container runtime sees (CNI spec 0.3.0 to 1.1.0).
//!
//! The plugin is chained: it runs after the plugin that gave the pod its interface and
//! addresses, takes that plugin's result (`prevResult`), hands the pod to the agent, and prints
//! the result back unchanged, byte for byte. Errors are the spec's error object on stdout with
//! a non-zero exit. Commands:
//!
//! - `ADD`: the pod (container ID, network namespace as a descriptor and a path, the addresses
//!   of `prevResult`, the pod's namespace, name and UID from `CNI_ARGS`) goes to the agent;
//!   the plugin returns once the agent has enrolled it or decided it is not in the mesh.
//! - `DEL`: the agent releases the pod. Never fails for want of an agent (the spec asks DEL to
//!   succeed when there is nothing left to remove, and the agent releases pods the API deleted).
//! - `CHECK` (0.4.0 and later): the agent confirms the pod is enrolled in this namespace, or
//!   not meant to be.
//! - `STATUS` (1.1.0): the agent answers; otherwise error 50 ("not available").
//! - `GC` (1.1.0): the agent forgets every pod not in `cni.dev/valid-attachments`.
//! - `VERSION`.
//!
//! When the agent cannot be reached or does not answer in time, `failPolicy` decides: `closed`
//! (the default) fails ADD with code 11 ("try again later"; the runtime retries the sandbox),
//! `open` lets the pod start uncaptured. See docs/kubernetes.md, "strait-cni".

use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::protocol::{self, Attachment, Op, Outcome, PodRef, Reply, Request};

/// Versions of the spec this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest, used when the configuration cannot be read.
pub const LATEST_VERSION: &str = "1.1.0";
/// How long ADD waits for the agent unless `timeoutSeconds` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// DEL and GC wait at most this long: they never fail for want of an agent.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a missing agent is tried again while the timeout runs.
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// The spec's well-known error codes.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// strait's own: the agent answered that the pod should be enrolled and is not.
    pub const NOT_ENROLLED: u32 = 100;
    /// strait's own: the agent refused the request.
    pub const REFUSED: u32 = 101;
}

/// A CNI error: printed as the spec's error object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    fn details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// The spec's error object.
    pub fn to_json(&self, cni_version: &str) -> String {
        let mut object = serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            object["details"] = Value::String(self.details.clone());
        }
        object.to_string()
    }
}

/// What to do when the agent cannot be asked or does not say yes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPolicy {
    /// Fail the CNI command: the pod does not start uncaptured.
    Closed,
    /// Let the pod start; its traffic is not captured until the agent finds it.
    Open,
}

/// The plugin's entry in the network configuration, checked.
#[derive(Debug, Clone)]
pub struct Config {
    pub cni_version: String,
    pub name: String,
    pub agent_socket: PathBuf,
    pub timeout: Duration,
    pub fail_policy: FailPolicy,
    /// Namespaces whose pods fail open even under `failPolicy: closed`.
    pub fail_open_namespaces: Vec<String>,
    /// Namespaces whose pods are never handed to the agent.
    pub exclude_namespaces: Vec<String>,
    /// GC: the attachments still in use.
    pub valid_attachments: Option<Vec<Attachment>>,
}

/// Only the raw `prevResult`, so it is printed exactly as received.
#[derive(Deserialize)]
struct RawPrev<'a> {
    #[serde(borrow, default, rename = "prevResult")]
    prev_result: Option<&'a RawValue>,
}

/// What one invocation printed and its exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    pub code: i32,
}

/// Runs one CNI invocation: `env` reads the environment, `stdin` is the configuration.
pub fn run(env: &dyn Fn(&str) -> Option<String>, stdin: &[u8]) -> Output {
    let mut stderr = String::new();
    // The error object names the configuration's version when there is one.
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_string());
    match dispatch(env, stdin, &mut stderr) {
        Ok(stdout) => Output {
            stdout,
            stderr,
            code: 0,
        },
        Err(error) => Output {
            stdout: error.to_json(&version),
            stderr,
            code: 1,
        },
    }
}

fn dispatch(
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &[u8],
    log: &mut String,
) -> Result<String, CniError> {
    let command = env("CNI_COMMAND")
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_ENVIRONMENT,
                "CNI_COMMAND is not set: strait-cni is a CNI plugin, run by the container runtime \
             (or `strait-cni install|uninstall`)",
            )
        })?;
    if command == "VERSION" {
        return Ok(serde_json::json!({
            "cniVersion": LATEST_VERSION,
            "supportedVersions": SUPPORTED_VERSIONS,
        })
        .to_string());
    }
    let (config, prev) = parse_config(stdin)?;
    let at_least = |version: &str| version_at_least(&config.cni_version, version);
    match command.as_str() {
        "ADD" => add(env, &config, prev, log),
        "DEL" => del(env, &config, log),
        "CHECK" if at_least("0.4.0") => check(env, &config, prev, log),
        "STATUS" | "GC" if at_least("1.1.0") => {
            if command == "STATUS" {
                status(&config, log)
            } else {
                gc(&config, log)
            }
        }
        "CHECK" | "STATUS" | "GC" => Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{command} is not part of CNI {} (cniVersion of network {}); CHECK needs 0.4.0, STATUS and GC need 1.1.0",
                config.cni_version, config.name
            ),
        )),
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!(
                "CNI_COMMAND: unknown command `{other}` (expected ADD, DEL, CHECK, STATUS, GC or VERSION)"
            ),
        )),
    }
}

/// `a >= b` for dotted versions.
fn version_at_least(a: &str, b: &str) -> bool {
    let parse = |v: &str| -> Vec<u32> { v.split('.').filter_map(|p| p.parse().ok()).collect() };
    parse(a) >= parse(b)
}

/// Reads and checks the configuration; every error names the field.
pub fn parse_config(stdin: &[u8]) -> Result<(Config, Option<&RawValue>), CniError> {
    let decode = |e: serde_json::Error| {
        CniError::new(
            code::DECODE,
            format!(
                "cannot decode the network configuration on stdin: line {}, column {}: {e}",
                e.line(),
                e.column()
            ),
        )
    };
    let value: Value = serde_json::from_slice(stdin).map_err(decode)?;
    let raw: RawPrev = serde_json::from_slice(stdin).map_err(decode)?;
    let object = value.as_object().ok_or_else(|| {
        CniError::new(
            code::DECODE,
            "the network configuration on stdin is not a JSON object",
        )
    })?;
    let invalid = |field: &str, expected: &str| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("network configuration field `{field}`: expected {expected}"),
        )
    };
    let string = |field: &str| -> Result<Option<String>, CniError> {
        match object.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(invalid(field, "a string")),
        }
    };
    let strings = |field: &str| -> Result<Vec<String>, CniError> {
        match object.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|item| item.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| invalid(field, "a list of namespace names (strings)")),
            Some(_) => Err(invalid(field, "a list of namespace names (strings)")),
        }
    };
    let cni_version = string("cniVersion")?
        .ok_or_else(|| invalid("cniVersion", "a string such as \"1.0.0\" (it is missing)"))?;
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "network configuration field `cniVersion`: {cni_version} is not supported (strait-cni speaks {})",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let name = string("name")?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("name", "the network's name (it is missing)"))?;
    let agent_socket = match string("agentSocket")? {
        None => PathBuf::from(protocol::DEFAULT_SOCKET),
        Some(path) if Path::new(&path).is_absolute() => PathBuf::from(path),
        Some(_) => return Err(invalid("agentSocket", "an absolute path")),
    };
    let timeout = match object.get("timeoutSeconds") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT,
        Some(v) => match v.as_u64() {
            Some(s @ 1..=600) => Duration::from_secs(s),
            _ => {
                return Err(invalid(
                    "timeoutSeconds",
                    "a whole number of seconds from 1 to 600",
                ));
            }
        },
    };
    let fail_policy = match string("failPolicy")?.as_deref() {
        None | Some("closed") => FailPolicy::Closed,
        Some("open") => FailPolicy::Open,
        Some(_) => return Err(invalid("failPolicy", "\"closed\" or \"open\"")),
    };
    let valid_attachments = match object.get("cni.dev/valid-attachments") {
        None | Some(Value::Null) => None,
        Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| {
            invalid(
                "cni.dev/valid-attachments",
                &format!("a list of {{\"containerID\", \"ifname\"}} objects ({e})"),
            )
        })?),
    };
    let prev = raw.prev_result;
    if let Some(prev) = prev
        && !prev.get().trim_start().starts_with('{')
    {
        return Err(invalid(
            "prevResult",
            "an object (the previous plugin's result)",
        ));
    }
    Ok((
        Config {
            cni_version,
            name,
            agent_socket,
            timeout,
            fail_policy,
            fail_open_namespaces: strings("failOpenNamespaces")?,
            exclude_namespaces: strings("excludeNamespaces")?,
            valid_attachments,
        },
        prev,
    ))
}

/// The container's addresses in a result: entries of `ips` whose interface is in a sandbox
/// (or that name no interface).
pub fn result_ips(result: &RawValue) -> Result<Vec<IpAddr>, CniError> {
    #[derive(Deserialize)]
    struct Interface {
        #[serde(default)]
        sandbox: String,
    }
    #[derive(Deserialize)]
    struct Ip {
        address: String,
        #[serde(default)]
        interface: Option<usize>,
    }
    #[derive(Deserialize)]
    struct Result {
        #[serde(default)]
        interfaces: Vec<Interface>,
        #[serde(default)]
        ips: Vec<Ip>,
    }
    let parsed: Result = serde_json::from_str(result.get()).map_err(|e| {
        CniError::new(
            code::INVALID_CONFIG,
            format!("network configuration field `prevResult`: {e}"),
        )
    })?;
    let mut ips = Vec::new();
    for (i, ip) in parsed.ips.iter().enumerate() {
        let in_container = ip
            .interface
            .and_then(|index| parsed.interfaces.get(index))
            .is_none_or(|interface| !interface.sandbox.is_empty());
        let address = ip.address.split('/').next().unwrap_or_default();
        let address: IpAddr = address.parse().map_err(|_| {
            CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "network configuration field `prevResult.ips[{i}].address`: `{}` is not an address in CIDR form",
                    ip.address
                ),
            )
        })?;
        if in_container && !ips.contains(&address) {
            ips.push(address);
        }
    }
    Ok(ips)
}

/// The invocation's environment for ADD, DEL and CHECK.
struct Invocation {
    container_id: String,
    netns: Option<String>,
    ifname: String,
    pod: Option<PodRef>,
}

fn required(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<String, CniError> {
    env(name).filter(|v| !v.is_empty()).ok_or_else(|| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("environment variable {name} is missing or empty"),
        )
    })
}

/// `CNI_ARGS`: `K=V` pairs separated by `;`.
pub fn parse_args(args: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut map = BTreeMap::new();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            CniError::new(
                code::INVALID_ENVIRONMENT,
                format!("CNI_ARGS: `{pair}` is not KEY=VALUE (pairs are separated by `;`)"),
            )
        })?;
        map.insert(key.to_string(), value.to_string());
    }
    Ok(map)
}

/// The pod from `CNI_ARGS`; `required_pod` makes a missing namespace or name an error.
fn invocation(
    env: &dyn Fn(&str) -> Option<String>,
    needs_netns: bool,
    required_pod: bool,
) -> Result<Invocation, CniError> {
    let container_id = required(env, "CNI_CONTAINERID")?;
    let ifname = required(env, "CNI_IFNAME")?;
    let netns = if needs_netns {
        Some(required(env, "CNI_NETNS")?)
    } else {
        env("CNI_NETNS").filter(|v| !v.is_empty())
    };
    let args = match env("CNI_ARGS").filter(|a| !a.is_empty()) {
        Some(args) => parse_args(&args)?,
        None if required_pod => {
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                "environment variable CNI_ARGS is missing: strait-cni needs K8S_POD_NAMESPACE and K8S_POD_NAME in it, which Kubernetes runtimes pass",
            ));
        }
        None => BTreeMap::new(),
    };
    let field = |key: &str| args.get(key).filter(|v| !v.is_empty()).cloned();
    let pod = match (field("K8S_POD_NAMESPACE"), field("K8S_POD_NAME")) {
        (Some(namespace), Some(name)) => Some(PodRef {
            namespace,
            name,
            uid: field("K8S_POD_UID"),
        }),
        (namespace, _) if required_pod => {
            let missing = if namespace.is_none() {
                "K8S_POD_NAMESPACE"
            } else {
                "K8S_POD_NAME"
            };
            return Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                format!(
                    "CNI_ARGS: {missing} is missing (Kubernetes runtimes pass K8S_POD_NAMESPACE, K8S_POD_NAME and K8S_POD_UID)"
                ),
            ));
        }
        _ => None,
    };
    Ok(Invocation {
        container_id,
        netns,
        ifname,
        pod,
    })
}

/// Why the agent gave no usable answer. The cause is part of the message (no `#[source]`):
/// the message is all the CNI error object carries.
#[derive(Debug, thiserror::Error)]
enum Unreachable {
    #[error("no strait agent answers on {socket} ({cause}); is the agent running on this node?")]
    NoAgent { socket: PathBuf, cause: io::Error },
    #[error("the strait agent on {socket} did not answer within {timeout:?} ({cause})")]
    NoAnswer {
        socket: PathBuf,
        timeout: Duration,
        cause: io::Error,
    },
}

/// Connects (retrying while nobody listens, until `timeout`), sends `request` with `fd`, and
/// reads the answer. A connection the agent closes without an answer is asked again on a new
/// one, within `timeout`: an agent that hands over to its successor during an upgrade closes
/// its pending requests so that they reach the new agent (every request is idempotent).
fn ask(
    socket: &Path,
    request: &Request,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
    timeout: Duration,
) -> Result<Reply, Unreachable> {
    let deadline = Instant::now() + timeout;
    loop {
        match ask_once(socket, request, fd, timeout, deadline) {
            Err(Unreachable::NoAnswer { cause, .. })
                if closed_unanswered(&cause) && Instant::now() + RETRY_EVERY < deadline =>
            {
                std::thread::sleep(RETRY_EVERY);
            }
            answer => return answer,
        }
    }
}

/// The agent closed the connection before answering (it is handing over, or stopping).
fn closed_unanswered(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

fn ask_once(
    socket: &Path,
    request: &Request,
    fd: Option<std::os::fd::BorrowedFd<'_>>,
    timeout: Duration,
    deadline: Instant,
) -> Result<Reply, Unreachable> {
    let stream = loop {
        match UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(error) => {
                // Not there yet or restarting: an agent coming back within the timeout still
                // takes the pod.
                let retry = matches!(
                    error.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                );
                if !retry || Instant::now() + RETRY_EVERY >= deadline {
                    return Err(Unreachable::NoAgent {
                        socket: socket.to_path_buf(),
                        cause: error,
                    });
                }
                std::thread::sleep(RETRY_EVERY);
            }
        }
    };
    let no_answer = |cause| Unreachable::NoAnswer {
        socket: socket.to_path_buf(),
        timeout,
        cause,
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(left)).map_err(no_answer)?;
    stream.set_write_timeout(Some(left)).map_err(no_answer)?;
    let mut request = request.clone();
    // The agent answers a little before the plugin gives up, so its reason arrives.
    request.timeout_ms = left.as_millis().saturating_sub(250).max(1) as u64;
    protocol::send(&stream, &request, fd).map_err(no_answer)?;
    protocol::receive_reply(&stream).map_err(no_answer)
}

fn request(op: Op, inv: Option<&Invocation>) -> Request {
    Request {
        version: protocol::VERSION,
        op,
        container_id: inv.map(|i| i.container_id.clone()).unwrap_or_default(),
        ifname: inv.map(|i| i.ifname.clone()).unwrap_or_default(),
        netns: inv.and_then(|i| i.netns.clone()).unwrap_or_default(),
        ips: Vec::new(),
        pod: inv.and_then(|i| i.pod.clone()),
        timeout_ms: 0,
        valid_attachments: Vec::new(),
    }
}

fn open_netns(path: &str) -> Result<std::fs::File, CniError> {
    std::fs::File::open(path).map_err(|e| {
        CniError::new(
            code::IO_FAILURE,
            format!("cannot open the network namespace CNI_NETNS={path}: {e}"),
        )
    })
}

/// Applies the fail policy to a failure: `Ok` lets the pod go on uncaptured.
fn fail(config: &Config, pod: &PodRef, error: CniError, log: &mut String) -> Result<(), CniError> {
    let open = config.fail_policy == FailPolicy::Open
        || config.fail_open_namespaces.contains(&pod.namespace);
    if open {
        log.push_str(&format!(
            "strait-cni: pod {}/{} starts WITHOUT strait capture (fail open): {}\n",
            pod.namespace, pod.name, error.msg
        ));
        Ok(())
    } else {
        Err(error)
    }
}

fn add(
    env: &dyn Fn(&str) -> Option<String>,
    config: &Config,
    prev: Option<&RawValue>,
    log: &mut String,
) -> Result<String, CniError> {
    let prev = prev.ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "network configuration field `prevResult` is missing: strait-cni is a chained plugin; list it in a .conflist after the plugin that sets up the pod's interface",
        )
    })?;
    let inv = invocation(env, true, true)?;
    let pod = inv.pod.clone().unwrap_or_default();
    let passthrough = prev.get().to_string();
    if config.exclude_namespaces.contains(&pod.namespace) {
        return Ok(passthrough);
    }
    let mut req = request(Op::Add, Some(&inv));
    req.ips = result_ips(prev)?;
    let netns = open_netns(inv.netns.as_deref().unwrap_or_default())?;
    match ask(
        &config.agent_socket,
        &req,
        Some(netns.as_fd()),
        config.timeout,
    ) {
        Ok(reply) => match reply.outcome {
            Outcome::Enrolled | Outcome::NotInMesh => Ok(passthrough),
            Outcome::Refused => Err(CniError::new(
                code::REFUSED,
                format!(
                    "the strait agent refused pod {}/{}: {}",
                    pod.namespace, pod.name, reply.message
                ),
            )),
            _ => fail(
                config,
                &pod,
                CniError::new(
                    code::TRY_AGAIN_LATER,
                    format!(
                        "the strait agent has not enrolled pod {}/{}: {}",
                        pod.namespace, pod.name, reply.message
                    ),
                ),
                log,
            )
            .map(|()| passthrough),
        },
        Err(unreachable) => fail(
            config,
            &pod,
            CniError::new(code::TRY_AGAIN_LATER, unreachable.to_string()),
            log,
        )
        .map(|()| passthrough),
    }
}

fn del(
    env: &dyn Fn(&str) -> Option<String>,
    config: &Config,
    log: &mut String,
) -> Result<String, CniError> {
    let inv = invocation(env, false, false)?;
    if inv
        .pod
        .as_ref()
        .is_some_and(|p| config.exclude_namespaces.contains(&p.namespace))
    {
        return Ok(String::new());
    }
    let req = request(Op::Del, Some(&inv));
    match ask(
        &config.agent_socket,
        &req,
        None,
        config.timeout.min(CLEANUP_TIMEOUT),
    ) {
        Ok(reply) if reply.outcome == Outcome::Released => {}
        Ok(reply) => log.push_str(&format!(
            "strait-cni: DEL of {}: the agent answered {:?}: {}\n",
            inv.container_id, reply.outcome, reply.message
        )),
        // Nothing to release here: the agent drops pods the API deleted and containers the
        // runtime no longer lists (GC).
        Err(unreachable) => log.push_str(&format!(
            "strait-cni: DEL of {}: {unreachable}\n",
            inv.container_id
        )),
    }
    Ok(String::new())
}

fn check(
    env: &dyn Fn(&str) -> Option<String>,
    config: &Config,
    prev: Option<&RawValue>,
    log: &mut String,
) -> Result<String, CniError> {
    let prev = prev.ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "network configuration field `prevResult` is missing: CHECK needs the result of ADD",
        )
    })?;
    let inv = invocation(env, true, true)?;
    let pod = inv.pod.clone().unwrap_or_default();
    if config.exclude_namespaces.contains(&pod.namespace) {
        return Ok(String::new());
    }
    let mut req = request(Op::Check, Some(&inv));
    req.ips = result_ips(prev)?;
    let netns = open_netns(inv.netns.as_deref().unwrap_or_default())?;
    match ask(
        &config.agent_socket,
        &req,
        Some(netns.as_fd()),
        config.timeout,
    ) {
        Ok(reply) => match reply.outcome {
            Outcome::Enrolled | Outcome::NotInMesh => Ok(String::new()),
            _ => Err(CniError::new(
                code::NOT_ENROLLED,
                format!(
                    "pod {}/{} is not enrolled by the strait agent: {}",
                    pod.namespace, pod.name, reply.message
                ),
            )),
        },
        Err(unreachable) => fail(
            config,
            &pod,
            CniError::new(code::TRY_AGAIN_LATER, unreachable.to_string()),
            log,
        )
        .map(|()| String::new()),
    }
}

fn status(config: &Config, log: &mut String) -> Result<String, CniError> {
    let req = request(Op::Status, None);
    let answer = ask(
        &config.agent_socket,
        &req,
        None,
        config.timeout.min(CLEANUP_TIMEOUT),
    );
    let reason = match answer {
        Ok(reply) if reply.outcome == Outcome::Ready => return Ok(String::new()),
        Ok(reply) => format!("the strait agent is not ready: {}", reply.message),
        Err(unreachable) => unreachable.to_string(),
    };
    match config.fail_policy {
        FailPolicy::Closed => Err(CniError::new(code::NOT_AVAILABLE, reason).details(
            "failPolicy is closed: pods cannot start on this node until the agent answers",
        )),
        FailPolicy::Open => {
            log.push_str(&format!("strait-cni: STATUS: {reason} (failPolicy open)\n"));
            Ok(String::new())
        }
    }
}

fn gc(config: &Config, log: &mut String) -> Result<String, CniError> {
    let Some(valid) = config.valid_attachments.clone() else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "network configuration field `cni.dev/valid-attachments`: GC needs the list of attachments still in use",
        ));
    };
    let mut req = request(Op::Gc, None);
    req.valid_attachments = valid;
    if let Err(unreachable) = ask(
        &config.agent_socket,
        &req,
        None,
        config.timeout.min(CLEANUP_TIMEOUT),
    ) {
        log.push_str(&format!("strait-cni: GC: {unreachable}\n"));
    }
    Ok(String::new())
}

#[cfg(test)]
mod tests;
