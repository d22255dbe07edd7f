//! Hot reload of the mesh file under traffic, the way Kubernetes updates a mounted ConfigMap:
//! the file is a symlink into a `..data` directory symlink that is swapped atomically. Valid
//! and invalid versions alternate while a client makes 1,000 connections; none may fail, the
//! valid versions take effect, the invalid ones change nothing and are counted and shown.
//! Then the whole ConfigMap volume as the mesh (`--mesh DIR`): several files are one mesh, and
//! a swap replaces all of them at once.
//!
//! Needs root; without it these tests fail (never skip) with the reason.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use crate::common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use testbed::agent::{Agent, peer_binary};

/// Publishes `text` as the ConfigMap volume does: a fresh timestamped directory, then an
/// atomic rename of the `..data` symlink over the old one.
fn publish(volume: &Path, generation: usize, text: &str) -> anyhow::Result<()> {
    let dir_name = format!("..2026_11_27_{generation:04}");
    let dir = volume.join(&dir_name);
    std::fs::create_dir(&dir)?;
    std::fs::write(dir.join("mesh.yaml"), text)?;
    let staged = volume.join("..data_tmp");
    let _ = std::fs::remove_file(&staged);
    symlink(&dir_name, &staged)?;
    std::fs::rename(&staged, volume.join("..data"))?;
    Ok(())
}

fn metric(metrics: &str, name_and_labels: &str) -> u64 {
    metrics
        .lines()
        .find(|line| line.starts_with(name_and_labels))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
        .map_or(0, |value| value as u64)
}

#[test]
fn reloading_valid_and_invalid_meshes_under_traffic_loses_no_connection() -> anyhow::Result<()> {
    let bed = bed("reload", &mesh_yaml("ALLOW_ALL", 100, 0))?;
    let volume = bed.tb.temp_dir().join("configmap");
    std::fs::create_dir(&volume)?;
    publish(&volume, 0, &mesh_yaml("ALLOW_ALL", 100, 0))?;
    symlink("..data/mesh.yaml", volume.join("mesh.yaml"))?;
    let agent = Agent::start(&bed.tb, &bed.node, &volume.join("mesh.yaml"), &[])?;

    let client = bed.tb.spawn(
        "client-1000",
        bed.client.command(peer_binary()?).args([
            "call",
            &format!("{SERVICE}:8080"),
            "-4",
            "--count",
            "1000",
            "--bytes",
            "20000",
            "--interval-ms",
            "8",
        ]),
    )?;
    let valid = [
        mesh_yaml("ALLOW_ALL", 0, 100),
        mesh_yaml("ALLOW_ALL", 100, 0),
    ];
    // An out-of-range weight: well-formed YAML, invalid App Mesh.
    let invalid = mesh_yaml("ALLOW_ALL", 150, 0);
    let mut still_running_at_end = true;
    for generation in 1..=20 {
        let text = if generation % 2 == 1 {
            &invalid
        } else {
            &valid[(generation / 2) % 2]
        };
        publish(&volume, generation, text)?;
        std::thread::sleep(Duration::from_millis(300));
        if client.try_wait()?.is_some() {
            still_running_at_end = false;
        }
    }
    let status = client.wait_timeout(Duration::from_secs(120))?;
    let report: Value = serde_json::from_str(client.stdout().trim())?;
    assert!(status.success(), "{report}");
    assert_eq!(
        report["succeeded"], 1000,
        "no connection may fail: {report}"
    );
    assert!(
        still_running_at_end,
        "the client finished before the rewrites did, so this run proved less than it should; \
         raise --interval-ms"
    );
    // Both weightings were in force at some point while the client ran.
    assert!(report["by_server"]["v1"].as_u64() > Some(0), "{report}");
    assert!(report["by_server"]["v2"].as_u64() > Some(0), "{report}");

    let metrics = agent.admin_get("/metrics")?;
    let applied = metric(&metrics, "strait_mesh_reloads_total{result=\"applied\"}");
    let rejected = metric(&metrics, "strait_mesh_reloads_total{result=\"rejected\"}");
    assert!(
        applied >= 8 && rejected >= 8,
        "10 valid and 10 invalid versions were published 300 ms apart: applied {applied}, rejected {rejected}"
    );

    // The last version published (generation 20) is valid and is the one in force.
    let last = &valid[(20 / 2) % 2];
    let dump: Value = serde_json::from_str(&agent.admin_get("/config_dump")?)?;
    assert_eq!(dump["sha256"], hex(&Sha256::digest(last.as_bytes())));
    let errors = dump["last_rejected"]["errors"].to_string();
    assert!(
        errors.contains("weightedTargets[0].weight") && errors.contains("150"),
        "the admin API shows the last rejection: {dump}"
    );
    Ok(())
}

