//! A mesh spread over several files: a directory (`--mesh DIR`, a mounted ConfigMap) or several
//! paths (`strait validate a.yaml b.yaml`). References, duplicates and the single Mesh are
//! checked across files; every error names its own file, line and column; a ConfigMap volume's
//! `..data` layout is read once, from one version.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use strait::mesh::*;

const MESH: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: {mesh: shop}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata:
  name: shop
spec:
  namespaceSelector: {matchLabels: {mesh: shop}}
";

const NODES: &str = "\
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata:
  name: cart
  namespace: shop
spec:
  podSelector: {matchLabels: {app: cart}}
  listeners:
    - portMapping: {port: 8080, protocol: http}
  serviceDiscovery:
    dns: {hostname: cart.shop.svc.cluster.local}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata:
  name: cart
  namespace: shop
spec:
  provider:
    virtualNode: {virtualNodeRef: {name: cart}}
";

const GATEWAY: &str = "\
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualGateway
metadata:
  name: ingress
  namespace: shop
spec:
  podSelector: {matchLabels: {app: ingress}}
  listeners:
    - portMapping: {port: 8443, protocol: http}
";

/// A GatewayRoute alone in its file, naming the gateway and the service defined elsewhere.
const ROUTE: &str = "\
apiVersion: appmesh.k8s.aws/v1beta2
kind: GatewayRoute
metadata:
  name: cart
  namespace: shop
spec:
  virtualGatewayRef: {name: ingress}
  httpRoute:
    match: {prefix: /cart}
    action:
      target:
        virtualService: {virtualServiceRef: {name: cart}}
";

/// The VirtualNode and VirtualService in the JSON form `kubectl get -o json` prints (a List).
const NODES_JSON: &str = r#"{
    "apiVersion": "v1",
    "kind": "List",
    "items": [
        {
            "apiVersion": "appmesh.k8s.aws/v1beta2",
            "kind": "VirtualNode",
            "metadata": {"name": "cart", "namespace": "shop", "uid": "1234"},
            "spec": {
                "podSelector": {"matchLabels": {"app": "cart"}},
                "listeners": [{"portMapping": {"port": 8080, "protocol": "http"}}],
                "serviceDiscovery": {"dns": {"hostname": "cart.shop.svc.cluster.local"}}
            }
        },
        {
            "apiVersion": "appmesh.k8s.aws/v1beta2",
            "kind": "VirtualService",
            "metadata": {"name": "cart", "namespace": "shop"},
            "spec": {"provider": {"virtualNode": {"virtualNodeRef": {"name": "cart"}}}}
        }
    ]
}
"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn errors(err: Error) -> Vec<String> {
    let Error::Invalid { diagnostics } = err else {
        panic!("expected diagnostics, got {err}")
    };
    diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(ToString::to_string)
        .collect()
}

fn id(ns: &str, name: &str) -> ResourceId {
    ResourceId::new(ns, name)
}

#[test]
fn a_directory_is_one_mesh_across_its_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "00-mesh.yaml", MESH);
    write(dir, "nodes.yml", NODES);
    write(dir, "gateway.json", GATEWAY);
    write(dir, "routes.yaml", ROUTE);
    // Not mesh files: another extension, a hidden file, a subdirectory.
    write(dir, "README.md", "not yaml: [");
    write(dir, ".draft.yaml", "kind: [");
    std::fs::create_dir(dir.join("old.yaml")).unwrap();

    let loaded = load_file(dir).unwrap_or_else(|e| panic!("{e}"));
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    let c = &loaded.config;
    assert_eq!(c.source.path, dir);
    let names: Vec<&str> = c
        .source
        .files
        .iter()
        .map(|f| f.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["00-mesh.yaml", "gateway.json", "nodes.yml", "routes.yaml"]
    );
    assert_eq!(c.mesh.name, "shop");
    assert!(c.namespace_in_mesh("shop"));
    let gw = c.virtual_gateway(&id("shop", "ingress")).unwrap();
    let routes: Vec<String> = c
        .gateway_routes_for(gw)
        .iter()
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(routes, ["shop/cart"]);
    assert!(c.virtual_node(&id("shop", "cart")).is_some());
    assert_eq!(
        summary(c),
        "Mesh shop (egress ALLOW_ALL)\n1 VirtualNode (1 listener, 0 backends)\n1 \
         VirtualService\n0 VirtualRouters (0 routes)\n1 VirtualGateway\n1 GatewayRoute"
    );
}

