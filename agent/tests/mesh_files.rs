//! `check_files`: TLS files named by the mesh must exist where the agent runs, and
//! `Options::check_files` folds that into loading.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use strait::mesh::{Error, Options, Severity, check_files, parse_str, parse_str_with};

fn mesh_with_files(cert: &str, key: &str, ca: &str) -> String {
    format!(
        "apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: m}}
spec: {{namespaceSelector: {{}}}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: n, namespace: app}}
spec:
  listeners:
    - portMapping: {{port: 8443, protocol: http}}
      tls:
        mode: STRICT
        certificate:
          file: {{certificateChain: {cert}, privateKey: {key}}}
        validation:
          trust:
            file: {{certificateChain: {ca}}}
  serviceDiscovery: {{dns: {{hostname: n.app}}}}
  backendDefaults:
    clientPolicy:
      tls:
        validation:
          trust:
            file: {{certificateChain: {ca}}}
"
    )
}

#[test]
fn missing_tls_files_are_reported_by_field() {
    let text = mesh_with_files(
        "/nonexistent/cert.pem",
        "/nonexistent/key.pem",
        "/nonexistent/ca.pem",
    );
    // Pure validation does not look at the disk...
    let loaded = parse_str(&text, Path::new("m.yaml")).unwrap();
    // ...check_files does.
    let diags = check_files(&loaded.config);
    let paths: Vec<&str> = diags.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "VirtualNode app/n: spec.listeners[0].tls.certificate.file.certificateChain",
            "VirtualNode app/n: spec.listeners[0].tls.certificate.file.privateKey",
            "VirtualNode app/n: spec.listeners[0].tls.validation.trust.file.certificateChain",
            "VirtualNode app/n: spec.backendDefaults.clientPolicy.tls.validation.trust.file.certificateChain",
        ]
    );
    assert!(diags.iter().all(|d| d.severity == Severity::Error));
    assert!(diags[0].to_string().starts_with(
        "m.yaml: error: VirtualNode app/n: spec.listeners[0].tls.certificate.file.certificateChain: \
         certificate chain \"/nonexistent/cert.pem\" cannot be used:"
    ));

    let err =
        parse_str_with(&text, Path::new("m.yaml"), Options { check_files: true }).unwrap_err();
    let Error::Invalid { diagnostics } = err else {
        panic!()
    };
    assert_eq!(diagnostics.len(), 4);
}

#[test]
fn present_tls_files_pass() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| {
        let path = dir.path().join(n);
        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\n").unwrap();
        path.display().to_string()
    };
    let key = p("key.pem");
    // A private key must be readable by its owner only (as ssh wants it).
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = mesh_with_files(&p("cert.pem"), &key, &p("ca.pem"));
    let loaded = parse_str_with(&text, Path::new("m.yaml"), Options { check_files: true }).unwrap();
    assert!(check_files(&loaded.config).is_empty());
    // A directory is not a certificate.
    let text = mesh_with_files(&p("cert.pem"), &key, &dir.path().display().to_string());
    let loaded = parse_str(&text, Path::new("m.yaml")).unwrap();
    let diags = check_files(&loaded.config);
    assert_eq!(diags.len(), 2);
    assert!(
        diags[0].message.contains("is not a regular file"),
        "{}",
        diags[0]
    );
}

#[test]
fn a_private_key_readable_by_others_is_an_error_naming_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| {
        let path = dir.path().join(n);
        std::fs::write(&path, "-----BEGIN CERTIFICATE-----\n").unwrap();
        path.display().to_string()
    };
    let key = p("key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = mesh_with_files(&p("cert.pem"), &key, &p("ca.pem"));
    let loaded = parse_str(&text, Path::new("m.yaml")).unwrap();
    let diags = check_files(&loaded.config);
    assert_eq!(diags.len(), 1, "{diags:?}");
    assert_eq!(
        diags[0].path,
        "VirtualNode app/n: spec.listeners[0].tls.certificate.file.privateKey"
    );
    assert!(
        diags[0].message.contains(&format!("chmod 600 {key}")),
        "{}",
        diags[0]
    );
}
