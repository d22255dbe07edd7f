//! Workload identity: one identity per VirtualNode, the certificates and trust bundles the mesh
//! file names for it, and the rustls configurations the tunnels use.
//!
//! - An identity is a SPIFFE ID, `spiffe://<mesh>/ns/<namespace>/vn/<name>` (the trust domain is
//!   the mesh's name), and/or the DNS name App Mesh used: the virtual node's
//!   `serviceDiscovery.dns.hostname`. A peer certificate whose URI or DNS SANs carry either is
//!   that virtual node ([`policy::Policy::peer_nodes`]).
//! - Certificates come from files (App Mesh's `file` source) and are re-read whenever a file
//!   changes ([`store::Store`]): new handshakes use the new material, connections already up
//!   keep theirs (nothing is dropped), and the tunnel pool stops reusing a connection made with
//!   material that has since changed.
//! - A node opens only the certificates of virtual nodes it runs a pod of, and uses one only
//!   if it carries that virtual node's identity ([`local`]).
//! - Verification ([`verify`]) is rustls/webpki chain validation against the configured trust
//!   bundle, then the App Mesh `subjectAlternativeNames` check. Every rejection is logged with
//!   its reason (`expired`, `san_mismatch`, `untrusted`, ...) and counted.
//!
//! TLS 1.3 only, ring as the crypto provider. What to do with a verified identity (which
//! backends it may reach) is [`policy`]; the tunnels themselves are `proxy::hbone`.

pub mod local;
pub mod policy;
pub mod service;
pub mod store;
pub mod verify;

use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls::crypto::CryptoProvider;

use crate::mesh::ResourceId;

/// ALPN of the node-to-node tunnel: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// Errors loading certificates, keys and trust bundles, or building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate (expected `-----BEGIN CERTIFICATE-----` blocks)")]
    NoCertificate { path: PathBuf },
    #[error("{path} is not a PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    BadKey {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(
        "the private key {key} does not belong to the certificate {chain} (if both were just \
         replaced, the next handshake retries)"
    )]
    KeyMismatch { chain: PathBuf, key: PathBuf },
    #[error("{path} is not a usable PEM certificate chain")]
    BadCertificate {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("trust bundle {path} has no usable CA certificate: {detail}")]
    BadTrust { path: PathBuf, detail: String },
    #[error(
        "{field} uses {source_kind}, which strait does not read yet; use a `file` source \
         (see docs/security.md)"
    )]
    Unsupported {
        field: String,
        source_kind: &'static str,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
    #[error(
        "the private key {path} is readable by group or others (mode {mode:03o}); strait \
         refuses it, as ssh does: run `chmod 600 {path}` (Kubernetes Secret volumes: \
         `defaultMode: 0400`)"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("{0}")]
    WrongIdentity(Box<IdentityMismatch>),
}

/// A certificate that does not carry the identity of the virtual node it would be used for.
#[derive(Debug)]
pub struct IdentityMismatch {
    pub virtual_node: ResourceId,
    /// Where the mesh file names the certificate.
    pub field: String,
    pub path: PathBuf,
    /// The leaf's URI and DNS SANs.
    pub found: Vec<String>,
    /// The virtual node's identities.
    pub expected: Vec<String>,
}

impl std::fmt::Display for IdentityMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let vn = &self.virtual_node;
        write!(
            f,
            "{} (named by {}) carries the subject alternative names {:?}, none of which is an \
             identity of VirtualNode {vn} ({:?}): strait refuses to present it as {vn}; point \
             the field at this virtual node's own certificate, or issue one with its SPIFFE ID \
             (`strait ca issue --virtual-node {vn}`)",
            self.path.display(),
            self.field,
            self.found,
            self.expected
        )
    }
}

/// The crypto provider of every TLS configuration strait builds.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The SPIFFE ID of a virtual node: `spiffe://<mesh>/ns/<namespace>/vn/<name>`.
pub fn spiffe_id(mesh: &str, vn: &ResourceId) -> String {
    format!(
        "spiffe://{}/ns/{}/vn/{}",
        mesh.to_ascii_lowercase(),
        vn.namespace,
        vn.name
    )
}

/// The SPIFFE ID of a virtual gateway: `spiffe://<mesh>/ns/<namespace>/vg/<name>`.
pub fn gateway_spiffe_id(mesh: &str, gateway: &ResourceId) -> String {
    format!(
        "spiffe://{}/ns/{}/vg/{}",
        mesh.to_ascii_lowercase(),
        gateway.namespace,
        gateway.name
    )
}

