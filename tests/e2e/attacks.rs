//! Attacks on strait, each performed for real against the agent on the testbed: a test passes
//! only when the attack fails. What each one defends is listed in docs/security.md ("What
//! strait defends against, and how it is tested").
//!
//! - Plaintext to a STRICT port through another address of the pod (a secondary IP that is
//!   not in the workload file, the IPv6 link-local address from a same-node pod and from the
//!   node) is refused like plaintext to the pod's own address; a pod without ::1 (no IPv6
//!   inbound socket) does not leave its STRICT ports open over IPv6.
//! - A virtual service without a provider is refused, not let out to its address.
//! - An access log path from the mesh cannot leave the operator's log directory (absolute
//!   elsewhere, a symlink planted at or swapped into the path).
//! - A duration past the bound in a mesh file is a located validation error.
//! - The hand-over socket hands nothing to a non-root process or to a root process that does
//!   not hold the agent's token, and the agent keeps serving.
//! - Private keys readable by group or others are refused (the identity, not the agent);
//!   `strait ca` writes 0700/0600.
//! - A workload sharing a network namespace cannot present its captured client port at another
//!   workload's outbound listener (SO_REUSEADDR) and be proxied as that workload.
//! - A pod flooding connects that never reach the agent cannot push other pods' pending
//!   connections out of the node-wide map.
//! - A pod whose own program holds the ports the agent would give it is enrolled on others,
//!   so holding ports keeps no pod out of its egress policy.
//!
//! Needs root; without it these tests fail (never skip) with the reason.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use testbed::agent::{Agent, echo_server, issue_mesh_certs, metric, peer_binary, strait_binary};
use testbed::{Node, Pod, PodSpec, Process, Testbed, addr, eventually, run};

const COLOR: &str = "color.app.svc.cluster.local";
const GHOST: &str = "ghost.app.svc.cluster.local";

/// The mesh of these tests (ALLOW_ALL): `client` may call `color` (a TCP echo on 9090 with tls
/// STRICT) and `ghost` (a virtual service without a provider). `client_log` and `color_log`
/// are `logging.accessLog.file.path` values.
fn mesh_yaml(certs: &Path, client_log: Option<&str>, color_log: Option<&str>) -> String {
    let c = certs.display();
    let logging = |path: Option<&str>| match path {
        Some(p) => format!("  logging: {{accessLog: {{file: {{path: {p:?}}}}}}}\n"),
        None => String::new(),
    };
    let client_logging = logging(client_log);
    let color_logging = logging(color_log);
    format!(
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: test}}
spec: {{egressFilter: {{type: ALLOW_ALL}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: client, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  backends:
    - virtualService: {{virtualServiceRef: {{name: color}}}}
    - virtualService: {{virtualServiceRef: {{name: ghost}}}}
{client_logging}---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: color, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: color}}}}
  listeners:
    - portMapping: {{port: 9090, protocol: tcp}}
      tls:
        mode: STRICT
        certificate: {{file: {{certificateChain: {c}/color.pem, privateKey: {c}/color-key.pem}}}}
  serviceDiscovery: {{dns: {{hostname: color-v1.app.svc.cluster.local}}}}
{color_logging}---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: color, namespace: app}}
spec:
  awsName: {COLOR}
  provider: {{virtualNode: {{virtualNodeRef: {{name: color}}}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: ghost, namespace: app}}
spec:
  awsName: {GHOST}
"#
    )
}

/// One node: `client` and `color` in the mesh, `outside` (a TCP echo named `outside` on 8080)
/// not in it; certificates issued; the agent not started yet.
struct Bed {
    tb: Testbed,
    node: Node,
    client: Pod,
    color: Pod,
    outside: Pod,
    certs: PathBuf,
    mesh: PathBuf,
    _servers: Vec<Process>,
}

fn bed(test: &str) -> anyhow::Result<Bed> {
    let tb = Testbed::new(test)?;
    let node = tb.add_node("node1")?;
    let client = node.add_pod(&PodSpec::new("client", "app").label("app", "client"))?;
    let color = node.add_pod(&PodSpec::new("color", "app").label("app", "color"))?;
    let outside = node.add_pod(&PodSpec::new("stranger", "outside").label("app", "stranger"))?;
    tb.dns_record(COLOR, &["10.96.0.10".parse()?])?;
    tb.dns_record("color-v1.app.svc.cluster.local", &color.ips())?;
    // The provider-less service's name answers with an address outside the mesh that does
    // serve: traffic that leaks past the agent would reach it.
    tb.dns_record(GHOST, &outside.ips())?;
    let mut servers = Vec::new();
    for (pod, port, name) in [(&color, 9090, "color"), (&outside, 8080, "outside")] {
        let server = echo_server(&tb, pod, port, name)?;
        servers.push(server);
    }
    let certs = tb.temp_dir().join("certs");
    let ca = tb.temp_dir().join("ca");
    let mesh = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh, mesh_yaml(&certs, None, None))?;
    issue_mesh_certs(&node, &mesh, &ca)?;
    for pod in [&client, &color] {
        node.write_workload(pod)?;
    }
    Ok(Bed {
        tb,
        node,
        client,
        color,
        outside,
        certs,
        mesh,
        _servers: servers,
    })
}

impl Bed {
    fn start(&self, extra: &[&str]) -> anyhow::Result<Agent> {
        let agent = Agent::start(&self.tb, &self.node, &self.mesh, extra)?;
        for pod in ["app/client", "app/color"] {
            agent.wait_enrolled(pod, true, Duration::from_secs(20))?;
        }
        Ok(agent)
    }
}