/// Publishes several files as one ConfigMap version: kubelet's layout, `DIR/name ->
/// ..data/name` for each key, `..data` swapped by rename.
fn publish_files(
    volume: &Path,
    generation: usize,
    files: &[(String, String)],
) -> anyhow::Result<()> {
    let dir_name = format!("..2026_11_30_{generation:04}");
    let dir = volume.join(&dir_name);
    std::fs::create_dir(&dir)?;
    for (name, text) in files {
        std::fs::write(dir.join(name), text)?;
        let link = volume.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(Path::new("..data").join(name), &link)?;
        }
    }
    let staged = volume.join("..data_tmp");
    let _ = std::fs::remove_file(&staged);
    symlink(&dir_name, &staged)?;
    std::fs::rename(&staged, volume.join("..data"))?;
    Ok(())
}

/// The test mesh as three files: the Mesh and Namespace, the VirtualNodes and VirtualService,
/// the VirtualRouter (the weights) alone.
fn split_mesh(text: &str) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = ["mesh.yaml", "nodes.yaml", "router.yaml"]
        .iter()
        .map(|n| (n.to_string(), String::new()))
        .collect();
    for doc in text.split("\n---\n") {
        let file = if doc.contains("kind: VirtualRouter") {
            2
        } else if doc.contains("kind: Mesh") || doc.contains("kind: Namespace") {
            0
        } else {
            1
        };
        let body = &mut files[file].1;
        if !body.is_empty() {
            body.push_str("---\n");
        }
        body.push_str(doc.trim_end());
        body.push('\n');
    }
    files
}

/// `count` connections from the client to the service, all of which must succeed; the
/// servers that answered.
fn served(bed: &Bed, count: u32) -> anyhow::Result<Value> {
    let report = call(
        &bed.client,
        &format!("{SERVICE}:8080"),
        &["-4", "--count", &count.to_string()],
    )?;
    assert_eq!(report["succeeded"], count, "{report}");
    Ok(report["by_server"].clone())
}

