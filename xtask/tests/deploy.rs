//! The manifests in deploy/ are what `kubectl apply` accepts: every document parses into the
//! Kubernetes API type of its kind (k8s-openapi) and serializes back to exactly what it was, so
//! a misspelled or unknown field fails here instead of being dropped by the API server. The
//! agent's RBAC rules grant only get/list/watch and no secrets; the DaemonSet keeps the promises
//! deploy/README.md makes (surge upgrades, readiness, capabilities, grace period); the identity
//! service (identity-service.yaml) runs two replicas, is the only one to mount the CA key, may
//! only review tokens and read pods and namespaces, and is reached by the agents with their
//! pod's token for audience strait-ca.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every `*.yaml` in deploy/ (not below it), by name.
fn manifest_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// The documents of a YAML file, as JSON values.
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// The first place where `a` and `b` differ, as a JSON path, or None.
fn first_difference(path: &str, a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(va), Some(vb)) => first_difference(&format!("{path}.{k}"), va, vb),
                (Some(_), None) => Some(format!("{path}.{k}: in the file, unknown to the type")),
                (None, Some(_)) => Some(format!("{path}.{k}: added by the type")),
                (None, None) => None,
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (va, vb))| first_difference(&format!("{path}[{i}]"), va, vb)),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} in the file, {b} after the round trip")),
    }
}

/// Parses `doc` as `T` and checks that serializing it gives `doc` back.
fn round_trip<T: DeserializeOwned + Serialize>(file: &Path, doc: &Value) -> T {
    let typed: T = serde_json::from_value(doc.clone()).unwrap_or_else(|e| {
        panic!(
            "{}: {} {}: {e}",
            file.display(),
            doc["kind"],
            doc["metadata"]["name"]
        )
    });
    let back = serde_json::to_value(&typed).unwrap();
    if let Some(diff) = first_difference("", doc, &back) {
        panic!(
            "{}: {} {}: {diff} (a misspelled or unknown field?)",
            file.display(),
            doc["kind"],
            doc["metadata"]["name"]
        );
    }
    typed
}

#[derive(Default)]
struct Parsed {
    daemonsets: Vec<(PathBuf, DaemonSet)>,
    deployments: Vec<Deployment>,
    services: Vec<Service>,
    cluster_roles: Vec<ClusterRole>,
    kinds: BTreeSet<String>,
}

fn parse_all() -> Parsed {
    let mut parsed = Parsed::default();
    let files = manifest_files();
    assert!(files.len() >= 7, "deploy/ went missing: {files:?}");
    for file in &files {
        let docs = documents(file);
        assert!(!docs.is_empty(), "{}: no document", file.display());
        for doc in &docs {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            match kind.as_str() {
                "Kustomization" => continue,
                "Namespace" => drop(round_trip::<Namespace>(file, doc)),
                "ServiceAccount" => drop(round_trip::<ServiceAccount>(file, doc)),
                "ConfigMap" => drop(round_trip::<ConfigMap>(file, doc)),
                "ClusterRoleBinding" => drop(round_trip::<ClusterRoleBinding>(file, doc)),
                "ClusterRole" => parsed
                    .cluster_roles
                    .push(round_trip::<ClusterRole>(file, doc)),
                "DaemonSet" => parsed
                    .daemonsets
                    .push((file.clone(), round_trip::<DaemonSet>(file, doc))),
                "Deployment" => parsed.deployments.push(round_trip::<Deployment>(file, doc)),
                "Service" => parsed.services.push(round_trip::<Service>(file, doc)),
                other => panic!(
                    "{}: kind {other:?} has no check here; add it to parse_all",
                    file.display()
                ),
            }
            parsed.kinds.insert(kind);
        }
    }
    parsed
}

#[test]
fn every_manifest_parses_into_its_api_type_with_no_unknown_field() {
    let parsed = parse_all();
    let want = [
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Deployment",
        "Namespace",
        "Service",
        "ServiceAccount",
    ];
    assert_eq!(parsed.kinds, want.iter().map(|k| k.to_string()).collect());
}

#[test]
fn the_round_trip_catches_a_misspelled_field() {
    let text = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\n\
                automountServiceAcountToken: false\n";
    let doc = serde_saphyr::from_str::<Value>(text).unwrap();
    let typed: ServiceAccount = serde_json::from_value(doc.clone()).unwrap();
    let diff = first_difference("", &doc, &serde_json::to_value(&typed).unwrap());
    assert_eq!(
        diff.as_deref(),
        Some(".automountServiceAcountToken: in the file, unknown to the type")
    );
}