/// The TLS server name a tunnel client sends for a destination listener: it tells the
/// receiving agent which workload's certificate to present and which validation to apply,
/// before any tunnelled request is read.
///
/// A virtual node whose name and namespace are both DNS labels (what Kubernetes requires of
/// most names) is named readably, `p<port>.<name>.<namespace>.strait`, as every earlier strait
/// did, so agents of both versions understand each other during a rolling upgrade. Any other
/// name the mesh loader accepts (dots, as in `color.v1`, or longer than a label's 63 bytes)
/// travels as a digest, `p<port>.<32 hex digits>.hashed.id.strait`, which the receiving agent
/// resolves against the virtual nodes of its own mesh ([`tunnel_label`]).
pub fn tunnel_sni(vn: &ResourceId, port: u16) -> String {
    if is_dns_label(&vn.name) && is_dns_label(&vn.namespace) {
        format!("p{port}.{}.{}.strait", vn.name, vn.namespace)
    } else {
        format!("p{port}.{}.{HASHED_SNI_SUFFIX}", tunnel_label(vn))
    }
}

/// What follows the digest in a hashed tunnel server name: two labels, so a hashed name never
/// has the four labels of a readable one and the two cannot be confused.
const HASHED_SNI_SUFFIX: &str = "hashed.id.strait";

/// The digest naming a virtual node in a hashed tunnel server name: the first 128 bits of
/// SHA-256 over `<namespace>/<name>`, in hex (a DNS label of 32 characters).
pub fn tunnel_label(vn: &ResourceId) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("{}/{}", vn.namespace, vn.name));
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A DNS label as RFC 1123 allows it in a server name, lower case: 1 to 63 of `[a-z0-9-]`, not
/// starting or ending with `-`.
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Which virtual node a tunnel server name asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelTarget {
    /// Named readably.
    Named(ResourceId),
    /// Named by its [`tunnel_label`]; the receiving agent looks it up in its mesh.
    Hashed(String),
}

/// The listener named by [`tunnel_sni`].
pub fn parse_tunnel_sni(sni: &str) -> Option<(TunnelTarget, u16)> {
    let (port, rest) = sni.split_once('.')?;
    let port = port.strip_prefix('p')?.parse().ok()?;
    if let Some(label) = rest
        .strip_suffix(HASHED_SNI_SUFFIX)
        .and_then(|l| l.strip_suffix('.'))
    {
        let hex = label.len() == 32 && label.bytes().all(|b| b.is_ascii_hexdigit());
        return hex.then(|| (TunnelTarget::Hashed(label.to_ascii_lowercase()), port));
    }
    let mut parts = rest.split('.');
    let name = parts.next()?;
    let namespace = parts.next()?;
    (parts.next()? == "strait" && parts.next().is_none())
        .then(|| (TunnelTarget::Named(ResourceId::new(namespace, name)), port))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsFailureLabels {
    /// `client` (we verified a server) or `server` (we verified a client).
    pub side: &'static str,
    /// Certificate rejections by the verifier: `expired`, `not_yet_valid`, `san_mismatch`
    /// (also a same-node caller whose identities a listener's SANs do not list),
    /// `untrusted`, `other`. Handshakes that failed otherwise: `no_certificate`,
    /// `peer_alert` (the peer rejected us; its agent counts why), `protocol`, `io`,
    /// `handshake_timeout`, `not_tls`, `no_server_name`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlaintextLabels {
    /// `strict` or `permissive`.
    pub mode: &'static str,
    /// `refused` or `accepted`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// Where the backend rule stopped the connection: `sender` (this agent, same node or
    /// before a tunnel) or `receiver` (a tunnel stream from another node).
    pub point: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    /// Why this node refused to use a local virtual node's certificate: `wrong_identity`
    /// (its SANs are not that virtual node's), `key_permissions`, `unreadable`,
    /// `unsupported` (a source strait does not read), `invalid`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VirtualNodeLabels {
    /// `namespace/name`.
    pub virtual_node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelLabels {
    /// `outbound` (streams this agent opened) or `inbound` (streams it accepted).
    pub direction: &'static str,
}

/// Security counters, registered once and shared.
#[derive(Clone, Default)]
pub struct Metrics {
    pub tls_failures: Family<TlsFailureLabels, Counter>,
    pub inbound_plaintext: Family<PlaintextLabels, Counter>,
    pub authz_denied: Family<AuthzLabels, Counter>,
    pub tunnel_streams: Family<TunnelLabels, Counter>,
    pub tunnel_connections: Family<TunnelLabels, Counter>,
    pub certificate_reloads: Counter,
    pub identity_refused: Family<RefusedLabels, Counter>,
    pub identity_expires_in: Family<VirtualNodeLabels, Gauge>,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "strait_tls_failures",
            "TLS peers rejected, by side and reason (expired, san_mismatch, untrusted, ...)",
            self.tls_failures.clone(),
        );
        registry.register(
            "strait_inbound_plaintext",
            "Plaintext connections from outside the mesh to captured listener ports, by tls mode and result",
            self.inbound_plaintext.clone(),
        );
        registry.register(
            "strait_authz_denied",
            "Connections refused by the mesh's backend rules, by enforcement point",
            self.authz_denied.clone(),
        );
        registry.register(
            "strait_tunnel_streams",
            "HTTP/2 CONNECT streams through node-to-node mTLS tunnels, by direction",
            self.tunnel_streams.clone(),
        );
        registry.register(
            "strait_tunnel_connections",
            "mTLS tunnel connections established, by direction",
            self.tunnel_connections.clone(),
        );
        registry.register(
            "strait_certificate_reloads",
            "Certificates and trust bundles re-read after their files changed",
            self.certificate_reloads.clone(),
        );
        registry.register(
            "strait_identity_refused",
            "Certificates of local virtual nodes this agent refused to use, by reason (counted once per distinct cause)",
            self.identity_refused.clone(),
        );
        registry.register(
            "strait_identity_expires_in_seconds",
            "Seconds until the certificate of each local virtual node expires (negative: expired), as last used",
            self.identity_expires_in.clone(),
        );
    }

    /// Counts and logs a rejected peer certificate.
    pub fn tls_failure(
        &self,
        side: &'static str,
        reason: &'static str,
        context: &str,
        detail: &str,
    ) {
        self.tls_failures
            .get_or_create(&TlsFailureLabels { side, reason })
            .inc();
        tracing::warn!(side, reason, context, "peer certificate rejected: {detail}");
    }

    /// Counts and logs a same-node caller refused by a listener's subjectAlternativeNames,
    /// exactly as a tunnel peer whose certificate does not match is (`side="server"`,
    /// `reason="san_mismatch"`), so one alert covers both placements.
    pub fn san_refused(&self, context: &str, mismatch: &verify::SanMismatch) {
        let (side, reason) = ("server", "san_mismatch");
        self.tls_failures
            .get_or_create(&TlsFailureLabels { side, reason })
            .inc();
        tracing::warn!(
            side,
            reason,
            context,
            "same-node caller rejected: SAN mismatch: {mismatch}"
        );
    }

    /// Counts a failed TLS handshake (already logged by the caller), unless the certificate
    /// verifier counted it with its reason.
    pub fn handshake_failed(&self, side: &'static str, error: &std::io::Error) {
        let reason = match error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            Some(rustls::Error::InvalidCertificate(_)) => return,
            Some(rustls::Error::NoCertificatesPresented) => "no_certificate",
            Some(rustls::Error::AlertReceived(_)) => "peer_alert",
            Some(_) => "protocol",
            None => "io",
        };
        self.handshake_failure(side, reason);
    }

    /// Counts a handshake that failed before or outside certificate verification.
    pub fn handshake_failure(&self, side: &'static str, reason: &'static str) {
        self.tls_failures
            .get_or_create(&TlsFailureLabels { side, reason })
            .inc();
    }
}

