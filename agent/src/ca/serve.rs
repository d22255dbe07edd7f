//! `strait ca serve`: the identity service. Agents ask it, over HTTP/2 and mutual TLS, for the
//! certificates of the virtual nodes they run pods of, and it signs one only if the asking
//! node runs a pod that virtual node selects (docs/identity.md describes the protocol).
//!
//! - A node authenticates with a node certificate from [`issue_node`]: its URI SAN is
//!   `spiffe://<mesh>/node/<node>` (the trust domain is the mesh's name, as in the workload
//!   SPIFFE IDs of `identity`). With `--kubernetes` an agent may instead send its pod's
//!   projected ServiceAccount token as a bearer token ([`super::token`]); the listener then
//!   lets clients without a certificate through the handshake.
//! - Which pods run on which node comes from the Kubernetes API (`--kubernetes`: Pods whose
//!   `spec.nodeName` is the node, and Namespaces' labels) or from a registry file the operator
//!   writes (`--nodes`), never from what agents report: a compromised node could report any
//!   pod. Both are read again for every request, so a change applies at once. A pod is selected by a virtual node
//!   under the same App Mesh rules the agent applies (`Workload::virtual_node`,
//!   `gateway::routes::gateway_of`).
//! - The CSR only carries the public key: the subject and SANs are the service's choice (the
//!   virtual node's SPIFFE ID and, with DNS service discovery, its host name), the lifetime
//!   is `--lifetime` (24 h by default).
//! - Every refusal is answered with a JSON body saying why and counted
//!   (`strait_ca_refused_total{reason}`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{Error, load_ca, write_atomic};
use crate::identity::{self, gateway_spiffe_id, spiffe_id};
use crate::logging::Chain;
use crate::mesh::{self, MeshConfig, ResourceId, ServiceDiscovery};
use crate::workloads::{Selection, Workload};

/// The path agents post a CSR to.
pub const ISSUE_PATH: &str = "/v1/identities";

/// The file names `issue-node` writes into its folder.
pub const NODE_CERT: &str = "node.pem";
pub const NODE_KEY: &str = "node-key.pem";
pub const NODE_CA: &str = "ca.pem";

/// A request for an identity: `POST /v1/identities`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssueRequest {
    /// The SPIFFE ID asked for (a virtual node's or a virtual gateway's).
    pub identity: String,
    /// A PEM PKCS#10 CSR; only its public key is used.
    pub csr: String,
}

/// The answer to a granted request (200).
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IssueResponse {
    /// The leaf certificate, PEM.
    pub certificate_chain: String,
    /// The CA certificate, PEM: what peers' certificates chain to.
    pub trust_bundle: String,
    /// The leaf's notAfter, seconds since the epoch.
    pub not_after: i64,
}

/// The answer to a refused or bad request (400, 403, 404).
#[derive(Debug, Serialize, Deserialize)]
pub struct Refusal {
    /// A short cause (`not_on_node`, `unknown_identity`, `bad_csr`, ...), the metric's label.
    pub reason: String,
    /// What happened, for the operator.
    pub message: String,
}

/// The URI SAN of a node certificate.
pub fn node_spiffe_id(trust_domain: &str, node: &str) -> String {
    format!(
        "spiffe://{}/node/{}",
        trust_domain.to_ascii_lowercase(),
        node
    )
}

/// One pod of the registry file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RegisteredPod {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub namespace_labels: Option<BTreeMap<String, String>>,
}

/// The registry file: node name to the pods it runs.
pub type NodeRegistry = BTreeMap<String, Vec<RegisteredPod>>;

