//! Which identities this node holds: only those of virtual nodes with a pod enrolled here.
//!
//! The agent opens a virtual node's certificate and key only when it acts for that virtual
//! node: a tunnel a local pod opens (its client policy's certificate), a tunnel another node
//! opens to a local pod's listener (that listener's certificate), or the status of a local
//! pod (`/workloads`). Files other virtual nodes name are never opened, so they need not exist
//! on this node (see docs/security.md, "Identities").
//!
//! A certificate is used for a virtual node only if it carries one of that virtual node's
//! identities (its SPIFFE ID, or the DNS name App Mesh used): a mesh file whose virtual node
//! points at another identity's files would otherwise let this node present that identity.
//! A refusal names the file and the SANs found, is logged once per distinct cause and
//! counted (`strait_identity_refused`), and touches nothing else: other virtual nodes keep
//! their tunnels.
//!
//! Each use of a local virtual node's certificate (at least every few seconds, through the
//! status of its pods) sets `strait_identity_expires_in_seconds` for it, and a certificate past
//! three quarters of its life (so not renewed at half-life, nor since) is warned about once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::mesh::{ResourceId, TlsCertificate};

use super::policy::{Policy, certificate_files};
use super::store::{LoadedCert, Store};
use super::{Error, Metrics};

/// The certificate `cert` names, if it is one `vn` may present (see the module docs).
///
/// `field` locates the certificate in the mesh file for error messages.
pub fn certificate(
    store: &Store,
    policy: &Policy,
    vn: &ResourceId,
    cert: &TlsCertificate,
    field: &str,
) -> Result<Arc<LoadedCert>, Error> {
    let (chain, key) = certificate_files(cert, field)?;
    let loaded = store.cert(&chain, &key)?;
    let expected = policy
        .nodes
        .get(vn)
        .map(|n| n.identities.clone())
        .unwrap_or_default();
    check_identity(&loaded, vn, &chain, field, &expected)?;
    Ok(loaded)
}

/// Ok if the certificate read from `chain` carries one of `expected`.
fn check_identity(
    loaded: &LoadedCert,
    vn: &ResourceId,
    chain: &Path,
    field: &str,
    expected: &[String],
) -> Result<(), Error> {
    if loaded.sans.iter().any(|san| expected.contains(san)) {
        return Ok(());
    }
    Err(Error::WrongIdentity(Box::new(super::IdentityMismatch {
        virtual_node: vn.clone(),
        field: field.to_owned(),
        path: chain.to_owned(),
        found: loaded.sans.clone(),
        expected: expected.to_vec(),
    })))
}

/// Reports refused identities once per distinct cause (the lookups run per new TLS connection,
/// and a log line per connection would drown the cause), and certificates nearing expiry.
#[derive(Default)]
pub struct Refusals {
    last: Mutex<HashMap<ResourceId, String>>,
    /// The serial last warned about as expiring, per virtual node.
    expiring: Mutex<HashMap<ResourceId, String>>,
}

/// Whether a certificate valid from `not_before` to `not_after` is past three quarters of its
/// life at `now`: a renewal (at half-life, or by the operator) has not happened in time.
pub fn nearing_expiry(not_before: i64, not_after: i64, now: i64) -> bool {
    let lifetime = (not_after - not_before).max(0);
    not_after - now < lifetime / 4
}

impl std::fmt::Debug for Refusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refusals").finish_non_exhaustive()
    }
}

impl Refusals {
    /// Logs and counts `error` for `vn` unless it is the cause last reported for it; a
    /// success clears the cause, so the same problem coming back is reported again.
    pub fn note(
        &self,
        metrics: &Metrics,
        vn: &ResourceId,
        result: &Result<Arc<LoadedCert>, Error>,
    ) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(cert) => {
                if last.remove(vn).is_some() {
                    tracing::info!(virtual_node = %vn, "identity usable again");
                }
                self.note_expiry(metrics, vn, cert);
            }
            Err(error) => {
                let text = crate::logging::Chain(&error).to_string();
                if last.get(vn) == Some(&text) {
                    return;
                }
                let reason = match error {
                    Error::WrongIdentity(_) => "wrong_identity",
                    Error::KeyPermissions { .. } => "key_permissions",
                    Error::Unsupported { .. } => "unsupported",
                    Error::Read { .. } => "unreadable",
                    _ => "invalid",
                };
                metrics
                    .identity_refused
                    .get_or_create(&super::RefusedLabels { reason })
                    .inc();
                tracing::error!(virtual_node = %vn, reason, "identity refused: {text}");
                last.insert(vn.clone(), text);
            }
        }
    }
}