/// Polls `/config_dump` (bounded) until `done` holds; returns the last dump.
fn wait_dump(agent: &Agent, what: &str, done: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let dump: Value = serde_json::from_str(&agent.admin_get("/config_dump")?)?;
        if done(&dump) {
            return Ok(dump);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{what}: not seen within 10 s; /config_dump: {dump}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_configmap_directory_is_one_mesh_and_a_swap_replaces_all_its_files() -> anyhow::Result<()> {
    let bed = bed("reload-dir", &mesh_yaml("ALLOW_ALL", 100, 0))?;
    let volume = bed.tb.temp_dir().join("configmap-dir");
    std::fs::create_dir(&volume)?;
    publish_files(&volume, 0, &split_mesh(&mesh_yaml("ALLOW_ALL", 100, 0)))?;
    let agent = Agent::start(&bed.tb, &bed.node, &volume, &[])?;

    // One mesh from three files, each named as the operator sees it.
    let dump: Value = serde_json::from_str(&agent.admin_get("/config_dump")?)?;
    let files: Vec<String> = ["mesh.yaml", "nodes.yaml", "router.yaml"]
        .iter()
        .map(|n| volume.join(n).display().to_string())
        .collect();
    assert_eq!(
        dump["mesh"]["source"]["files"],
        serde_json::json!(files),
        "{dump}"
    );
    assert_eq!(dump["file"], volume.display().to_string());
    for pod in ["app/client", "app/color-v1", "app/color-v2"] {
        agent.wait_enrolled(pod, true, Duration::from_secs(10))?;
    }
    let servers = served(&bed, 20)?;
    assert_eq!(servers["v1"], 20, "weights 100/0: {servers}");

    // Only router.yaml changes; the swap brings it with the others, and it applies.
    let first = dump["sha256"].clone();
    publish_files(&volume, 1, &split_mesh(&mesh_yaml("ALLOW_ALL", 0, 100)))?;
    let dump = wait_dump(&agent, "the 0/100 version", |d| d["sha256"] != first)?;
    let servers = served(&bed, 20)?;
    assert_eq!(servers["v2"], 20, "weights 0/100: {servers}");

    // A duplicate across files (color-v1 again in a new key, read after nodes.yaml) is
    // rejected at its own place, naming the first; the mesh in force does not change.
    let applied = dump["sha256"].clone();
    let mut files = split_mesh(&mesh_yaml("ALLOW_ALL", 100, 0));
    let nodes = files[1].1.clone();
    let color_v1 = nodes
        .split("---\n")
        .find(|d| d.contains("name: color-v1"))
        .expect("color-v1 is in nodes.yaml")
        .to_string();
    files.push(("workers.yaml".to_string(), color_v1));
    publish_files(&volume, 2, &files)?;
    let dump = wait_dump(&agent, "the rejection", |d| !d["last_rejected"].is_null())?;
    let errors = dump["last_rejected"]["errors"].to_string();
    let extra = volume.join("workers.yaml").display().to_string();
    let nodes_file = volume.join("nodes.yaml").display().to_string();
    assert!(
        errors.contains(&format!(
            "{extra}:4:9: error: VirtualNode app/color-v1: duplicate"
        )) && errors.contains(&format!("already defined at {nodes_file}:")),
        "{dump}"
    );
    assert_eq!(dump["sha256"], applied);
    let servers = served(&bed, 20)?;
    assert_eq!(
        servers["v2"], 20,
        "the rejected version changed nothing: {servers}"
    );
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A reload that adds or removes a virtual service changes no other service's standing in
/// eBPF: service ids are stable, so a pod calling its backend `color` is never refused while a
/// service sorted before it (`aaa`, not a backend of the caller) comes and goes 20 times.
#[test]
fn a_service_coming_and_going_never_refuses_calls_to_another() -> anyhow::Result<()> {
    let with_aaa = |base: &str| {
        format!(
            "{base}---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata:
  name: aaa
  namespace: app
spec:
  awsName: aaa.app.svc.cluster.local
  provider:
    virtualNode:
      virtualNodeRef:
        name: color-v1
"
        )
    };
    let base = mesh_yaml("DROP_ALL", 100, 0);
    let bed = bed("reload-ids", &base)?;
    bed.tb
        .dns_record("aaa.app.svc.cluster.local", &["10.96.0.9".parse()?])?;
    let volume = bed.tb.temp_dir().join("configmap");
    std::fs::create_dir(&volume)?;
    publish(&volume, 0, &base)?;
    symlink("..data/mesh.yaml", volume.join("mesh.yaml"))?;
    let agent = Agent::start(&bed.tb, &bed.node, &volume.join("mesh.yaml"), &[])?;
    let client = bed.tb.spawn(
        "client-ids",
        bed.client.command(peer_binary()?).args([
            "call",
            &format!("{SERVICE}:8080"),
            "-4",
            "--count",
            "3000",
            "--bytes",
            "16",
            "--interval-ms",
            "2",
        ]),
    )?;
    let mut still_running_at_end = true;
    for generation in 1..=20 {
        let text = if generation % 2 == 1 {
            with_aaa(&base)
        } else {
            base.clone()
        };
        publish(&volume, generation, &text)?;
        std::thread::sleep(Duration::from_millis(250));
        if client.try_wait()?.is_some() {
            still_running_at_end = false;
        }
    }
    let status = client.wait_timeout(Duration::from_secs(120))?;
    let report: Value = serde_json::from_str(client.stdout().trim())?;
    assert!(status.success(), "{report}");
    assert_eq!(
        report["succeeded"], 3000,
        "no call to color may be refused while aaa comes and goes: {report}"
    );
    assert!(
        still_running_at_end,
        "the client finished before the reloads did; raise --count"
    );
    let metrics = agent.admin_get("/metrics")?;
    let applied = metric(&metrics, "strait_mesh_reloads_total{result=\"applied\"}");
    assert!(applied >= 15, "20 versions published, applied {applied}");
    assert_eq!(
        metric(
            &metrics,
            "strait_inpod_events_total{reason=\"not_a_backend\"}"
        ),
        0,
        "no call was refused as a non-backend"
    );
    Ok(())
}

/// `mesh_yaml` with the router's route to `color` leading to `keep` only (`color-v1` or
/// `color-v2`): the other node is not a target at all, so the client's backend rule does
/// not let it reach that node either. `padding` more virtual services (static addresses,
/// nobody's backend) make the routing table slower to compile, as a large mesh's is.
fn one_target_mesh(keep: &str, padding: usize) -> String {
    let (weights, drop) = match keep {
        "color-v1" => ((100, 0), "color-v2"),
        _ => ((0, 100), "color-v1"),
    };
    let full = mesh_yaml("ALLOW_ALL", weights.0, weights.1);
    let weight = if drop == "color-v1" {
        weights.0
    } else {
        weights.1
    };
    let target = format!(
        "            - virtualNodeRef:\n                name: {drop}\n              weight: {weight}\n"
    );
    assert!(full.contains(&target), "mesh_yaml's router changed shape");
    let mut text = full.replace(&target, "");
    for i in 0..padding {
        text.push_str(&format!(
            "---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata:
  name: pad-{i}
  namespace: app
spec:
  addresses: [10.97.{}.{}]
  provider:
    virtualNode:
      virtualNodeRef:
        name: color-v1
",
            i / 250,
            i % 250 + 1
        ));
    }
    text
}

/// One mesh version at a time: two versions swap both the route of `color` (to color-v1 or
/// to color-v2) and, with it, the node the client's backend rule lets it reach. A connection
/// that paired one version's route with the other's rule would be refused (`not reachable
/// through the backends`). The agent compiles each version into one state and swaps it once,
/// and every connection reads one snapshot, so while the two versions alternate 30 times
/// under two clients' traffic no connection is refused, and both versions served.
#[test]
fn a_reload_never_pairs_one_versions_route_with_the_others_policy() -> anyhow::Result<()> {
    const PADDING: usize = 1500;
    let to_v1 = one_target_mesh("color-v1", PADDING);
    let to_v2 = one_target_mesh("color-v2", PADDING);
    let bed = bed("reload-state", &to_v1)?;
    let volume = bed.tb.temp_dir().join("configmap");
    std::fs::create_dir(&volume)?;
    publish(&volume, 0, &to_v1)?;
    symlink("..data/mesh.yaml", volume.join("mesh.yaml"))?;
    let agent = Agent::start(&bed.tb, &bed.node, &volume.join("mesh.yaml"), &[])?;
    const COUNT: u32 = 8000;
    let clients = (0..2)
        .map(|i| {
            bed.tb.spawn(
                &format!("client-state-{i}"),
                bed.client.command(peer_binary()?).args([
                    "call",
                    &format!("{SERVICE}:8080"),
                    "-4",
                    "--count",
                    &COUNT.to_string(),
                    "--bytes",
                    "16",
                    "--interval-ms",
                    "1",
                ]),
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut still_running_at_end = true;
    for generation in 1..=30 {
        let text = if generation % 2 == 1 { &to_v2 } else { &to_v1 };
        publish(&volume, generation, text)?;
        std::thread::sleep(Duration::from_millis(400));
        for client in &clients {
            if client.try_wait()?.is_some() {
                still_running_at_end = false;
            }
        }
    }
    let mut served = std::collections::BTreeMap::<String, u64>::new();
    for client in &clients {
        let status = client.wait_timeout(Duration::from_secs(180))?;
        let report: Value = serde_json::from_str(client.stdout().trim())?;
        assert!(status.success(), "{report}");
        assert_eq!(
            report["succeeded"], COUNT,
            "no connection may see one version's route with the other's backend rule: {report}"
        );
        for server in ["v1", "v2"] {
            *served.entry(server.to_owned()).or_default() +=
                report["by_server"][server].as_u64().unwrap_or(0);
        }
    }
    assert!(
        still_running_at_end,
        "the clients finished before the reloads did, so this run proved less than it should; \
         raise COUNT"
    );
    // Both versions were in force while the clients ran.
    assert!(served["v1"] > 0 && served["v2"] > 0, "{served:?}");
    let metrics = agent.admin_get("/metrics")?;
    let applied = metric(&metrics, "strait_mesh_reloads_total{result=\"applied\"}");
    assert!(applied >= 10, "30 versions published, applied {applied}");
    Ok(())
}