/// Why the pods of a node cannot be listed (the service answers 503, or does not start).
#[derive(Debug, thiserror::Error)]
pub enum PodsError {
    #[error("cannot read the node registry {path}")]
    ReadRegistry {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}:{line}:{column}: not a node registry (expected \
         {{\"<node>\": [{{\"name\", \"namespace\", \"labels\"}}]}})"
    )]
    ParseRegistry {
        path: PathBuf,
        line: usize,
        column: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot read the kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration (in-cluster or ~/.kube/config)")]
    NoKubernetes(#[source] kube::config::InferConfigError),
    #[error("cannot make a Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("cannot list the pods of node {node}")]
    ListPods {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot list namespaces")]
    ListNamespaces(#[source] kube::Error),
}

fn read_registry(path: &Path) -> Result<NodeRegistry, PodsError> {
    let text = std::fs::read_to_string(path).map_err(|source| PodsError::ReadRegistry {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| PodsError::ParseRegistry {
        path: path.to_owned(),
        line: source.line(),
        column: source.column(),
        source,
    })
}

/// Writes a node certificate for `node` into `out` (`node.pem`, `node-key.pem`, `ca.pem`),
/// valid `days` days. The trust domain is the mesh file's mesh name.
pub fn issue_node(
    mesh_file: &Path,
    ca_dir: &Path,
    node: &str,
    out: &Path,
    days: u32,
) -> Result<String, Error> {
    let loaded = mesh::load_file(mesh_file)?;
    let (issuer, issuer_key, ca_pem) = load_ca(ca_dir)?;
    let id = node_spiffe_id(&loaded.config.mesh.name, node);
    let key = KeyPair::generate()?;
    let params = leaf_params(
        std::slice::from_ref(&id),
        Duration::from_secs(u64::from(days) * 86_400),
    )?;
    let cert = params.signed_by(&key, &issuer, &issuer_key)?;
    write_atomic(&out.join(NODE_KEY), &key.serialize_pem(), true)?;
    write_atomic(&out.join(NODE_CERT), &cert.pem(), false)?;
    write_atomic(&out.join(NODE_CA), &ca_pem, false)?;
    Ok(id)
}

/// A leaf's parameters: `sans` (URIs for `scheme://`, IP addresses, else DNS names), valid from
/// a little in the past (clock skew) for `lifetime`.
fn leaf_params(sans: &[String], lifetime: Duration) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "strait");
    dn.push(
        DnType::CommonName,
        sans.first().map(String::as_str).unwrap_or("strait"),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = sans
        .iter()
        .map(|s| {
            Ok(if s.contains("://") {
                SanType::URI(s.as_str().try_into()?)
            } else if let Ok(ip) = s.parse() {
                SanType::IpAddress(ip)
            } else {
                SanType::DnsName(s.as_str().try_into()?)
            })
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.serial_number = Some(SerialNumber::from(rand::random::<u64>() >> 1));
    let now = OffsetDateTime::now_utc();
    // Back-dated for clock skew, by at most a tenth of the life, so a short-lived certificate
    // is not three quarters through (the agent's expiry warning) when renewed at half-life.
    let skew = (lifetime.as_secs() / 10).min(60) as i64;
    params.not_before = now - time::Duration::seconds(skew);
    params.not_after = now + time::Duration::seconds(lifetime.as_secs() as i64);
    Ok(params)
}

/// Parses a lifetime: a number followed by `s`, `m`, `h` or `d` (`60s`, `24h`).
pub fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let (number, unit) = s.split_at(s.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len());
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{s}`: expected a number and a unit, like 60s, 30m, 24h, 7d"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("`{s}`: the unit must be s, m, h or d (like 24h)")),
    };
    if !(10..=366 * 86_400).contains(&secs) {
        return Err(format!("`{s}`: a lifetime is from 10s to 366d"));
    }
    Ok(Duration::from_secs(secs))
}

/// How `strait ca serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub ca_dir: PathBuf,
    pub mesh: PathBuf,
    pub pods: PodSourceOptions,
    pub listen: SocketAddr,
    /// Plain HTTP `/metrics` (Prometheus).
    pub metrics_listen: Option<SocketAddr>,
    pub lifetime: Duration,
    /// DNS names of the service's own certificate (besides the listen address).
    pub server_names: Vec<String>,
    /// With the Kubernetes API: which pods' tokens prove a node ([`super::token`]).
    pub agents: super::token::AgentPods,
}

/// Where the service learns which pods run on which node.
#[derive(Debug, Clone)]
pub enum PodSourceOptions {
    /// The registry file (`--nodes`).
    Registry(PathBuf),
    /// The Kubernetes API (`--kubernetes`), with this kubeconfig or the in-cluster one.
    Kubernetes { kubeconfig: Option<PathBuf> },
}

enum PodSource {
    Registry(PathBuf),
    Kubernetes(kube::Client),
}

impl PodSource {
    async fn open(options: &PodSourceOptions) -> Result<Self, PodsError> {
        match options {
            PodSourceOptions::Registry(path) => {
                read_registry(path)?;
                Ok(Self::Registry(path.clone()))
            }
            PodSourceOptions::Kubernetes { kubeconfig } => {
                let config = match kubeconfig {
                    Some(path) => {
                        let kubeconfig = |source| PodsError::Kubeconfig {
                            path: path.clone(),
                            source,
                        };
                        let file = kube::config::Kubeconfig::read_from(path).map_err(kubeconfig)?;
                        kube::Config::from_custom_kubeconfig(file, &Default::default())
                            .await
                            .map_err(kubeconfig)?
                    }
                    None => kube::Config::infer()
                        .await
                        .map_err(PodsError::NoKubernetes)?,
                };
                tracing::info!(api = %config.cluster_url, "pods per node from the Kubernetes API");
                Ok(Self::Kubernetes(
                    kube::Client::try_from(config).map_err(PodsError::Client)?,
                ))
            }
        }
    }

    /// What names the source in a refusal.
    fn describe(&self) -> String {
        match self {
            Self::Registry(path) => path.display().to_string(),
            Self::Kubernetes(_) => "the Kubernetes API".into(),
        }
    }

    /// The pods running on `node`.
    async fn pods_of(&self, node: &str) -> Result<Vec<RegisteredPod>, PodsError> {
        match self {
            Self::Registry(path) => Ok(read_registry(path)?.remove(node).unwrap_or_default()),
            Self::Kubernetes(client) => {
                use k8s_openapi::api::core::v1::{Namespace, Pod};
                use kube::api::{Api, ListParams};
                let pods = Api::<Pod>::all(client.clone())
                    .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
                    .await
                    .map_err(|source| PodsError::ListPods {
                        node: node.to_owned(),
                        source,
                    })?;
                let namespaces: BTreeMap<String, BTreeMap<String, String>> =
                    Api::<Namespace>::all(client.clone())
                        .list(&ListParams::default())
                        .await
                        .map_err(PodsError::ListNamespaces)?
                        .items
                        .into_iter()
                        .filter_map(|ns| {
                            Some((ns.metadata.name?, ns.metadata.labels.unwrap_or_default()))
                        })
                        .collect();
                Ok(pods
                    .items
                    .into_iter()
                    // A finished pod runs nothing that needs an identity.
                    .filter(|pod| {
                        !pod.status
                            .as_ref()
                            .and_then(|s| s.phase.as_deref())
                            .is_some_and(|p| p == "Succeeded" || p == "Failed")
                    })
                    .filter_map(|pod| {
                        let namespace = pod.metadata.namespace?;
                        Some(RegisteredPod {
                            name: pod.metadata.name?,
                            namespace_labels: namespaces.get(&namespace).cloned(),
                            namespace,
                            labels: pod.metadata.labels.unwrap_or_default(),
                        })
                    })
                    .collect())
            }
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Default)]
struct Metrics {
    issued: Counter,
    refused: Family<ReasonLabels, Counter>,
}

struct Service {
    options: ServeOptions,
    pods: PodSource,
    issuer: rcgen::Certificate,
    issuer_key: KeyPair,
    ca_pem: String,
    metrics: Metrics,
}

fn refuse(status: StatusCode, reason: &str, message: String) -> (StatusCode, Vec<u8>) {
    let body = serde_json::to_vec(&Refusal {
        reason: reason.into(),
        message,
    })
    .unwrap_or_default();
    (status, body)
}

impl Service {
    /// Decides one request. The node is the one the verified client certificate names, else,
    /// with the Kubernetes API, the node of the agent pod the bearer token is bound to.
    async fn answer(
        &self,
        cert_node: Option<&str>,
        token: Option<&str>,
        body: &[u8],
    ) -> (StatusCode, Vec<u8>) {
        let node = match (cert_node, token, &self.pods) {
            (Some(node), _, _) => Some(node.to_owned()),
            (None, Some(token), PodSource::Kubernetes(client)) => {
                match super::token::node_of(client, token, &self.options.agents).await {
                    Ok(node) => Some(node),
                    Err(refused) => return self.finish(None, Err(refused)),
                }
            }
            _ => None,
        };
        let pods = match &node {
            Some(node) => self.pods.pods_of(node).await,
            None => Ok(Vec::new()),
        };
        self.decide(node.as_deref(), body, pods)
    }

    /// [`Service::answer`], given the pods the source lists on the node.
    fn decide(
        &self,
        node: Option<&str>,
        body: &[u8],
        pods: Result<Vec<RegisteredPod>, PodsError>,
    ) -> (StatusCode, Vec<u8>) {
        self.finish(node, self.decide_inner(node, body, pods))
    }

    /// Counts and logs the outcome, and makes the answer.
    fn finish(
        &self,
        node: Option<&str>,
        result: Result<Vec<u8>, (StatusCode, &'static str, String)>,
    ) -> (StatusCode, Vec<u8>) {
        match &result {
            Ok(_) => {
                self.metrics.issued.inc();
            }
            Err((_, reason, message)) => {
                tracing::warn!(node = node.unwrap_or("?"), reason, "refused: {message}");
                self.metrics
                    .refused
                    .get_or_create(&ReasonLabels {
                        reason: (*reason).into(),
                    })
                    .inc();
            }
        }
        match result {
            Ok(body) => (StatusCode::OK, body),
            Err((status, reason, message)) => refuse(status, reason, message),
        }
    }

    fn decide_inner(
        &self,
        node: Option<&str>,
        body: &[u8],
        pods: Result<Vec<RegisteredPod>, PodsError>,
    ) -> Result<Vec<u8>, (StatusCode, &'static str, String)> {
        let Some(node) = node else {
            return Err((
                StatusCode::FORBIDDEN,
                "no_node",
                "the client proved no node: no client certificate naming a node of this mesh \
                 (a URI SAN spiffe://<mesh>/node/<name>, from `strait ca issue-node`), and, \
                 with --kubernetes, no bearer token"
                    .into(),
            ));
        };
        let request: IssueRequest = serde_json::from_slice(body).map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("the body is not {{\"identity\", \"csr\"}} JSON: {e}"),
            )
        })?;
        let internal = |e: String| (StatusCode::SERVICE_UNAVAILABLE, "unavailable", e);
        let loaded = mesh::load_file(&self.options.mesh)
            .map_err(|e| internal(format!("cannot load the mesh file: {}", Chain(&e))))?;
        let mesh = &loaded.config;
        let pods = pods.map_err(|e| internal(Chain(&e).to_string()))?;
        let Some((id, sans)) = identity_of(mesh, &request.identity) else {
            return Err((
                StatusCode::NOT_FOUND,
                "unknown_identity",
                format!(
                    "{} is the SPIFFE ID of no virtual node or virtual gateway of mesh {}",
                    request.identity, mesh.mesh.name
                ),
            ));
        };
        if !pods.iter().any(|pod| selects(mesh, &id, pod)) {
            return Err((
                StatusCode::FORBIDDEN,
                "not_on_node",
                format!(
                    "node {node} runs no pod selected by {id} (per {}): a node is given only \
                     the identities of its own pods",
                    self.pods.describe()
                ),
            ));
        }
        let mut csr = CertificateSigningRequestParams::from_pem(&request.csr).map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                "bad_csr",
                format!("the csr is not a valid PEM PKCS#10 request: {e}"),
            )
        })?;
        csr.params = leaf_params(&sans, self.options.lifetime)
            .map_err(|e| internal(format!("cannot build the certificate: {e}")))?;
        let not_after = csr.params.not_after.unix_timestamp();
        let cert = csr
            .signed_by(&self.issuer, &self.issuer_key)
            .map_err(|e| internal(format!("cannot sign: {e}")))?;
        tracing::info!(node, identity = %request.identity, not_after, "issued");
        Ok(serde_json::to_vec(&IssueResponse {
            certificate_chain: cert.pem(),
            trust_bundle: self.ca_pem.clone(),
            not_after,
        })
        .unwrap_or_default())
    }
}

/// The virtual node or gateway whose SPIFFE ID is `wanted`, and the SANs its certificate gets.
fn identity_of(mesh: &MeshConfig, wanted: &str) -> Option<(ResourceId, Vec<String>)> {
    for vn in &mesh.virtual_nodes {
        let id = spiffe_id(&mesh.mesh.name, &vn.id);
        if id == wanted {
            let mut sans = vec![id];
            if let Some(ServiceDiscovery::Dns { hostname, .. }) = &vn.spec.service_discovery {
                sans.push(hostname.clone());
            }
            return Some((vn.id.clone(), sans));
        }
    }
    // A gateway's certificate also names the hosts its routes match: it is presented to
    // clients at the edge (`sds` on a gateway listener), which check the host they asked for.
    mesh.virtual_gateways
        .iter()
        .find(|gw| gateway_spiffe_id(&mesh.mesh.name, &gw.id) == wanted)
        .map(|gw| (gw.id.clone(), super::gateway_sans(mesh, gw)))
}

/// Whether `pod` is selected by the virtual node or gateway `id`, under the agent's rules.
fn selects(mesh: &MeshConfig, id: &ResourceId, pod: &RegisteredPod) -> bool {
    let workload = Workload {
        name: pod.name.clone(),
        namespace: pod.namespace.clone(),
        labels: pod.labels.clone(),
        ips: Vec::new(),
        netns: PathBuf::new(),
        cgroup: PathBuf::new(),
        namespace_labels: pod.namespace_labels.clone(),
        unavailable: None,
    };
    if let Selection::One(vn) = workload.virtual_node(mesh) {
        return vn == id;
    }
    workload.in_mesh(mesh)
        && crate::gateway::routes::gateway_of(mesh, &workload.namespace, &workload.labels)
            .is_some_and(|gw| gw.id == *id)
}

/// The node a verified client certificate names.
fn node_of(trust_domain: &str, cert: &CertificateDer<'_>) -> Option<String> {
    let prefix = node_spiffe_id(trust_domain, "");
    identity::store::cert_facts(cert)
        .ok()?
        .sans
        .into_iter()
        .find_map(|san| san.strip_prefix(&prefix).map(str::to_owned))
        .filter(|n| !n.is_empty() && !n.contains('/'))
}

/// The errors of [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Ca(#[from] Error),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Tls(String),
    #[error(transparent)]
    Pods(PodsError),
}

/// Runs the identity service until the process ends.
pub async fn serve(options: ServeOptions) -> Result<(), ServeError> {
    let (issuer, issuer_key, ca_pem) = load_ca(&options.ca_dir)?;
    let trust_domain = mesh::load_file(&options.mesh)
        .map_err(Error::from)?
        .config
        .mesh
        .name
        .to_ascii_lowercase();
    let pods = PodSource::open(&options.pods)
        .await
        .map_err(ServeError::Pods)?;
    // The service's own certificate: its DNS names and the listen address, for as long as it
    // runs (a restart makes a new one).
    let mut names = options.server_names.clone();
    if !options.listen.ip().is_unspecified() {
        names.push(options.listen.ip().to_string());
    }
    names.push(format!("spiffe://{trust_domain}/identity-service"));
    let server_key = KeyPair::generate().map_err(Error::from)?;
    let server_cert = leaf_params(&names, Duration::from_secs(366 * 86_400))
        .and_then(|p| p.signed_by(&server_key, &issuer, &issuer_key))
        .map_err(Error::from)?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()).flatten() {
        roots
            .add(cert)
            .map_err(|e| ServeError::Tls(e.to_string()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.into(),
        identity::provider(),
    );
    // On Kubernetes agents have no node certificate: they prove their node with a token in
    // the request, so the handshake lets a client without a certificate through (one that
    // presents a certificate must still chain to the CA). Elsewhere no certificate, no answer.
    let verifier = match pods {
        PodSource::Kubernetes(_) => verifier.allow_unauthenticated(),
        PodSource::Registry(_) => verifier,
    }
    .build()
    .map_err(|e| ServeError::Tls(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(server_key.serialize_pem().as_bytes())
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server_cert.der().clone()], key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![identity::ALPN_H2.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: options.listen,
            source,
        })?;
    let service = Arc::new(Service {
        options: options.clone(),
        pods,
        issuer,
        issuer_key,
        ca_pem,
        metrics: Metrics::default(),
    });
    if let Some(addr) = options.metrics_listen {
        let mut registry = Registry::default();
        registry.register(
            "strait_ca_issued",
            "Identity certificates the identity service signed",
            service.metrics.issued.clone(),
        );
        registry.register(
            "strait_ca_refused",
            "Identity requests the identity service refused, by reason (not_on_node, no_node, bad_token, not_agent, unknown_identity, bad_csr, ...)",
            service.metrics.refused.clone(),
        );
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Listen { addr, source })?;
        tokio::spawn(serve_metrics(listener, Arc::new(registry)));
    }
    tracing::info!(listen = %options.listen, lifetime_s = options.lifetime.as_secs(), "identity service up");
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let acceptor = acceptor.clone();
        let service = service.clone();
        let trust_domain = trust_domain.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::warn!(%peer, "TLS handshake refused: {e}");
                        service
                            .metrics
                            .refused
                            .get_or_create(&ReasonLabels {
                                reason: "tls".into(),
                            })
                            .inc();
                        return;
                    }
                    Err(_) => return,
                };
            let node = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| node_of(&trust_domain, c));
            let handler = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let service = service.clone();
                let node = node.clone();
                let token = req
                    .headers()
                    .get(hyper::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty());
                async move {
                    let (status, body) =
                        if req.method() != hyper::Method::POST || req.uri().path() != ISSUE_PATH {
                            refuse(
                                StatusCode::NOT_FOUND,
                                "not_found",
                                format!("the identity service answers POST {ISSUE_PATH} only"),
                            )
                        } else {
                            match Limited::new(req.into_body(), 64 * 1024).collect().await {
                                Ok(body) => {
                                    service
                                        .answer(node.as_deref(), token.as_deref(), &body.to_bytes())
                                        .await
                                }
                                Err(e) => refuse(
                                    StatusCode::BAD_REQUEST,
                                    "bad_request",
                                    format!("cannot read the body (at most 64 KiB): {e}"),
                                ),
                            }
                        };
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), handler)
                .await;
        });
    }
}

