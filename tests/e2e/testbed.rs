//! End-to-end checks of the testbed itself: pods reach each other over IPv4 and IPv6, DNS
//! answers from the node's dnsmasq, the service range fails locally, pods on two nodes talk
//! through the underlay, and everything is gone after the testbed is dropped, even after a
//! panic. Needs root; without it these tests fail (never skip) with the reason.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use testbed::{Pod, PodSpec, Process, Testbed, run, run_ok};

const PEER: &str = env!("CARGO_BIN_EXE_strait-peer");
const T: Duration = Duration::from_secs(30);

/// What a testbed made, to check after it is gone.
#[derive(Default, Clone, Debug)]
struct Made {
    id: String,
    netns: Vec<String>,
    cgroup_dir: PathBuf,
    bpffs: Vec<PathBuf>,
    temp_dir: PathBuf,
    pids: Vec<u32>,
}

fn made(tb: &Testbed, extra_pids: &[u32]) -> Made {
    let mut m = Made {
        id: tb.id().to_owned(),
        cgroup_dir: tb.cgroup_dir().to_owned(),
        temp_dir: tb.temp_dir().to_owned(),
        pids: extra_pids.to_vec(),
        netns: vec![tb.fabric_netns_name().to_owned()],
        ..Made::default()
    };
    for node in tb.nodes() {
        m.netns.push(node.netns_name().to_owned());
        m.bpffs.push(node.bpffs().to_owned());
        m.pids.extend(node.dns_pid());
        for pod in node.pods() {
            m.netns.push(pod.netns_name().to_owned());
        }
    }
    m
}

/// A pid that is gone or was reused by something that is not ours is fine; ours as a zombie is
/// not (cleanup reaps its children).
fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn assert_gone(m: &Made) {
    let list = run_ok(std::process::Command::new("ip").args(["netns", "list"]), T).unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    let prefix = format!("st{}", m.id);
    assert!(
        !list.lines().any(|l| l.starts_with(&prefix)),
        "netns with prefix {prefix} left: {list}"
    );
    for ns in &m.netns {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "netns {ns} left"
        );
    }
    assert!(
        !m.cgroup_dir.exists(),
        "cgroup {} left",
        m.cgroup_dir.display()
    );
    for b in &m.bpffs {
        assert!(!b.exists(), "bpffs folder {} left", b.display());
    }
    let bpf_left: Vec<_> = std::fs::read_dir("/sys/fs/bpf")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("strait-test-{}", m.id))
        })
        .collect();
    assert!(bpf_left.is_empty(), "bpffs entries left: {bpf_left:?}");
    assert!(
        !m.temp_dir.exists(),
        "temp dir {} left",
        m.temp_dir.display()
    );
    for pid in &m.pids {
        assert!(!pid_alive(*pid), "process {pid} still exists");
    }
}

