//! Sockets inside other network namespaces.
//!
//! The agent's listeners for a pod live in that pod's network namespace (the way Istio
//! ztunnel's in-pod mode works), and the agent delivers to a pod from inside it. A socket keeps
//! the namespace it was created in, so only its creation needs the namespace: the calling
//! thread enters the pod's namespace with setns(2), creates the socket and returns to the
//! agent's own namespace at once ([`in_netns`]). No thread per pod, no hand-off between
//! threads on a delivery; the runtime then uses the socket from any thread.
//!
//! Every agent thread lives in the agent's own network namespace outside [`in_netns`]. A
//! thread that could not return would carry on creating sockets in a pod's namespace (the
//! agent's own connects, to the wrong network), so that failure aborts the agent instead.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open network namespace {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter network namespace {path} (the agent needs CAP_SYS_ADMIN)")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen on {addr} in network namespace {path}")]
    Bind {
        path: PathBuf,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The address does not exist in the namespace (`EADDRNOTAVAIL`; ::1 in a pod without
    /// IPv6).
    pub fn is_address_not_available(&self) -> bool {
        matches!(self, Error::Bind { source, .. } if source.kind() == io::ErrorKind::AddrNotAvailable)
    }

    /// Another socket holds the port in the namespace (`EADDRINUSE`).
    pub fn is_address_in_use(&self) -> bool {
        matches!(self, Error::Bind { source, .. } if source.kind() == io::ErrorKind::AddrInUse)
    }
}

/// The agent's own network namespace, opened once: what [`in_netns`] returns to.
fn home() -> io::Result<BorrowedFd<'static>> {
    static HOME: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = HOME.get() {
        return Ok(fd.as_fd());
    }
    // The process's (main thread's) namespace, which every agent thread shares outside
    // `in_netns`. A race between two first calls opens it twice; one copy is kept.
    let opened: OwnedFd = File::open("/proc/self/ns/net")?.into();
    Ok(HOME.get_or_init(|| opened).as_fd())
}

