//! Privileged test of the eBPF capture path (`strait::redirect`) on the real
//! kernel. Needs root; run `cargo xtask build-ebpf` first, then
//! `cargo test -p strait --test redirect`.
//!
//! Shape (after aya's integration tests): a parent cgroup (the "node root" the
//! programs attach to) with a child cgroup (the "pod", which is enrolled) and a
//! grandchild (its "container"), a pin folder of our own, forked clients that
//! move themselves into the container cgroup and connect.
//! Traffic stays on this machine: every client socket is bound to `lo`
//! (SO_BINDTODEVICE), captured connects go to loopback listeners, and
//! 10.255.0.0/16 is only connected to where the programs capture or refuse the
//! connect before any packet is sent (or with UDP, whose connect sends nothing).
//! Everything made here (cgroups, pins, child processes) is removed by a
//! guard, also when the test fails.

use std::{
    ffi::CString,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::{fd::AsFd as _, unix::ffi::OsStrExt as _},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use strait::redirect::{
    self, Counters, EnrolledPod, OriginalDestination, Redirect, RedirectConfig, Taken,
};

const CGROUP2: &str = "/sys/fs/cgroup/unified";
const BPFFS: &str = "/sys/fs/bpf";
const TIMEOUT: Duration = Duration::from_secs(5);

/// Removes what the test made: child processes, pins, cgroups.
struct Guard {
    node: PathBuf,
    pod: PathBuf,
    container: PathBuf,
    bpffs: PathBuf,
    children: Vec<libc::pid_t>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        for &pid in &self.children {
            // SAFETY: plain syscalls on pids this test forked and has not reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        if let Err(e) = redirect::uninstall(&self.bpffs) {
            eprintln!("cleanup: uninstall {}: {e}", self.bpffs.display());
        }
        for dir in [&self.container, &self.pod, &self.node] {
            let deadline = Instant::now() + Duration::from_secs(2);
            while dir.exists() && std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if dir.exists() {
                eprintln!("cleanup: could not remove cgroup {}", dir.display());
            }
        }
    }
}

impl Guard {
    /// Check that the test can run, then make its cgroups: a "node" cgroup the programs attach
    /// to, with a "pod" (enrolled) and its "container" below, as on a Kubernetes node; and a
    /// pin folder name of its own (`test` keeps the names of concurrent tests apart).
    fn new(test: &str) -> Guard {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "this test attaches eBPF programs to a cgroup: run it as root \
             (`sudo -E cargo test -p strait --test redirect`)"
        );
        assert!(
            Path::new(CGROUP2).join("cgroup.procs").exists(),
            "cgroup v2 is not mounted at {CGROUP2}"
        );
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!("strait-test-{test}-{}-{nanos}", std::process::id());
        let node = Path::new(CGROUP2).join(&name);
        let guard = Guard {
            pod: node.join("pod"),
            container: node.join("pod").join("container"),
            bpffs: Path::new(BPFFS).join(&name),
            node,
            children: Vec::new(),
        };
        for dir in [&guard.node, &guard.pod, &guard.container] {
            std::fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        }
        guard
    }
}

#[derive(Clone, Copy, Debug)]
enum Proto {
    Tcp,
    Udp,
}

/// A socket address in the kernel's layout, built before fork.
enum RawAddr {
    V4(libc::sockaddr_in),
    V6(libc::sockaddr_in6),
}

impl RawAddr {
    fn new(addr: SocketAddr, force_v6: bool) -> Self {
        match (addr.ip(), force_v6) {
            (IpAddr::V4(ip), false) => RawAddr::V4(libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: addr.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(ip.octets()),
                },
                sin_zero: [0; 8],
            }),
            (ip, _) => {
                let ip = match ip {
                    IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                    IpAddr::V6(v6) => v6,
                };
                RawAddr::V6(libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: addr.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    sin6_scope_id: 0,
                })
            }
        }
    }
}

