//! The network checks: the ports the agent listens on inside a pod's network namespace are
//! free there (bound and released, the way the agent binds them), and the DNS resolver the
//! agent will use answers a query.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::Outcome;
use crate::logging::Chain;
use crate::netns;

/// How long the resolver may take per try, and how many tries it gets.
const DNS_TIMEOUT: Duration = Duration::from_secs(2);
const DNS_TRIES: usize = 2;

/// A new network namespace with its loopback up, held open by the returned file.
pub(super) fn scratch_netns() -> io::Result<File> {
    std::thread::spawn(|| -> io::Result<File> {
        // unshare(CLONE_NEWNET) moves only this thread, which ends right after.
        // SAFETY: plain syscall without pointers.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        loopback_up()?;
        File::open("/proc/thread-self/ns/net")
    })
    .join()
    .map_err(|_| io::Error::other("BUG: the thread making a network namespace died"))?
}

/// `ip link set lo up` in the calling thread's network namespace.
fn loopback_up() -> io::Result<()> {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    // SAFETY: plain syscall; the fd is owned right after.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new, valid descriptor nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..2].copy_from_slice(b"lo");
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write a `struct ifreq`, which `IfReq` lays out
    // (name, then the flags member of the union, padded to the union's size).
    unsafe {
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) != 0 {
            return Err(io::Error::last_os_error());
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

pub(super) fn check_ports(pod_netns: Option<&Path>, ports: &[u16]) -> Outcome {
    const NAME: &str = "ports";
    let fix_enter = "run as root with CAP_SYS_ADMIN";
    let _scratch: File;
    let (path, shown) = match pod_netns {
        Some(path) => (
            path.to_owned(),
            format!("network namespace {}", path.display()),
        ),
        None => match scratch_netns() {
            Ok(file) => {
                let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
                _scratch = file;
                (path, "a scratch network namespace".to_owned())
            }
            Err(e) => {
                return Outcome::fail(
                    NAME,
                    format!("cannot make a scratch network namespace: {e}"),
                    fix_enter,
                );
            }
        },
    };
    let addrs: Vec<SocketAddr> = ports
        .iter()
        .flat_map(|&p| {
            [
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), p),
            ]
        })
        .collect();
    let results = match netns::listen_in(&path, &addrs) {
        Ok(results) => results,
        Err(e) => return Outcome::fail(NAME, Chain(&e).to_string(), fix_enter),
    };
    let list = ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    for result in results {
        match result {
            Ok(_listener) => {}
            // A pod without IPv6: the agent listens on 127.0.0.1 only.
            Err(e) if e.is_address_not_available() => {}
            Err(netns::Error::Bind { addr, source, .. })
                if source.kind() == io::ErrorKind::AddrInUse =>
            {
                return Outcome::fail(
                    NAME,
                    format!("{addr} is taken in {shown}"),
                    "stop what listens there, or give `strait run` other ports \
                     (--outbound-port, --inbound-port) and `strait check` the same (--ports)",
                );
            }
            Err(e) => return Outcome::fail(NAME, Chain(&e).to_string(), fix_enter),
        }
    }
    Outcome::ok(NAME, format!("{list} free on loopback in {shown}"))
}

pub(super) fn check_dns(server: Option<SocketAddr>, resolv_conf: &Path, name: &str) -> Outcome {
    const NAME: &str = "dns";
    let fix = "make the resolver reachable from the node, or give `strait run` and `strait \
               check` one that is (--dns-server)";
    let server = match server {
        Some(server) => server,
        None => match first_nameserver(resolv_conf) {
            Some(ip) => SocketAddr::new(ip, 53),
            None => {
                return Outcome::fail(
                    NAME,
                    format!("no nameserver in {}", resolv_conf.display()),
                    fix,
                );
            }
        },
    };
    match query(server, name) {
        Ok((rcode, took)) if rcode == 0 || rcode == 3 => Outcome::ok(
            NAME,
            format!(
                "{server} answered {name} ({}) in {} ms",
                if rcode == 0 { "NOERROR" } else { "NXDOMAIN" },
                took.as_millis()
            ),
        ),
        Ok((rcode, _)) => Outcome::fail(
            NAME,
            format!("{server} answered {name} with error code {rcode}"),
            fix,
        ),
        Err(e) => Outcome::fail(NAME, format!("no answer from {server}: {e}"), fix),
    }
}

fn first_nameserver(resolv_conf: &Path) -> Option<IpAddr> {
    std::fs::read_to_string(resolv_conf)
        .ok()?
        .lines()
        .find_map(|l| l.trim().strip_prefix("nameserver")?.trim().parse().ok())
}

/// One A query over UDP; the response code and how long the answer took.
fn query(server: SocketAddr, name: &str) -> io::Result<(u8, Duration)> {
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind)?;
    socket.connect(server)?;
    socket.set_read_timeout(Some(DNS_TIMEOUT))?;
    let id = (std::process::id() & 0xffff) as u16;
    let mut packet = Vec::with_capacity(64);
    packet.extend_from_slice(&id.to_be_bytes());
    // Recursion desired; one question.
    packet.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|l| (1..=63).contains(l))
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("bad DNS name {name}"))
            })?;
        packet.push(len);
        packet.extend_from_slice(label.as_bytes());
    }
    packet.extend_from_slice(&[0, 0, 1, 0, 1]);
    let start = Instant::now();
    let mut last = io::Error::new(io::ErrorKind::TimedOut, "timed out");
    for _ in 0..DNS_TRIES {
        socket.send(&packet)?;
        let mut buf = [0u8; 512];
        match socket.recv(&mut buf) {
            // Our id, and the QR bit set: this resolver's answer.
            Ok(n) if n >= 12 && buf[..2] == id.to_be_bytes() && buf[2] & 0x80 != 0 => {
                return Ok((buf[3] & 0x0f, start.elapsed()));
            }
            Ok(_) => last = io::Error::other("a malformed answer"),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                last = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("timed out after {} s", DNS_TIMEOUT.as_secs()),
                );
            }
            Err(e) => return Err(e),
        }
    }
    Err(last)
}