/// `strait-peer call` from a command (a pod's or the node's); returns its JSON report.
fn call_from(mut command: Command, target: &str, args: &[&str]) -> anyhow::Result<Value> {
    let output = run(
        command.args(["call", target]).args(args),
        Duration::from_secs(60),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "strait-peer call printed no JSON report: stdout {stdout:?}, stderr {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

fn call(pod: &Pod, target: &str, args: &[&str]) -> anyhow::Result<Value> {
    call_from(pod.command(peer_binary()?), target, args)
}

/// The pod's IPv6 link-local address on eth0, once it has left the tentative state.
fn link_local(pod: &Pod) -> anyhow::Result<String> {
    let mut found = None;
    eventually(
        Duration::from_secs(10),
        "the pod's link-local address is usable",
        || {
            let output = run(
                pod.command("ip").args([
                    "-6",
                    "-o",
                    "addr",
                    "show",
                    "dev",
                    testbed::POD_IF,
                    "scope",
                    "link",
                ]),
                Duration::from_secs(10),
            )?;
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            if text.contains("tentative") {
                return Ok(false);
            }
            found = text
                .split_whitespace()
                .skip_while(|w| *w != "inet6")
                .nth(1)
                .and_then(|a| a.split('/').next())
                .map(str::to_owned);
            Ok(found.is_some())
        },
    )?;
    found.context("no link-local address")
}

/// The count of STRICT refusals; `want` is checked, with the agent's counters on failure.
fn assert_refused(agent: &Agent, want: f64) -> anyhow::Result<()> {
    let mut seen = 0.0;
    eventually(
        Duration::from_secs(5),
        "the agent counts the refusal",
        || {
            seen = metric(agent, "strait_inbound_plaintext", &["strict", "refused"])?;
            Ok(seen == want)
        },
    )
    .with_context(|| {
        let metrics = agent.admin_get("/metrics").unwrap_or_default();
        let inpod: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("strait_inpod") || l.starts_with("strait_inbound"))
            .collect();
        format!("STRICT refusals {seen}, want {want}; in-pod counters {inpod:?}")
    })
}

/// Plaintext to a STRICT port must pass the agent whatever local address of the pod it
/// targets: a secondary IP the workload file does not list, and the IPv6 link-local address
/// (from a same-node pod and from the node).
#[test]
fn strict_is_not_bypassed_through_another_address_of_the_pod() -> anyhow::Result<()> {
    let bed = bed("attack-strict-addr")?;
    let agent = bed.start(&[])?;
    // The attacks need the app to be reachable at those addresses at all: it is, from
    // inside the pod (loopback is never captured; a pod calling itself is its own business).
    let report = call(&bed.color, "127.0.0.1:9090", &["-4"])?;
    assert_eq!(report["by_server"]["color"], 1, "loopback: {report}");

    // A secondary address, not in the workload file.
    let secondary = addr::pod_v4(bed.node.index(), 200);
    run(
        bed.color.command("ip").args([
            "addr",
            "add",
            &format!("{secondary}/32"),
            "dev",
            testbed::POD_IF,
        ]),
        Duration::from_secs(10),
    )?;
    let report = call(&bed.outside, &format!("{secondary}:9090"), &["-4"])?;
    assert_eq!(
        report["ok"], false,
        "plaintext to a STRICT port on a secondary address reached the app: {report}"
    );
    assert_refused(&agent, 1.0)?;

    // IPv6 link-local, from a pod on the same bridge and from the node.
    let ll = link_local(&bed.color)?;
    let report = call(
        &bed.outside,
        &format!("[{ll}%{}]:9090", testbed::POD_IF),
        &["-6"],
    )?;
    assert_eq!(
        report["ok"], false,
        "plaintext to a STRICT port on the link-local address reached the app: {report}"
    );
    assert_refused(&agent, 2.0)?;
    let report = call_from(
        bed.node.command(peer_binary()?),
        &format!("[{ll}%{}]:9090", testbed::NODE_BRIDGE),
        &["-6"],
    )?;
    assert_eq!(
        report["ok"], false,
        "plaintext from the node to the link-local address reached the app: {report}"
    );
    assert_refused(&agent, 3.0)?;

    // The mesh still delivers to the pod.
    let report = call(&bed.client, &format!("{COLOR}:9090"), &["-4"])?;
    assert_eq!(
        report["by_server"]["color"], 1,
        "through the mesh: {report}"
    );
    Ok(())
}

/// A pod without an IPv6 loopback (::1 gone) cannot get the agent's IPv6 inbound socket; its
/// STRICT port must not be reachable over IPv6 for it (the pod still has IPv6 on eth0).
#[test]
fn strict_is_not_bypassed_over_ipv6_when_the_pod_has_no_ipv6_loopback() -> anyhow::Result<()> {
    let bed = bed("attack-strict-v6")?;
    run(
        bed.color
            .command("sysctl")
            .args(["-w", "net.ipv6.conf.lo.disable_ipv6=1"]),
        Duration::from_secs(10),
    )?;
    // Without the agent, the app does answer over IPv6 on the pod's address.
    let v6 = format!("[{}]:9090", bed.color.ipv6());
    let report = call(&bed.outside, &v6, &["-6"])?;
    assert_eq!(
        report["by_server"]["color"], 1,
        "before the agent: {report}"
    );
    let agent = bed.start(&[])?;
    // IPv4 is captured as usual.
    let report = call(&bed.outside, &format!("{}:9090", bed.color.ipv4()), &["-4"])?;
    assert_eq!(report["ok"], false, "{report}");
    assert_refused(&agent, 1.0)?;
    // IPv6 to the pod's own address: no agent socket to hand it to, so it is dropped.
    let report = call(&bed.outside, &v6, &["-6", "--timeout", "3"])?;
    assert_eq!(
        report["ok"], false,
        "plaintext over IPv6 reached the STRICT app of a pod without ::1: {report}"
    );
    assert!(report["by_server"]["color"].is_null(), "{report}");
    let dropped = metric(&agent, "strait_inpod_events", &["inbound_no_socket"])?;
    ensure!(dropped >= 1.0, "no drop counted ({dropped})");
    Ok(())
}

/// A virtual service without a provider: the mesh says its connections are refused, so they
/// must not go out to its address (which here serves) under ALLOW_ALL.
#[test]
fn a_virtual_service_without_a_provider_is_refused_not_let_out() -> anyhow::Result<()> {
    let bed = bed("attack-no-provider")?;
    let agent = bed.start(&[])?;
    // The agent warned about it.
    ensure!(
        agent
            .process
            .stderr()
            .contains("connections to it are refused"),
        "no warning about the provider-less service: {}",
        agent.process.stderr()
    );
    // Wait for the agent's DNS answers to be in (the other service is captured by then).
    eventually(Duration::from_secs(15), "color is captured", || {
        Ok(call(&bed.client, &format!("{COLOR}:9090"), &["-4"])?["ok"] == true)
    })?;
    for (target, family) in [
        (format!("{GHOST}:8080"), "-4"),
        (format!("{GHOST}:8080"), "-6"),
    ] {
        let report = call(&bed.client, &target, &[family])?;
        assert_eq!(
            report["ok"], false,
            "a connection to the provider-less service left the mesh ({family}): {report}"
        );
        assert!(report["by_server"]["outside"].is_null(), "{report}");
    }
    // The address itself is still reachable for pods outside the mesh (nothing else changed).
    let report = call(
        &bed.outside,
        &format!("{}:8080", bed.outside.ipv4()),
        &["-4"],
    )?;
    assert_eq!(report["by_server"]["outside"], 1, "{report}");
    Ok(())
}

/// Waits a moment for access-log writers, then returns the victim's content.
fn victim_after_traffic(bed: &Bed, victim: &Path) -> anyhow::Result<String> {
    for _ in 0..3 {
        let _ = call(&bed.client, &format!("{COLOR}:9090"), &["-4"])?;
    }
    std::thread::sleep(Duration::from_secs(2));
    Ok(std::fs::read_to_string(victim)?)
}

/// A mesh author names a file outside the access-log directory (as root, the agent would
/// append chosen text to it).
#[test]
fn an_access_log_outside_the_log_directory_is_refused() -> anyhow::Result<()> {
    let bed = bed("attack-log-outside")?;
    // The victim: a file this test made in its own temp dir, standing in for /etc/cron.d/x.
    let victim = bed.tb.temp_dir().join("victim.txt");
    std::fs::write(&victim, "original\n")?;
    std::fs::write(
        &bed.mesh,
        mesh_yaml(&bed.certs, Some(&victim.display().to_string()), None),
    )?;
    // The default access log directory (/var/log/strait): the victim is outside it. The
    // agent refuses before it creates that directory.
    let started = Agent::start(&bed.tb, &bed.node, &bed.mesh, &[]);
    match started {
        Ok(agent) => {
            agent.wait_enrolled("app/client", true, Duration::from_secs(20))?;
            let content = victim_after_traffic(&bed, &victim)?;
            bail!(
                "the agent accepted an access log outside its directory; the victim now holds {content:?}"
            );
        }
        Err(error) => {
            let text = format!("{error:#}");
            ensure!(
                text.contains("accessLog.file.path")
                    && text.contains("outside the access log directory"),
                "the refusal does not say what and where: {text}"
            );
        }
    }
    assert_eq!(std::fs::read_to_string(&victim)?, "original\n");

    // `..` is caught by validation, with its line and column.
    std::fs::write(
        &bed.mesh,
        mesh_yaml(&bed.certs, Some("../victim.txt"), None),
    )?;
    let output = run(
        Command::new(strait_binary()?)
            .arg("validate")
            .arg(&bed.mesh),
        Duration::from_secs(30),
    )?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    ensure!(!output.status.success(), "validate accepted `..`: {text}");
    ensure!(
        text.contains(&format!("{}:14:", bed.mesh.display()))
            && text.contains("logging.accessLog.file.path"),
        "no located error for `..`: {text}"
    );
    Ok(())
}

/// Symlinks in the log directory: planted before the agent starts (refused at load), or
/// swapped in for a log file while it runs (the file is reopened without following it).
#[test]
fn an_access_log_symlink_out_of_the_log_directory_is_not_followed() -> anyhow::Result<()> {
    let bed = bed("attack-log-symlink")?;
    let victim = bed.tb.temp_dir().join("victim.txt");
    std::fs::write(&victim, "original\n")?;
    let logs = bed.tb.temp_dir().join("logs-dir");
    std::fs::create_dir_all(&logs)?;
    std::os::unix::fs::symlink(&victim, logs.join("color.log"))?;
    std::fs::write(
        &bed.mesh,
        mesh_yaml(&bed.certs, Some("client.log"), Some("color.log")),
    )?;
    let dir_arg = ["--access-log-dir", &logs.display().to_string()];
    match Agent::start(&bed.tb, &bed.node, &bed.mesh, &dir_arg) {
        Ok(agent) => {
            agent.wait_enrolled("app/client", true, Duration::from_secs(20))?;
            let content = victim_after_traffic(&bed, &victim)?;
            bail!("the agent accepted a symlinked access log; the victim now holds {content:?}");
        }
        Err(error) => {
            let text = format!("{error:#}");
            ensure!(
                text.contains("color.log") && text.contains("symlink"),
                "the refusal does not name the symlink: {text}"
            );
        }
    }
    assert_eq!(std::fs::read_to_string(&victim)?, "original\n");

    // Without the planted link the agent runs; relative paths land in the directory.
    std::fs::remove_file(logs.join("color.log"))?;
    let agent = bed.start(&dir_arg)?;
    let report = call(&bed.client, &format!("{COLOR}:9090"), &["-4"])?;
    assert_eq!(report["ok"], true, "{report}");
    let client_log = logs.join("client.log");
    eventually(
        Duration::from_secs(10),
        "the client's access log line",
        || Ok(std::fs::read_to_string(&client_log).is_ok_and(|t| !t.is_empty())),
    )?;
    // Swapped in while running: the writer notices the rotation and must not follow it.
    std::fs::remove_file(&client_log)?;
    std::os::unix::fs::symlink(&victim, &client_log)?;
    let content = victim_after_traffic(&bed, &victim)?;
    assert_eq!(
        content, "original\n",
        "the agent followed a swapped-in symlink"
    );
    ensure!(agent.process.try_wait()?.is_none(), "the agent died");
    Ok(())
}

/// A duration of i64::MAX seconds made `Instant + d` panic on every request of its route;
/// such values are validation errors with file, line, column and field path.
#[test]
fn a_duration_past_the_bound_is_a_located_validation_error() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("strait-attack-duration-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mesh = dir.join("mesh.yaml");
    std::fs::write(
        &mesh,
        r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {name: test}
spec: {}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: color, namespace: app}
spec:
  listeners:
    - portMapping: {port: 8080, protocol: http}
      timeout:
        http:
          perRequest: {unit: s, value: 9223372036854775807}
  serviceDiscovery: {dns: {hostname: color.app.svc.cluster.local}}
"#,
    )?;
    let output = run(
        Command::new(strait_binary()?).arg("validate").arg(&mesh),
        Duration::from_secs(30),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let output = output?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    ensure!(
        !output.status.success(),
        "validate accepted a duration of i64::MAX seconds: {text}"
    );
    ensure!(
        text.contains(&format!("{}:14:", mesh.display()))
            && text.contains("timeout.http.perRequest.value"),
        "no located error for the duration: {text}"
    );
    Ok(())
}

/// Runs a Python snippet that connects to the hand-over socket and prints what it received
/// (or the error), under `setpriv` arguments if given.
fn handover_client(socket: &Path, setpriv: &[&str]) -> anyhow::Result<String> {
    let script = r#"
import os, socket, sys
print("uid=%d" % os.getuid())
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(5)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("connect failed:", e)
    sys.exit(0)
try:
    data = s.recv(65536)
    print("received:", data.decode(errors="replace"))
    s.send(b"k")
    print("more:", s.recv(65536))
except OSError as e:
    print("recv failed:", e)
"#;
    // The system's interpreter: `nobody` cannot run one under /root.
    let python = "/usr/bin/python3";
    let mut command = if setpriv.is_empty() {
        Command::new(python)
    } else {
        let mut c = Command::new("setpriv");
        c.args(setpriv).arg(python);
        c
    };
    let output = run(
        command.args(["-c", script]).arg(socket),
        Duration::from_secs(20),
    )?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr))
}

