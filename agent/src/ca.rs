//! `strait ca`: a development certificate authority, so the demo and the tests need no outside
//! tooling. Not for production (the CA key sits in a file; use your own PKI there).
//!
//! - [`init`] writes `ca.pem` and `ca-key.pem` (ECDSA P-256, ten years) into a folder.
//! - [`issue`] reads a mesh file and, for every virtual node, writes a certificate and key to
//!   each `certificate.file` path the node names (listener `tls` and `clientPolicy.tls`), with
//!   the node's identities as SANs (its SPIFFE ID `spiffe://<mesh>/ns/<ns>/vn/<name>` and its
//!   DNS service-discovery name), and the CA certificate to every `validation.trust.file`
//!   path. A virtual gateway gets the same for its listeners and `backendDefaults`, with its
//!   SPIFFE ID (`.../vg/<name>`) and the host names its routes match. Files are replaced by rename, so a running agent picks them up whole (rotation).

pub mod serve;
pub mod token;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::identity::{self, spiffe_id};
use crate::mesh::{self, ServiceDiscovery, TlsCertificate, TlsTrust, TlsValidation};

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} exists already: `strait ca init` never overwrites a CA (remove the folder to start over)"
    )]
    Exists { path: PathBuf },
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error(transparent)]
    Mesh(#[from] mesh::Error),
    #[error("no virtual node named {0} in the mesh file")]
    NoSuchNode(String),
    #[error(transparent)]
    Key(#[from] identity::Error),
    #[error(
        "{path} is named as the certificate of both VirtualNode {first} and VirtualNode \
         {second}: a certificate carries one virtual node's identity, and agents refuse it for \
         the other; give each virtual node its own files"
    )]
    SharedFile {
        path: PathBuf,
        first: String,
        second: String,
    },
}

/// How [`issue`] mints.
#[derive(Debug, Clone, Default)]
pub struct IssueOptions {
    /// Only these virtual nodes (`name` or `namespace/name`); empty = all.
    pub only: Vec<String>,
    /// Validity in days from now (default 365).
    pub days: Option<u32>,
    /// Validity in minutes from now, instead of `days` (short-lived certificates).
    pub minutes: Option<u32>,
    /// Make certificates that expired yesterday (to test rejection).
    pub expired: bool,
    /// Use these SANs instead of the node's identities (to test SAN mismatch).
    pub sans: Vec<String>,
}

/// One written certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub virtual_node: String,
    pub chain: PathBuf,
    pub key: PathBuf,
    pub sans: Vec<String>,
}

pub(crate) fn io<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Writes `text` to `path` through a temp file and a rename, so readers see old or new.
pub(crate) fn write_atomic(path: &Path, text: &str, private: bool) -> Result<(), Error> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    // Folders strait makes hold keys: only their owner may list them (folders that exist
    // already are the operator's and keep their mode).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create folder", dir))?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    // `mode` applies only to a file that did not exist; a leftover temp file keeps its own.
    if private {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io("restrict", &tmp))?;
    }
    file.write_all(text.as_bytes()).map_err(io("write", &tmp))?;
    file.sync_all().map_err(io("sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("rename into place", path))
}

/// The CA's parameters. Deterministic apart from the dates, so re-creating the issuer from the
/// key yields the same name and key identifier: what a child certificate's signature and
/// authority key id refer to.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "strait");
    dn.push(DnType::CommonName, "strait development CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    params
}

/// Creates a CA in `dir` (refuses to overwrite one). Returns the CA certificate's path.
pub fn init(dir: &Path) -> Result<PathBuf, Error> {
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(Error::Exists { path: path.clone() });
        }
    }
    let key = KeyPair::generate()?;
    let cert = ca_params().self_signed(&key)?;
    write_atomic(&key_path, &key.serialize_pem(), true)?;
    write_atomic(&cert_path, &cert.pem(), false)?;
    Ok(cert_path)
}

