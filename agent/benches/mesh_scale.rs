//! Scale benchmark of the mesh file: a generated mesh of 2,000 virtual nodes, 2,000 virtual
//! services and 500 routers with 10 routes each is read, validated and compiled into the
//! routing table the proxy uses. Reports the median of several rounds and the memory the
//! loaded model and table take (resident set growth of this process).
//!
//! Run with `cargo bench -p strait --bench mesh_scale`. Not a test: nothing here asserts a
//! time; the figure goes into docs/benchmarks.md.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use strait::mesh::{self, ServiceDiscovery, generate};
use strait::routing::Table;

const ROUNDS: usize = 7;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// DNS answers for every name the table needs, as the resolver would hand them over.
fn answers(config: &mesh::MeshConfig) -> BTreeMap<String, Vec<IpAddr>> {
    let mut answers = BTreeMap::new();
    for (i, vs) in config.virtual_services.iter().enumerate() {
        let ip = Ipv4Addr::from(0x0a60_0000u32 + i as u32);
        answers.insert(vs.hostname(), vec![IpAddr::V4(ip)]);
    }
    for (i, vn) in config.virtual_nodes.iter().enumerate() {
        if let Some(ServiceDiscovery::Dns { hostname, .. }) = &vn.spec.service_discovery {
            let ip = Ipv4Addr::from(0x0af4_0000u32 + i as u32);
            answers.insert(hostname.clone(), vec![IpAddr::V4(ip)]);
        }
    }
    answers
}

fn main() {
    let dir = std::env::temp_dir().join(format!("strait-mesh-scale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("mesh.yaml");
    let text = generate::large_mesh_default();
    std::fs::write(&path, &text).expect("write generated mesh");

    // Memory first, in a fresh process, before the timing rounds warm the allocator's free
    // lists (which would hide the growth).
    let before = rss_kib();
    let loaded = mesh::load_file(&path).expect("valid");
    let table = Table::compile(&loaded.config, &answers(&loaded.config));
    let after = rss_kib();
    std::hint::black_box((&loaded, &table));

    let mut load_times = Vec::new();
    let mut compile_times = Vec::new();
    let mut services = 0;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let loaded = mesh::load_file(&path).expect("the generated mesh is valid");
        let loaded_at = Instant::now();
        let answers = answers(&loaded.config);
        let compile_started = Instant::now();
        let table = Table::compile(&loaded.config, &answers);
        compile_times.push(compile_started.elapsed());
        load_times.push(loaded_at - started);
        services = table.services.len();
    }

    let median = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let load = median(&mut load_times);
    let compile = median(&mut compile_times);
    let c = &loaded.config;
    println!(
        "mesh: {} virtual nodes, {} virtual services, {} routers, {} routes; file {:.1} MiB",
        c.virtual_nodes.len(),
        c.virtual_services.len(),
        c.virtual_routers.len(),
        c.virtual_routers
            .iter()
            .map(|r| r.spec.routes.len())
            .sum::<usize>(),
        text.len() as f64 / 1048576.0
    );
    println!(
        "read + parse + validate: {:.0} ms (median of {ROUNDS})",
        load.as_secs_f64() * 1000.0
    );
    println!(
        "compile routing table ({services} service ports): {:.0} ms (median of {ROUNDS})",
        compile.as_secs_f64() * 1000.0
    );
    println!(
        "total: {:.0} ms; model + table resident memory: {:.1} MiB",
        (load + compile).as_secs_f64() * 1000.0,
        after.saturating_sub(before) as f64 / 1024.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