#[test]
fn several_paths_validate_together_and_alone_they_do_not() {
    let tmp = tempfile::tempdir().unwrap();
    let mesh = write(tmp.path(), "mesh.yaml", MESH);
    let nodes = write(tmp.path(), "nodes.yaml", NODES);
    let gateway = write(tmp.path(), "gateway.yaml", GATEWAY);
    let routes_dir = tmp.path().join("routes");
    std::fs::create_dir(&routes_dir).unwrap();
    let route = write(&routes_dir, "cart.yaml", ROUTE);

    let paths = [mesh.clone(), nodes, gateway, routes_dir];
    let loaded = load_paths(&paths, Options::default()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.config.source.files.len(), 4);
    assert_eq!(loaded.config.source.files[3], route);
    assert_eq!(loaded.config.gateway_routes.len(), 1);

    // The route file with only the Mesh: its gateway and service are missing, each named at
    // its place in the route file.
    let got = errors(load_paths(&[mesh, route.clone()], Options::default()).unwrap_err());
    let r = route.display();
    assert_eq!(
        got,
        [
            format!(
                "{r}:7:22: error: GatewayRoute shop/cart: spec.virtualGatewayRef: \
                 VirtualGateway shop/ingress does not exist in this mesh"
            ),
            format!(
                "{r}:12:45: error: GatewayRoute shop/cart: \
                 spec.httpRoute.action.target.virtualService.virtualServiceRef: \
                 VirtualService shop/cart does not exist in this mesh"
            ),
        ]
    );
}

#[test]
fn a_duplicate_across_files_names_both_places() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "a-mesh.yaml", MESH);
    let first = write(dir, "b-nodes.yaml", NODES);
    let second = write(
        dir,
        "c-more.yaml",
        &format!("# the same node again\n{NODES}"),
    );
    let got = errors(load_file(dir).unwrap_err());
    let (f, s) = (first.display(), second.display());
    assert_eq!(
        got,
        [
            format!(
                "{s}:5:9: error: VirtualNode shop/cart: duplicate VirtualNode shop/cart: \
                 already defined at {f}:4:9"
            ),
            format!(
                "{s}:17:9: error: VirtualService shop/cart: duplicate VirtualService shop/cart: \
                 already defined at {f}:16:9"
            ),
        ]
    );
}

#[test]
fn mesh_count_errors_span_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let first = write(dir, "a.yaml", MESH);
    let second = write(dir, "b.yaml", MESH);
    assert_eq!(
        errors(load_file(dir).unwrap_err()),
        [format!(
            "{}:10:9: error: Mesh shop: a second Mesh: a mesh file describes exactly one mesh \
             (Mesh shop is defined at {}:10:9)",
            second.display(),
            first.display()
        )]
    );

    std::fs::remove_file(&first).unwrap();
    std::fs::remove_file(&second).unwrap();
    write(dir, "nodes.yaml", NODES);
    write(dir, "gateway.yaml", GATEWAY);
    assert_eq!(
        errors(load_file(dir).unwrap_err()),
        [format!(
            "{}: error: no Mesh document in any of the files: exactly one `kind: Mesh` \
             (apiVersion appmesh.k8s.aws/v1beta2) is required",
            dir.display()
        )]
    );
}

