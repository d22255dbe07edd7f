//! The hand-off protocol between `strait-cni` and the node agent (docs/kubernetes.md, "The CNI
//! hand-off protocol").
//!
//! One Unix stream connection per CNI invocation. The plugin sends one request, a JSON object
//! on one line, in a single `sendmsg(2)`; for ADD and CHECK the pod's network namespace rides
//! along as a file descriptor (SCM_RIGHTS), so the agent holds the very namespace the runtime
//! made, whatever happens to its path. The agent answers with one JSON line (the ack) and
//! closes. Every message carries `version`; an agent refuses a version it does not speak, with
//! an answer the plugin can show, instead of guessing.
//!
//! The agent answers ADD only once the pod is enrolled (its cgroup steered, its listeners up in
//! this network namespace) or decided not to be in the mesh: the runtime starts the app
//! containers after ADD returns, so their first connect is already captured.

use std::io::{self, IoSlice, IoSliceMut, Read as _, Write as _};
use std::net::IpAddr;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;
/// The agent's socket unless the network configuration names another (`agentSocket`).
pub const DEFAULT_SOCKET: &str = "/run/strait/cni.sock";
/// The longest message either side accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// What the runtime asked the plugin to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Add,
    Del,
    Check,
    Status,
    Gc,
}

/// The pod, from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_UID`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// Absent when the runtime does not pass `K8S_POD_UID`; the agent then takes the pod of
    /// that name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// One attachment the runtime still uses (GC's `cni.dev/valid-attachments`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The plugin's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    pub op: Op,
    /// `CNI_CONTAINERID` (empty for STATUS and GC).
    #[serde(default, rename = "containerID")]
    pub container_id: String,
    #[serde(default)]
    pub ifname: String,
    /// `CNI_NETNS`, the path the runtime gave; the descriptor sent with ADD and CHECK is the
    /// namespace itself, the path lets a restarted agent open it again.
    #[serde(default)]
    pub netns: String,
    /// The pod's addresses, from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub pod: Option<PodRef>,
    /// How long the plugin waits for the answer; the agent answers before that.
    #[serde(default)]
    pub timeout_ms: u64,
    /// GC: the attachments still in use.
    #[serde(default)]
    pub valid_attachments: Vec<Attachment>,
}

/// How the agent dealt with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// ADD, CHECK: the pod is enrolled in this network namespace.
    Enrolled,
    /// ADD, CHECK: the pod is not to be enrolled (`message` says why).
    NotInMesh,
    /// DEL, GC: done (also when there was nothing to release).
    Released,
    /// STATUS: the agent takes pods.
    Ready,
    /// The pod should be enrolled but is not (yet): `message` says why.
    Failed,
    /// The agent refuses the request (bad request, other version, not allowed).
    Refused,
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    pub version: u32,
    pub outcome: Outcome,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_node: Option<String>,
}

impl Reply {
    pub fn new(outcome: Outcome, message: impl Into<String>) -> Reply {
        Reply {
            version: VERSION,
            outcome,
            message: message.into(),
            virtual_node: None,
        }
    }
}

/// Sends one message as a JSON line in one `sendmsg`, with `fd` attached when given.
pub fn send<T: Serialize>(
    stream: &UnixStream,
    message: &T,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    line.push(b'\n');
    if line.len() > MAX_MESSAGE {
        return Err(io::Error::other(format!(
            "message of {} bytes is over the {MAX_MESSAGE} byte limit",
            line.len()
        )));
    }
    let raw: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let control: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    let sent = sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&line)],
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    // A stream socket may take less than the whole line; the descriptor went with the
    // first byte.
    let mut writer = stream;
    writer.write_all(&line[sent..])?;
    Ok(())
}

/// Reads one JSON line and the descriptors that came with it (at most 4; more are closed).
pub fn receive<T: for<'de> Deserialize<'de>>(stream: &UnixStream) -> io::Result<(T, Vec<OwnedFd>)> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let msg = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        let received = msg.bytes;
        for cmsg in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                for fd in raw {
                    // SAFETY: the kernel just installed this descriptor for us; nothing
                    // else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        if received == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the peer closed the connection before a whole message",
            ));
        }
        line.extend_from_slice(&chunk[..received]);
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end);
            break;
        }
        if line.len() > MAX_MESSAGE {
            return Err(io::Error::other(format!(
                "message over the {MAX_MESSAGE} byte limit"
            )));
        }
    }
    fds.truncate(4);
    let message =
        serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok((message, fds))
}

/// Reads one JSON line, without descriptors (the plugin reading the agent's answer).
pub fn receive_reply(stream: &UnixStream) -> io::Result<Reply> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    let mut reader = stream;
    loop {
        match reader.read(&mut byte)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the agent closed the connection without an answer",
                ));
            }
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
        if line.len() > MAX_MESSAGE {
            return Err(io::Error::other("answer over the size limit"));
        }
    }
    serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    #[test]
    fn a_request_and_its_namespace_descriptor_arrive_together() {
        let (a, b) = UnixStream::pair().unwrap();
        let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
        let request = Request {
            version: VERSION,
            op: Op::Add,
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: "/var/run/netns/cni-1".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
            pod: Some(PodRef {
                namespace: "shop".into(),
                name: "cart".into(),
                uid: Some("u1".into()),
            }),
            timeout_ms: 1000,
            valid_attachments: Vec::new(),
        };
        send(&a, &request, Some(netns.as_fd())).unwrap();
        let (got, fds): (Request, _) = receive(&b).unwrap();
        assert_eq!(got, request);
        assert_eq!(fds.len(), 1);
        let fd = std::fs::File::from(fds.into_iter().next().unwrap());
        assert_eq!(
            fd.metadata().unwrap().ino(),
            netns.metadata().unwrap().ino()
        );
        let reply = Reply::new(Outcome::NotInMesh, "namespace shop is not in the mesh");
        send(&b, &reply, None).unwrap();
        assert_eq!(receive_reply(&a).unwrap(), reply);
    }

    #[test]
    fn an_unknown_field_or_a_truncated_message_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(b"{\"version\":1,\"op\":\"add\",\"bogus\":1}\n")
            .unwrap();
        let error = receive::<Request>(&b).unwrap_err();
        assert!(error.to_string().contains("bogus"), "{error}");
        (&a).write_all(b"{\"version\":1").unwrap();
        drop(a);
        assert_eq!(
            receive::<Request>(&b).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
