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