/// Any local process that could connect to the hand-over socket received every in-pod
/// listener and made the agent drain and exit. A non-root process and a root process that is
/// not a strait agent (no token) must get nothing, and the agent must keep serving. The agent
/// is started with umask 0, so the socket's mode is the agent's doing, not the umask's.
#[test]
fn the_handover_socket_serves_only_a_strait_agent() -> anyhow::Result<()> {
    let bed = bed("attack-handover")?;
    // Let `nobody` reach the socket's folder (the testbed's temp dir), as in a /run/strait that
    // others may traverse.
    std::fs::set_permissions(bed.tb.temp_dir(), std::fs::Permissions::from_mode(0o755))?;
    let agent = Agent::start_with(&bed.tb, &bed.node, &bed.mesh, &[], |command| {
        // SAFETY: umask is async-signal-safe and touches only the child.
        unsafe {
            command.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
    })?;
    agent.wait_enrolled("app/client", true, Duration::from_secs(20))?;
    let socket = bed
        .tb
        .temp_dir()
        .join(format!("{}-handover.sock", bed.node.name()));
    ensure!(
        socket.exists(),
        "no hand-over socket at {}",
        socket.display()
    );

    let nobody = handover_client(
        &socket,
        &["--reuid=65534", "--regid=65534", "--clear-groups"],
    )?;
    ensure!(
        nobody.contains("uid=65534"),
        "the client did not run as nobody: {nobody}"
    );
    ensure!(
        !nobody.contains("outbound/") && !nobody.contains("inbound/"),
        "a non-root process received the listener manifest: {nobody}"
    );
    let foreign = handover_client(&socket, &[])?;
    ensure!(
        foreign.contains("uid=0"),
        "the client did not run as root: {foreign}"
    );
    ensure!(
        !foreign.contains("outbound/") && !foreign.contains("inbound/"),
        "a root process without the token received the listener manifest: {foreign}"
    );
    // The agent did not hand over, drain or exit, and still serves the mesh.
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        agent.process.try_wait()?.is_none(),
        "the agent exited after a foreign hand-over request: {}",
        agent.process.stderr()
    );
    ensure!(
        !agent.process.stderr().contains("listeners handed over"),
        "the agent handed its listeners over: {}",
        agent.process.stderr()
    );
    let report = call(&bed.client, &format!("{COLOR}:9090"), &["-4"])?;
    assert_eq!(report["by_server"]["color"], 1, "{report}");
    ensure!(
        agent.process.stderr().contains("hand-over refused"),
        "the refusals were not logged: {}",
        agent.process.stderr()
    );
    let mode = std::fs::metadata(&socket)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "hand-over socket mode {mode:o}");
    Ok(())
}

