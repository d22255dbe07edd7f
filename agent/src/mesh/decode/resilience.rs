//! A listener's health check, connection pool and rate limit (a strait extension).

use super::*;

impl Cx<'_> {
    pub(super) fn health_check(
        &mut self,
        n: &Node,
        path: &str,
        gateway: bool,
    ) -> Option<HealthCheck> {
        let o = self.obj(
            n,
            path,
            &[
                "healthyThreshold",
                "intervalMillis",
                "path",
                "port",
                "protocol",
                "timeoutMillis",
                "unhealthyThreshold",
            ],
        )?;
        let healthy = self.req(&o, "healthyThreshold", |cx, n, p| cx.u32_in(n, p, 2, 10));
        let unhealthy = self.req(&o, "unhealthyThreshold", |cx, n, p| cx.u32_in(n, p, 2, 10));
        let interval = self.req(&o, "intervalMillis", |cx, n, p| {
            cx.u32_in(n, p, 5000, 300_000)
        });
        let timeout = self.req(&o, "timeoutMillis", |cx, n, p| {
            cx.u32_in(n, p, 2000, 60_000)
        });
        let protocol = self.req(&o, "protocol", |cx, n, p| {
            cx.pick(
                n,
                p,
                if gateway {
                    GATEWAY_PROTOCOLS
                } else {
                    PROTOCOLS
                },
            )
        });
        let port = self.opt(&o, "port", Cx::port);
        let hc_path = self.opt(&o, "path", Cx::nonempty);
        if let (Some(proto), Some(_)) = (protocol, &hc_path)
            && matches!(proto, Protocol::Tcp | Protocol::Grpc)
        {
            self.warn(
                o.key_pos("path"),
                &o.at("path"),
                format!("`path` is only used by http and http2 health checks; ignored for {proto}"),
            );
        }
        Some(HealthCheck {
            healthy_threshold: healthy?,
            unhealthy_threshold: unhealthy?,
            interval_millis: interval?,
            timeout_millis: timeout?,
            protocol: protocol?,
            port,
            path: hc_path,
        })
    }

    pub(super) fn connection_pool(
        &mut self,
        n: &Node,
        path: &str,
        gateway: bool,
    ) -> Option<ConnectionPool> {
        let keys: &[&'static str] = if gateway {
            &["http", "http2", "grpc"]
        } else {
            &["tcp", "http", "http2", "grpc"]
        };
        let o = self.obj(n, path, keys)?;
        let (which, v) = self.one_of(&o, keys, true)?;
        let p = o.at(which);
        match which {
            "tcp" => {
                let o = self.obj(v, &p, &["maxConnections"])?;
                let max_connections = self.req(&o, "maxConnections", Cx::positive)?;
                Some(ConnectionPool::Tcp { max_connections })
            }
            "http" => {
                let o = self.obj(v, &p, &["maxConnections", "maxPendingRequests"])?;
                let max_connections = self.req(&o, "maxConnections", Cx::positive);
                let max_pending_requests = self.opt(&o, "maxPendingRequests", Cx::positive);
                Some(ConnectionPool::Http {
                    max_connections: max_connections?,
                    max_pending_requests,
                })
            }
            _ => {
                let o = self.obj(v, &p, &["maxRequests"])?;
                let max_requests = self.req(&o, "maxRequests", Cx::positive)?;
                Some(if which == "grpc" {
                    ConnectionPool::Grpc { max_requests }
                } else {
                    ConnectionPool::Http2 { max_requests }
                })
            }
        }
    }

    /// strait extension `rateLimit` (see docs/resilience.md).
    pub(super) fn rate_limit(&mut self, n: &Node, path: &str) -> Option<RateLimit> {
        let o = self.obj(
            n,
            path,
            &[
                "requestsPerSecond",
                "burst",
                "perCaller",
                "overrides",
                "shadow",
            ],
        )?;
        let rps = self.opt(&o, "requestsPerSecond", Cx::positive);
        let burst = self.opt(&o, "burst", Cx::positive);
        let per_caller = self.opt(&o, "perCaller", Cx::bucket);
        let overrides = self.opt(&o, "overrides", |cx, n, p| {
            cx.each(n, p, 1, 100, Cx::rate_limit_override)
        });
        let shadow = self.opt(&o, "shadow", Cx::boolean);
        let failed = |key: &str, ok: bool| o.get(key).is_some() && !ok;
        if failed("requestsPerSecond", rps.is_some())
            || failed("burst", burst.is_some())
            || failed("perCaller", per_caller.is_some())
            || failed("overrides", overrides.is_some())
            || failed("shadow", shadow.is_some())
        {
            return None;
        }
        if rps.is_none() && burst.is_some() {
            self.err(
                o.key_pos("burst"),
                &o.at("burst"),
                "`burst` needs `requestsPerSecond` beside it (the bucket every caller shares)",
            );
            return None;
        }
        let overrides = overrides.unwrap_or_default();
        if rps.is_none() && per_caller.is_none() && overrides.is_empty() {
            self.err(
                o.pos,
                path,
                "a rate limit needs at least one of `requestsPerSecond` (every caller together), \
                 `perCaller` or `overrides`",
            );
            return None;
        }
        Some(RateLimit {
            total: rps.map(|requests_per_second| Bucket {
                requests_per_second,
                burst,
            }),
            per_caller,
            overrides,
            shadow: shadow.unwrap_or(false),
        })
    }

    /// `{requestsPerSecond, burst?}`.
    pub(super) fn bucket(&mut self, n: &Node, path: &str) -> Option<Bucket> {
        let o = self.obj(n, path, &["requestsPerSecond", "burst"])?;
        let rps = self.req(&o, "requestsPerSecond", Cx::positive);
        let burst = self.opt(&o, "burst", Cx::positive);
        Some(Bucket {
            requests_per_second: rps?,
            burst,
        })
    }

    /// `{callers: [{virtualNodeRef | virtualNodeARN | identity}], requestsPerSecond, burst?}`.
    pub(super) fn rate_limit_override(
        &mut self,
        n: &Node,
        path: &str,
    ) -> Option<RateLimitOverride> {
        let o = self.obj(n, path, &["callers", "requestsPerSecond", "burst"])?;
        let callers = self.req(&o, "callers", |cx, n, p| {
            cx.each(n, p, 1, 100, |cx, n, p| {
                let o = cx.obj(n, p, &["virtualNodeRef", "virtualNodeARN", "identity"])?;
                if o.get("identity").is_some() {
                    if o.get("virtualNodeRef").is_some() || o.get("virtualNodeARN").is_some() {
                        cx.err(
                            o.key_pos("identity"),
                            &o.at("identity"),
                            "give either `identity` or a virtual node, not both",
                        );
                        return None;
                    }
                    return cx
                        .req(&o, "identity", |cx, n, p| cx.string_len(n, p, 1, 2048))
                        .map(RateLimitCaller::Identity);
                }
                cx.reference(
                    &o,
                    RefKind::VirtualNode,
                    "virtualNodeRef",
                    "virtualNodeARN",
                    None,
                )
                .map(RateLimitCaller::VirtualNode)
            })
        });
        let rps = self.req(&o, "requestsPerSecond", Cx::positive);
        let burst = self.opt(&o, "burst", Cx::positive);
        Some(RateLimitOverride {
            callers: callers?,
            limit: Bucket {
                requests_per_second: rps?,
                burst,
            },
        })
    }
}