pub(crate) fn load_ca(dir: &Path) -> Result<(Certificate, KeyPair, String), Error> {
    let key_path = dir.join(CA_KEY);
    let cert_path = dir.join(CA_CERT);
    if key_path.exists() {
        identity::store::check_key_mode(&key_path)?;
    }
    let key_pem = std::fs::read_to_string(&key_path).map_err(io(
        "read the CA key (run `strait ca init` first)",
        &key_path,
    ))?;
    let ca_pem =
        std::fs::read_to_string(&cert_path).map_err(io("read the CA certificate", &cert_path))?;
    let key = KeyPair::from_pem(&key_pem)?;
    let issuer = ca_params().self_signed(&key)?;
    Ok((issuer, key, ca_pem))
}

fn leaf(
    sans: &[String],
    options: &IssueOptions,
    issuer: &Certificate,
    issuer_key: &KeyPair,
) -> Result<(String, String), Error> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "strait");
    dn.push(
        DnType::CommonName,
        sans.first()
            .map(String::as_str)
            .unwrap_or("strait workload"),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = sans
        .iter()
        .map(|s| {
            Ok(if s.contains("://") {
                SanType::URI(s.as_str().try_into()?)
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
    if options.expired {
        params.not_before = now - time::Duration::days(30);
        params.not_after = now - time::Duration::days(1);
    } else {
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = match options.minutes {
            Some(minutes) => now + time::Duration::minutes(i64::from(minutes)),
            None => now + time::Duration::days(i64::from(options.days.unwrap_or(365))),
        };
    }
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer, issuer_key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Mints a certificate per virtual node of the mesh file into the paths it names, and writes
/// the CA to every trust path (see the module docs).
pub fn issue(
    mesh_file: &Path,
    ca_dir: &Path,
    options: &IssueOptions,
) -> Result<Vec<Issued>, Error> {
    let loaded = mesh::load_file(mesh_file)?;
    let mesh = &loaded.config;
    let (issuer, issuer_key, ca_pem) = load_ca(ca_dir)?;
    for name in &options.only {
        if !mesh
            .virtual_nodes
            .iter()
            .map(|vn| &vn.id)
            .chain(mesh.virtual_gateways.iter().map(|gw| &gw.id))
            .any(|id| id.name == *name || id.to_string() == *name)
        {
            return Err(Error::NoSuchNode(name.clone()));
        }
    }
    let mut issued = Vec::new();
    let mut trusts = BTreeSet::new();
    // Certificate paths and the virtual node that names them: one file cannot carry two
    // identities (see identity::local).
    let mut owners: std::collections::BTreeMap<String, String> = Default::default();
    let mut planned = Vec::new();
    let mut add_trust = |v: &TlsValidation| {
        if let TlsTrust::File { certificate_chain } = &v.trust {
            trusts.insert(PathBuf::from(certificate_chain));
        }
    };
    for vn in &mesh.virtual_nodes {
        let mut files = BTreeSet::new();
        for listener in &vn.spec.listeners {
            if let Some(tls) = &listener.tls {
                if let TlsCertificate::File {
                    certificate_chain,
                    private_key,
                } = &tls.certificate
                {
                    files.insert((certificate_chain.clone(), private_key.clone()));
                }
                if let Some(v) = &tls.validation {
                    add_trust(v);
                }
            }
        }
        let policies = vn
            .spec
            .backends
            .iter()
            .filter_map(|b| b.client_policy.as_ref())
            .chain(
                vn.spec
                    .backend_defaults
                    .as_ref()
                    .and_then(|d| d.client_policy.as_ref()),
            );
        for policy in policies {
            if let Some(tls) = &policy.tls {
                if let Some(TlsCertificate::File {
                    certificate_chain,
                    private_key,
                }) = &tls.certificate
                {
                    files.insert((certificate_chain.clone(), private_key.clone()));
                }
                add_trust(&tls.validation);
            }
        }
        for (chain, key) in &files {
            for path in [chain, key] {
                match owners.get(path) {
                    Some(first) if *first != vn.id.to_string() => {
                        return Err(Error::SharedFile {
                            path: path.into(),
                            first: first.clone(),
                            second: vn.id.to_string(),
                        });
                    }
                    _ => {
                        owners.insert(path.clone(), vn.id.to_string());
                    }
                }
            }
        }
        let selected = options.only.is_empty()
            || options
                .only
                .iter()
                .any(|n| *n == vn.id.name || *n == vn.id.to_string());
        if !selected || files.is_empty() {
            continue;
        }
        let sans = if options.sans.is_empty() {
            let mut sans = vec![spiffe_id(&mesh.mesh.name, &vn.id)];
            if let Some(ServiceDiscovery::Dns { hostname, .. }) = &vn.spec.service_discovery {
                sans.push(hostname.clone());
            }
            sans
        } else {
            options.sans.clone()
        };
        planned.push((vn.id.to_string(), sans, files));
    }
    // Nothing is written before every virtual node's files were checked.
    for (virtual_node, sans, files) in planned {
        for (chain, key) in files {
            let (cert_pem, key_pem) = leaf(&sans, options, &issuer, &issuer_key)?;
            // Key first: a reader that sees the new chain with the old key keeps the old
            // pair in service and retries (identity::store).
            write_atomic(Path::new(&key), &key_pem, true)?;
            write_atomic(Path::new(&chain), &cert_pem, false)?;
            issued.push(Issued {
                virtual_node: virtual_node.clone(),
                chain: chain.into(),
                key: key.into(),
                sans: sans.clone(),
            });
        }
    }
    // Virtual gateways: the listeners' certificates (presented to clients at the edge) and
    // the client certificate toward the mesh, with the gateway's SPIFFE ID and the host names
    // its routes match (an exact name, `*.example.com` for a suffix `.example.com`).
    for gateway in &mesh.virtual_gateways {
        let mut files = BTreeSet::new();
        for listener in &gateway.spec.listeners {
            if let Some(tls) = &listener.tls {
                if let TlsCertificate::File {
                    certificate_chain,
                    private_key,
                } = &tls.certificate
                {
                    files.insert((certificate_chain.clone(), private_key.clone()));
                }
                if let Some(v) = &tls.validation {
                    add_trust(v);
                }
            }
        }
        let policy = gateway
            .spec
            .backend_defaults
            .as_ref()
            .and_then(|d| d.client_policy.as_ref())
            .and_then(|p| p.tls.as_ref());
        if let Some(tls) = policy {
            if let Some(TlsCertificate::File {
                certificate_chain,
                private_key,
            }) = &tls.certificate
            {
                files.insert((certificate_chain.clone(), private_key.clone()));
            }
            add_trust(&tls.validation);
        }
        let selected = options.only.is_empty()
            || options
                .only
                .iter()
                .any(|n| *n == gateway.id.name || *n == gateway.id.to_string());
        if !selected || files.is_empty() {
            continue;
        }
        let sans = if options.sans.is_empty() {
            gateway_sans(mesh, gateway)
        } else {
            options.sans.clone()
        };
        for (chain, key) in files {
            let (cert_pem, key_pem) = leaf(&sans, options, &issuer, &issuer_key)?;
            write_atomic(Path::new(&key), &key_pem, true)?;
            write_atomic(Path::new(&chain), &cert_pem, false)?;
            issued.push(Issued {
                virtual_node: gateway.id.to_string(),
                chain: chain.into(),
                key: key.into(),
                sans: sans.clone(),
            });
        }
    }
    if options.only.is_empty() {
        for path in trusts {
            write_atomic(&path, &ca_pem, false)?;
        }
    }
    Ok(issued)
}

/// Used by `identity` consumers that want to know what a file holds (the CLI prints it).
pub fn describe(chain: &Path) -> Option<identity::store::CertFacts> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let cert = CertificateDer::pem_file_iter(chain).ok()?.next()?.ok()?;
    identity::store::cert_facts(&cert).ok()
}

/// A virtual gateway's certificate names: its SPIFFE ID and the host names its routes match
/// (an exact name, `*.example.com` for a suffix `.example.com`), so clients at the edge can
/// check the certificate against the host they asked for. Used by `ca issue` and the identity
/// service alike.
pub fn gateway_sans(mesh: &mesh::MeshConfig, gateway: &mesh::VirtualGateway) -> Vec<String> {
    let mut sans = vec![identity::gateway_spiffe_id(&mesh.mesh.name, &gateway.id)];
    for route in mesh.gateway_routes_for(gateway) {
        let host = match &route.spec.kind {
            mesh::GatewayRouteKind::Http(r) | mesh::GatewayRouteKind::Http2(r) => {
                r.r#match.hostname.as_ref()
            }
            mesh::GatewayRouteKind::Grpc(r) => r.r#match.hostname.as_ref(),
        };
        let name = match host {
            Some(mesh::HostnameMatch::Exact(name)) => name.clone(),
            Some(mesh::HostnameMatch::Suffix(s)) if s.starts_with('.') => format!("*{s}"),
            _ => continue,
        };
        if !sans.contains(&name) {
            sans.push(name);
        }
    }
    sans
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::store::Store;
    use crate::identity::verify::{ClientVerifier, Report};
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, UnixTime};
    use rustls::server::danger::ClientCertVerifier as _;

    fn mesh(dir: &Path) -> PathBuf {
        let d = dir.display();
        let text = format!(
            r#"apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {{name: test}}
spec: {{}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: client, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  backendDefaults:
    clientPolicy:
      tls:
        certificate: {{file: {{certificateChain: {d}/client.pem, privateKey: {d}/client.key}}}}
        validation: {{trust: {{file: {{certificateChain: {d}/trust.pem}}}}}}
"#
        );
        let path = dir.join("mesh.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn verify(dir: &Path, sans: &[&str]) -> Result<(), rustls::Error> {
        let store = Store::default();
        let trust = store.trust(&dir.join("trust.pem")).unwrap();
        let verifier = ClientVerifier::new(
            trust.roots.clone(),
            sans.iter().map(|s| s.to_string()).collect(),
            Report {
                metrics: Default::default(),
                context: "test".into(),
            },
        )
        .unwrap();
        let cert = CertificateDer::from_pem_file(dir.join("client.pem")).unwrap();
        verifier
            .verify_client_cert(&cert, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn one_file_named_by_two_virtual_nodes_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init(&ca).unwrap();
        let mesh = mesh(dir.path());
        let d = dir.path().display();
        let mut text = std::fs::read_to_string(&mesh).unwrap();
        text.push_str(&format!(
            r#"---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {{name: thief, namespace: app}}
spec:
  podSelector: {{matchLabels: {{app: thief}}}}
  backendDefaults:
    clientPolicy:
      tls:
        certificate: {{file: {{certificateChain: {d}/client.pem, privateKey: {d}/thief.key}}}}
        validation: {{trust: {{file: {{certificateChain: {d}/trust.pem}}}}}}
"#
        ));
        std::fs::write(&mesh, text).unwrap();
        let error = issue(&mesh, &ca, &IssueOptions::default()).unwrap_err();
        assert!(matches!(error, Error::SharedFile { .. }), "{error}");
        assert!(error.to_string().contains("client.pem"), "{error}");
        assert!(!dir.path().join("client.pem").exists());
    }

    #[test]
    fn issued_certificates_verify_and_bad_ones_are_classified() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init(&ca).unwrap();
        assert!(matches!(init(&ca), Err(Error::Exists { .. })));
        let mesh = mesh(dir.path());
        let issued = issue(&mesh, &ca, &IssueOptions::default()).unwrap();
        assert_eq!(issued.len(), 1);
        assert_eq!(
            issued[0].sans,
            vec!["spiffe://test/ns/app/vn/client".to_string()]
        );
        let store = Store::default();
        let loaded = store
            .cert(
                &dir.path().join("client.pem"),
                &dir.path().join("client.key"),
            )
            .unwrap();
        assert_eq!(loaded.sans, issued[0].sans);
        verify(dir.path(), &["spiffe://test/ns/app/vn/client"]).unwrap();

        let err = verify(dir.path(), &["spiffe://test/ns/app/vn/other"]).unwrap_err();
        assert_eq!(identity::verify::classify(&err), "san_mismatch", "{err}");

        let expired = IssueOptions {
            expired: true,
            ..Default::default()
        };
        issue(&mesh, &ca, &expired).unwrap();
        let err = verify(dir.path(), &[]).unwrap_err();
        assert_eq!(identity::verify::classify(&err), "expired", "{err}");

        // The store sees the rotation.
        let again = store
            .cert(
                &dir.path().join("client.pem"),
                &dir.path().join("client.key"),
            )
            .unwrap();
        assert_ne!(again.fingerprint, loaded.fingerprint);
    }
}
