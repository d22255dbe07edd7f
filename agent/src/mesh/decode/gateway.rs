//! VirtualGateway and GatewayRoute specs: gateway listeners, matches, targets and
//! rewrites (with App Mesh's reserved prefixes).

use super::*;

impl Cx<'_> {
    pub(super) fn gateway_prefix(&mut self, n: &Node, path: &str) -> Option<String> {
        let s = self.prefix(n, path)?;
        self.not_reserved(n, path, s)
    }

    pub(super) fn gateway_path_match(&mut self, n: &Node, path: &str) -> Option<PathMatch> {
        match self.path_match(n, path)? {
            PathMatch::Exact(s) => self
                .not_reserved(n, &format!("{path}.exact"), s)
                .map(PathMatch::Exact),
            regex => Some(regex),
        }
    }

    pub(super) fn virtual_gateway_spec(&mut self, n: &Node) -> Option<VirtualGatewaySpec> {
        let o = self.obj(
            n,
            "spec",
            &[
                "awsName",
                "namespaceSelector",
                "podSelector",
                "gatewayRouteSelector",
                "listeners",
                "logging",
                "backendDefaults",
                "meshRef",
            ],
        )?;
        let aws_name = self.opt(&o, "awsName", Cx::nonempty);
        let namespace_selector = self.opt(&o, "namespaceSelector", Cx::selector);
        let pod_selector = self.opt(&o, "podSelector", Cx::selector);
        let gateway_route_selector = self.opt(&o, "gatewayRouteSelector", Cx::selector);
        let listeners = self.opt(&o, "listeners", |cx, n, p| {
            cx.each(n, p, 0, usize::MAX, |cx, n, p| {
                let o = cx.obj(
                    n,
                    p,
                    &[
                        "portMapping",
                        "healthCheck",
                        "connectionPool",
                        "tls",
                        "rateLimit",
                    ],
                )?;
                let port_mapping =
                    cx.req(&o, "portMapping", |cx, n, p| cx.port_mapping(n, p, true));
                let health_check =
                    cx.opt(&o, "healthCheck", |cx, n, p| cx.health_check(n, p, true));
                let connection_pool = cx.opt(&o, "connectionPool", |cx, n, p| {
                    cx.connection_pool(n, p, true)
                });
                let tls = cx.opt(&o, "tls", |cx, n, p| cx.listener_tls(n, p, true));
                let rate_limit = cx.opt(&o, "rateLimit", Cx::rate_limit);
                let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
                if bad("healthCheck", health_check.is_some())
                    || bad("connectionPool", connection_pool.is_some())
                    || bad("tls", tls.is_some())
                    || bad("rateLimit", rate_limit.is_some())
                {
                    return None;
                }
                // At the edge `overrides` name clients by their verified certificate
                // (gateway/limit.rs): a listener that asks for none could never apply them.
                if let Some(rate) = &rate_limit
                    && !rate.overrides.is_empty()
                    && tls
                        .as_ref()
                        .is_none_or(|t| t.validation.is_none() || t.mode == TlsMode::Disabled)
                {
                    let (pos, path) = match o.get("rateLimit").map(|n| &n.value) {
                        Some(Value::Map(entries)) => {
                            let rl = Obj {
                                pos: o.key_pos("rateLimit"),
                                path: o.at("rateLimit"),
                                entries,
                            };
                            (rl.key_pos("overrides"), rl.at("overrides"))
                        }
                        _ => (o.key_pos("rateLimit"), o.at("rateLimit")),
                    };
                    cx.err(
                        pos,
                        &path,
                        "a gateway listener's rate limit overrides name clients by their \
                         certificate: give the listener `tls` with `validation` (client \
                         certificates), or use `perCaller` (per client address) alone",
                    );
                    return None;
                }
                Some(GatewayListener {
                    port_mapping: port_mapping?,
                    health_check,
                    connection_pool,
                    tls,
                    rate_limit,
                })
            })
        });
        if let Some(ls) = &listeners {
            self.duplicate_ports(
                ls.iter().map(|l| l.port_mapping.port),
                o.get("listeners"),
                &o.at("listeners"),
            );
        }
        let logging = self.opt(&o, "logging", Cx::logging);
        let backend_defaults = self.opt(&o, "backendDefaults", |cx, n, p| {
            let o = cx.obj(n, p, &["clientPolicy"])?;
            let client_policy =
                cx.opt(&o, "clientPolicy", |cx, n, p| cx.client_policy(n, p, false));
            Some(BackendDefaults { client_policy })
        });
        let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
        if bad("listeners", listeners.is_some())
            || bad("namespaceSelector", namespace_selector.is_some())
            || bad("podSelector", pod_selector.is_some())
            || bad("gatewayRouteSelector", gateway_route_selector.is_some())
        {
            return None;
        }
        Some(VirtualGatewaySpec {
            aws_name,
            namespace_selector,
            pod_selector,
            gateway_route_selector,
            listeners: listeners.unwrap_or_default(),
            logging,
            backend_defaults,
        })
    }

    pub(super) fn gateway_route_spec(&mut self, n: &Node) -> Option<GatewayRouteSpec> {
        let keys = &["httpRoute", "http2Route", "grpcRoute"];
        let o = self.obj(
            n,
            "spec",
            &[
                "awsName",
                "priority",
                "httpRoute",
                "http2Route",
                "grpcRoute",
                "virtualGatewayRef",
                "meshRef",
            ],
        )?;
        let aws_name = self.opt(&o, "awsName", Cx::nonempty);
        let priority = self.opt(&o, "priority", |cx, n, p| cx.u32_in(n, p, 0, 1000));
        let virtual_gateway = self.opt(&o, "virtualGatewayRef", |cx, n, p| {
            let ro = cx.obj(n, p, &["name", "namespace", "uid"])?;
            let name = cx.req(&ro, "name", Cx::nonempty)?;
            let ns = match ro.get("namespace") {
                Some(n) => cx.nonempty(n, &ro.at("namespace"))?,
                None => cx.ns.clone(),
            };
            let id = ResourceId::new(ns, name);
            let path = cx.full_path(p);
            cx.out.refs.push(PendingRef {
                kind: RefKind::VirtualGateway,
                id: id.clone(),
                pos: n.pos,
                file: cx.file.to_path_buf(),
                path,
                port: None,
            });
            Some(id)
        });
        let kind = self.one_of(&o, keys, true).and_then(|(which, v)| {
            let p = o.at(which);
            match which {
                "grpcRoute" => self.grpc_gateway_route(v, &p).map(GatewayRouteKind::Grpc),
                "httpRoute" => self.http_gateway_route(v, &p).map(GatewayRouteKind::Http),
                _ => self.http_gateway_route(v, &p).map(GatewayRouteKind::Http2),
            }
        });
        if (o.get("priority").is_some() && priority.is_none())
            || (o.get("virtualGatewayRef").is_some() && virtual_gateway.is_none())
        {
            return None;
        }
        Some(GatewayRouteSpec {
            aws_name,
            priority,
            kind: kind?,
            virtual_gateway,
        })
    }

    pub(super) fn hostname_match(&mut self, n: &Node, path: &str) -> Option<HostnameMatch> {
        let o = self.obj(n, path, &["exact", "suffix"])?;
        let (which, v) = self.one_of(&o, &["exact", "suffix"], true)?;
        let s = self.string_len(v, &o.at(which), 1, 253)?;
        Some(if which == "exact" {
            HostnameMatch::Exact(s)
        } else {
            HostnameMatch::Suffix(s)
        })
    }

    pub(super) fn gateway_target(&mut self, n: &Node, path: &str) -> Option<GatewayRouteTarget> {
        let o = self.obj(n, path, &["virtualService", "port"])?;
        let port = self.opt(&o, "port", Cx::port);
        let vs = self.req(&o, "virtualService", |cx, n, p| {
            let o = cx.obj(n, p, &["virtualServiceRef", "virtualServiceARN"])?;
            cx.reference(
                &o,
                RefKind::VirtualService,
                "virtualServiceRef",
                "virtualServiceARN",
                None,
            )
        });
        if o.get("port").is_some() && port.is_none() {
            return None;
        }
        Some(GatewayRouteTarget {
            virtual_service: vs?,
            port,
        })
    }

    pub(super) fn hostname_rewrite(&mut self, n: &Node, path: &str) -> Option<Toggle> {
        let o = self.obj(n, path, &["defaultTargetHostname"])?;
        self.req(&o, "defaultTargetHostname", Cx::toggle)
    }

    pub(super) fn toggle(&mut self, n: &Node, path: &str) -> Option<Toggle> {
        self.pick(
            n,
            path,
            &[("ENABLED", Toggle::Enabled), ("DISABLED", Toggle::Disabled)],
        )
    }

    pub(super) fn http_gateway_route(&mut self, n: &Node, path: &str) -> Option<HttpGatewayRoute> {
        let o = self.obj(n, path, &["match", "action"])?;
        let m = self.req(&o, "match", |cx, n, p| {
            let o = cx.obj(
                n,
                p,
                &[
                    "prefix",
                    "path",
                    "queryParameters",
                    "method",
                    "hostname",
                    "headers",
                    "port",
                ],
            )?;
            let prefix = cx.opt(&o, "prefix", Cx::gateway_prefix);
            let path = cx.opt(&o, "path", Cx::gateway_path_match);
            let qp = cx.opt(&o, "queryParameters", |cx, n, p| {
                cx.each(n, p, 1, 10, Cx::query_parameter)
            });
            let method = cx.opt(&o, "method", Cx::method);
            let hostname = cx.opt(&o, "hostname", Cx::hostname_match);
            let headers = cx.opt(&o, "headers", |cx, n, p| {
                cx.each(n, p, 1, 10, Cx::header_match)
            });
            let port = cx.opt(&o, "port", Cx::port);
            if ["prefix", "path", "hostname"]
                .iter()
                .all(|k| o.get(k).is_none())
            {
                cx.err(
                    o.pos,
                    p,
                    "a gateway route match needs at least one of `prefix`, `path` or `hostname`",
                );
                return None;
            }
            let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
            if bad("prefix", prefix.is_some())
                || bad("path", path.is_some())
                || bad("queryParameters", qp.is_some())
                || bad("method", method.is_some())
                || bad("hostname", hostname.is_some())
                || bad("headers", headers.is_some())
                || bad("port", port.is_some())
            {
                return None;
            }
            Some(HttpGatewayRouteMatch {
                prefix,
                path,
                query_parameters: qp.unwrap_or_default(),
                method,
                hostname,
                headers: headers.unwrap_or_default(),
                port,
            })
        });
        let action = self.req(&o, "action", |cx, n, p| {
            let o = cx.obj(n, p, &["target", "rewrite"])?;
            let target = cx.req(&o, "target", Cx::gateway_target);
            let rewrite = cx.opt(&o, "rewrite", |cx, n, p| {
                let o = cx.obj(n, p, &["prefix", "path", "hostname"])?;
                let prefix = cx.opt(&o, "prefix", |cx, n, p| {
                    let o = cx.obj(n, p, &["defaultPrefix", "value"])?;
                    let default_prefix = cx.opt(&o, "defaultPrefix", Cx::toggle);
                    let value = cx.opt(&o, "value", |cx, n, p| {
                        let s = cx.string_len(n, p, 1, 255)?;
                        cx.not_reserved(n, p, s)
                    });
                    if o.get("defaultPrefix").is_some() && o.get("value").is_some() {
                        cx.err(
                            o.key_pos("value"),
                            &o.at("value"),
                            "`defaultPrefix` and `value` are mutually exclusive",
                        );
                        return None;
                    }
                    Some(PrefixRewrite {
                        default_prefix,
                        value,
                    })
                });
                let path = cx.opt(&o, "path", |cx, n, p| {
                    let o = cx.obj(n, p, &["exact"])?;
                    cx.req(&o, "exact", |cx, n, p| {
                        let s = cx.string_len(n, p, 1, 255)?;
                        cx.not_reserved(n, p, s)
                    })
                });
                let hostname = cx.opt(&o, "hostname", Cx::hostname_rewrite);
                let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
                if bad("prefix", prefix.is_some())
                    || bad("path", path.is_some())
                    || bad("hostname", hostname.is_some())
                {
                    return None;
                }
                Some(HttpGatewayRouteRewrite {
                    prefix,
                    path,
                    hostname,
                })
            });
            if o.get("rewrite").is_some() && rewrite.is_none() {
                return None;
            }
            Some(HttpGatewayRouteAction {
                target: target?,
                rewrite,
            })
        });
        Some(HttpGatewayRoute {
            r#match: m?,
            action: action?,
        })
    }

    pub(super) fn grpc_gateway_route(&mut self, n: &Node, path: &str) -> Option<GrpcGatewayRoute> {
        let o = self.obj(n, path, &["match", "action"])?;
        let m = self.req(&o, "match", |cx, n, p| {
            let o = cx.obj(n, p, &["serviceName", "hostname", "metadata", "port"])?;
            let service_name = cx.opt(&o, "serviceName", Cx::nonempty);
            let hostname = cx.opt(&o, "hostname", Cx::hostname_match);
            let metadata = cx.opt(&o, "metadata", |cx, n, p| {
                cx.each(n, p, 1, 10, Cx::header_match)
            });
            let port = cx.opt(&o, "port", Cx::port);
            if o.get("serviceName").is_none() && o.get("hostname").is_none() {
                cx.err(
                    o.pos,
                    p,
                    "a gRPC gateway route match needs `serviceName`, `hostname` or both",
                );
                return None;
            }
            let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
            if bad("serviceName", service_name.is_some())
                || bad("hostname", hostname.is_some())
                || bad("metadata", metadata.is_some())
                || bad("port", port.is_some())
            {
                return None;
            }
            Some(GrpcGatewayRouteMatch {
                service_name,
                hostname,
                metadata: metadata.unwrap_or_default(),
                port,
            })
        });
        let action = self.req(&o, "action", |cx, n, p| {
            let o = cx.obj(n, p, &["target", "rewrite"])?;
            let target = cx.req(&o, "target", Cx::gateway_target);
            let rewrite = cx.opt(&o, "rewrite", |cx, n, p| {
                let o = cx.obj(n, p, &["hostname"])?;
                cx.req(&o, "hostname", Cx::hostname_rewrite)
            });
            if o.get("rewrite").is_some() && rewrite.is_none() {
                return None;
            }
            Some(GrpcGatewayRouteAction {
                target: target?,
                rewrite_hostname: rewrite,
            })
        });
        Some(GrpcGatewayRoute {
            r#match: m?,
            action: action?,
        })
    }
}
