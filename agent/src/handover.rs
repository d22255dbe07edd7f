//! Listener hand-over between an old and a new agent, so an upgrade refuses no connect.
//!
//! The agent's in-pod listeners are what pods' captured connects land on. If a new agent had
//! to bind them afresh, every connect between the old agent's exit and the new agent's bind
//! would be refused. Instead the running agent serves a Unix socket; a starting agent connects
//! to it, receives every listening socket (SCM_RIGHTS) with its name, and uses them as they
//! are. The old agent then stops accepting (connects queue in the shared backlog meanwhile),
//! drains its connections and exits. No listener is ever closed in between.
//!
//! Protocol: the new agent connects and sends the hand-over token; the old agent sends one
//! JSON line, the names of the sockets in order, then the descriptors in batches of at most
//! [`FDS_PER_MESSAGE`], each with a one-byte payload; then it closes the connection.
//!
//! Who may ask: whoever gets the listeners can impersonate every pod's agent and makes this
//! agent drain and exit. So the socket is created 0600 in a folder only root may write to
//! (made 0700 when the agent creates it), and before handing anything over the serving agent
//! checks the peer: it must run as the agent's own user, root (SO_PEERCRED), and send the token the serving agent wrote,
//! 0600, beside the socket ([`token_path`]). A token rather than "same executable": an upgrade
//! is a new binary. Anyone who can read the token is root on the node already.

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
/// The token: 32 random bytes, hex.
const TOKEN_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot serve the hand-over socket {path}")]
    Serve {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the hand-over socket's folder {dir} is writable by group or others (mode {mode:03o}): \
         anyone could replace the socket; use a folder only root may write to (`chmod 700`)"
    )]
    UnsafeFolder { dir: PathBuf, mode: u32 },
    #[error("hand-over from the running agent at {path} failed: {message}")]
    Receive { path: PathBuf, message: String },
}

/// Where the serving agent keeps its hand-over token: beside the socket, `<stem>.token`.
pub fn token_path(socket: &Path) -> PathBuf {
    socket.with_extension("token")
}

/// Why a peer gets nothing.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("cannot read the peer's credentials")]
    Credentials(#[source] nix::Error),
    #[error("the peer (pid {pid}) runs as uid {uid}, not as this agent's user (uid {ours})")]
    OtherUser { pid: i32, uid: u32, ours: u32 },
    #[error("the peer (pid {pid}) did not send the hand-over token")]
    NoToken { pid: i32, source: io::Error },
    #[error("the peer (pid {pid}) sent a wrong hand-over token")]
    WrongToken { pid: i32 },
}

/// Root, and the token: see the module docs.
fn check_peer(stream: &UnixStream, token: &[u8]) -> Result<(), Refused> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let cred = getsockopt(stream, PeerCredentials).map_err(Refused::Credentials)?;
    let pid = cred.pid();
    // SAFETY: geteuid has no arguments and cannot fail.
    let ours = unsafe { libc::geteuid() };
    if cred.uid() != ours {
        return Err(Refused::OtherUser {
            pid,
            uid: cred.uid(),
            ours,
        });
    }
    let mut sent = [0u8; TOKEN_LEN];
    io::Read::read_exact(&mut &*stream, &mut sent)
        .map_err(|source| Refused::NoToken { pid, source })?;
    // Constant time: the comparison must not tell how much of a guess was right.
    let differ = sent
        .iter()
        .zip(token)
        .fold(u8::from(token.len() != TOKEN_LEN), |acc, (a, b)| {
            acc | (a ^ b)
        });
    if differ != 0 {
        return Err(Refused::WrongToken { pid });
    }
    Ok(())
}

/// Makes the socket's folder (0700) or checks that an existing one is not writable by others.
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

/// Writes a fresh token, 0600, never through a symlink.
fn write_token(path: &Path) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let bytes: [u8; 32] = rand::random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.write_all(token.as_bytes())?;
    Ok(token.into_bytes())
}

/// Listening sockets this agent has, by name, ready to hand over.
#[derive(Clone, Default)]
pub struct Registry {
    sockets: Arc<Mutex<BTreeMap<String, Arc<OwnedFd>>>>,
}

impl Registry {
    /// Records a duplicate of a listening socket under `name`.
    pub fn add(&self, name: &str, listener: &TcpListener) -> io::Result<()> {
        let fd = listener.as_fd().try_clone_to_owned()?;
        self.lock().insert(name.to_string(), Arc::new(fd));
        Ok(())
    }

    /// Records a listening socket under `name` as a duplicate the caller shares (a pod's
    /// inbound socket, which the capture maps need too: one descriptor for both).
    pub fn add_shared(&self, name: &str, socket: Arc<OwnedFd>) {
        self.lock().insert(name.to_string(), socket);
    }

    /// Forgets a socket (its pod was released).
    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<OwnedFd>>> {
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
    // An agent too old to write a token asks for none.
    let token = std::fs::read(token_path(path)).ok();
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
    if let Some(token) = &token {
        (&stream)
            .write_all(token)
            .map_err(|e| fail(format!("sending the token: {e}")))?;
    }
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
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        prepare_folder(dir)?;
    }
    let token = write_token(&token_path(path)).map_err(fail)?;
    // A socket file left by an agent that is gone (we already asked it, so nobody answers).
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(fail)?;
    // Whatever the umask made of it: only root may connect.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("strait-handover".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                // Bounded: a peer that connects and sends nothing must not block the socket.
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                if let Err(reason) = check_peer(&stream, &token) {
                    tracing::warn!(path = %path.display(), %reason, "hand-over refused; still serving");
                    continue;
                }
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
    let fds: Vec<RawFd> = sockets.values().map(|fd| fd.as_raw_fd()).collect();
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
    fn a_peer_without_the_token_gets_nothing_and_the_agent_keeps_serving() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("handover.sock");
        let old = TcpListener::bind("127.0.0.1:0").unwrap();
        let registry = Registry::default();
        registry.add("outbound/app/a/127.0.0.1:1", &old).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        serve(&path, registry, move |n| tx.send(n).unwrap()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&token_path(&path)), 0o600);

        // A wrong token: nothing comes back, and no hand-over happened.
        let mut stream = UnixStream::connect(&path).unwrap();
        stream.write_all(&[b'0'; TOKEN_LEN]).unwrap();
        let mut answer = Vec::new();
        io::Read::read_to_end(&mut stream, &mut answer).unwrap();
        assert!(answer.is_empty(), "{answer:?}");
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        // The agent still serves a peer with the token.
        let inherited = receive(&path).unwrap();
        assert_eq!(inherited.len(), 1);
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)).unwrap(), 1);
    }

    #[test]
    fn a_folder_others_may_write_to_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = serve(&dir.path().join("h.sock"), Registry::default(), |_| {}).unwrap_err();
        assert!(matches!(error, Error::UnsafeFolder { .. }), "{error}");
    }

    #[test]
    fn no_running_agent_means_nothing_to_inherit() {
        let dir = tempfile::tempdir().unwrap();
        let inherited = receive(&dir.path().join("none.sock")).unwrap();
        assert!(inherited.is_empty());
    }
}