#[test]
fn the_cluster_role_reads_pods_namespaces_and_nodes_and_nothing_else() {
    let parsed = parse_all();
    let role = parsed
        .cluster_roles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some("strait"))
        .unwrap();
    let rules = role.rules.clone().unwrap_or_default();
    let mut resources = BTreeSet::new();
    for rule in &rules {
        for verb in &rule.verbs {
            assert!(
                ["get", "list", "watch"].contains(&verb.as_str()),
                "verb {verb:?}: the agent only reads"
            );
        }
        assert_eq!(
            rule.api_groups.as_deref(),
            Some(&[String::new()][..]),
            "core API group only"
        );
        assert!(rule.non_resource_urls.is_none() && rule.resource_names.is_none());
        resources.extend(rule.resources.clone().unwrap_or_default());
    }
    assert!(!resources.contains("secrets") && !resources.contains("*"));
    let want: BTreeSet<String> = ["pods", "namespaces", "nodes"]
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(resources, want);
}

fn agent(ds: &DaemonSet) -> &Container {
    let spec = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    spec.containers.iter().find(|c| c.name == "agent").unwrap()
}

/// The value of `--flag=VALUE` in a container's args.
fn flag<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    let prefix = format!("{name}=");
    c.args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix(prefix.as_str()))
}

#[test]
fn the_daemonset_keeps_its_promises() {
    let parsed = parse_all();
    let (_, ds) = parsed
        .daemonsets
        .iter()
        .find(|(f, _)| f.ends_with("daemonset.yaml"))
        .unwrap();
    let spec = ds.spec.as_ref().unwrap();
    let rolling = spec
        .update_strategy
        .as_ref()
        .unwrap()
        .rolling_update
        .as_ref()
        .unwrap();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));

    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.as_ref().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );

    let c = agent(ds);
    // A hostPort (which hostNetwork makes of every declared port) would keep the surge pod
    // off the node.
    assert!(c.ports.is_none(), "surge upgrades need no declared ports");
    let drain: i64 = flag(c, "--drain-timeout").unwrap().parse().unwrap();
    assert!(pod.termination_grace_period_seconds.unwrap() > drain);

    let probe = c
        .readiness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(probe.path.as_deref(), Some("/ready"));
    let admin = flag(c, "--admin").unwrap();
    assert_eq!(
        format!(
            "{}:{}",
            probe.host.as_deref().unwrap(),
            match &probe.port {
                IntOrString::Int(p) => p.to_string(),
                IntOrString::String(s) => s.clone(),
            }
        ),
        admin
    );

    let node_name = c
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "NODE_NAME")
        .unwrap();
    let field = node_name
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "spec.nodeName");
    assert_eq!(flag(c, "--node-name"), Some("$(NODE_NAME)"));

    let caps = c
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, BTreeSet::from(["SYS_ADMIN"]));
    assert!(
        c.security_context.as_ref().unwrap().privileged != Some(true),
        "capabilities, not privileged"
    );
    let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));

    // The mesh is the ConfigMap mounted as a directory, named by --mesh.
    let mesh = flag(c, "--mesh").unwrap();
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == mesh)
        .unwrap_or_else(|| panic!("nothing mounted at --mesh={mesh}"));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(
        volume.config_map.as_ref().map(|c| c.name.as_str()),
        Some("strait-mesh")
    );
}

/// Every flag the manifests pass to `strait` is one docs/operations.md, docs/kubernetes.md or
/// docs/kubernetes-pod-source.md documents.
#[test]
fn the_agent_flags_are_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let operations = std::fs::read_to_string(root.join("docs/operations.md")).unwrap();
    let kubernetes = std::fs::read_to_string(root.join("docs/kubernetes.md")).unwrap();
    let pod_source = std::fs::read_to_string(root.join("docs/kubernetes-pod-source.md")).unwrap();
    let parsed = parse_all();
    let (_, ds) = parsed
        .daemonsets
        .iter()
        .find(|(f, _)| f.ends_with("daemonset.yaml"))
        .unwrap();
    for arg in agent(ds).args.iter().flatten().skip(1) {
        let name = arg.split('=').next().unwrap();
        assert!(name.starts_with("--"), "{arg}: use --flag=value");
        let documented = [&operations, &kubernetes, &pod_source]
            .iter()
            .any(|doc| doc.contains(&format!("| `{name}`")));
        assert!(documented, "{name} is in no flag table of docs/");
    }
    // `strait ca serve`'s flags: docs/identity.md.
    let identity = std::fs::read_to_string(root.join("docs/identity.md")).unwrap();
    for arg in identity_service(&parsed).args.iter().flatten().skip(2) {
        let name = arg.split('=').next().unwrap();
        assert!(name.starts_with("--"), "{arg}: use --flag=value");
        assert!(
            identity.contains(&format!("| `{name}`"))
                || operations.contains(&format!("| `{name}`")),
            "{name} is in no flag table of docs/identity.md"
        );
    }
}

