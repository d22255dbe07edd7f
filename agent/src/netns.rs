//! Sockets inside other network namespaces.
//!
//! The agent's outbound listener for a pod lives in that pod's network namespace (the way Istio
//! ztunnel's in-pod mode works): a thread enters the namespace with setns(2), creates the
//! socket, and leaves. A socket keeps the namespace it was created in, so the runtime can then
//! use it from any thread.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source} (the agent needs CAP_SYS_ADMIN)")]
    Enter { path: PathBuf, source: io::Error },
    #[error("cannot listen on {addr} in network namespace {path}: {source}")]
    Bind {
        path: PathBuf,
        addr: SocketAddr,
        source: io::Error,
    },
    #[error("BUG: the thread that entered network namespace {0} died")]
    ThreadDied(PathBuf),
}

impl Error {
    /// The address does not exist in the namespace (`EADDRNOTAVAIL`; ::1 in a pod without
    /// IPv6).
    pub fn is_address_not_available(&self) -> bool {
        matches!(self, Error::Bind { source, .. } if source.kind() == io::ErrorKind::AddrNotAvailable)
    }
}

/// Binds a non-blocking TCP listener at each address inside the network namespace at `path`.
/// Addresses that cannot be bound are returned as errors beside the ones that could.
pub fn listen_in(
    path: &Path,
    addrs: &[SocketAddr],
) -> Result<Vec<Result<TcpListener, Error>>, Error> {
    let target = File::open(path).map_err(|source| Error::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let path = path.to_path_buf();
    let addrs = addrs.to_vec();
    // A fresh thread, so that the namespace switch never leaks into a runtime worker; the
    // thread ends right after, so it never needs to switch back.
    let thread_path = path.clone();
    std::thread::spawn(move || -> Result<Vec<Result<TcpListener, Error>>, Error> {
        nix_setns(&target).map_err(|source| Error::Enter {
            path: thread_path.clone(),
            source,
        })?;
        Ok(addrs
            .into_iter()
            .map(|addr| {
                bind(addr).map_err(|source| Error::Bind {
                    path: thread_path.clone(),
                    addr,
                    source,
                })
            })
            .collect())
    })
    .join()
    .map_err(|_| Error::ThreadDied(path))?
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn nix_setns(target: &File) -> io::Result<()> {
    // SAFETY: setns takes a valid open file descriptor (borrowed from `target`, alive for the
    // call) and a namespace type; it changes only the calling thread's namespace.
    let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens TCP connections from inside one network namespace: a thread that lives in the
/// namespace creates the sockets (a socket keeps the namespace it was created in), the runtime
/// connects them. The agent delivers to a pod this way, to the pod's loopback, which is how
/// App Mesh's Envoy delivered inbound traffic too, and which the pod's inbound capture (keyed
/// by the pod's own addresses) never steers.
pub struct Connector {
    path: PathBuf,
    requests: std::sync::mpsc::Sender<SocketRequest>,
}

/// A request to the namespace's thread: a socket of this domain, sent back on the channel.
type SocketRequest = (
    socket2::Domain,
    tokio::sync::oneshot::Sender<io::Result<socket2::Socket>>,
);

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("path", &self.path)
            .finish()
    }
}

impl Connector {
    /// Starts the namespace's socket thread; it ends when the connector is dropped.
    pub fn start(path: &Path) -> Result<Connector, Error> {
        let target = File::open(path).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        let (tx, rx) = std::sync::mpsc::channel::<SocketRequest>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<io::Result<()>>();
        let thread_path = path.to_path_buf();
        std::thread::Builder::new()
            .name("netns-connector".into())
            .spawn(move || {
                let entered = nix_setns(&target);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                // Ends when every sender (the Connector) is gone.
                while let Ok((domain, reply)) = rx.recv() {
                    let socket = socket2::Socket::new(
                        domain,
                        socket2::Type::STREAM,
                        Some(socket2::Protocol::TCP),
                    );
                    let _ = reply.send(socket);
                }
                tracing::debug!(netns = %thread_path.display(), "connector thread done");
            })
            .map_err(|source| Error::Enter {
                path: path.to_path_buf(),
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Connector {
                path: path.to_path_buf(),
                requests: tx,
            }),
            Ok(Err(source)) => Err(Error::Enter {
                path: path.to_path_buf(),
                source,
            }),
            Err(_) => Err(Error::ThreadDied(path.to_path_buf())),
        }
    }

    /// Connects to `addr` from inside the namespace, within `timeout`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        timeout: std::time::Duration,
    ) -> io::Result<tokio::net::TcpStream> {
        let (reply, socket) = tokio::sync::oneshot::channel();
        self.requests
            .send((socket2::Domain::for_address(addr), reply))
            .map_err(|_| {
                io::Error::other(format!(
                    "BUG: the connector thread of {} is gone",
                    self.path.display()
                ))
            })?;
        let socket = socket
            .await
            .map_err(|_| io::Error::other("BUG: the connector thread dropped a request"))??;
        socket.set_nonblocking(true)?;
        if addr.ip().is_loopback() && addr.is_ipv4() {
            // Marks the agent's end of a same-node delivery for the eBPF fast path.
            let [a, b, c, d] = strait_ebpf::AGENT_LOOPBACK_V4;
            let from = SocketAddr::from(([a, b, c, d], 0));
            socket.bind(&from.into())?;
        }
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        let stream = tokio::time::timeout(timeout, socket.connect(addr))
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("connect to {addr} in {} timed out", self.path.display()),
                )
            })??;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}