/// Private keys readable by group or others are refused (as ssh does), naming the file and
/// the fix; `strait ca` writes its folders 0700 and keys 0600.
#[test]
fn keys_readable_by_others_are_refused_and_strait_ca_writes_private_files() -> anyhow::Result<()> {
    let bed = bed("attack-key-mode")?;
    let mode = |p: &Path| -> anyhow::Result<u32> {
        Ok(std::fs::metadata(p)
            .with_context(|| p.display().to_string())?
            .permissions()
            .mode()
            & 0o777)
    };
    let key = bed.certs.join("color-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644))?;
    // The agent holds only the identities of its pods, read when it needs them: it starts,
    // and refuses color's identity (its pod runs here) naming the key and the fix.
    let agent = bed.start(&[])?;
    let key_text = key.display().to_string();
    let status = bed_workload(&agent, "app/color")?;
    let error = status["identity"]["certificate"]["error"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    ensure!(
        error.contains(&key_text) && error.contains("chmod 600"),
        "the agent used a private key readable by others, or did not name the key and the fix: {status}"
    );
    ensure!(
        agent
            .log_lines()
            .iter()
            .any(|l| l["reason"] == "key_permissions"
                && l["message"].as_str().is_some_and(|m| m.contains(&key_text))),
        "the refusal was not logged: {}",
        agent.process.stderr()
    );
    assert!(metric(&agent, "strait_identity_refused", &["key_permissions"])? >= 1.0);
    agent.stop()?;
    drop(agent);
    // With the fix applied the identity is used.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))?;
    let agent = bed.start(&[])?;
    let status = bed_workload(&agent, "app/color")?;
    ensure!(
        status["identity"]["certificate"]["error"].is_null(),
        "{status}"
    );

    // What `strait ca` wrote: folders 0700, keys 0600.
    let ca = bed.tb.temp_dir().join("ca");
    assert_eq!(mode(&ca)?, 0o700, "CA folder");
    assert_eq!(mode(&ca.join("ca-key.pem"))?, 0o600, "CA key");
    assert_eq!(
        mode(&bed.certs)?,
        0o700,
        "certificate folder strait ca made"
    );
    for name in ["color-key.pem", "client-key.pem"] {
        let path = bed.certs.join(name);
        if path.exists() {
            assert_eq!(mode(&path)?, 0o600, "issued key {name}");
        }
    }
    Ok(())
}

/// The `/workloads` entry of a pod.
fn bed_workload(agent: &Agent, pod: &str) -> anyhow::Result<Value> {
    agent
        .workloads()?
        .into_iter()
        .find(|w| w["pod"] == pod)
        .with_context(|| format!("{pod} is not in /workloads"))
}

/// The mesh of the change test: egress DROP_ALL; `color` pods are selected by one of two
/// virtual nodes (label `track: a|b`), both with a STRICT listener on 9090, and so are the
/// `client` pods (both calling `color`).
fn changing_mesh_yaml(certs: &Path) -> String {
    let c = certs.display();
    let mut yaml = String::from(
        "apiVersion: appmesh.k8s.aws/v1beta2\nkind: Mesh\nmetadata: {name: test}\n\
         spec: {egressFilter: {type: DROP_ALL}}\n",
    );
    for track in ["a", "b"] {
        yaml.push_str(&format!(
            r#"---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: client-{track}, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: client, track: "{track}"}}}}
  backends:
    - virtualService: {{virtualServiceRef: {{name: color}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: color-{track}, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: color, track: "{track}"}}}}
  listeners:
    - portMapping: {{port: 9090, protocol: tcp}}
      tls:
        mode: STRICT
        certificate: {{file: {{certificateChain: {c}/color-{track}.pem, privateKey: {c}/color-{track}-key.pem}}}}
  serviceDiscovery: {{dns: {{hostname: color-v1.app.svc.cluster.local}}}}
"#
        ));
    }
    yaml.push_str(&format!(
        r#"---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata: {{name: color, namespace: app}}
spec:
  listeners: [{{portMapping: {{port: 9090, protocol: tcp}}}}]
  routes:
    - name: both
      tcpRoute:
        action:
          weightedTargets:
            - {{virtualNodeRef: {{name: color-a}}, weight: 50}}
            - {{virtualNodeRef: {{name: color-b}}, weight: 50}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata: {{name: color, namespace: app}}
spec:
  awsName: {COLOR}
  provider: {{virtualRouter: {{virtualRouterRef: {{name: color}}}}}}
"#
    ));
    yaml
}

/// Writes a pod's workload file with `track` as its label (which picks its virtual node) and,
/// when `extra_ip` is set, one more address: a change to the workload and to its virtual node.
fn write_changed_workload(
    node: &Node,
    pod: &Pod,
    track: &str,
    extra_ip: Option<std::net::IpAddr>,
) -> anyhow::Result<()> {
    let mut workload = pod.workload();
    workload.labels.insert("track".into(), track.into());
    workload.ips.extend(extra_ip);
    let path = node.workloads_dir().join(workload.file_name());
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&workload)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// A change to a pod (its labels, so its virtual node, and its addresses) is make before
/// break: while a STRICT pod and a DROP_ALL pod are changed 50 times, plaintext hammering the
/// STRICT port and outside connects from the DROP_ALL pod never get through once.
#[test]
fn a_pod_changed_50_times_is_never_less_protected() -> anyhow::Result<()> {
    let tb = Testbed::new("attack-changes")?;
    let node = tb.add_node("node1")?;
    let client = node.add_pod(&PodSpec::new("client", "app").label("app", "client"))?;
    let color = node.add_pod(&PodSpec::new("color", "app").label("app", "color"))?;
    let outside = node.add_pod(&PodSpec::new("stranger", "outside").label("app", "stranger"))?;
    tb.dns_record(COLOR, &["10.96.0.10".parse()?])?;
    tb.dns_record("color-v1.app.svc.cluster.local", &color.ips())?;
    let mut servers = Vec::new();
    for (pod, port, name) in [(&color, 9090, "color"), (&outside, 8080, "outside")] {
        let server = echo_server(&tb, pod, port, name)?;
        servers.push(server);
    }
    let certs = tb.temp_dir().join("certs");
    let ca = tb.temp_dir().join("ca");
    let mesh = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh, changing_mesh_yaml(&certs))?;
    issue_mesh_certs(&node, &mesh, &ca)?;
    write_changed_workload(&node, &client, "a", None)?;
    write_changed_workload(&node, &color, "a", None)?;
    let agent = Agent::start(&tb, &node, &mesh, &[])?;
    let virtual_node = |pod: &str| -> anyhow::Result<Option<String>> {
        Ok(agent
            .workloads()?
            .iter()
            .find(|w| w["pod"] == pod && w["enrolled"] == true)
            .and_then(|w| w["virtual_node"].as_str().map(str::to_owned)))
    };
    for pod in ["app/client", "app/color"] {
        agent.wait_enrolled(pod, true, Duration::from_secs(20))?;
    }
    // Before any change: the STRICT port refuses plaintext, DROP_ALL refuses the outside.
    let color_target = format!("{}:9090", color.ipv4());
    let outside_target = format!("{}:8080", outside.ipv4());
    let report = call(&outside, &color_target, &["-4"])?;
    assert_eq!(
        report["succeeded"], 0,
        "STRICT before the changes: {report}"
    );
    let report = call(&client, &outside_target, &["-4"])?;
    assert_eq!(
        report["succeeded"], 0,
        "DROP_ALL before the changes: {report}"
    );

    // The hammers: bounded batches of connects, until the changes are done.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = |from: Pod, target: String| {
        let done = done.clone();
        std::thread::spawn(move || -> anyhow::Result<(u64, u64)> {
            let (mut attempts, mut through) = (0, 0);
            let deadline = Instant::now() + Duration::from_secs(300);
            while !done.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let report = call(
                    &from,
                    &target,
                    &[
                        "-4",
                        "--count",
                        "40",
                        "--interval-ms",
                        "2",
                        "--timeout",
                        "2",
                    ],
                )?;
                attempts += report["connections"].as_u64().unwrap_or(0);
                through += report["succeeded"].as_u64().unwrap_or(0);
            }
            Ok((attempts, through))
        })
    };
    let strict_hammer = hammer(outside.clone(), color_target.clone());
    let drop_all_hammer = hammer(client.clone(), outside_target.clone());

    let changes = (|| -> anyhow::Result<()> {
        for change in 1..=50u8 {
            let track = if change % 2 == 1 { "b" } else { "a" };
            // Every third change also gives the pods another address.
            let extra = |pod: &Pod| {
                (change % 3 == 0)
                    .then(|| std::net::IpAddr::V4(addr::pod_v4(node.index(), 200 + pod.index())))
            };
            write_changed_workload(&node, &color, track, extra(&color))?;
            write_changed_workload(&node, &client, track, extra(&client))?;
            // Each change must be applied (not folded into the next one) before the next.
            for (pod, vn) in [("app/color", "color"), ("app/client", "client")] {
                let want = format!("app/{vn}-{track}");
                eventually(Duration::from_secs(60), "the change is applied", || {
                    Ok(virtual_node(pod)?.as_deref() == Some(want.as_str()))
                })
                .with_context(|| {
                    let stderr = agent.process.stderr();
                    let tail: Vec<&str> = stderr
                        .lines()
                        .filter(|l| {
                            !l.contains("\"level\":\"DEBUG\"") && !l.contains("strait::inbound")
                        })
                        .rev()
                        .take(30)
                        .collect();
                    format!("change {change}: {pod} to {want}; the agent's last lines: {tail:#?}")
                })?;
            }
        }
        Ok(())
    })();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let strict = strict_hammer
        .join()
        .map_err(|_| anyhow::anyhow!("the STRICT hammer panicked"))??;
    let drop_all = drop_all_hammer
        .join()
        .map_err(|_| anyhow::anyhow!("the DROP_ALL hammer panicked"))??;
    changes?;
    assert_eq!(
        strict.1, 0,
        "plaintext reached the STRICT app {} times in {} attempts during 50 changes",
        strict.1, strict.0
    );
    assert_eq!(
        drop_all.1, 0,
        "the DROP_ALL pod reached the outside {} times in {} attempts during 50 changes",
        drop_all.1, drop_all.0
    );
    assert!(
        strict.0 >= 200 && drop_all.0 >= 200,
        "too few attempts to mean anything: STRICT {}, DROP_ALL {}",
        strict.0,
        drop_all.0
    );
    eprintln!(
        "50 changes: {} plaintext attempts at the STRICT port, {} outside connects from the \
         DROP_ALL pod; none got through",
        strict.0, drop_all.0
    );
    // And the mesh still works for the pods as they are now.
    let report = call(&client, &format!("{COLOR}:9090"), &["-4", "--count", "5"])?;
    assert_eq!(report["succeeded"], 5, "after the changes: {report}");
    drop(servers);
    Ok(())
}