/// Runs `f` on the calling thread inside the network namespace `target` (an open namespace
/// file, or anything setns(2) accepts for a network namespace), then returns the thread to the
/// agent's namespace on every path. `f` should only create sockets: it must not await, block
/// or hand the thread to other work.
pub fn in_netns<T>(target: BorrowedFd<'_>, f: impl FnOnce() -> T) -> io::Result<T> {
    let home = home()?;
    setns(target)?;
    // Returns even if `f` panics: the guard's drop runs during unwinding.
    struct Return(BorrowedFd<'static>);
    impl Drop for Return {
        fn drop(&mut self) {
            if let Err(error) = setns(self.0) {
                // See the module docs: a thread left in a pod's namespace is never acceptable.
                eprintln!(
                    "strait: cannot return a thread to the agent's network namespace ({error}); \
                     aborting so that no socket is created in the wrong network"
                );
                std::process::abort();
            }
        }
    }
    let _return = Return(home);
    Ok(f())
}

/// Moves the calling thread (only it, for a network namespace) into `target`.
fn setns(target: BorrowedFd<'_>) -> io::Result<()> {
    nix::sched::setns(target, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// The network namespace a socket was created in, as a new namespace file descriptor
/// (ioctl `SIOCGSKNS`; needs CAP_NET_ADMIN).
fn socket_netns(socket: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor or -1; the socket is
    // borrowed and open for the call.
    let fd = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGSKNS as _) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
    let bound = in_netns(target.as_fd(), || {
        addrs
            .iter()
            .map(|addr| (*addr, bind(*addr)))
            .collect::<Vec<_>>()
    })
    .map_err(|source| Error::Enter {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(bound
        .into_iter()
        .map(|(addr, result)| {
            result.map_err(|source| Error::Bind {
                path: path.to_path_buf(),
                addr,
                source,
            })
        })
        .collect())
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

/// Opens TCP connections from inside one network namespace: the socket is created there (a
/// socket keeps the namespace it was created in), the runtime connects it. The agent delivers
/// to a pod this way, to the pod's loopback, which is how App Mesh's Envoy delivered inbound
/// traffic too, and which the pod's inbound capture (keyed by the pod's own addresses) never
/// steers.
///
/// The connector holds no descriptor of its own: it finds the namespace through a socket the
/// pod's enrollment keeps open anyway (its inbound listener), which also makes it exact (the
/// namespace that socket lives in, not whatever a path names by now).
pub struct Connector {
    path: PathBuf,
    anchor: Arc<OwnedFd>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("path", &self.path)
            .finish()
    }
}

impl Connector {
    /// A connector for the namespace `anchor` (a socket) lives in; `path` names it in errors.
    pub fn new(path: &Path, anchor: Arc<OwnedFd>) -> Connector {
        Connector {
            path: path.to_path_buf(),
            anchor,
        }
    }

    /// A TCP socket of `domain` created inside the namespace.
    fn socket(&self, domain: socket2::Domain) -> io::Result<socket2::Socket> {
        let netns = socket_netns(self.anchor.as_fd()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot find network namespace {}: {e}", self.path.display()),
            )
        })?;
        in_netns(netns.as_fd(), || {
            socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
        })
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot enter network namespace {}: {e} (the agent needs CAP_SYS_ADMIN)",
                    self.path.display()
                ),
            )
        })?
    }

    /// Connects to `addr` from inside the namespace, within `timeout`.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        timeout: std::time::Duration,
    ) -> io::Result<tokio::net::TcpStream> {
        let socket = self.socket(socket2::Domain::for_address(addr))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    /// The inode of a namespace file descriptor (what tells two namespaces apart).
    fn inode(fd: BorrowedFd<'_>) -> u64 {
        File::from(fd.try_clone_to_owned().unwrap())
            .metadata()
            .unwrap()
            .ino()
    }

    fn this_thread_netns() -> u64 {
        std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino()
    }

    /// A new, empty network namespace, from a thread that unshares and then ends.
    fn new_netns() -> OwnedFd {
        std::thread::spawn(|| {
            // SAFETY: unshare changes only this short-lived thread's network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare(CLONE_NEWNET): {} (these tests need root)",
                io::Error::last_os_error()
            );
            OwnedFd::from(File::open("/proc/thread-self/ns/net").unwrap())
        })
        .join()
        .unwrap()
    }

    #[test]
    fn a_socket_is_made_in_the_target_namespace_and_the_thread_returns() {
        let target = new_netns();
        let before = this_thread_netns();
        assert_ne!(before, inode(target.as_fd()));
        let socket = in_netns(target.as_fd(), || {
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        })
        .unwrap()
        .unwrap();
        assert_eq!(this_thread_netns(), before, "the thread is back home");
        let made_in = socket_netns(socket.as_fd()).unwrap();
        assert_eq!(inode(made_in.as_fd()), inode(target.as_fd()));
    }

    #[test]
    fn a_failed_switch_leaves_the_thread_where_it_was() {
        let before = this_thread_netns();
        let not_a_namespace = File::open("/proc/self/status").unwrap();
        let result = in_netns(not_a_namespace.as_fd(), || unreachable!("never runs"));
        assert!(result.is_err());
        assert_eq!(this_thread_netns(), before);
    }

    #[test]
    fn a_panic_inside_still_returns_the_thread() {
        let target = new_netns();
        let before = this_thread_netns();
        let caught = std::panic::catch_unwind(|| {
            let _ = in_netns(target.as_fd(), || panic!("inside"));
        });
        assert!(caught.is_err());
        assert_eq!(this_thread_netns(), before);
    }

    #[tokio::test]
    async fn a_connector_connects_from_inside_the_namespace() {
        let target = new_netns();
        // A listener in the namespace, on its loopback (brought up first): the connector's
        // anchor and its destination at once.
        let listener = in_netns(target.as_fd(), || {
            let up = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status();
            assert!(up.is_ok_and(|s| s.success()), "ip link set lo up");
            bind("127.0.0.1:0".parse().unwrap()).unwrap()
        })
        .unwrap();
        let addr = listener.local_addr().unwrap();
        let anchor = Arc::new(OwnedFd::from(listener.try_clone().unwrap()));
        let connector = Connector::new(Path::new("test"), anchor);
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (stream, accepted) = tokio::join!(
            connector.connect(addr, std::time::Duration::from_secs(5)),
            listener.accept()
        );
        let stream = stream.unwrap();
        let (_, peer) = accepted.unwrap();
        assert_eq!(stream.peer_addr().unwrap(), addr);
        // The fast-path mark: the agent's end comes from the agent's loopback address.
        let [a, b, c, d] = strait_ebpf::AGENT_LOOPBACK_V4;
        assert_eq!(peer.ip(), std::net::IpAddr::from([a, b, c, d]));
    }
}