fn identity_service(parsed: &Parsed) -> &Container {
    let deployment = parsed
        .deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("strait-ca"))
        .unwrap();
    let spec = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    spec.containers
        .iter()
        .find(|c| c.name == "identity-service")
        .unwrap()
}

#[test]
fn the_identity_service_keeps_its_promises() {
    let parsed = parse_all();
    assert_eq!(parsed.deployments.len(), 1);
    let deployment = &parsed.deployments[0];
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2), "two replicas");
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("strait-ca"));
    let c = identity_service(&parsed);
    assert_eq!(c.args.as_ref().unwrap()[..2], ["ca", "serve"]);
    assert!(c.args.iter().flatten().any(|a| a == "--kubernetes"));

    // The CA key: a Secret, mounted by this Deployment and by nothing else.
    let ca_dir = flag(c, "--ca-dir").unwrap();
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == ca_dir)
        .unwrap();
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    let secret = volume.secret.as_ref().unwrap();
    assert_eq!(secret.secret_name.as_deref(), Some("strait-ca"));
    assert_eq!(
        secret.default_mode,
        Some(0o400),
        "the key readable by its owner only"
    );
    for (file, ds) in &parsed.daemonsets {
        let volumes = ds
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .volumes
            .iter();
        for v in volumes.flatten() {
            assert!(v.secret.is_none(), "{}: mounts a Secret", file.display());
        }
    }
    let text = std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap();
    let k: Value = serde_saphyr::from_str(&text).unwrap();
    assert_eq!(k["secretGenerator"][0]["name"], "strait-ca");
    let bundle = &k["configMapGenerator"][0];
    assert_eq!(bundle["name"], "strait-ca-bundle");
    assert_eq!(
        bundle["files"],
        serde_json::json!(["ca/ca.pem"]),
        "no key for agents"
    );

    // It may review tokens and read pods and namespaces: nothing else.
    let role = parsed
        .cluster_roles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some("strait-ca"))
        .unwrap();
    let mut grants = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(rule.non_resource_urls.is_none() && rule.resource_names.is_none());
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    grants.insert(format!("{group}/{resource}:{verb}"));
                }
            }
        }
    }
    let want: BTreeSet<String> = [
        "authentication.k8s.io/tokenreviews:create",
        "/pods:get",
        "/pods:list",
        "/namespaces:list",
    ]
    .iter()
    .map(|g| g.to_string())
    .collect();
    assert_eq!(grants, want);

    // The agents reach it by its Service's name, which its certificate carries, and prove
    // their node with their own pod's token for audience strait-ca.
    let service = parsed
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("strait-ca"))
        .unwrap();
    let port = service.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port;
    let host = format!(
        "strait-ca.{}.svc",
        service.metadata.namespace.as_deref().unwrap()
    );
    assert_eq!(flag(c, "--server-name"), Some(host.as_str()));
    assert_eq!(
        flag(c, "--listen").map(|l| l.rsplit(':').next().unwrap().to_string()),
        Some(port.to_string())
    );
    let (_, ds) = parsed
        .daemonsets
        .iter()
        .find(|(f, _)| f.ends_with("daemonset.yaml"))
        .unwrap();
    let a = agent(ds);
    assert_eq!(
        flag(a, "--identity-service"),
        Some(format!("https://{host}:{port}").as_str())
    );
    let ds_pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(
        flag(c, "--agent-service-account"),
        Some(
            format!(
                "strait-system/{}",
                ds_pod.service_account_name.as_deref().unwrap()
            )
            .as_str()
        )
    );
    let token = flag(a, "--node-token").unwrap();
    let mount = a
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| token.starts_with(&format!("{}/", m.mount_path)))
        .unwrap_or_else(|| panic!("nothing mounted at --node-token={token}"));
    let volume = ds_pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    let sources = volume.projected.as_ref().unwrap().sources.as_ref().unwrap();
    let sa_token = sources[0].service_account_token.as_ref().unwrap();
    assert_eq!(sa_token.audience.as_deref(), Some("strait-ca"));
    assert_eq!(format!("{}/{}", mount.mount_path, sa_token.path), token);
}

#[test]
fn the_kustomization_lists_every_manifest_but_the_uninstaller() {
    let text = std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap();
    let k: Value = serde_saphyr::from_str(&text).unwrap();
    let listed: BTreeSet<String> = k["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    let present: BTreeSet<String> = manifest_files()
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap().to_string())
        .filter(|n| n != "kustomization.yaml" && n != "uninstall.yaml")
        .collect();
    assert_eq!(listed, present);
}