#[test]
fn a_broken_file_is_the_only_error_and_names_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "mesh.yaml", MESH);
    write(dir, "nodes.yaml", NODES);
    // Without the node it defines, routes.yaml's reference would dangle: not reported, the
    // syntax error is the one thing to fix.
    let broken = write(
        dir,
        "gateway.yaml",
        &GATEWAY.replace("protocol: http}", "protocol: http"),
    );
    write(dir, "routes.yaml", ROUTE);
    let got = errors(load_file(dir).unwrap_err());
    assert_eq!(got.len(), 1, "{got:#?}");
    assert!(
        got[0].starts_with(&format!("{}:", broken.display())) && got[0].contains("invalid YAML"),
        "{got:#?}"
    );

    std::fs::write(&broken, b"kind: \xff\n").unwrap();
    assert_eq!(
        errors(load_file(dir).unwrap_err()),
        [format!(
            "{}:1:7: error: the mesh file is not valid UTF-8",
            broken.display()
        )]
    );
}

#[test]
fn json_manifests_load_and_their_errors_have_positions() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write(dir, "mesh.yaml", MESH);
    let json = write(dir, "nodes.json", NODES_JSON);
    let loaded = load_file(dir).unwrap_or_else(|e| panic!("{e}"));
    let node = loaded.config.virtual_node(&id("shop", "cart")).unwrap();
    assert_eq!(node.spec.listeners[0].port_mapping.port, 8080);
    assert_eq!(node.spec.listeners[0].port_mapping.protocol, Protocol::Http);

    // Tab-indented JSON is JSON too (YAML 1.2 allows tabs as flow whitespace).
    std::fs::write(&json, NODES_JSON.replace("    ", "\t")).unwrap();
    load_file(dir).unwrap_or_else(|e| panic!("tab-indented JSON: {e}"));

    std::fs::write(&json, NODES_JSON.replace("8080", "80800")).unwrap();
    assert_eq!(
        errors(load_file(dir).unwrap_err()),
        [format!(
            "{}:11:56: error: VirtualNode shop/cart: spec.listeners[0].portMapping.port: \
             expected an integer 1..=65535, got 80800",
            json.display()
        )]
    );
}

/// Publishes `files` as kubelet does: a timestamped directory, the `..data` link swapped by
/// rename, and `DIR/name -> ..data/name` for each key.
fn publish(volume: &Path, generation: usize, files: &[(&str, &str)]) {
    let version = format!("..2026_11_30_{generation:04}");
    std::fs::create_dir(volume.join(&version)).unwrap();
    for (name, text) in files {
        std::fs::write(volume.join(&version).join(name), text).unwrap();
        let link = volume.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(Path::new("..data").join(name), &link).unwrap();
        }
    }
    let staged = volume.join("..data_tmp");
    symlink(&version, &staged).unwrap();
    std::fs::rename(&staged, volume.join("..data")).unwrap();
}

#[test]
fn a_configmap_volume_is_read_once_from_the_version_data_points_at() {
    let tmp = tempfile::tempdir().unwrap();
    let volume = tmp.path();
    publish(volume, 1, &[("mesh.yaml", MESH), ("nodes.yaml", NODES)]);
    let loaded = load_file(volume).unwrap_or_else(|e| panic!("{e}"));
    // Each file once, under the name the operator sees, not `..data/...` or `..2026.../...`.
    assert_eq!(
        loaded.config.source.files,
        [volume.join("mesh.yaml"), volume.join("nodes.yaml")]
    );
    assert_eq!(
        digest(&[volume.to_path_buf()]).unwrap(),
        loaded.config.source.sha256
    );

    // kubelet links a new key before it swaps `..data`: the dangling link is not read yet.
    symlink("..data/routes.yaml", volume.join("routes.yaml")).unwrap();
    let loaded = load_file(volume).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.config.source.files.len(), 2);
    assert!(loaded.config.gateway_routes.is_empty());

    let before = loaded.config.source.sha256;
    publish(
        volume,
        2,
        &[
            ("mesh.yaml", MESH),
            ("nodes.yaml", NODES),
            ("gateway.yaml", GATEWAY),
            ("routes.yaml", ROUTE),
        ],
    );
    // The old version is removed after the swap, as kubelet does.
    std::fs::remove_dir_all(volume.join("..2026_11_30_0001")).unwrap();
    let loaded = load_file(volume).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.config.source.files.len(), 4);
    assert_eq!(loaded.config.gateway_routes.len(), 1);
    assert_ne!(loaded.config.source.sha256, before);

    // A key dropped from the ConfigMap: its link dangles until kubelet removes it; the version
    // `..data` points at no longer has it, so it is gone from the mesh.
    publish(volume, 3, &[("mesh.yaml", MESH), ("nodes.yaml", NODES)]);
    let loaded = load_file(volume).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.config.source.files.len(), 2);
    assert!(loaded.config.virtual_gateways.is_empty());
}

