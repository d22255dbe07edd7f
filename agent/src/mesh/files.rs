//! Checks that the files a mesh names exist on this machine: TLS certificates, keys (errors,
//! also for a key readable by group or others) and trust bundles (errors); and, against the
//! operator's access log directory, access log paths (errors when they leave it, warnings for
//! a missing folder).
//!
//! Kept apart from validation so `strait validate` on a laptop does not fail for files that
//! only exist on the nodes; the agent calls [`check_files`] at start and on reload. Paths are
//! used as written (relative ones against the agent's working directory). The model carries no
//! positions, so these diagnostics have line 0 and name the field path instead.

use std::path::Path;

use super::model::*;
use super::{Diagnostic, MeshConfig, Severity};

struct Checker<'a> {
    file: &'a Path,
    out: Vec<Diagnostic>,
}

impl Checker<'_> {
    fn push(&mut self, severity: Severity, path: String, message: String) {
        self.out.push(Diagnostic {
            severity,
            file: self.file.to_path_buf(),
            line: 0,
            column: 0,
            path,
            message,
        });
    }

    fn readable(&mut self, field: String, file: &str, what: &str) {
        match std::fs::metadata(file) {
            Ok(m) if m.is_file() => {
                if let Err(e) = std::fs::File::open(file) {
                    self.push(
                        Severity::Error,
                        field,
                        format!("cannot read {what} {file:?}: {e}"),
                    );
                }
            }
            Ok(_) => self.push(
                Severity::Error,
                field,
                format!("{what} {file:?} is not a regular file"),
            ),
            Err(e) => self.push(
                Severity::Error,
                field,
                format!("{what} {file:?} cannot be used: {e}"),
            ),
        }
    }

    fn certificate(&mut self, at: &str, cert: &TlsCertificate) {
        if let TlsCertificate::File {
            certificate_chain,
            private_key,
        } = cert
        {
            self.readable(
                format!("{at}.file.certificateChain"),
                certificate_chain,
                "certificate chain",
            );
            let field = format!("{at}.file.privateKey");
            self.readable(field.clone(), private_key, "private key");
            if let Err(error) = crate::identity::store::check_key_mode(Path::new(private_key))
                && matches!(error, crate::identity::Error::KeyPermissions { .. })
            {
                self.push(Severity::Error, field, error.to_string());
            }
        }
    }

    fn validation(&mut self, at: &str, v: &TlsValidation) {
        if let TlsTrust::File { certificate_chain } = &v.trust {
            self.readable(
                format!("{at}.trust.file.certificateChain"),
                certificate_chain,
                "trust bundle",
            );
        }
    }

    fn listener_tls(&mut self, at: &str, tls: &ListenerTls) {
        self.certificate(&format!("{at}.certificate"), &tls.certificate);
        if let Some(v) = &tls.validation {
            self.validation(&format!("{at}.validation"), v);
        }
    }

    fn client_policy(&mut self, at: &str, cp: &ClientPolicy) {
        if let Some(tls) = &cp.tls {
            if let Some(c) = &tls.certificate {
                self.certificate(&format!("{at}.tls.certificate"), c);
            }
            self.validation(&format!("{at}.tls.validation"), &tls.validation);
        }
    }

    fn logging(&mut self, at: &str, logging: &Logging, dir: &Path) {
        let Some(log) = &logging.access_log else {
            return;
        };
        let field = format!("{at}.accessLog.file.path");
        let path = match crate::telemetry::access_log::resolve(dir, &log.path) {
            Ok(path) => path,
            Err(error) => {
                self.push(Severity::Error, field, error.to_string());
                return;
            }
        };
        if path.exists() {
            return;
        }
        // The agent makes the access log directory itself; folders below it are the operator's.
        if let Some(parent) = path.parent()
            && parent != dir
            && !parent.is_dir()
        {
            self.push(
                Severity::Warning,
                field,
                format!(
                    "directory {} does not exist, so the access log {:?} cannot be written",
                    parent.display(),
                    log.path
                ),
            );
        }
    }
}

/// File checks for everything in `config`; see the module docs.
pub fn check_files(config: &MeshConfig) -> Vec<Diagnostic> {
    let mut c = Checker {
        file: &config.source.path,
        out: Vec::new(),
    };
    for vn in &config.virtual_nodes {
        let res = format!("VirtualNode {}: spec", vn.id);
        for (i, l) in vn.spec.listeners.iter().enumerate() {
            if let Some(tls) = &l.tls {
                c.listener_tls(&format!("{res}.listeners[{i}].tls"), tls);
            }
        }
        for (i, b) in vn.spec.backends.iter().enumerate() {
            if let Some(cp) = &b.client_policy {
                c.client_policy(
                    &format!("{res}.backends[{i}].virtualService.clientPolicy"),
                    cp,
                );
            }
        }
        if let Some(cp) = vn
            .spec
            .backend_defaults
            .as_ref()
            .and_then(|d| d.client_policy.as_ref())
        {
            c.client_policy(&format!("{res}.backendDefaults.clientPolicy"), cp);
        }
    }
    for gw in &config.virtual_gateways {
        let res = format!("VirtualGateway {}: spec", gw.id);
        for (i, l) in gw.spec.listeners.iter().enumerate() {
            if let Some(tls) = &l.tls {
                c.listener_tls(&format!("{res}.listeners[{i}].tls"), tls);
            }
        }
        if let Some(cp) = gw
            .spec
            .backend_defaults
            .as_ref()
            .and_then(|d| d.client_policy.as_ref())
        {
            c.client_policy(&format!("{res}.backendDefaults.clientPolicy"), cp);
        }
    }
    c.out
}

/// Access log paths against the operator's access log directory (`--access-log-dir`): errors
/// for a path that leaves it or goes through a symlink, a warning for a missing folder. See
/// `telemetry::access_log::resolve`.
pub fn check_access_logs(config: &MeshConfig, dir: &Path) -> Vec<Diagnostic> {
    let mut c = Checker {
        file: &config.source.path,
        out: Vec::new(),
    };
    for vn in &config.virtual_nodes {
        if let Some(l) = &vn.spec.logging {
            c.logging(&format!("VirtualNode {}: spec.logging", vn.id), l, dir);
        }
    }
    for gw in &config.virtual_gateways {
        if let Some(l) = &gw.spec.logging {
            c.logging(&format!("VirtualGateway {}: spec.logging", gw.id), l, dir);
        }
    }
    c.out
}