/// Fork a client that joins the cgroup whose `cgroup.procs` is `procs`, then
/// connects to `dst` (as an IPv6 socket with a mapped address if `force_v6`).
/// TCP clients then wait (up to TIMEOUT) for the server to close. The child's
/// exit code is 0 or the connect's errno.
fn spawn_client(
    guard: &mut Guard,
    procs: &Path,
    dst: SocketAddr,
    proto: Proto,
    force_v6: bool,
) -> libc::pid_t {
    let procs = CString::new(procs.as_os_str().as_bytes()).unwrap();
    let raw = RawAddr::new(dst, force_v6);
    let kind = match proto {
        Proto::Tcp => libc::SOCK_STREAM,
        Proto::Udp => libc::SOCK_DGRAM,
    };
    // SAFETY: the child only makes async-signal-safe syscalls on data prepared
    // above (no allocation, no locks) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: as above; all pointers point to live, initialised data.
        unsafe {
            let errno = || *libc::__errno_location();
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 || libc::write(fd, c"0".as_ptr().cast(), 1) != 1 {
                libc::_exit(200);
            }
            libc::close(fd);
            let (family, ptr, len) = match &raw {
                RawAddr::V4(sa) => (
                    libc::AF_INET,
                    (sa as *const libc::sockaddr_in).cast::<libc::sockaddr>(),
                    size_of::<libc::sockaddr_in>(),
                ),
                RawAddr::V6(sa) => (
                    libc::AF_INET6,
                    (sa as *const libc::sockaddr_in6).cast::<libc::sockaddr>(),
                    size_of::<libc::sockaddr_in6>(),
                ),
            };
            let sock = libc::socket(family, kind, 0);
            if sock < 0 {
                libc::_exit(201);
            }
            let tv = libc::timeval {
                tv_sec: TIMEOUT.as_secs() as libc::time_t,
                tv_usec: 0,
            };
            for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
                libc::setsockopt(
                    sock,
                    libc::SOL_SOCKET,
                    opt,
                    (&raw const tv).cast(),
                    size_of::<libc::timeval>() as libc::socklen_t,
                );
            }
            // Bound to lo, nothing this client sends can leave the machine,
            // even if a bug let a connect to 10.255.x.x through uncaptured.
            let lo = c"lo";
            if libc::setsockopt(
                sock,
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                lo.as_ptr().cast(),
                lo.to_bytes_with_nul().len() as libc::socklen_t,
            ) != 0
            {
                libc::_exit(202);
            }
            if libc::connect(sock, ptr, len as libc::socklen_t) != 0 {
                libc::_exit(errno());
            }
            if kind == libc::SOCK_STREAM {
                let mut buf = [0u8; 1];
                libc::read(sock, buf.as_mut_ptr().cast(), 1);
            }
            libc::_exit(0);
        }
    }
    guard.children.push(pid);
    pid
}

/// Wait for a client and return its exit code (0 or an errno).
fn wait_client(guard: &mut Guard, pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: waiting for our own child; `status` is valid for writes.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", std::io::Error::last_os_error());
    guard.children.retain(|&p| p != pid);
    assert!(libc::WIFEXITED(status), "client died: status {status}");
    libc::WEXITSTATUS(status)
}

fn accept_within(listener: &TcpListener, timeout: Duration) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok(conn) => return conn,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept on {:?}: {e}", listener.local_addr()),
        }
    }
}

