//! End-to-end tests of `strait check`, the pre-flight: on a testbed node every check passes
//! (the eBPF programs really load and attach in a scratch cgroup, the node's own dnsmasq
//! answers, the ports are free in a real pod's network namespace), and with each requirement
//! taken away where a test can do that safely (a bpffs path that is not on bpffs, a cgroup v1
//! hierarchy the test mounts, CAP_SYS_ADMIN dropped with capsh, a port taken in the pod, a
//! resolver that does not answer, a missing mesh) the exact FAIL line and exit code 1.
//!
//! Needs root; without it these tests fail with the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::Value;
use testbed::agent::{echo_server, strait_binary};
use testbed::{Node, PodSpec, Testbed, run};

const TIMEOUT: Duration = Duration::from_secs(60);

/// `strait check` with the node's cgroup root and bpffs folder, plus `extra`, in the node.
fn check(node: &Node, extra: &[&str]) -> anyhow::Result<Output> {
    let mut command = node.command(strait_binary()?);
    command.args(check_args(node, extra));
    run(&mut command, TIMEOUT)
}

fn check_args(node: &Node, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "check".to_owned(),
        "--cgroup-root".to_owned(),
        node.cgroup_root().display().to_string(),
        "--bpffs".to_owned(),
        node.bpffs().display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The line of check `name` in a text report.
fn line<'a>(report: &'a str, name: &str) -> anyhow::Result<&'a str> {
    report
        .lines()
        .find(|l| l[4..].trim_start().starts_with(&format!("{name}:")))
        .with_context(|| format!("no `{name}` line in:\n{report}"))
}

/// Asserts that the report fails with exit code 1 and has exactly `expected` as a line.
fn assert_fails_with(output: &Output, expected: &str) -> anyhow::Result<()> {
    let report = stdout(output);
    ensure!(
        output.status.code() == Some(1),
        "expected exit code 1, got {:?}:\n{report}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    ensure!(
        report.lines().any(|l| l == expected),
        "expected the line\n{expected}\nin:\n{report}"
    );
    Ok(())
}

/// Leftovers of a check: its scratch cgroups below the root and pin folders.
fn leftovers(node: &Node) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for dir in [node.cgroup_root(), node.bpffs()] {
        if let Ok(entries) = std::fs::read_dir(dir) {
            found.extend(entries.flatten().map(|e| e.path()).filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().contains("check-"))
            }));
        }
    }
    found
}

#[test]
fn check_passes_on_the_testbed() -> anyhow::Result<()> {
    let tb = Testbed::new("check-ok")?;
    let node = tb.add_node("node1")?;
    let pod = node.add_pod(&PodSpec::new("client", "app").label("app", "client"))?;
    let mesh = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh, crate::common::mesh_yaml("DROP_ALL", 50, 50))?;
    let netns = pod.netns_path().display().to_string();
    let mesh_arg = mesh.display().to_string();
    let output = check(&node, &["--mesh", &mesh_arg, "--pod-netns", &netns])?;
    let report = stdout(&output);
    ensure!(
        output.status.success(),
        "strait check failed on the testbed:\n{report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let names = [
        "kernel",
        "btf",
        "cgroup",
        "bpffs",
        "capabilities",
        "ebpf",
        "ports",
        "dns",
        "mesh",
    ];
    ensure!(
        report.lines().count() == names.len(),
        "one line per check expected:\n{report}"
    );
    for name in names {
        ensure!(
            line(&report, name)?.starts_with("OK   "),
            "{name} did not pass:\n{report}"
        );
    }
    // What each OK line says it tested.
    ensure!(
        line(&report, "cgroup")?
            == format!("OK   cgroup: cgroup v2 at {}", node.cgroup_root().display()),
        "{report}"
    );
    let ebpf = line(&report, "ebpf")?;
    for program in [
        "cgroup_sock_addr strait_connect4",
        "cgroup_sock_addr strait_connect6",
        "sock_ops strait_sockops",
        "sock_ops strait_sockops_fastpath",
        "sk_msg strait_sk_msg_fastpath",
        "sk_lookup strait_sk_lookup",
    ] {
        ensure!(ebpf.contains(program), "{program} not attached: {ebpf}");
    }
    ensure!(
        line(&report, "ports")?
            == format!("OK   ports: 15001, 15006 free on loopback in network namespace {netns}"),
        "{report}"
    );
    // The node's resolv.conf names its dnsmasq, which holds no such name: NXDOMAIN.
    ensure!(
        line(&report, "dns")?.starts_with(&format!(
            "OK   dns: {}:53 answered kubernetes.default.svc.cluster.local (NXDOMAIN)",
            node.bridge_ipv4()
        )),
        "{report}"
    );
    ensure!(
        line(&report, "mesh")?.starts_with(&format!("OK   mesh: {mesh_arg} is valid: ")),
        "{report}"
    );
    ensure!(
        leftovers(&node).is_empty(),
        "the check left {:?}",
        leftovers(&node)
    );

    // --json: the same checks for automation.
    let output = check(&node, &["--mesh", &mesh_arg, "--json"])?;
    ensure!(output.status.success(), "{}", stdout(&output));
    let json: Value = serde_json::from_str(&stdout(&output))?;
    ensure!(json["ok"] == true, "{json}");
    let checks = json["checks"].as_array().context("checks")?;
    ensure!(checks.len() == names.len(), "{json}");
    ensure!(
        checks
            .iter()
            .all(|c| c["status"] == "OK" && c.get("fix").is_none()),
        "{json}"
    );
    ensure!(
        checks[7]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with(&format!("{}:53 answered", node.bridge_ipv4()))),
        "{json}"
    );
    Ok(())
}

