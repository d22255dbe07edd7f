//! Hot reload of the mesh file under traffic, the way Kubernetes updates a mounted ConfigMap:
//! the file is a symlink into a `..data` directory symlink that is swapped atomically. Valid
//! and invalid versions alternate while a client makes 1,000 connections; none may fail, the
//! valid versions take effect, the invalid ones change nothing and are counted and shown.
//!
//! Needs root; without it these tests fail (never skip) with the reason.

mod common;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use common::*;
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
