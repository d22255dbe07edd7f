//! Certificates, keys and trust bundles read from files, re-read when the files change.
//!
//! Every lookup stats the files (cheap, and only done per new TLS connection, never per
//! request) and re-parses them when size, mtime or inode changed, so a rotation by rename
//! (`strait ca issue`, a Kubernetes Secret volume's symlink swap) or in place is picked up by
//! the next handshake. A file that fails to parse after a change (a half-written file, a key
//! that does not match the new chain yet) keeps the previous good material in service and is
//! retried on the next lookup.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use sha2::{Digest as _, Sha256};

use super::{Error, Metrics, provider};

/// What identifies a version of a file. The mode is in it so a key made readable by others
/// after it was loaded is checked (and refused) again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    mtime: Option<SystemTime>,
    len: u64,
    ino: u64,
    mode: u32,
}

/// Refuses a private key that group or others may read, as ssh does: such a key may already
/// have been copied by anyone on the node. Follows symlinks (a Kubernetes Secret volume's
/// files are links into its `..data` folder; the mode that counts is the target's).
pub fn check_key_mode(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = std::fs::metadata(path).map_err(|source| Error::Read {
        what: "private key",
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(Error::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

fn stamp(path: &Path, what: &'static str) -> Result<Stamp, Error> {
    let meta = std::fs::metadata(path).map_err(|source| Error::Read {
        what,
        path: path.to_owned(),
        source,
    })?;
    Ok(Stamp {
        mtime: meta.modified().ok(),
        len: meta.len(),
        ino: meta.ino(),
        mode: meta.mode(),
    })
}

/// A certificate chain and its key, ready for rustls.
#[derive(Debug)]
pub struct LoadedCert {
    pub certified: Arc<CertifiedKey>,
    /// Hex SHA-256 of the leaf certificate (changes with every rotation).
    pub fingerprint: String,
    /// The leaf's URI and DNS SANs.
    pub sans: Vec<String>,
    /// The leaf's serial number, hex.
    pub serial: String,
    /// The leaf's notBefore and notAfter, seconds since the epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// The file the chain was read from.
    pub chain: PathBuf,
}

/// A trust bundle.
#[derive(Debug)]
pub struct Trust {
    pub roots: Arc<RootCertStore>,
    /// Hex SHA-256 of the file's bytes.
    pub fingerprint: String,
}

/// Facts about a certificate strait cares about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    pub sans: Vec<String>,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// A certificate that is not valid X.509 DER.
#[derive(Debug, thiserror::Error)]
#[error("not a valid X.509 certificate")]
pub struct NotX509(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>);

/// Reads the SANs (URI and DNS), serial and validity of a DER certificate.
pub fn cert_facts(der: &[u8]) -> Result<CertFacts, NotX509> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(NotX509)?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::URI(uri) => sans.push((*uri).to_owned()),
                GeneralName::DNSName(dns) => sans.push((*dns).to_owned()),
                _ => {}
            }
        }
    }
    Ok(CertFacts {
        sans,
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn load_cert(chain_path: &Path, key_path: &Path) -> Result<LoadedCert, Error> {
    let bad_certificate =
        |source: Box<dyn std::error::Error + Send + Sync>| Error::BadCertificate {
            path: chain_path.to_owned(),
            source,
        };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(chain_path)
        .map_err(|e| bad_certificate(e.into()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad_certificate(e.into()))?;
    let Some(leaf) = chain.first() else {
        return Err(Error::NoCertificate {
            path: chain_path.to_owned(),
        });
    };
    let facts = cert_facts(leaf).map_err(|e| bad_certificate(e.into()))?;
    let fingerprint = hex(&Sha256::digest(leaf));
    check_key_mode(key_path)?;
    let bad_key = |source: Box<dyn std::error::Error + Send + Sync>| Error::BadKey {
        path: key_path.to_owned(),
        source,
    };
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| bad_key(e.into()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| bad_key(e.into()))?;
    let certified = CertifiedKey::new(chain, signing);
    if certified.keys_match().is_err() {
        return Err(Error::KeyMismatch {
            chain: chain_path.to_owned(),
            key: key_path.to_owned(),
        });
    }
    Ok(LoadedCert {
        certified: Arc::new(certified),
        fingerprint,
        sans: facts.sans,
        serial: facts.serial,
        not_before: facts.not_before,
        not_after: facts.not_after,
        chain: chain_path.to_owned(),
    })
}

fn load_trust(path: &Path) -> Result<Trust, Error> {
    let bytes = std::fs::read(path).map_err(|source| Error::Read {
        what: "trust bundle",
        path: path.to_owned(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    let mut problems = Vec::new();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        match cert {
            Ok(cert) => {
                if let Err(e) = roots.add(cert) {
                    problems.push(e.to_string());
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    if roots.is_empty() {
        return Err(Error::BadTrust {
            path: path.to_owned(),
            detail: if problems.is_empty() {
                "no PEM certificates in it".into()
            } else {
                problems.join("; ")
            },
        });
    }
    Ok(Trust {
        roots: Arc::new(roots),
        fingerprint: hex(&Sha256::digest(&bytes)),
    })
}

/// A certificate chain and key, by (chain path, key path), with the stamps it was read at.
type CertCache = HashMap<(PathBuf, PathBuf), ((Stamp, Stamp), Arc<LoadedCert>)>;

/// The certificates and trust bundles in use, by path.
#[derive(Default)]
pub struct Store {
    certs: Mutex<CertCache>,
    trusts: Mutex<HashMap<PathBuf, (Stamp, Arc<Trust>)>>,
    metrics: Metrics,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    pub fn new(metrics: Metrics) -> Store {
        Store {
            metrics,
            ..Store::default()
        }
    }

    /// The current certificate and key at these paths.
    pub fn cert(&self, chain: &Path, key: &Path) -> Result<Arc<LoadedCert>, Error> {
        let stamps = (
            stamp(chain, "certificate chain")?,
            stamp(key, "private key")?,
        );
        let id = (chain.to_owned(), key.to_owned());
        let previous = {
            let certs = self.certs.lock().unwrap_or_else(|e| e.into_inner());
            match certs.get(&id) {
                Some((s, cert)) if *s == stamps => return Ok(cert.clone()),
                Some((_, cert)) => Some(cert.clone()),
                None => None,
            }
        };
        match load_cert(chain, key) {
            Ok(loaded) => {
                let loaded = Arc::new(loaded);
                let expired = loaded.not_after < now_unix();
                if previous.is_some() {
                    self.metrics.certificate_reloads.inc();
                }
                tracing::info!(
                    chain = %chain.display(),
                    serial = %loaded.serial,
                    sans = ?loaded.sans,
                    not_after = loaded.not_after,
                    reloaded = previous.is_some(),
                    "certificate loaded"
                );
                if expired {
                    tracing::warn!(chain = %chain.display(), not_after = loaded.not_after, "this certificate has expired: peers will reject it; issue a new one");
                }
                self.certs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, (stamps, loaded.clone()));
                Ok(loaded)
            }
            Err(error) => match previous {
                Some(previous) => {
                    tracing::warn!(chain = %chain.display(), error = %crate::logging::Chain(&error), "the changed certificate cannot be used yet; the previous one stays in service");
                    Ok(previous)
                }
                None => Err(error),
            },
        }
    }

    /// The current trust bundle at this path.
    pub fn trust(&self, path: &Path) -> Result<Arc<Trust>, Error> {
        let s = stamp(path, "trust bundle")?;
        let previous = {
            let trusts = self.trusts.lock().unwrap_or_else(|e| e.into_inner());
            match trusts.get(path) {
                Some((old, trust)) if *old == s => return Ok(trust.clone()),
                Some((_, trust)) => Some(trust.clone()),
                None => None,
            }
        };
        match load_trust(path) {
            Ok(trust) => {
                let trust = Arc::new(trust);
                if previous.is_some() {
                    self.metrics.certificate_reloads.inc();
                }
                tracing::info!(path = %path.display(), anchors = trust.roots.len(), reloaded = previous.is_some(), "trust bundle loaded");
                self.trusts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(path.to_owned(), (s, trust.clone()));
                Ok(trust)
            }
            Err(error) => match previous {
                Some(previous) => {
                    tracing::warn!(path = %path.display(), error = %crate::logging::Chain(&error), "the changed trust bundle cannot be used yet; the previous one stays in service");
                    Ok(previous)
                }
                None => Err(error),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn a_key_readable_by_others_is_refused_naming_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(&key, "not even a key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_key_mode(&key).unwrap();
        for mode in [0o640, 0o604, 0o644] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
            let error = check_key_mode(&key).unwrap_err();
            assert!(matches!(error, Error::KeyPermissions { .. }), "{error}");
            let text = error.to_string();
            assert!(
                text.contains(&format!("chmod 600 {}", key.display())),
                "{text}"
            );
        }
        // Through a symlink (a Kubernetes Secret volume), the target's mode counts.
        let link = dir.path().join("link.pem");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        assert!(check_key_mode(&link).is_err());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
        check_key_mode(&link).unwrap();
    }
}