/// Holds the agent's first outbound and inbound ports (both families) inside the pod, then
/// sleeps: a pod's own program on the ports the agent would pick for it.
const HOLD_PORTS_SCRIPT: &str = r#"
import socket, sys, time
held = []
for port in range(int(sys.argv[1]), int(sys.argv[2]) + 1):
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.bind((addr, port))
        s.listen(8)
        held.append(s)
print("held", len(held), flush=True)
time.sleep(600)
"#;

/// A pod whose own program already listens on the ports the agent would give it (on loopback,
/// in both families) is still enrolled, on other ports, and held to its egress policy: holding
/// ports is no way for a pod to stay out of the mesh. Before the fix, its enrollment failed
/// with EADDRINUSE on every retry and the DROP_ALL pod's connects went out.
#[test]
fn a_pod_holding_the_agents_ports_is_still_enrolled_and_held_to_its_policy() -> anyhow::Result<()> {
    let tb = Testbed::new("attack-ports")?;
    let node = tb.add_node("node1")?;
    let client = node.add_pod(&PodSpec::new("client", "app").label("app", "client"))?;
    let color = node.add_pod(&PodSpec::new("color", "app").label("app", "color"))?;
    let outside = node.add_pod(&PodSpec::new("stranger", "outside").label("app", "stranger"))?;
    tb.dns_record(COLOR, &["10.96.0.10".parse()?])?;
    tb.dns_record("color-v1.app.svc.cluster.local", &color.ips())?;
    let servers = [
        echo_server(&tb, &color, 9090, "color")?,
        echo_server(&tb, &outside, 8080, "outside")?,
    ];
    // The agent's defaults: outbound 15001, inbound 15006; hold three of each.
    let script = tb.temp_dir().join("hold.py");
    std::fs::write(&script, HOLD_PORTS_SCRIPT)?;
    let holders = [("15001", "15003"), ("15006", "15008")]
        .iter()
        .map(|(first, last)| {
            tb.spawn(
                &format!("holder-{first}"),
                client
                    .command("/usr/bin/python3")
                    .arg(&script)
                    .args([first, last]),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for holder in &holders {
        eventually(Duration::from_secs(10), "the pod holds its ports", || {
            if let Some(status) = holder.try_wait()? {
                bail!("the port holder exited ({status}): {}", holder.stderr());
            }
            Ok(holder.stdout().contains("held 6"))
        })?;
    }
    let certs = tb.temp_dir().join("certs");
    let ca = tb.temp_dir().join("ca");
    let mesh = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh, changing_mesh_yaml(&certs))?;
    issue_mesh_certs(&node, &mesh, &ca)?;
    write_changed_workload(&node, &client, "a", None)?;
    write_changed_workload(&node, &color, "a", None)?;
    let agent = Agent::start(&tb, &node, &mesh, &[])?;
    for pod in ["app/client", "app/color"] {
        agent.wait_enrolled(pod, true, Duration::from_secs(30))?;
    }
    // Enrolled, so DROP_ALL holds and the mesh works for it.
    let report = call(&client, &format!("{}:8080", outside.ipv4()), &["-4"])?;
    assert_eq!(
        report["succeeded"], 0,
        "DROP_ALL with its ports held: {report}"
    );
    let report = call(&client, &format!("{COLOR}:9090"), &["-4", "--count", "3"])?;
    assert_eq!(
        report["succeeded"], 3,
        "the mesh with its ports held: {report}"
    );
    // And a change to it (a new enrollment beside the old) passes over the held ports too.
    write_changed_workload(&node, &client, "b", None)?;
    eventually(Duration::from_secs(30), "the change is applied", || {
        Ok(agent.workloads()?.iter().any(|w| {
            w["pod"] == "app/client" && w["enrolled"] == true && w["virtual_node"] == "app/client-b"
        }))
    })?;
    let report = call(&client, &format!("{}:8080", outside.ipv4()), &["-4"])?;
    assert_eq!(
        report["succeeded"], 0,
        "DROP_ALL after the change: {report}"
    );
    drop((holders, servers));
    Ok(())
}

/// A cgroup the test made, removed on drop (before the testbed removes the node's cgroup root
/// around it, so declare it after the `Bed`).
struct OwnCgroup(PathBuf);

impl Drop for OwnCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Adds a second workload, `app/<name>`, in its own cgroup under the node's cgroup root but in
/// `pod`'s network namespace (a plain host running two services), before the agent starts.
fn workload_sharing_netns(bed: &Bed, pod: &Pod, name: &str) -> anyhow::Result<OwnCgroup> {
    let cgroup = OwnCgroup(bed.node.cgroup_root().join(format!("app_{name}")));
    std::fs::create_dir(&cgroup.0)?;
    let mut workload = pod.workload();
    workload.name = name.into();
    workload.cgroup = cgroup.0.clone();
    std::fs::write(
        bed.node.workloads_dir().join(workload.file_name()),
        serde_json::to_vec(&workload)?,
    )?;
    Ok(cgroup)
}

/// The port of a workload's IPv4 outbound listener, from the agent's `/workloads`.
fn outbound_port(agent: &Agent, workload: &str) -> anyhow::Result<u16> {
    let workloads = agent.workloads()?;
    workloads
        .iter()
        .find(|w| w["pod"] == workload)
        .and_then(|w| w["listeners"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str()?.strip_prefix("127.0.0.1:")?.parse().ok())
        .next()
        .with_context(|| format!("no IPv4 outbound listener for {workload} in {workloads:?}"))
}

/// The attacker of the shared-namespace test. Each attempt: a captured connect to `color`
/// from a socket bound with SO_REUSEADDR (its original destination is recorded under
/// (netns, 127.0.0.1, its port)), then a second socket bound to the same address and port
/// (SO_REUSEADDR again) connects straight to the victim's outbound listener and sends a line.
/// Prints one JSON report per attempt: what came back on the second socket.
const SPOOF_SCRIPT: &str = r#"
import json, socket, sys
service = (sys.argv[1], int(sys.argv[2]))
victim = ("127.0.0.1", int(sys.argv[3]))
for attempt in range(int(sys.argv[4])):
    first = socket.socket()
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    first.bind(("127.0.0.1", 0))
    port = first.getsockname()[1]
    first.setblocking(False)
    try:
        first.connect(service)
    except BlockingIOError:
        pass
    second = socket.socket()
    second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    second.bind(("127.0.0.1", port))
    second.settimeout(5)
    reply, error = b"", ""
    try:
        second.connect(victim)
        second.sendall(b"spoofed\n")
        reply = second.recv(100)
    except OSError as e:
        error = str(e)
    print(json.dumps({"port": port, "reply": reply.decode(errors="replace"), "error": error}), flush=True)
    second.close()
    first.close()
"#;

/// Identity spoofing in a shared network namespace: two workloads of a plain host share one
/// namespace, each with its own outbound listener. The attacker makes a captured connect (its
/// original destination recorded under its client port), and presents that same client port,
/// from a second socket bound with SO_REUSEADDR, at the *victim's* listener: keyed only by
/// (netns, client address, client port), the agent would take the connection for the victim's
/// and proxy it with the victim's identity. The test holds the attacker's own captured SYN (a
/// drop rule in the namespace, standing for the agent being slower on the attacker's listener)
/// so the attacker wins that race every time. The agent must refuse every such connection and
/// count it (`other_listener`), while the victim's own calls keep working.
#[test]
fn a_workload_sharing_the_namespace_cannot_pass_for_another_at_its_listener() -> anyhow::Result<()>
{
    const ATTEMPTS: usize = 5;
    let bed = bed("spoofns")?;
    let attacker_cgroup = workload_sharing_netns(&bed, &bed.client, "batch")?;
    let agent = bed.start(&[])?;
    agent.wait_enrolled("app/batch", true, Duration::from_secs(20))?;
    let victim_port = outbound_port(&agent, "app/client")?;
    let attacker_port = outbound_port(&agent, "app/batch")?;
    ensure!(
        victim_port != attacker_port,
        "the workloads share a listener"
    );
    let report = call(&bed.client, &format!("{COLOR}:9090"), &["-4"])?;
    assert_eq!(report["ok"], true, "victim before the attack: {report}");

    let rule = [
        "OUTPUT",
        "-o",
        "lo",
        "-p",
        "tcp",
        "--syn",
        "--dport",
        &attacker_port.to_string(),
        "-j",
        "DROP",
    ]
    .map(str::to_owned);
    let iptables = |op: &str| -> anyhow::Result<()> {
        let output = run(
            bed.client.command("iptables").args(["-w", op]).args(&rule),
            Duration::from_secs(10),
        )?;
        ensure!(
            output.status.success(),
            "iptables {op}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    };
    iptables("-A")?;
    let script = bed.tb.temp_dir().join("spoof.py");
    std::fs::write(&script, SPOOF_SCRIPT)?;
    let attack = run(
        bed.client.command("sh").arg("-c").arg(format!(
            "echo $$ > {}/cgroup.procs && exec /usr/bin/python3 {} 10.96.0.10 9090 {victim_port} {ATTEMPTS}",
            attacker_cgroup.0.display(),
            script.display()
        )),
        Duration::from_secs(60),
    );
    let removed = iptables("-D");
    let attack = attack?;
    removed?;
    let stdout = String::from_utf8_lossy(&attack.stdout);
    let reports: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| {
            format!(
                "attacker output {stdout:?}, stderr {:?}",
                String::from_utf8_lossy(&attack.stderr)
            )
        })?;
    assert_eq!(reports.len(), ATTEMPTS, "{stdout}");
    for report in &reports {
        assert_eq!(
            report["reply"], "",
            "the victim's listener carried the attacker's connection: {report}"
        );
    }
    eventually(
        Duration::from_secs(5),
        "the agent counts every refusal",
        || Ok(agent.counter("other_listener")? == ATTEMPTS as u64),
    )
    .with_context(|| format!("counters {:?}", agent.counters()))?;
    let victims: Vec<Value> = agent
        .connection_logs()
        .into_iter()
        .filter(|l| l["source_workload"] == "app/client")
        .collect();
    assert_eq!(victims.len(), 1, "only the victim's own call: {victims:?}");

    let report = call(&bed.client, &format!("{COLOR}:9090"), &["-4"])?;
    assert_eq!(report["ok"], true, "victim after the attack: {report}");
    Ok(())
}

/// One process of the flooding pod of the connection-flood test. The pod's own SYNs to its
/// outbound listener are dropped (a rule in its namespace), so every captured connect stays
/// pending: an original destination the agent never takes. It opens up to `argv[3]` such
/// connects at once from several loopback source addresses (enough ports to pass the node's
/// 65,536 pending entries across the pod's processes), prints a report, waits for the file
/// `argv[5]` to exist, then for `argv[4]` seconds closes its oldest thousand and opens a
/// thousand more. Reports (JSON lines): connects that went pending, connects refused with
/// EPERM, the most it had open at once.
const FLOOD_SCRIPT: &str = r#"
import collections, json, os, resource, socket, sys, time
service = (sys.argv[1], int(sys.argv[2]))
target, seconds, go = int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
if hard != resource.RLIM_INFINITY and hard < target + 100:
    sys.exit("the open-files hard limit %d is below %d" % (hard, target + 100))
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
IP_BIND_ADDRESS_NO_PORT = 24
sources = ["127.0.%d.%d" % (os.getpid() % 200, i) for i in range(2, 10)]
open_socks = collections.deque()
report = {"pending": 0, "refused": 0, "other": 0, "most_open": 0}
def connect(i):
    s = socket.socket()
    s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind((sources[i % len(sources)], 0))
    s.setblocking(False)
    try:
        s.connect(service)
    except BlockingIOError:
        pass
    except PermissionError:
        report["refused"] += 1
        s.close()
        return
    except OSError as e:
        report["other"] += 1
        report["error"] = str(e)
        s.close()
        return
    open_socks.append(s)
    report["pending"] += 1
    report["most_open"] = max(report["most_open"], len(open_socks))
i = 0
while i < target:
    connect(i)
    i += 1
print(json.dumps({"phase": "filled", "open": len(open_socks), **report}), flush=True)
waited = 0
while not os.path.exists(go) and waited < 600:
    time.sleep(0.1)
    waited += 1
deadline = time.monotonic() + seconds
while time.monotonic() < deadline and i < 50 * target:
    for _ in range(min(1000, len(open_socks))):
        open_socks.popleft().close()
    for _ in range(1000):
        connect(i)
        i += 1
print(json.dumps({"phase": "done", "open": len(open_socks), **report}), flush=True)
"#;

/// One pod flooding connects cannot make another pod's connections fail. The original
/// destinations of captured connects wait in one node-wide map of 65,536 entries until the
/// agent accepts; a pod whose connects never reach the agent (here: its own SYNs dropped)
/// could fill it and push out other pods' entries, whose connections the agent then closes as
/// lookup misses. Each pod may have at most `--max-pod-connections` (default 16,384) captured
/// connections open: the flooder's connects past that fail with EPERM and are counted, its
/// closed sockets free their share (and their entries) at once, and a well-behaved pod's calls
/// all succeed during the flood.
#[test]
fn a_pod_flooding_connects_cannot_make_another_pods_connections_fail() -> anyhow::Result<()> {
    const FLOOD: usize = 75_000;
    const PROCESSES: usize = 5;
    const LIMIT: u64 = 16_384;
    let bed = bed("attack-flood")?;
    let flooder = bed
        .node
        .add_pod(&PodSpec::new("flooder", "app").label("app", "client"))?;
    bed.node.write_workload(&flooder)?;
    let agent = bed.start(&[])?;
    agent.wait_enrolled("app/flooder", true, Duration::from_secs(20))?;
    let port = outbound_port(&agent, "app/flooder")?;
    run(
        flooder
            .command("sysctl")
            .args(["-w", "net.ipv4.ip_local_port_range=1024 65535"]),
        Duration::from_secs(10),
    )?;
    let drop_syns = [
        "OUTPUT",
        "-o",
        "lo",
        "-p",
        "tcp",
        "--syn",
        "--dport",
        &port.to_string(),
        "-j",
        "DROP",
    ]
    .map(str::to_owned);
    let output = run(
        flooder
            .command("iptables")
            .args(["-w", "-A"])
            .args(&drop_syns),
        Duration::from_secs(10),
    )?;
    ensure!(
        output.status.success(),
        "iptables: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let script = bed.tb.temp_dir().join("flood.py");
    std::fs::write(&script, FLOOD_SCRIPT)?;
    let go = bed.tb.temp_dir().join("flood-go");
    let per_process = (FLOOD / PROCESSES).to_string();
    let floods = (0..PROCESSES)
        .map(|n| {
            bed.tb.spawn(
                &format!("flooder{n}"),
                flooder.command("/usr/bin/python3").arg(&script).args([
                    "10.96.0.10",
                    "9090",
                    &per_process,
                    "15",
                    &go.display().to_string(),
                ]),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let reports = |phase: &str| -> anyhow::Result<Vec<Value>> {
        let mut found = Vec::new();
        for flood in &floods {
            if let Some(status) = flood.try_wait()?
                && !status.success()
            {
                bail!("a flooder failed ({status}): {}", flood.stderr());
            }
            found.extend(
                flood
                    .stdout()
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .filter(|r| r["phase"] == phase),
            );
        }
        Ok(found)
    };
    let sum = |reports: &[Value], field: &str| -> u64 {
        reports.iter().filter_map(|r| r[field].as_u64()).sum()
    };
    eventually(
        Duration::from_secs(90),
        "every flooding process has opened what it could",
        || Ok(reports("filled")?.len() == PROCESSES),
    )?;
    let filled = reports("filled")?;
    std::fs::write(&go, "")?;
    // The well-behaved pod, during the churn: every connection must get through.
    let report = call(
        &bed.client,
        &format!("{COLOR}:9090"),
        &["-4", "--count", "200"],
    )?;
    for flood in &floods {
        let status = flood.wait_timeout(Duration::from_secs(120))?;
        ensure!(status.success(), "flooder: {}", flood.stderr());
    }
    assert_eq!(
        report["ok"],
        true,
        "the well-behaved pod lost connections during the flood: {report}; counters {:?}",
        agent.counters()
    );
    // Nothing was closed before the filled reports: what was open then is what the pod held.
    // connect4 checks the count and sock_ops adds to it later in the same connect, so each of
    // the other processes connecting at that moment can pass the check once more: the share
    // is the limit, plus at most one connect per other process of the pod.
    let held = sum(&filled, "open");
    assert!(
        (LIMIT..LIMIT + PROCESSES as u64).contains(&held),
        "the flooding pod held {held} pending connects, its share is {LIMIT} (+ at most {} \
         racing): {filled:?}",
        PROCESSES - 1
    );
    assert_eq!(sum(&filled, "other"), 0, "{filled:?}");
    let done = reports("done")?;
    ensure!(done.len() == PROCESSES, "flooder reports {done:?}");
    assert_eq!(sum(&done, "other"), 0, "{done:?}");
    let refused = sum(&done, "refused");
    ensure!(refused > 0, "no connect was refused: {done:?}");
    eventually(
        Duration::from_secs(5),
        "the agent counts every refused connect",
        || Ok(agent.counter("pod_connection_limit")? == refused),
    )
    .with_context(|| format!("counters {:?}, flooders {done:?}", agent.counters()))?;
    // The flooder's share is free again once its sockets are gone: nothing leaked.
    let output = run(
        flooder
            .command("iptables")
            .args(["-w", "-D"])
            .args(&drop_syns),
        Duration::from_secs(10),
    )?;
    ensure!(output.status.success(), "iptables -D");
    let after = call(&flooder, &format!("{COLOR}:9090"), &["-4", "--count", "5"])?;
    assert_eq!(
        after["ok"], true,
        "the flooder's share was not given back: {after}"
    );
    Ok(())
}