fn peer_call(pod: &Pod, args: &[&str]) -> (bool, Value) {
    let out = run(pod.command(PEER).arg("call").args(args), T).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "strait-peer printed no JSON ({e}): {stdout} / {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

fn serve(tb: &Testbed, pod: &Pod, name: &str) -> Process {
    let p = tb
        .spawn(
            &format!("peer-{name}"),
            pod.command(PEER).args([
                "serve",
                "--listen",
                "0.0.0.0:8080,[::]:8080",
                "--name",
                name,
            ]),
        )
        .unwrap();
    p.wait_listening(8080, Duration::from_secs(10)).unwrap();
    p
}

fn getent(pod: &Pod, name: &str) -> (i32, String) {
    let out = run(pod.command("getent").args(["hosts", name]), T).unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn one_node_dns_direct_and_unreachable() {
    let tb = Testbed::new("one_node_dns_direct_and_unreachable").expect("testbed");
    let node = tb.add_node("node1").unwrap();
    let client = node
        .add_pod(&PodSpec::new("client", "app").label("app", "client"))
        .unwrap();
    let server = node
        .add_pod(
            &PodSpec::new("color-v1", "app")
                .label("app", "color")
                .label("version", "v1"),
        )
        .unwrap();
    assert_eq!(client.ipv4().to_string(), "10.244.1.2");
    assert_eq!(server.ipv6().to_string(), "fd00:244:1::3");
    assert!(client.cgroup_path().starts_with(node.cgroup_root()));
    assert!(node.cgroup_root().starts_with(tb.cgroup2_mount()));

    tb.dns_record(
        "color.app.svc.cluster.local",
        &["10.96.0.10".parse().unwrap()],
    )
    .unwrap();
    tb.dns_record("color-v1.app.svc.cluster.local", &server.ips())
        .unwrap();

    // DNS: the full name, a short name through the search path, an unknown name.
    let (code, out) = getent(&client, "color.app.svc.cluster.local");
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("10.96.0.10 "), "{out}");
    let (code, out) = getent(&client, "color-v1");
    assert_eq!(code, 0, "search path: {out}");
    assert!(
        out.contains("fd00:244:1::3") || out.contains("10.244.1.3"),
        "{out}"
    );
    let (code, out) = getent(&client, "nothing.app.svc.cluster.local");
    assert_eq!(code, 2, "unknown names are NXDOMAIN: {out}");
    // Python's getaddrinfo sees the same DNS (the resolv.conf bind mount works for it too).
    if testbed::require_tool("python3").is_ok() {
        let out = run_ok(
            client.command("python3").args([
                "-c",
                "import socket; print(sorted({a[4][0] for a in socket.getaddrinfo('color-v1.app.svc.cluster.local', 80)}))",
            ]),
            T,
        )
        .unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.contains("10.244.1.3") && out.contains("fd00:244:1::3"),
            "{out}"
        );
    }

    // Pod to pod, by address and by name, both families.
    let srv = serve(&tb, &server, "v1");
    let v4 = format!("{}:8080", server.ipv4());
    let (ok, report) = peer_call(&client, &[&v4, "--bytes", "3000000"]);
    assert!(ok, "{report}");
    assert_eq!(report["by_server"]["v1"], 1, "{report}");
    assert_eq!(report["bytes_received"], 3_000_000, "{report}");
    let v6 = format!("[{}]:8080", server.ipv6());
    let (ok, report) = peer_call(&client, &[&v6, "--bytes", "3000000", "--count", "3"]);
    assert!(ok, "{report}");
    assert_eq!(report["succeeded"], 3, "{report}");
    let (ok, report) = peer_call(
        &client,
        &[
            "-6",
            "color-v1.app.svc.cluster.local:8080",
            "--bytes",
            "1000",
        ],
    );
    assert!(ok, "{report}");
    assert!(
        report["address"]
            .as_str()
            .unwrap()
            .starts_with("[fd00:244:1::3]"),
        "{report}"
    );

    // A service address nobody captured fails at once, locally.
    let started = Instant::now();
    let (ok, report) = peer_call(&client, &["10.96.0.10:8080", "--timeout", "5"]);
    assert!(!ok, "{report}");
    assert_eq!(report["errors"][0]["kind"], "connect", "{report}");
    assert_eq!(
        report["errors"][0]["errno"],
        libc::EHOSTUNREACH,
        "unreachable route: {report}"
    );
    assert!(started.elapsed() < Duration::from_secs(2), "{report}");
    let (ok, report) = peer_call(&client, &["[fd00:96::a]:8080", "--timeout", "5"]);
    assert!(!ok, "{report}");
    let errno = report["errors"][0]["errno"].as_i64().unwrap();
    assert!(
        errno == i64::from(libc::ENETUNREACH) || errno == i64::from(libc::EHOSTUNREACH),
        "{report}"
    );
    let routes = run_ok(
        std::process::Command::new("ip").args([
            "-n",
            client.netns_name(),
            "route",
            "show",
            "type",
            "unreachable",
        ]),
        T,
    )
    .unwrap();
    assert!(
        String::from_utf8_lossy(&routes.stdout).contains("unreachable 10.96.0.0/16"),
        "{routes:?}"
    );

    // No default route in a pod, either family.
    for family in ["-4", "-6"] {
        let out = run_ok(
            std::process::Command::new("ip").args([
                family,
                "-n",
                client.netns_name(),
                "route",
                "show",
                "default",
            ]),
            T,
        )
        .unwrap();
        assert!(out.stdout.is_empty(), "default route in pod: {out:?}");
    }

    // The process really runs in the pod's app container cgroup, a child of the pod cgroup (as
    // kubelet and the container runtime place it), not in the pod cgroup itself.
    let out = run_ok(client.command("cat").arg("/proc/self/cgroup"), T).unwrap();
    let app = client.container_cgroup("app");
    assert_eq!(app.parent(), Some(client.cgroup_path()));
    let rel = app.strip_prefix(tb.cgroup2_mount()).unwrap().to_owned();
    // (On hybrid hosts the v1 controllers' lines come first; the v2 line is `0::`.)
    let own = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        own.lines().find(|l| l.starts_with("0::")),
        Some(format!("0::/{}", rel.display()).as_str()),
        "{out:?}"
    );

    // Removing a record makes it NXDOMAIN after the reload.
    tb.remove_dns_record("color-v1.app.svc.cluster.local")
        .unwrap();
    let (code, _) = getent(&client, "color-v1.app.svc.cluster.local");
    assert_eq!(code, 2);

    // Workload file, as the agent reads it.
    let path = node.write_workload(&client).unwrap();
    let back: testbed::WorkloadFile =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(back, client.workload());
    assert_eq!(back.ips[0].to_string(), "10.244.1.2");
    node.remove_workload(&client).unwrap();
    assert!(!path.exists());

    // The agent would create its bpffs folder; the testbed removes it with everything in it.
    std::fs::create_dir_all(node.bpffs().join("links")).unwrap();

    let m = made(&tb, &[srv.pid()]);
    tb.cleanup().unwrap();
    assert_gone(&m);
}

