//! Certificates, validation contexts, listener TLS and client policies (with their
//! `file` / `sds` / `acm` sources).

use super::*;

impl Cx<'_> {
    /// A certificate: `acm` (listeners only), `file` or `sds`.
    pub(super) fn certificate(
        &mut self,
        n: &Node,
        path: &str,
        allow_acm: bool,
    ) -> Option<TlsCertificate> {
        let keys: &[&'static str] = if allow_acm {
            &["acm", "file", "sds"]
        } else {
            &["file", "sds"]
        };
        let o = self.obj(n, path, keys)?;
        let (which, v) = self.one_of(&o, keys, true)?;
        let p = o.at(which);
        match which {
            "acm" => {
                let o = self.obj(v, &p, &["certificateARN"])?;
                let arn = self.req(&o, "certificateARN", Cx::nonempty)?;
                // Accepted with a warning, this broke every connection from another node to
                // the listener (no certificate to present): refused where it is written.
                self.err(
                    v.pos,
                    &p,
                    "ACM certificates never leave AWS, so strait cannot present this one; use \
                     `file` (a certificate and key on the nodes running this virtual node's \
                     pods, e.g. from cert-manager or `strait ca issue`; see docs/security.md)",
                );
                Some(TlsCertificate::Acm {
                    certificate_arn: arn,
                })
            }
            "file" => {
                let o = self.obj(v, &p, &["certificateChain", "privateKey"])?;
                let chain = self.req(&o, "certificateChain", |cx, n, p| {
                    cx.string_len(n, p, 1, 255)
                });
                let key = self.req(&o, "privateKey", |cx, n, p| cx.string_len(n, p, 1, 255));
                Some(TlsCertificate::File {
                    certificate_chain: chain?,
                    private_key: key?,
                })
            }
            _ => {
                let o = self.obj(v, &p, &["secretName"])?;
                let secret = self.req(&o, "secretName", Cx::nonempty)?;
                self.sds_warning(v.pos, &p);
                Some(TlsCertificate::Sds {
                    secret_name: secret,
                })
            }
        }
    }

    pub(super) fn sds_warning(&mut self, pos: Pos, path: &str) {
        self.warn(
            pos,
            path,
            "SDS is served by the strait identity service (`strait run --identity-service`, \
             docs/identity.md; the secret name is the SPIFFE ID asked for): an agent started \
             without one refuses this certificate or trust; otherwise use `file`",
        );
    }

    pub(super) fn validation(
        &mut self,
        n: &Node,
        path: &str,
        allow_acm: bool,
    ) -> Option<TlsValidation> {
        let o = self.obj(n, path, &["trust", "subjectAlternativeNames"])?;
        let trust = self.req(&o, "trust", |cx, n, p| {
            let keys: &[&'static str] = if allow_acm {
                &["acm", "file", "sds"]
            } else {
                &["file", "sds"]
            };
            let o = cx.obj(n, p, keys)?;
            let (which, v) = cx.one_of(&o, keys, true)?;
            let p = o.at(which);
            match which {
                "acm" => {
                    let o = cx.obj(v, &p, &["certificateAuthorityARNs"])?;
                    let arns = cx.req(&o, "certificateAuthorityARNs", |cx, n, p| {
                        cx.each(n, p, 1, 3, Cx::nonempty)
                    })?;
                    cx.err(
                        v.pos,
                        &p,
                        "ACM Private CA trust lives in AWS, so strait cannot verify peers with \
                         it; use `file` (a PEM bundle of the CA that issued the peers' \
                         certificates; see docs/security.md)",
                    );
                    Some(TlsTrust::Acm {
                        certificate_authority_arns: arns,
                    })
                }
                "file" => {
                    let o = cx.obj(v, &p, &["certificateChain"])?;
                    let chain = cx.req(&o, "certificateChain", |cx, n, p| {
                        cx.string_len(n, p, 1, 255)
                    })?;
                    Some(TlsTrust::File {
                        certificate_chain: chain,
                    })
                }
                _ => {
                    let o = cx.obj(v, &p, &["secretName"])?;
                    let secret = cx.req(&o, "secretName", Cx::nonempty)?;
                    cx.sds_warning(v.pos, &p);
                    Some(TlsTrust::Sds {
                        secret_name: secret,
                    })
                }
            }
        });
        let sans = self.opt(&o, "subjectAlternativeNames", |cx, n, p| {
            let o = cx.obj(n, p, &["match"])?;
            cx.req(&o, "match", |cx, n, p| {
                let o = cx.obj(n, p, &["exact"])?;
                cx.req(&o, "exact", |cx, n, p| {
                    cx.each(n, p, 1, usize::MAX, Cx::nonempty)
                })
            })
        });
        if o.get("subjectAlternativeNames").is_some() && sans.is_none() {
            return None;
        }
        Some(TlsValidation {
            trust: trust?,
            subject_alternative_names: sans.unwrap_or_default(),
        })
    }

    pub(super) fn listener_tls(
        &mut self,
        n: &Node,
        path: &str,
        gateway: bool,
    ) -> Option<ListenerTls> {
        let o = self.obj(n, path, &["mode", "certificate", "validation"])?;
        let mode = self.req(&o, "mode", |cx, n, p| {
            cx.pick(
                n,
                p,
                &[
                    ("STRICT", TlsMode::Strict),
                    ("PERMISSIVE", TlsMode::Permissive),
                    ("DISABLED", TlsMode::Disabled),
                ],
            )
        });
        let certificate = self.req(&o, "certificate", |cx, n, p| cx.certificate(n, p, true));
        // Listener-side trust cannot be ACM on a VirtualNode; a VirtualGateway's may be.
        let validation = self.opt(&o, "validation", |cx, n, p| cx.validation(n, p, gateway));
        if o.get("validation").is_some() && validation.is_none() {
            return None;
        }
        Some(ListenerTls {
            mode: mode?,
            certificate: certificate?,
            validation,
        })
    }

    pub(super) fn client_policy(
        &mut self,
        n: &Node,
        path: &str,
        extensions: bool,
    ) -> Option<ClientPolicy> {
        let known: &[&str] = if extensions {
            &["tls", "circuitBreaker"]
        } else {
            &["tls"]
        };
        let o = self.obj(n, path, known)?;
        let tls = self.opt(&o, "tls", |cx, n, p| {
            let o = cx.obj(n, p, &["enforce", "ports", "certificate", "validation"])?;
            let enforce = cx.opt(&o, "enforce", Cx::boolean);
            let ports = cx.opt(&o, "ports", |cx, n, p| {
                cx.each(n, p, 0, usize::MAX, Cx::port)
            });
            let certificate = cx.opt(&o, "certificate", |cx, n, p| cx.certificate(n, p, false));
            let validation = cx.req(&o, "validation", |cx, n, p| cx.validation(n, p, true));
            if (o.get("ports").is_some() && ports.is_none())
                || (o.get("certificate").is_some() && certificate.is_none())
                || (o.get("enforce").is_some() && enforce.is_none())
            {
                return None;
            }
            Some(ClientTls {
                enforce: enforce.unwrap_or(true),
                ports: ports.unwrap_or_default(),
                certificate,
                validation: validation?,
            })
        });
        let circuit_breaker = if extensions {
            self.opt(&o, "circuitBreaker", |cx, n, p| {
                let o = cx.obj(
                    n,
                    p,
                    &[
                        "maxConnections",
                        "maxPendingRequests",
                        "maxRequests",
                        "maxRetries",
                    ],
                )?;
                Some(CircuitBreaker {
                    max_connections: cx.opt(&o, "maxConnections", Cx::positive),
                    max_pending_requests: cx.opt(&o, "maxPendingRequests", Cx::positive),
                    max_requests: cx.opt(&o, "maxRequests", Cx::positive),
                    max_retries: cx.opt(&o, "maxRetries", Cx::positive),
                })
            })
        } else {
            None
        };
        Some(ClientPolicy {
            tls,
            circuit_breaker,
        })
    }

    pub(super) fn backend_defaults(&mut self, n: &Node, path: &str) -> Option<BackendDefaults> {
        let o = self.obj(n, path, &["clientPolicy"])?;
        let client_policy = self.opt(&o, "clientPolicy", |cx, n, p| cx.client_policy(n, p, true));
        Some(BackendDefaults { client_policy })
    }
}