impl Refusals {
    /// Sets `strait_identity_expires_in_seconds` for `vn`, and warns once per certificate when
    /// it is past three quarters of its life ([`nearing_expiry`]).
    fn note_expiry(&self, metrics: &Metrics, vn: &ResourceId, cert: &LoadedCert) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let left = cert.not_after - now;
        metrics
            .identity_expires_in
            .get_or_create(&super::VirtualNodeLabels {
                virtual_node: vn.to_string(),
            })
            .set(left);
        if !nearing_expiry(cert.not_before, cert.not_after, now) {
            return;
        }
        let mut expiring = self.expiring.lock().unwrap_or_else(|e| e.into_inner());
        if expiring.get(vn) == Some(&cert.serial) {
            return;
        }
        tracing::warn!(
            virtual_node = %vn,
            chain = %cert.chain.display(),
            serial = %cert.serial,
            expires_in_seconds = left,
            "the certificate of this virtual node is past three quarters of its life and was not \
             renewed: peers refuse it once it expires; renew it (`strait ca issue`, or your PKI)"
        );
        expiring.insert(vn.clone(), cert.serial.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const MESH: &str = r#"
apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata: {name: test}
spec: {}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: client, namespace: app}
spec:
  podSelector: {matchLabels: {app: client}}
  serviceDiscovery: {dns: {hostname: client.app.svc.cluster.local}}
---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata: {name: color, namespace: app}
spec:
  podSelector: {matchLabels: {app: color}}
"#;

    fn write_cert(dir: &Path, name: &str, sans: &[&str]) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans
            .iter()
            .map(|s| {
                if s.contains("://") {
                    rcgen::SanType::URI((*s).try_into().unwrap())
                } else {
                    rcgen::SanType::DnsName((*s).try_into().unwrap())
                }
            })
            .collect();
        let cert = params.self_signed(&key).unwrap();
        let chain = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}-key.pem"));
        std::fs::write(&chain, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        (chain, key_path)
    }

    fn file(chain: &Path, key: &Path) -> TlsCertificate {
        TlsCertificate::File {
            certificate_chain: chain.display().to_string(),
            private_key: key.display().to_string(),
        }
    }

    #[test]
    fn a_certificate_of_another_identity_is_refused_naming_the_file_and_sans() {
        let dir = tempfile::tempdir().unwrap();
        let loaded = crate::mesh::parse_str(MESH, Path::new("mesh.yaml")).unwrap();
        let policy = Policy::compile(&loaded.config);
        let store = Store::default();
        let client = ResourceId::new("app", "client");
        let color = ResourceId::new("app", "color");

        let (chain, key) = write_cert(dir.path(), "color", &["spiffe://test/ns/app/vn/color"]);
        certificate(&store, &policy, &color, &file(&chain, &key), "f").unwrap();
        let error = certificate(&store, &policy, &client, &file(&chain, &key), "f").unwrap_err();
        assert!(matches!(error, Error::WrongIdentity(_)), "{error}");
        let text = error.to_string();
        assert!(text.contains(&chain.display().to_string()), "{text}");
        assert!(text.contains("spiffe://test/ns/app/vn/color"), "{text}");
        assert!(text.contains("spiffe://test/ns/app/vn/client"), "{text}");

        // The DNS name App Mesh used is an identity too.
        let (chain, key) = write_cert(dir.path(), "dns", &["client.app.svc.cluster.local"]);
        certificate(&store, &policy, &client, &file(&chain, &key), "f").unwrap();
        // A virtual node the mesh does not have carries no identity at all.
        let stranger = ResourceId::new("app", "stranger");
        assert!(certificate(&store, &policy, &stranger, &file(&chain, &key), "f").is_err());
    }

    #[test]
    fn expiry_is_near_past_three_quarters_of_the_life() {
        assert!(!nearing_expiry(0, 100, 0));
        assert!(!nearing_expiry(0, 100, 75));
        assert!(nearing_expiry(0, 100, 76));
        assert!(nearing_expiry(0, 100, 200));
    }

    #[test]
    fn refusals_are_counted_once_per_cause() {
        let metrics = Metrics::default();
        let refusals = Refusals::default();
        let vn = ResourceId::new("app", "client");
        let missing = || {
            Err(Error::Read {
                what: "private key",
                path: "/nonexistent".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
        };
        for _ in 0..3 {
            refusals.note(&metrics, &vn, &missing());
        }
        let count = |reason| {
            metrics
                .identity_refused
                .get_or_create(&crate::identity::RefusedLabels { reason })
                .get()
        };
        assert_eq!(count("unreadable"), 1);
    }
}