/// Exposes the in-pod eBPF counters (backend denials, inbound steering), read on each scrape.
pub struct InPodCollector(pub Arc<crate::redirect::Redirect>);

impl std::fmt::Debug for InPodCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InPodCollector")
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl prometheus_client::collector::Collector for InPodCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        let Ok(counters) = self.0.inpod().counters() else {
            return Ok(());
        };
        let mut metric = encoder.encode_descriptor(
            "strait_inpod_events",
            "In-pod eBPF outcomes: connects refused as not a backend, inbound connections steered or dropped",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, value) in counters.by_reason() {
            prometheus_client::metrics::counter::ConstCounter::new(value)
                .encode(metric.encode_family(&ReasonLabel { reason })?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_round_trips() {
        let vn = ResourceId::new("app", "color-v1");
        let sni = tunnel_sni(&vn, 8080);
        assert_eq!(sni, "p8080.color-v1.app.strait");
        assert_eq!(
            parse_tunnel_sni(&sni),
            Some((TunnelTarget::Named(vn), 8080))
        );
        assert_eq!(parse_tunnel_sni("p8080.a.b.example"), None);
        assert_eq!(parse_tunnel_sni("8080.a.b.strait"), None);
    }

    #[test]
    fn names_that_are_not_dns_labels_travel_as_a_digest() {
        let long = "a".repeat(64);
        for vn in [
            ResourceId::new("app", "color.v1"),
            ResourceId::new("app", &long),
            ResourceId::new("app", "Color"),
        ] {
            let sni = tunnel_sni(&vn, 9090);
            assert!(sni.len() <= 253, "{sni}");
            assert!(sni.split('.').all(is_dns_label), "{sni}");
            rustls::pki_types::ServerName::try_from(sni.clone()).expect("a valid server name");
            assert_eq!(
                parse_tunnel_sni(&sni),
                Some((TunnelTarget::Hashed(tunnel_label(&vn)), 9090)),
                "{sni}"
            );
        }
        assert_ne!(
            tunnel_label(&ResourceId::new("app", "a.b")),
            tunnel_label(&ResourceId::new("app.a", "b"))
        );
        assert_eq!(parse_tunnel_sni("p1.abc.hashed.id.strait"), None);
    }

    #[test]
    fn spiffe_ids_use_the_mesh_as_trust_domain() {
        assert_eq!(
            spiffe_id("Shop", &ResourceId::new("app", "cart")),
            "spiffe://shop/ns/app/vn/cart"
        );
    }
}
