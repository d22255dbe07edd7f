//! Peer certificate verification: webpki chain validation against the configured trust
//! bundle, then App Mesh's `subjectAlternativeNames.match.exact` (URI or DNS SANs). Failures
//! are classified (`expired`, `not_yet_valid`, `untrusted`, `san_mismatch`, ...), logged with
//! what was presented and what was expected, and counted ([`super::Metrics::tls_failure`]).
//!
//! The tunnel's TLS server name is synthetic ([`super::tunnel_sni`]); the server's identity is
//! checked by SAN list, as App Mesh does, not by hostname.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};

use super::Metrics;
use super::store::cert_facts;

/// The presented certificate has none of the expected SANs.
#[derive(Debug)]
pub struct SanMismatch {
    pub presented: Vec<String>,
    pub expected: Vec<String>,
}

impl std::fmt::Display for SanMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "subject alternative names {:?} match none of {:?}",
            self.presented, self.expected
        )
    }
}

impl std::error::Error for SanMismatch {}

/// The bounded reason label of a verification error.
pub fn classify(error: &rustls::Error) -> &'static str {
    match error {
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "untrusted",
            CertificateError::Other(other) if other.0.downcast_ref::<SanMismatch>().is_some() => {
                "san_mismatch"
            }
            _ => "other",
        },
        rustls::Error::NoCertificatesPresented => "no_certificate",
        _ => "other",
    }
}

/// Ok if `expected` is empty or the leaf carries one of the names.
fn check_sans(leaf: &CertificateDer<'_>, expected: &[String]) -> Result<(), rustls::Error> {
    if expected.is_empty() {
        return Ok(());
    }
    let presented = cert_facts(leaf)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?
        .sans;
    if presented.iter().any(|p| expected.contains(p)) {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(SanMismatch {
                presented,
                expected: expected.to_vec(),
            })),
        )))
    }
}

/// Where a verifier reports rejections.
#[derive(Clone)]
pub struct Report {
    pub metrics: Metrics,
    /// What the connection is for, for the log line (e.g. `tunnel to 192.0.2.2:15008 for app/client`).
    pub context: String,
}

impl Report {
    fn fail(&self, side: &'static str, error: &rustls::Error, leaf: &CertificateDer<'_>) {
        let facts = cert_facts(leaf).ok();
        let detail = match (classify(error), &facts) {
            ("expired", Some(f)) => format!(
                "certificate expired (notAfter {} s since the epoch; serial {}; SANs {:?})",
                f.not_after, f.serial, f.sans
            ),
            ("san_mismatch", _) => format!("SAN mismatch: {error}"),
            (_, Some(f)) => format!("{error} (serial {}; SANs {:?})", f.serial, f.sans),
            _ => error.to_string(),
        };
        self.metrics
            .tls_failure(side, classify(error), &self.context, &detail);
    }
}

/// Verifies the server of a tunnel: the client policy's trust and SANs. Without a trust
/// bundle (no client policy), App Mesh negotiates TLS without verifying the server: so does
/// this, and says so once per connection at debug level.
pub struct ServerVerifier {
    pub roots: Option<Arc<RootCertStore>>,
    pub expected_sans: Vec<String>,
    pub provider: Arc<CryptoProvider>,
    pub report: Report,
}

impl std::fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerVerifier")
            .field("expected_sans", &self.expected_sans)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            tracing::debug!(context = %self.report.context, "no client policy validation: the server certificate is not verified (App Mesh semantics)");
            return Ok(ServerCertVerified::assertion());
        };
        let result = rustls::server::ParsedCertificate::try_from(end_entity)
            .and_then(|parsed| {
                rustls::client::verify_server_cert_signed_by_trust_anchor(
                    &parsed,
                    roots,
                    intermediates,
                    now,
                    self.provider.signature_verification_algorithms.all,
                )
            })
            .and_then(|()| check_sans(end_entity, &self.expected_sans));
        match result {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(error) => {
                self.report.fail("client", &error, end_entity);
                Err(error)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Verifies the client of a tunnel: the destination listener's `validation` (mutual TLS).
pub struct ClientVerifier {
    pub inner: Arc<dyn ClientCertVerifier>,
    pub expected_sans: Vec<String>,
    pub report: Report,
}

impl std::fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientVerifier")
            .field("expected_sans", &self.expected_sans)
            .finish_non_exhaustive()
    }
}

impl ClientVerifier {
    /// A verifier requiring a client certificate chained to `roots` with one of `sans`.
    pub fn new(
        roots: Arc<RootCertStore>,
        expected_sans: Vec<String>,
        report: Report,
    ) -> Result<ClientVerifier, super::Error> {
        let inner =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, super::provider())
                .build()
                .map_err(|e| super::Error::Config(e.to_string()))?;
        Ok(ClientVerifier {
            inner,
            expected_sans,
            report,
        })
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let result = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .and_then(|verified| check_sans(end_entity, &self.expected_sans).map(|()| verified));
        if let Err(error) = &result {
            self.report.fail("server", error, end_entity);
        }
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}