/// An outbound listener pair: 127.0.0.1:P and [::1]:P on the same port.
fn outbound_listeners() -> (TcpListener, TcpListener, u16) {
    for _ in 0..20 {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        if let Ok(v6) = TcpListener::bind(("::1", port)) {
            return (v4, v6, port);
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1");
}

/// Connect from the pod to a service address; the outbound listener must get
/// the connection and the map its original destination.
fn expect_captured(
    guard: &mut Guard,
    r: &Redirect,
    procs: &Path,
    listener: &TcpListener,
    dst: SocketAddr,
    force_v6: bool,
    want: OriginalDestination,
) {
    let pid = spawn_client(guard, procs, dst, Proto::Tcp, force_v6);
    let (stream, peer) = accept_within(listener, TIMEOUT);
    let cookie = redirect::socket_netns_cookie(stream.as_fd()).unwrap();
    let port = listener.local_addr().unwrap().port();
    assert_eq!(
        r.take_original_destination(cookie, peer, port + 1).unwrap(),
        Taken::OtherListener { expected: port },
        "an entry is only taken on the listener its connect was steered to"
    );
    let got = r.take_original_destination(cookie, peer, port).unwrap();
    assert_eq!(
        got,
        Taken::Found(want),
        "original destination of {dst} (peer {peer})"
    );
    assert_eq!(
        r.take_original_destination(cookie, peer, port).unwrap(),
        Taken::Missing,
        "taking deletes the entry"
    );
    drop(stream);
    assert_eq!(wait_client(guard, pid), 0, "client of {dst}");
}

/// Connect from the pod to a loopback listener that is not the outbound one:
/// it must arrive there untouched.
fn expect_direct(guard: &mut Guard, procs: &Path, listener: &TcpListener) {
    let addr = listener.local_addr().unwrap();
    let pid = spawn_client(guard, procs, addr, Proto::Tcp, false);
    let (stream, _) = accept_within(listener, TIMEOUT);
    drop(stream);
    assert_eq!(wait_client(guard, pid), 0, "client of {addr}");
}

fn connect_errno(guard: &mut Guard, procs: &Path, dst: SocketAddr, proto: Proto) -> i32 {
    let pid = spawn_client(guard, procs, dst, proto, false);
    wait_client(guard, pid)
}

/// Ids of the programs behind the links pinned in `bpffs`.
fn pinned_program_ids(bpffs: &Path) -> Vec<u32> {
    ["link_connect4", "link_connect6", "link_sockops"]
        .iter()
        .map(|name| {
            let pinned = aya::programs::links::PinnedLink::from_pin(bpffs.join(name))
                .unwrap_or_else(|e| panic!("open pinned link {name}: {e}"));
            aya::programs::links::FdLink::from(pinned)
                .info()
                .unwrap()
                .program_id()
        })
        .collect()
}

/// Wait until none of `ids` is loaded (a program attached through a link stays
/// loaded, so this proves the links are gone).
fn wait_unloaded(ids: &[u32]) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let loaded: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .filter(|id| ids.contains(id))
            .collect();
        if loaded.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "programs {loaded:?} still loaded (still attached?)"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn capture_deny_pass_restart_uninstall() {
    let mut guard = Guard::new("redirect");
    let (node, pod, bpffs) = (guard.node.clone(), guard.pod.clone(), guard.bpffs.clone());
    let procs = guard.container.join("cgroup.procs");

    let (out4, out6, out_port) = outbound_listeners();
    let direct = TcpListener::bind("127.0.0.2:0").unwrap();

    let cfg = RedirectConfig {
        cgroup_root: node.clone(),
        bpffs: bpffs.clone(),
        fast_path: false,
        max_pod_connections: 16_384,
    };
    let r = Redirect::install(&cfg).unwrap();
    let pod_id = redirect::cgroup_id(&pod).unwrap();
    let allow = EnrolledPod {
        outbound_port: out_port,
        egress_drop_all: false,
        workload_id: 1,
    };
    r.enroll(pod_id, allow).unwrap();
    assert_eq!(r.enrolled().unwrap(), vec![(pod_id, allow)]);

    let svc4: SocketAddr = "10.255.0.1:8080".parse().unwrap();
    let svc6: SocketAddr = "[fd00:255::1]:8080".parse().unwrap();
    // A stale entry, to check set_services removes it.
    r.set_services(&[("10.255.0.2:80".parse().unwrap(), 99)])
        .unwrap();
    r.set_services(&[(svc4, 7), (svc6, 8)]).unwrap();

    let mut want = Counters::default();
    assert_eq!(r.counters().unwrap(), want);

    // Captured: IPv4, IPv6, and IPv4 through a dual-stack IPv6 socket.
    let orig4 = OriginalDestination {
        addr: svc4,
        service_id: 7,
    };
    expect_captured(&mut guard, &r, &procs, &out4, svc4, false, orig4);
    want.captured += 1;
    want.rekeyed += 1;
    want.other_listener += 1;
    assert_eq!(r.counters().unwrap(), want, "after the IPv4 capture");

    let orig6 = OriginalDestination {
        addr: svc6,
        service_id: 8,
    };
    expect_captured(&mut guard, &r, &procs, &out6, svc6, false, orig6);
    expect_captured(&mut guard, &r, &procs, &out4, svc4, true, orig4);
    want.captured += 2;
    want.rekeyed += 2;
    want.other_listener += 2;
    assert_eq!(r.counters().unwrap(), want, "after the IPv6 captures");

    // ALLOW_ALL: a non-service destination passes untouched. Only loopback is
    // used so nothing leaves the machine; the `passed` counter shows that the
    // programs saw it and let it through.
    expect_direct(&mut guard, &procs, &direct);
    want.passed += 1;
    assert_eq!(r.counters().unwrap(), want, "after the ALLOW_ALL pass");

    // DROP_ALL: refused with EPERM before any packet; loopback still passes;
    // services are still captured; UDP is never touched.
    r.enroll(
        pod_id,
        EnrolledPod {
            egress_drop_all: true,
            ..allow
        },
    )
    .unwrap();
    let outside: SocketAddr = "10.255.9.9:80".parse().unwrap();
    assert_eq!(
        connect_errno(&mut guard, &procs, outside, Proto::Tcp),
        libc::EPERM,
        "DROP_ALL must refuse {outside}"
    );
    want.denied += 1;
    expect_direct(&mut guard, &procs, &direct);
    want.passed += 1;
    expect_captured(&mut guard, &r, &procs, &out4, svc4, false, orig4);
    want.captured += 1;
    want.rekeyed += 1;
    want.other_listener += 1;
    let udp = connect_errno(
        &mut guard,
        &procs,
        "10.255.9.9:53".parse().unwrap(),
        Proto::Udp,
    );
    assert_ne!(udp, libc::EPERM, "UDP must not be refused");
    assert_eq!(r.counters().unwrap(), want, "after DROP_ALL");
    // The stale service is gone: with DROP_ALL it is refused, not captured.
    assert_eq!(
        connect_errno(
            &mut guard,
            &procs,
            "10.255.0.2:80".parse().unwrap(),
            Proto::Tcp
        ),
        libc::EPERM
    );
    want.denied += 1;

    // Agent restart: a new install adopts the maps (enrollment, services and
    // counters survive) and replaces the links; the old programs go away.
    drop(r);
    let old_programs = pinned_program_ids(&bpffs);
    let r = Redirect::install(&cfg).unwrap();
    wait_unloaded(&old_programs);
    // The eBPF counters survive; the agent's own count of refused listeners starts over.
    want.other_listener = 0;
    assert_eq!(r.counters().unwrap(), want, "counters survive a restart");
    expect_captured(&mut guard, &r, &procs, &out4, svc4, false, orig4);
    want.captured += 1;
    want.rekeyed += 1;
    want.other_listener += 1;

    // Released: untouched and counted as not enrolled.
    r.release(pod_id).unwrap();
    r.release(pod_id).unwrap();
    assert_eq!(r.enrolled().unwrap(), vec![]);
    expect_direct(&mut guard, &procs, &direct);
    want.not_enrolled += 1;
    assert_eq!(r.counters().unwrap(), want, "after release");
    assert_eq!(want.lookup_miss, 0);

    // Uninstall: pins and folder gone, programs detached and unloaded.
    drop(r);
    let programs = pinned_program_ids(&bpffs);
    let report = redirect::uninstall(&bpffs).unwrap();
    assert!(report.folder_existed);
    assert!(!bpffs.exists(), "{} still exists", bpffs.display());
    wait_unloaded(&programs);
    let again = redirect::uninstall(&bpffs).unwrap();
    assert!(!again.folder_existed, "uninstall is idempotent");
    drop(guard);
    assert!(!node.exists(), "cgroup {} was not removed", node.display());
}

/// The pod's open-connection count, read from the pinned map (absent: never counted).
fn pod_connections(bpffs: &Path, netns: u64) -> i64 {
    let map = aya::maps::MapData::from_pin(bpffs.join(strait_ebpf::MAP_POD_CONNECTIONS))
        .expect("open the pinned pod connection map");
    let counts: aya::maps::HashMap<_, u64, i64> =
        aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(map)).unwrap();
    counts.get(&netns, 0).unwrap_or(0)
}

/// During an upgrade the old and the new agent's sockops programs are both attached for a
/// moment (the link swap), and the kernel runs both on every socket event. A connect is
/// counted once (by the program that finds its cookie entry); its close must be uncounted
/// once too, or the count drifts low and `--max-pod-connections` lets more through.
#[test]
fn a_close_seen_by_two_attached_programs_is_uncounted_once() {
    let mut guard = Guard::new("redirect-two-programs");
    let procs = guard.container.join("cgroup.procs");
    let (out4, _out6, out_port) = outbound_listeners();
    let limit = 2;
    let cfg = RedirectConfig {
        cgroup_root: guard.node.clone(),
        bpffs: guard.bpffs.clone(),
        fast_path: false,
        max_pod_connections: limit,
    };
    let r = Redirect::install(&cfg).unwrap();
    let pod_id = redirect::cgroup_id(&guard.pod).unwrap();
    r.enroll(
        pod_id,
        EnrolledPod {
            outbound_port: out_port,
            egress_drop_all: false,
            workload_id: 1,
        },
    )
    .unwrap();
    let svc: SocketAddr = "10.255.0.1:8080".parse().unwrap();
    r.set_services(&[(svc, 7)]).unwrap();
    let orig = OriginalDestination {
        addr: svc,
        service_id: 7,
    };

    // A second copy of the sockops program on the same pinned maps, attached beside the
    // installed one, as a new agent's is while it replaces the old agent's links.
    let mut second = aya::EbpfLoader::new()
        .default_map_pin_directory(&guard.bpffs)
        .load(redirect::embedded_object())
        .unwrap();
    let sockops: &mut aya::programs::SockOps = second
        .program_mut(strait_ebpf::PROG_SOCKOPS)
        .unwrap()
        .try_into()
        .unwrap();
    sockops.load().unwrap();
    let cgroup = std::fs::File::open(&guard.node).unwrap();
    sockops
        .attach(&cgroup, aya::programs::CgroupAttachMode::Single)
        .unwrap();

    // The clients share this test's network namespace; the count is kept per namespace.
    let netns = redirect::socket_netns_cookie(out4.as_fd()).unwrap();
    for round in 0..3 {
        expect_captured(&mut guard, &r, &procs, &out4, svc, false, orig);
        // The client's socket closes once its FIN is acknowledged: wait for the count to
        // move, then give the second program's run on that close time to land too.
        let deadline = Instant::now() + TIMEOUT;
        while pod_connections(&guard.bpffs, netns) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        thread::sleep(Duration::from_millis(50));
        let open = pod_connections(&guard.bpffs, netns);
        assert_eq!(
            open, 0,
            "after connection {round} closed with two sockops programs attached, the pod's \
             open-connection count is {open}: each close must be uncounted once"
        );
    }
    drop(second);

    // The limit still holds: two connections open, the third refused.
    let held: Vec<_> = (0..limit)
        .map(|_| {
            let pid = spawn_client(&mut guard, &procs, svc, Proto::Tcp, false);
            let (stream, _) = accept_within(&out4, TIMEOUT);
            (pid, stream)
        })
        .collect();
    assert_eq!(
        connect_errno(&mut guard, &procs, svc, Proto::Tcp),
        libc::EPERM,
        "with {limit} connections open, a pod limited to {limit} must be refused a third"
    );
    assert_eq!(r.counters().unwrap().pod_connection_limit, 1);
    for (pid, stream) in held {
        drop(stream);
        assert_eq!(wait_client(&mut guard, pid), 0);
    }
}