/// Unmounts a cgroup hierarchy the test mounted and removes its folder, also on failure.
struct V1Mount(PathBuf);

impl Drop for V1Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn mount_cgroup_v1(dir: &Path, name: &str) -> anyhow::Result<V1Mount> {
    std::fs::create_dir_all(dir)?;
    let mount = V1Mount(dir.to_owned());
    // A named hierarchy without controllers: a real cgroup v1 mount that takes nothing from the
    // machine's own hierarchies.
    let output = run(
        Command::new("mount")
            .args(["-t", "cgroup", "-o", &format!("none,name={name}"), "cgroup"])
            .arg(dir),
        Duration::from_secs(10),
    )?;
    ensure!(
        output.status.success(),
        "cannot mount a cgroup v1 hierarchy (is cgroup v1 disabled in this kernel?): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(mount)
}

#[test]
fn check_names_each_missing_requirement() -> anyhow::Result<()> {
    let tb = Testbed::new("check-fail")?;
    let node = tb.add_node("node1")?;
    let pod = node.add_pod(&PodSpec::new("client", "app").label("app", "client"))?;
    let mesh = tb.temp_dir().join("mesh.yaml");
    std::fs::write(&mesh, crate::common::mesh_yaml("DROP_ALL", 50, 50))?;
    let mesh_arg = mesh.display().to_string();

    // bpffs: a folder on the temp dir's filesystem, not on bpffs.
    let not_bpffs = tb.temp_dir().join("bpf");
    let output = {
        let mut command = node.command(strait_binary()?);
        command.args([
            "check",
            "--cgroup-root",
            &node.cgroup_root().display().to_string(),
            "--bpffs",
            &not_bpffs.display().to_string(),
        ]);
        run(&mut command, TIMEOUT)?
    };
    assert_fails_with(
        &output,
        &format!(
            "FAIL bpffs: {} is not on a bpf filesystem; mount one (`mount -t bpf bpf \
             /sys/fs/bpf`) or pass --bpffs a folder on it",
            not_bpffs.display()
        ),
    )?;
    assert_fails_with(
        &output,
        "FAIL ebpf: not tried: it needs the cgroup and bpffs checks to pass; fix those first",
    )?;

    // cgroup: a cgroup v1 hierarchy.
    let v1 = tb.temp_dir().join("cgroup-v1");
    let _mount = mount_cgroup_v1(&v1, &format!("strait-{}", std::process::id()))?;
    let mut command = node.command(strait_binary()?);
    command.args([
        "check",
        "--cgroup-root",
        &v1.display().to_string(),
        "--bpffs",
        &node.bpffs().display().to_string(),
    ]);
    let output = run(&mut command, TIMEOUT)?;
    assert_fails_with(
        &output,
        &format!(
            "FAIL cgroup: {} is a cgroup v1 hierarchy; pass --cgroup-root the cgroup2 mount \
             (`findmnt -t cgroup2`), or boot with systemd.unified_cgroup_hierarchy=1",
            v1.display()
        ),
    )?;
    drop(_mount);

    // cgroup: a hybrid layout (cgroup v2 mounted at `unified` below a folder that is not
    // cgroup v2) given as the root: the fix names the v2 mount.
    let hybrid = tb.temp_dir().join("cgroup-hybrid");
    let unified = hybrid.join("unified");
    std::fs::create_dir_all(&unified)?;
    let _unified = V1Mount(unified.clone());
    let output = run(
        Command::new("mount")
            .args(["-t", "cgroup2", "cgroup2"])
            .arg(&unified),
        Duration::from_secs(10),
    )?;
    ensure!(
        output.status.success(),
        "cannot mount cgroup2: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut command = node.command(strait_binary()?);
    command.args([
        "check",
        "--cgroup-root",
        &hybrid.display().to_string(),
        "--bpffs",
        &node.bpffs().display().to_string(),
    ]);
    let output = run(&mut command, TIMEOUT)?;
    assert_fails_with(
        &output,
        &format!(
            "FAIL cgroup: {} is not a cgroup v2 hierarchy (a hybrid layout); pass --cgroup-root \
             {} (its cgroup v2 mount)",
            hybrid.display(),
            unified.display()
        ),
    )?;
    drop(_unified);

    // capabilities: CAP_SYS_ADMIN dropped from the bounding set before exec (capsh), so the
    // check runs as root without it.
    let capsh =
        which("capsh").context("capsh is missing: `cargo xtask setup` installs libcap2-bin")?;
    let mut command = node.command(capsh);
    command
        .args(["--drop=cap_sys_admin", "--", "-c", "exec \"$0\" \"$@\""])
        .arg(strait_binary()?)
        .args(check_args(&node, &[]));
    let output = run(&mut command, TIMEOUT)?;
    assert_fails_with(
        &output,
        "FAIL capabilities: CAP_SYS_ADMIN is not effective (setns into pods' network \
         namespaces, loading and attaching the eBPF programs); run as root with CAP_SYS_ADMIN \
         (in a container: securityContext.capabilities.add: [SYS_ADMIN])",
    )?;
    ensure!(
        line(&stdout(&output), "ebpf")?.starts_with("FAIL ebpf: "),
        "without CAP_SYS_ADMIN the eBPF check cannot pass:\n{}",
        stdout(&output)
    );

    // ports: something listens on the outbound port in the pod.
    let _server = echo_server(&tb, &pod, 15001, "squatter")?;
    let netns = pod.netns_path().display().to_string();
    let output = check(&node, &["--pod-netns", &netns])?;
    assert_fails_with(
        &output,
        &format!(
            "FAIL ports: 127.0.0.1:15001 is taken in network namespace {netns}; stop what \
             listens there, or give `strait run` other ports (--outbound-port, --inbound-port) \
             and `strait check` the same (--ports)"
        ),
    )?;
    // The same pod with other ports passes that check.
    let output = check(&node, &["--pod-netns", &netns, "--ports", "15101,15106"])?;
    ensure!(
        line(&stdout(&output), "ports")?.starts_with("OK   "),
        "{}",
        stdout(&output)
    );

    // dns: a resolver that does not answer (nothing listens on that loopback port).
    let output = check(&node, &["--dns-server", "127.0.0.1:9"])?;
    assert_fails_with(
        &output,
        "FAIL dns: no answer from 127.0.0.1:9: Connection refused (os error 111); make the \
         resolver reachable from the node, or give `strait run` and `strait check` one that \
         is (--dns-server)",
    )?;

    // mesh: a file that is not there, and one that is not a mesh.
    let missing = tb.temp_dir().join("no-such-mesh.yaml");
    let output = check(&node, &["--mesh", &missing.display().to_string()])?;
    let mesh_line = line(&stdout(&output), "mesh")?.to_owned();
    ensure!(
        mesh_line.starts_with(&format!("FAIL mesh: {}: ", missing.display()))
            && mesh_line
                .ends_with("; fix the mesh (`strait validate` shows every error with its line)"),
        "{mesh_line}"
    );
    ensure!(output.status.code() == Some(1), "{}", stdout(&output));
    std::fs::write(&mesh, "kind: VirtualNode\nspec: [\n")?;
    let output = check(&node, &["--mesh", &mesh_arg, "--json"])?;
    ensure!(output.status.code() == Some(1), "{}", stdout(&output));
    let json: Value = serde_json::from_str(&stdout(&output))?;
    ensure!(json["ok"] == false, "{json}");
    let mesh_check = &json["checks"][8];
    ensure!(
        mesh_check["name"] == "mesh" && mesh_check["status"] == "FAIL",
        "{json}"
    );
    ensure!(mesh_check["fix"].is_string(), "{json}");
    ensure!(leftovers(&node).is_empty(), "{:?}", leftovers(&node));
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}
