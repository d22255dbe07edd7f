//! The identity service's client (`strait run --identity-service URL`, with `--node-cert DIR`
//! on a plain host or `--node-token FILE --identity-ca FILE` on Kubernetes): App
//! Mesh `sds` certificate sources are served by the identity service (`strait ca serve`,
//! docs/identity.md), the secret name being the SPIFFE ID asked for.
//!
//! - A `sds` certificate maps to two files in `--identity-dir` that only this client writes
//!   ([`sds_certificate`]); the file store (`store`) reads them like any `file` source, so the
//!   identity checks of `local`, the expiry metric and warning, and rotation without dropped
//!   connections (new handshakes use the new pair, open tunnels keep theirs) all apply as
//!   they do to files.
//! - Asking for a path is what makes the client want that identity: `local` asks only for the
//!   virtual nodes with a pod on this node, so the agent requests exactly those and no other.
//! - For each wanted identity the client generates a fresh key, sends a CSR, writes the key
//!   then the certificate, and renews at half of the certificate's remaining life. While the
//!   service cannot be reached, it keeps the current pair, warns, and retries every few
//!   seconds; the pair is used until it expires (`strait_identity_expires_in_seconds`).
//! - A `sds` trust bundle is the CA bundle the service returns (first the node folder's
//!   `ca.pem`, or `--identity-ca`: the same CA).
//! - The node is proven by the TLS client certificate (`--node-cert`) or, on Kubernetes, by
//!   the projected ServiceAccount token of the agent's pod (audience `strait-ca`) sent as
//!   `authorization: Bearer`, over TLS without a client certificate. kubelet rewrites the
//!   token before it expires, so it is read again for every request.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::ca::serve::{
    ISSUE_PATH, IssueRequest, IssueResponse, NODE_CA, NODE_CERT, NODE_KEY, Refusal,
};
use crate::logging::Chain;

/// The errors of setting the client up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "--identity-service {0}: expected https://HOST:PORT (the address of `strait ca serve`)"
    )]
    Url(String),
    #[error("cannot use {file} of the node certificate folder (`strait ca issue-node`)")]
    NodeCert {
        file: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error(
        "cannot use --identity-ca {path} (the CA certificate of the identity service, \
         `ca.pem` of `strait ca init`)"
    )]
    IdentityCa {
        path: PathBuf,
        #[source]
        source: BoxError,
    },
    #[error(transparent)]
    Write(#[from] crate::ca::Error),
}

struct Shared {
    dir: PathBuf,
    wanted: Mutex<BTreeSet<String>>,
    wake: tokio::sync::Notify,
}

static SDS: OnceLock<Arc<Shared>> = OnceLock::new();