async fn serve_metrics(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let handler =
                hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let mut text = String::new();
                    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
                    async move {
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(text)))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), handler)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(dir: &Path) -> Service {
        let ca = dir.join("ca");
        super::super::init(&ca).unwrap();
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
  podSelector: {matchLabels: {app: color}}
  serviceDiscovery: {dns: {hostname: color.app.svc.cluster.local}}
"#,
        )
        .unwrap();
        let nodes = dir.join("nodes.json");
        std::fs::write(
            &nodes,
            r#"{"node1": [{"name": "c", "namespace": "app", "labels": {"app": "client"}}],
                "node2": [{"name": "s", "namespace": "app", "labels": {"app": "color"}}]}"#,
        )
        .unwrap();
        let (issuer, issuer_key, ca_pem) = load_ca(&ca).unwrap();
        Service {
            pods: PodSource::Registry(nodes.clone()),
            options: ServeOptions {
                ca_dir: ca,
                mesh,
                pods: PodSourceOptions::Registry(nodes),
                listen: "127.0.0.1:0".parse().unwrap(),
                metrics_listen: None,
                lifetime: Duration::from_secs(3600),
                server_names: vec![],
                agents: super::super::token::AgentPods {
                    service_account: "strait-system/strait".into(),
                    labels: crate::kubernetes::endpoints::DEFAULT_AGENT_LABELS
                        .parse()
                        .unwrap(),
                },
            },
            issuer,
            issuer_key,
            ca_pem,
            metrics: Metrics::default(),
        }
    }

    fn request(identity: &str) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        // The CSR asks for another identity: ignored, the service chooses the SANs.
        let csr = CertificateParams::new(vec!["evil.example".to_string()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        serde_json::to_vec(&IssueRequest {
            identity: identity.into(),
            csr,
        })
        .unwrap()
    }

    /// [`Service::decide`] with the registry's pods of `node`.
    fn ask(service: &Service, node: Option<&str>, body: &[u8]) -> (StatusCode, Vec<u8>) {
        let PodSource::Registry(path) = &service.pods else {
            unreachable!("the tests use a registry")
        };
        let pods = match node {
            Some(node) => read_registry(path).map(|mut r| r.remove(node).unwrap_or_default()),
            None => Ok(Vec::new()),
        };
        service.decide(node, body, pods)
    }

    fn refused(service: &Service, reason: &str) -> u64 {
        service
            .metrics
            .refused
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .get()
    }

    #[test]
    fn only_a_node_running_a_selected_pod_gets_the_identity_with_the_services_sans() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        let color = "spiffe://test/ns/app/vn/color";
        let (status, body) = ask(&service, Some("node2"), &request(color));
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        let issued: IssueResponse = serde_json::from_slice(&body).unwrap();
        let der = CertificateDer::from_pem_slice(issued.certificate_chain.as_bytes()).unwrap();
        let facts = identity::store::cert_facts(&der).unwrap();
        assert_eq!(facts.sans, vec![color, "color.app.svc.cluster.local"]);
        assert_eq!(facts.not_after - facts.not_before, 3600 + 60);

        let (status, body) = ask(&service, Some("node1"), &request(color));
        assert_eq!(status, StatusCode::FORBIDDEN);
        let refusal: Refusal = serde_json::from_slice(&body).unwrap();
        assert_eq!(refusal.reason, "not_on_node");
        assert!(
            refusal
                .message
                .contains("node node1 runs no pod selected by app/color")
        );
        assert_eq!(refused(&service, "not_on_node"), 1);

        let (status, _) = ask(&service, None, &request(color));
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(refused(&service, "no_node"), 1);
        let (status, _) = ask(
            &service,
            Some("node2"),
            &request("spiffe://test/ns/app/vn/x"),
        );
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _) = ask(
            &service,
            Some("node2"),
            br#"{"identity": "spiffe://test/ns/app/vn/color", "csr": "x"}"#,
        );
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(refused(&service, "bad_csr"), 1);
        assert_eq!(service.metrics.issued.get(), 1);
    }

    #[test]
    fn node_names_come_only_from_the_node_uri_san() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        super::super::init(&ca).unwrap();
        let (issuer, issuer_key, _) = load_ca(&ca).unwrap();
        let cert = |sans: &[&str]| {
            let key = KeyPair::generate().unwrap();
            let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
            leaf_params(&sans, Duration::from_secs(60))
                .unwrap()
                .signed_by(&key, &issuer, &issuer_key)
                .unwrap()
                .der()
                .clone()
        };
        assert_eq!(
            node_of("test", &cert(&["spiffe://test/node/node1"])).as_deref(),
            Some("node1")
        );
        for sans in [
            &["spiffe://test/ns/app/vn/color"][..],
            &["spiffe://other/node/node1"],
            &["spiffe://test/node/a/b"],
            &["node1"],
        ] {
            assert_eq!(node_of("test", &cert(sans)), None, "{sans:?}");
        }
    }

    #[test]
    fn lifetimes_parse_with_units_and_bounds() {
        assert_eq!(parse_lifetime("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_lifetime("60s").unwrap(), Duration::from_secs(60));
        assert!(parse_lifetime("5").is_err());
        assert!(parse_lifetime("1s").is_err());
        assert!(parse_lifetime("2y").is_err());
    }
}