#[test]
fn a_directory_without_mesh_files_says_what_it_expected() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "notes.txt", "nothing");
    let err = load_file(tmp.path()).unwrap_err();
    assert!(matches!(err, Error::EmptyDir { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&tmp.path().display().to_string())
            && text.contains("*.yaml, *.yml or *.json"),
        "{text}"
    );
}

#[test]
fn one_file_digests_as_its_bytes_and_several_as_names_and_bytes() {
    use sha2::{Digest, Sha256};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mesh = write(dir, "mesh.yaml", &format!("{MESH}---\n{NODES}"));
    let hex = |b: &[u8]| -> String { b.iter().map(|b| format!("{b:02x}")).collect() };
    let bytes = std::fs::read(&mesh).unwrap();
    assert_eq!(
        digest(std::slice::from_ref(&mesh)).unwrap(),
        hex(&Sha256::digest(&bytes))
    );
    // A directory holding that one file is the same mesh, and digests the same.
    assert_eq!(
        digest(&[dir.to_path_buf()]).unwrap(),
        hex(&Sha256::digest(&bytes))
    );

    // The same bytes in two files: the split is part of what is digested.
    std::fs::write(&mesh, format!("{MESH}---\n")).unwrap();
    let nodes = write(dir, "nodes.yaml", NODES);
    let split = digest(&[dir.to_path_buf()]).unwrap();
    assert_ne!(split, hex(&Sha256::digest(&bytes)));
    // Moving a document from one file to the other, same bytes in all, is a change.
    std::fs::write(&mesh, MESH).unwrap();
    std::fs::write(&nodes, format!("---\n{NODES}")).unwrap();
    assert_ne!(digest(&[dir.to_path_buf()]).unwrap(), split);
    assert_eq!(
        digest(&[dir.to_path_buf()]).unwrap(),
        digest(&[dir.to_path_buf()]).unwrap()
    );
}

#[test]
fn strait_validate_takes_files_and_directories_as_one_mesh() {
    let tmp = tempfile::tempdir().unwrap();
    let mesh = write(tmp.path(), "mesh.yaml", &format!("{MESH}---\n{NODES}"));
    let routes = tmp.path().join("routes");
    std::fs::create_dir(&routes).unwrap();
    write(&routes, "gateway.yaml", GATEWAY);
    let route = write(&routes, "cart.yaml", ROUTE);
    let strait = env!("CARGO_BIN_EXE_strait");

    let out = Command::new(strait)
        .arg("validate")
        .args([&mesh, &routes])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(": valid\n"), "{stdout}");
    assert!(stdout.contains("1 GatewayRoute"), "{stdout}");

    // The route file on its own cannot be checked against a gateway it does not hold.
    let out = Command::new(strait)
        .arg("validate")
        .args([&mesh, &route])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{}:7:22: error: GatewayRoute shop/cart: spec.virtualGatewayRef: VirtualGateway \
             shop/ingress does not exist in this mesh",
            route.display()
        )),
        "{stderr}"
    );
}