fn file_stem(secret: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(secret.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The chain and key files of the `sds` certificate `secret`, if an identity service is
/// configured; asking makes the client fetch and renew it.
pub fn sds_certificate(secret: &str) -> Option<(PathBuf, PathBuf)> {
    let shared = SDS.get()?;
    let new = shared
        .wanted
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(secret.to_owned());
    if new {
        shared.wake.notify_one();
    }
    let stem = file_stem(secret);
    Some((
        shared.dir.join(format!("{stem}.pem")),
        shared.dir.join(format!("{stem}-key.pem")),
    ))
}

/// The trust bundle file `sds` validations use, if an identity service is configured.
pub fn sds_trust() -> Option<PathBuf> {
    SDS.get().map(|s| s.dir.join("trust.pem"))
}

/// How the agent proves its node to the service.
#[derive(Debug, Clone)]
pub enum NodeProof {
    /// The folder of `strait ca issue-node` (node.pem, node-key.pem, ca.pem).
    Certificate(PathBuf),
    /// A projected ServiceAccount token file (audience `strait-ca`), and the CA certificate.
    Token { token: PathBuf, ca: PathBuf },
}

/// The client.
pub struct Client {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    /// The token file, with [`NodeProof::Token`].
    token: Option<PathBuf>,
    shared: Arc<Shared>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn roots_of(ca_pem: &str) -> Result<rustls::RootCertStore, BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    if roots.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(roots)
}

impl Client {
    /// Reads the node's proof, prepares `dir` and makes `sds` sources resolve into it.
    pub fn new(url: &str, proof: &NodeProof, dir: &Path) -> Result<Self, Error> {
        let uri: http::Uri = url.parse().map_err(|_| Error::Url(url.into()))?;
        if uri.scheme_str() != Some("https") {
            return Err(Error::Url(url.into()));
        }
        let host = uri
            .host()
            .ok_or_else(|| Error::Url(url.into()))?
            .trim_matches(|c| c == '[' || c == ']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.clone()).map_err(|_| Error::Url(url.into()))?;
        let builder = |roots| {
            rustls::ClientConfig::builder_with_provider(super::provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map(|b| b.with_root_certificates(roots))
        };
        let (mut tls, ca_pem, token) = match proof {
            NodeProof::Certificate(node_cert) => {
                let bad = |file: &str, source: BoxError| Error::NodeCert {
                    file: node_cert.join(file),
                    source,
                };
                let ca_pem = std::fs::read_to_string(node_cert.join(NODE_CA))
                    .map_err(|e| bad(NODE_CA, e.into()))?;
                let roots = roots_of(&ca_pem).map_err(|e| bad(NODE_CA, e))?;
                let key_path = node_cert.join(NODE_KEY);
                super::store::check_key_mode(&key_path).map_err(|e| bad(NODE_KEY, e.into()))?;
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_file_iter(node_cert.join(NODE_CERT))
                        .and_then(|i| i.collect())
                        .map_err(|e| bad(NODE_CERT, e.into()))?;
                let key =
                    PrivateKeyDer::from_pem_file(&key_path).map_err(|e| bad(NODE_KEY, e.into()))?;
                let tls = builder(roots)
                    .map_err(|e| bad(NODE_CERT, e.into()))?
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| bad(NODE_CERT, e.into()))?;
                (tls, ca_pem, None)
            }
            NodeProof::Token { token, ca } => {
                let bad = |source: BoxError| Error::IdentityCa {
                    path: ca.to_owned(),
                    source,
                };
                let ca_pem = std::fs::read_to_string(ca).map_err(|e| bad(e.into()))?;
                let tls = builder(roots_of(&ca_pem).map_err(bad)?)
                    .map_err(|e| bad(e.into()))?
                    .with_no_client_auth();
                (tls, ca_pem, Some(token.clone()))
            }
        };
        tls.alpn_protocols = vec![super::ALPN_H2.to_vec()];
        crate::ca::write_atomic(&dir.join("trust.pem"), &ca_pem, false)?;
        let shared = SDS
            .get_or_init(|| {
                Arc::new(Shared {
                    dir: dir.to_owned(),
                    wanted: Mutex::default(),
                    wake: tokio::sync::Notify::new(),
                })
            })
            .clone();
        Ok(Self {
            host,
            port,
            server_name,
            tls: Arc::new(tls),
            token,
            shared,
        })
    }

    /// Fetches and renews the wanted identities, for as long as the agent runs.
    pub async fn run(self) {
        // When each identity is due: renewal at half-life, or a retry after a failure.
        let mut due: BTreeMap<String, Instant> = BTreeMap::new();
        loop {
            let wanted = self
                .shared
                .wanted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let now = Instant::now();
            for secret in wanted {
                if due.get(&secret).is_some_and(|at| *at > now) {
                    continue;
                }
                let next = match self.renew(&secret).await {
                    Ok(not_after) => {
                        let left = not_after - unix_now();
                        let half = Duration::from_secs((left.max(2) / 2) as u64);
                        tracing::info!(identity = %secret, renew_in_s = half.as_secs(), "identity certificate issued by the identity service");
                        half
                    }
                    // A refusal stands until the operator changes the registry or the mesh:
                    // asked again less often, so it is not logged every few seconds.
                    Err(failure @ Failure::Refused { .. }) => {
                        let failure = Chain(&failure);
                        tracing::warn!(identity = %secret, "cannot renew the certificate from the identity service ({failure}); the current one stays in use until it expires, asking again in 30 s");
                        Duration::from_secs(30)
                    }
                    Err(failure) => {
                        let failure = Chain(&failure);
                        tracing::warn!(identity = %secret, "cannot renew the certificate from the identity service ({failure}); the current one stays in use until it expires, retrying");
                        Duration::from_secs(3)
                    }
                };
                due.insert(secret, Instant::now() + next);
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.shared.wake.notified()).await;
        }
    }

    /// Asks for `secret` with a new key; writes key and certificate. Returns notAfter.
    async fn renew(&self, secret: &str) -> Result<i64, Failure> {
        let key = rcgen::KeyPair::generate().map_err(Failure::Request)?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(&key))
            .and_then(|r| r.pem())
            .map_err(Failure::Request)?;
        let body = serde_json::to_vec(&IssueRequest {
            identity: secret.to_owned(),
            csr,
        })
        .map_err(Failure::Encode)?;
        let (status, body) = tokio::time::timeout(ANSWER_TIMEOUT, self.post(body))
            .await
            .map_err(|_| Failure::NoAnswer)??;
        if status != hyper::StatusCode::OK {
            let refusal: Option<Refusal> = serde_json::from_slice(&body).ok();
            return Err(match refusal {
                Some(r) if status.is_client_error() => Failure::Refused {
                    status,
                    reason: r.reason,
                    message: r.message,
                },
                Some(r) => Failure::Answered {
                    status,
                    reason: r.reason,
                    message: r.message,
                },
                None => Failure::Status(status),
            });
        }
        let issued: IssueResponse = serde_json::from_slice(&body).map_err(Failure::BadAnswer)?;
        let (chain, key_path) = sds_certificate(secret).ok_or(Failure::NoFolder)?;
        // Key first: a handshake that reads the new key with the old chain keeps the old pair
        // (store) and retries.
        crate::ca::write_atomic(&key_path, &key.serialize_pem(), true)?;
        crate::ca::write_atomic(&chain, &issued.certificate_chain, false)?;
        if let Some(trust) = sds_trust() {
            crate::ca::write_atomic(&trust, &issued.trust_bundle, false)?;
        }
        Ok(issued.not_after)
    }

    async fn post(&self, body: Vec<u8>) -> Result<(hyper::StatusCode, Bytes), Failure> {
        // Read for every request: kubelet replaces the token well before it expires.
        let token = match &self.token {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| Failure::Token {
                        path: path.clone(),
                        source,
                    })?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| Failure::Connect {
                host: self.host.clone(),
                port: self.port,
                source,
            })?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(Failure::Tls)?;
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(Failure::Http)?;
        tokio::spawn(connection);
        let mut request =
            hyper::Request::post(format!("https://{}:{}{ISSUE_PATH}", self.host, self.port))
                .header("content-type", "application/json");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(Failure::Build)?;
        let response = sender.send_request(request).await.map_err(Failure::Http)?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(Failure::Http)?
            .to_bytes();
        Ok((status, body))
    }
}

/// How long a renewal waits for the identity service's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a renewal failed. A refusal is asked again less often; anything else soon.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// The service said no (4xx): the registry or the mesh has to change first.
    #[error("refused ({status}, {reason}): {message}")]
    Refused {
        status: hyper::StatusCode,
        reason: String,
        message: String,
    },
    #[error("answered {status}, {reason}: {message}")]
    Answered {
        status: hyper::StatusCode,
        reason: String,
        message: String,
    },
    #[error("answered {0}")]
    Status(hyper::StatusCode),
    #[error("no answer within {} s", ANSWER_TIMEOUT.as_secs())]
    NoAnswer,
    #[error("cannot read the node token {path}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to {host}:{port}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS with the identity service failed")]
    Tls(#[source] std::io::Error),
    #[error("HTTP/2 with the identity service failed")]
    Http(#[source] hyper::Error),
    #[error("cannot build the request")]
    Build(#[source] http::Error),
    #[error("cannot make the key or the certificate request")]
    Request(#[source] rcgen::Error),
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
    #[error("bad answer")]
    BadAnswer(#[source] serde_json::Error),
    #[error("no identity folder")]
    NoFolder,
    #[error(transparent)]
    Write(#[from] crate::ca::Error),
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
