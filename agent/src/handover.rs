//! Listener hand-over between an old and a new agent, so an upgrade refuses no connect.
//!
//! The agent's in-pod listeners are what pods' captured connects land on. If a new agent had
//! to bind them afresh, every connect between the old agent's exit and the new agent's bind
//! would be refused. Instead the running agent serves a Unix socket; a starting agent connects
//! to it, receives every listening socket (SCM_RIGHTS) with its name, and uses them as they
//! are. The old agent then stops accepting (connects queue in the shared backlog meanwhile),
//! drains its connections and exits. No listener is ever closed in between.
//!
//! Protocol: the new agent connects; the old agent sends one JSON line, the names of the
//! sockets in order, then the descriptors in batches of at most [`FDS_PER_MESSAGE`], each
//! with a one-byte payload; then it closes the connection.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The kernel accepts at most 253 descriptors in one SCM_RIGHTS message.
const FDS_PER_MESSAGE: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot serve the hand-over socket {path}: {source}")]
    Serve { path: PathBuf, source: io::Error },
    #[error("hand-over from the running agent at {path} failed: {message}")]
    Receive { path: PathBuf, message: String },
}

/// Listening sockets this agent has, by name, ready to hand over.
#[derive(Clone, Default)]
pub struct Registry {
    sockets: Arc<Mutex<BTreeMap<String, OwnedFd>>>,
}

impl Registry {
    /// Records a duplicate of a listening socket under `name`.
    pub fn add(&self, name: &str, listener: &TcpListener) -> io::Result<()> {
        let fd = listener.as_fd().try_clone_to_owned()?;
        self.lock().insert(name.to_string(), fd);
        Ok(())
    }

    /// Forgets a socket (its pod was released).
    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, OwnedFd>> {
        self.sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Sockets received from the previous agent, taken one by one as pods are enrolled.
#[derive(Default)]
pub struct Inherited {
    sockets: Mutex<BTreeMap<String, OwnedFd>>,
}

impl Inherited {
    /// Takes the socket handed over under `name`, if there was one.
    pub fn take(&self, name: &str) -> Option<TcpListener> {
        let fd = self
            .sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(name)?;
        let listener = TcpListener::from(fd);
        listener.set_nonblocking(true).ok()?;
        Some(listener)
    }

    pub fn len(&self) -> usize {
        self.sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Asks a running agent at `path` for its listeners. No agent there (no socket, or nobody
/// listening on it) is not an error: there is nothing to inherit.
pub fn receive(path: &Path) -> Result<Inherited, Error> {
    let fail = |message: String| Error::Receive {
        path: path.to_path_buf(),
        message,
    };
    let stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Inherited::default());
        }
        Err(error) => return Err(fail(error.to_string())),
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| fail(e.to_string()))?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|e| fail(e.to_string()))?);
    let mut manifest = String::new();
    reader
        .read_line(&mut manifest)
        .map_err(|e| fail(format!("reading the manifest: {e}")))?;
    let names: Vec<String> =
        serde_json::from_str(&manifest).map_err(|e| fail(format!("bad manifest: {e}")))?;
    // The manifest line was read through a buffer; the descriptors follow in separate
    // messages that the buffer has not touched, because the sender waits for our ack.
    (&stream).write_all(b"k").map_err(|e| fail(e.to_string()))?;
    let mut fds: Vec<OwnedFd> = Vec::with_capacity(names.len());
    while fds.len() < names.len() {
        let mut byte = [0u8; 1];
        let mut iov = [IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE]);
        let message = recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| fail(format!("receiving descriptors: {e}")))?;
        if message.bytes == 0 {
            return Err(fail(format!(
                "the running agent closed the connection after {} of {} sockets",
                fds.len(),
                names.len()
            )));
        }
        for cmsg in message.cmsgs().map_err(|e| fail(e.to_string()))? {
            if let ControlMessageOwned::ScmRights(received) = cmsg {
                // SAFETY: SCM_RIGHTS hands this process new descriptors that nothing else
                // owns; each is wrapped exactly once.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
    }
    Ok(Inherited {
        sockets: Mutex::new(names.into_iter().zip(fds).collect()),
    })
}

/// Serves the hand-over socket at `path`. When a new agent has taken the listeners,
/// `handed_over` is called (once) so this agent stops accepting and drains.
pub fn serve(
    path: &Path,
    registry: Registry,
    handed_over: impl Fn(usize) + Send + 'static,
) -> Result<(), Error> {
    let fail = |source| Error::Serve {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    // A socket file left by an agent that is gone (we already asked it, so nobody answers).
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(fail)?;
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("strait-handover".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                match send(&stream, &registry) {
                    Ok(count) => {
                        tracing::info!(sockets = count, "listeners handed over to a new agent");
                        handed_over(count);
                        // Leave the socket file to the new agent, which binds its own.
                        return;
                    }
                    Err(error) => {
                        tracing::warn!(path = %path.display(), %error, "listener hand-over failed; still serving")
                    }
                }
            }
        })
        .map_err(fail)?;
    Ok(())
}

fn send(stream: &UnixStream, registry: &Registry) -> io::Result<usize> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let sockets = registry.lock();
    let names: Vec<&String> = sockets.keys().collect();
    let mut manifest = serde_json::to_vec(&names).map_err(io::Error::other)?;
    manifest.push(b'\n');
    (&*stream).write_all(&manifest)?;
    let mut ack = [0u8; 1];
    io::Read::read_exact(&mut &*stream, &mut ack)?;
    let fds: Vec<RawFd> = sockets.values().map(AsRawFd::as_raw_fd).collect();
    for batch in fds.chunks(FDS_PER_MESSAGE) {
        let payload = [0u8; 1];
        let iov = [IoSlice::new(&payload)];
        let rights = [ControlMessage::ScmRights(batch)];
        sendmsg::<()>(stream.as_raw_fd(), &iov, &rights, MsgFlags::empty(), None)
            .map_err(io::Error::from)?;
    }
    Ok(fds.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_survive_a_hand_over_and_keep_their_queued_connections() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("handover.sock");
        let old = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = old.local_addr().unwrap();
        let registry = Registry::default();
        registry
            .add("outbound/app/a/127.0.0.1:15001", &old)
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        serve(&path, registry, move |n| tx.send(n).unwrap()).unwrap();

        // A client connects while the old agent still holds the listener.
        let queued = std::net::TcpStream::connect(addr).unwrap();
        let inherited = receive(&path).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
        drop(old); // the old agent lets go
        let listener = inherited.take("outbound/app/a/127.0.0.1:15001").unwrap();
        assert_eq!(listener.local_addr().unwrap(), addr);
        listener.set_nonblocking(false).unwrap();
        let (_, peer) = listener.accept().unwrap();
        assert_eq!(peer, queued.local_addr().unwrap());
        assert!(inherited.take("outbound/app/a/127.0.0.1:15001").is_none());
    }

    #[test]
    fn no_running_agent_means_nothing_to_inherit() {
        let dir = tempfile::tempdir().unwrap();
        let inherited = receive(&dir.path().join("none.sock")).unwrap();
        assert!(inherited.is_empty());
    }
}