#[test]
fn two_nodes_through_underlay() {
    let tb = Testbed::new("two_nodes_through_underlay").expect("testbed");
    let node1 = tb.add_node("node1").unwrap();
    let node2 = tb.add_node("node2").unwrap();
    assert_eq!(node2.underlay_ip().to_string(), "192.0.2.2");
    let a = node1.add_pod(&PodSpec::new("a", "app")).unwrap();
    let b = node2.add_pod(&PodSpec::new("b", "app")).unwrap();
    assert_eq!(b.ipv4().to_string(), "10.244.2.2");

    tb.dns_record("b.app.svc.cluster.local", &[IpAddr::V4(b.ipv4())])
        .unwrap();
    // Both nodes' DNS serve the record.
    let (code, out) = getent(&a, "b.app.svc.cluster.local");
    assert_eq!((code, out.starts_with("10.244.2.2 ")), (0, true), "{out}");
    let (code, _) = getent(&b, "b");
    assert_eq!(code, 0);

    let srv = serve(&tb, &b, "remote");
    for target in [format!("{}:8080", b.ipv4()), format!("[{}]:8080", b.ipv6())] {
        let (ok, report) = peer_call(&a, &[&target, "--bytes", "1000000"]);
        assert!(ok, "{target}: {report}");
        assert_eq!(report["by_server"]["remote"], 1);
    }
    // And back the other way, by name through the search path.
    let srv_a = serve(&tb, &a, "back");
    tb.dns_record("a.app.svc.cluster.local", &[IpAddr::V4(a.ipv4())])
        .unwrap();
    let (ok, report) = peer_call(&b, &["a:8080", "--bytes", "10000"]);
    assert!(ok, "{report}");

    let m = made(&tb, &[srv.pid(), srv_a.pid()]);
    drop(tb);
    assert_gone(&m);
}

#[test]
fn cleanup_after_panic() {
    let seen: Arc<Mutex<Option<Made>>> = Arc::default();
    let handle_slot: Arc<Mutex<Option<testbed::CleanupHandle>>> = Arc::default();
    let stray_slot: Arc<Mutex<Option<std::process::Child>>> = Arc::default();
    let (seen2, handle2, stray2) = (seen.clone(), handle_slot.clone(), stray_slot.clone());
    let result = std::panic::catch_unwind(move || {
        let tb = Testbed::new("cleanup_after_panic").expect("testbed");
        *handle2.lock().unwrap() = Some(tb.cleanup_handle());
        let node = tb.add_node("node1").unwrap();
        let pod = node.add_pod(&PodSpec::new("p", "app")).unwrap();
        let srv = serve(&tb, &pod, "doomed");
        // An untracked process in the pod's cgroup: cleanup must find it through the cgroup.
        let stray = pod.command("sleep").arg("600").spawn().unwrap();
        node.write_workload(&pod).unwrap();
        std::fs::create_dir_all(node.bpffs()).unwrap();
        *seen2.lock().unwrap() = Some(made(&tb, &[srv.pid(), stray.id()]));
        *stray2.lock().unwrap() = Some(stray);
        panic!("deliberate panic in the middle of a test");
    });
    assert!(result.is_err());
    let m = seen
        .lock()
        .unwrap()
        .clone()
        .expect("closure got far enough");
    // The untracked `sleep` was killed by cgroup.kill; it stays a zombie until its parent (this
    // test) reaps it.
    let status = stray_slot.lock().unwrap().take().unwrap().wait().unwrap();
    assert!(!status.success(), "{status}");
    assert_gone(&m);
    // The Ctrl-C handle is idempotent after Drop.
    let handle = handle_slot.lock().unwrap().take().unwrap();
    handle.cleanup().unwrap();
    handle.cleanup().unwrap();
}

#[test]
fn names_and_prerequisites_are_checked() {
    let tb = Testbed::new("names_and_prerequisites_are_checked").expect("testbed");
    assert_eq!(tb.id().len(), 6);
    assert!(tb.add_node("Bad.Name").is_err());
    let node = tb.add_node("n").unwrap();
    assert!(tb.add_node("n").is_err());
    assert!(node.add_pod(&PodSpec::new("x_y", "app")).is_err());
    assert!(node.netns_name().len() <= 15);
    let p = node.add_pod(&PodSpec::new("x", "app")).unwrap();
    assert!(p.netns_name().len() <= 15);
    assert!(node.add_pod(&PodSpec::new("x", "app")).is_err());
    assert!(testbed::require_tool("no-such-tool-strait").is_err());
}
