//! VirtualRouter and Route specs: matches, actions, retry policies, per-protocol routes.

use super::*;

impl Cx<'_> {
    pub(super) fn virtual_router_spec(&mut self, n: &Node) -> Option<VirtualRouterSpec> {
        let o = self.obj(n, "spec", &["awsName", "listeners", "routes", "meshRef"])?;
        let aws_name = self.opt(&o, "awsName", Cx::nonempty);
        let listeners = self.req(&o, "listeners", |cx, n, p| {
            cx.each(n, p, 1, usize::MAX, |cx, n, p| {
                let o = cx.obj(n, p, &["portMapping"])?;
                let port_mapping =
                    cx.req(&o, "portMapping", |cx, n, p| cx.port_mapping(n, p, false))?;
                Some(RouterListener { port_mapping })
            })
        });
        if let Some(ls) = &listeners {
            self.duplicate_ports(
                ls.iter().map(|l| l.port_mapping.port),
                o.get("listeners"),
                &o.at("listeners"),
            );
        }
        let mut routes = Vec::new();
        let mut routes_ok = true;
        if let Some(list) = o.get("routes") {
            let p = o.at("routes");
            match self.list(list, &p, 0, usize::MAX) {
                None => routes_ok = false,
                Some(items) => {
                    let mut names: BTreeMap<String, Pos> = BTreeMap::new();
                    for (i, item) in items.iter().enumerate() {
                        let rp = index(&p, i);
                        match self.route(item, &rp, listeners.as_deref()) {
                            Some((route, name_pos)) => {
                                if names.insert(route.name.clone(), name_pos).is_some() {
                                    self.err(
                                        name_pos,
                                        &join(&rp, "name"),
                                        format!(
                                            "duplicate route name `{}` in this router",
                                            route.name
                                        ),
                                    );
                                    routes_ok = false;
                                }
                                routes.push(route);
                            }
                            None => routes_ok = false,
                        }
                    }
                }
            }
        }
        if !routes_ok {
            return None;
        }
        Some(VirtualRouterSpec {
            aws_name,
            listeners: listeners?,
            routes,
        })
    }

    pub(super) fn route(
        &mut self,
        n: &Node,
        path: &str,
        listeners: Option<&[RouterListener]>,
    ) -> Option<(Route, Pos)> {
        let keys = &["httpRoute", "http2Route", "grpcRoute", "tcpRoute"];
        let o = self.obj(
            n,
            path,
            &[
                "name",
                "priority",
                "httpRoute",
                "http2Route",
                "grpcRoute",
                "tcpRoute",
            ],
        )?;
        let name = self.req(&o, "name", |cx, n, p| cx.string_len(n, p, 1, 255));
        let name_pos = o.get("name").map_or(o.pos, |n| n.pos);
        let priority = self.opt(&o, "priority", |cx, n, p| cx.u32_in(n, p, 0, 1000));
        let (which, v) = self.one_of(&o, keys, true)?;
        let p = o.at(which);
        let kind = match which {
            "httpRoute" => self.http_route(v, &p).map(RouteKind::Http),
            "http2Route" => self.http_route(v, &p).map(RouteKind::Http2),
            "grpcRoute" => self.grpc_route(v, &p).map(RouteKind::Grpc),
            _ => self.tcp_route(v, &p).map(RouteKind::Tcp),
        }?;
        if o.get("priority").is_some() && priority.is_none() {
            return None;
        }
        // Checks against the router's listeners (local to this document).
        if let Some(listeners) = listeners {
            let ports: Vec<u16> = listeners.iter().map(|l| l.port_mapping.port).collect();
            let port_list = ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let port_node = find(v, &["match", "port"]);
            match kind.match_port() {
                Some(port) if !ports.contains(&port) => {
                    self.err(
                        port_node.map_or(o.pos, |n| n.pos),
                        &join(&p, "match.port"),
                        format!(
                            "port {port} matches no listener of this router (listener ports: \
                             {port_list})"
                        ),
                    );
                    return None;
                }
                None if listeners.len() > 1 => {
                    self.err(
                        v.pos,
                        &join(&p, "match.port"),
                        format!(
                            "required: this router has {} listeners (ports {port_list}), so every \
                             route must say which one it serves",
                            listeners.len()
                        ),
                    );
                    return None;
                }
                _ => {}
            }
            let proto = kind.protocol();
            let relevant: Vec<&RouterListener> = listeners
                .iter()
                .filter(|l| kind.match_port().is_none_or(|p| p == l.port_mapping.port))
                .collect();
            if !relevant.iter().any(|l| l.port_mapping.protocol == proto) {
                self.warn(
                    v.pos,
                    &p,
                    format!(
                        "a {which} only matches traffic on a {proto} listener, and this router \
                         has none{}; the route never matches",
                        if kind.match_port().is_some() {
                            " on that port"
                        } else {
                            ""
                        }
                    ),
                );
            }
        }
        Some((
            Route {
                name: name?,
                priority,
                kind,
            },
            name_pos,
        ))
    }

    pub(super) fn route_action(&mut self, n: &Node, path: &str) -> Option<RouteAction> {
        let o = self.obj(n, path, &["weightedTargets"])?;
        let targets = self.req(&o, "weightedTargets", |cx, n, p| {
            cx.each(n, p, 1, 10, |cx, n, p| {
                let o = cx.obj(
                    n,
                    p,
                    &["virtualNodeRef", "virtualNodeARN", "weight", "port"],
                )?;
                let weight = cx.req(&o, "weight", |cx, n, p| cx.u32_in(n, p, 0, 100));
                let port = cx.opt(&o, "port", Cx::port);
                let port_info = port.map(|port| {
                    (
                        port,
                        o.get("port").map_or(o.pos, |n| n.pos),
                        cx.full_path(&o.at("port")),
                    )
                });
                let node = cx.reference(
                    &o,
                    RefKind::VirtualNode,
                    "virtualNodeRef",
                    "virtualNodeARN",
                    port_info,
                );
                Some(WeightedTarget {
                    virtual_node: node?,
                    weight: weight?,
                    port,
                })
            })
        })?;
        if targets.iter().all(|t| t.weight == 0) {
            self.warn(
                o.pos,
                &o.at("weightedTargets"),
                "every weight is 0: traffic matching this route has nowhere to go",
            );
        }
        Some(RouteAction {
            weighted_targets: targets,
        })
    }

    pub(super) fn header_match(&mut self, n: &Node, path: &str) -> Option<HeaderMatch> {
        let o = self.obj(n, path, &["name", "match", "invert"])?;
        let name = self.req(&o, "name", |cx, n, p| cx.string_len(n, p, 1, 50));
        let m = self.opt(&o, "match", Cx::match_method);
        let invert = self.opt(&o, "invert", Cx::boolean);
        if (o.get("match").is_some() && m.is_none())
            || (o.get("invert").is_some() && invert.is_none())
        {
            return None;
        }
        Some(HeaderMatch {
            name: name?,
            r#match: m,
            invert: invert.unwrap_or(false),
        })
    }

    pub(super) fn match_method(&mut self, n: &Node, path: &str) -> Option<MatchMethod> {
        let keys = &["exact", "prefix", "suffix", "regex", "range"];
        let o = self.obj(n, path, keys)?;
        let (which, v) = self.one_of(&o, keys, true)?;
        let p = o.at(which);
        let text = |cx: &mut Self| cx.string_len(v, &p, 1, 255);
        match which {
            "exact" => text(self).map(MatchMethod::Exact),
            "prefix" => text(self).map(MatchMethod::Prefix),
            "suffix" => text(self).map(MatchMethod::Suffix),
            "regex" => self.regex(v, &p).map(MatchMethod::Regex),
            _ => {
                let o = self.obj(v, &p, &["start", "end"])?;
                let start = self.req(&o, "start", |cx, n, p| cx.int(n, p, i64::MIN, i64::MAX));
                let end = self.req(&o, "end", |cx, n, p| cx.int(n, p, i64::MIN, i64::MAX));
                let (start, end) = (start?, end?);
                if start >= end {
                    self.err(
                        o.pos,
                        &p,
                        format!("range start ({start}) must be below its end ({end}; exclusive)"),
                    );
                    return None;
                }
                Some(MatchMethod::Range { start, end })
            }
        }
    }

    pub(super) fn path_match(&mut self, n: &Node, path: &str) -> Option<PathMatch> {
        let o = self.obj(n, path, &["exact", "regex"])?;
        let (which, v) = self.one_of(&o, &["exact", "regex"], true)?;
        let p = o.at(which);
        if which == "exact" {
            self.string_len(v, &p, 1, 255).map(PathMatch::Exact)
        } else {
            self.regex(v, &p).map(PathMatch::Regex)
        }
    }

    pub(super) fn query_parameter(&mut self, n: &Node, path: &str) -> Option<QueryParameterMatch> {
        let o = self.obj(n, path, &["name", "match"])?;
        let name = self.req(&o, "name", Cx::nonempty);
        let exact = self.opt(&o, "match", |cx, n, p| {
            let o = cx.obj(n, p, &["exact"])?;
            cx.req(&o, "exact", Cx::string)
        });
        if o.get("match").is_some() && exact.is_none() {
            return None;
        }
        Some(QueryParameterMatch { name: name?, exact })
    }

    /// A path a gateway route matches or rewrites to: App Mesh reserves `/aws-appmesh*` for
    /// its own use and refuses it there.
    pub(super) fn not_reserved(&mut self, n: &Node, path: &str, value: String) -> Option<String> {
        if value.starts_with("/aws-appmesh") {
            self.err(
                n.pos,
                path,
                format!(
                    "{value:?}: paths starting with `/aws-appmesh` are reserved by App Mesh; choose another"
                ),
            );
            return None;
        }
        Some(value)
    }

    pub(super) fn prefix(&mut self, n: &Node, path: &str) -> Option<String> {
        let s = self.string_len(n, path, 1, 255)?;
        if !s.starts_with('/') {
            self.err(
                n.pos,
                path,
                format!("a prefix must start with `/`, got {s:?}"),
            );
            return None;
        }
        Some(s)
    }

    pub(super) fn method(&mut self, n: &Node, path: &str) -> Option<HttpMethod> {
        self.pick(
            n,
            path,
            &[
                ("CONNECT", HttpMethod::Connect),
                ("DELETE", HttpMethod::Delete),
                ("GET", HttpMethod::Get),
                ("HEAD", HttpMethod::Head),
                ("OPTIONS", HttpMethod::Options),
                ("PATCH", HttpMethod::Patch),
                ("POST", HttpMethod::Post),
                ("PUT", HttpMethod::Put),
                ("TRACE", HttpMethod::Trace),
            ],
        )
    }

    pub(super) fn http_route(&mut self, n: &Node, path: &str) -> Option<HttpRoute> {
        let o = self.obj(
            n,
            path,
            &["match", "action", "retryPolicy", "timeout", "rateLimit"],
        )?;
        let m = self.req(&o, "match", |cx, n, p| {
            let o = cx.obj(
                n,
                p,
                &[
                    "prefix",
                    "path",
                    "headers",
                    "method",
                    "scheme",
                    "queryParameters",
                    "port",
                ],
            )?;
            let prefix = cx.opt(&o, "prefix", Cx::prefix);
            let path = cx.opt(&o, "path", Cx::path_match);
            let headers = cx.opt(&o, "headers", |cx, n, p| {
                cx.each(n, p, 1, 10, Cx::header_match)
            });
            let method = cx.opt(&o, "method", Cx::method);
            let scheme = cx.opt(&o, "scheme", |cx, n, p| {
                cx.pick(
                    n,
                    p,
                    &[("http", HttpScheme::Http), ("https", HttpScheme::Https)],
                )
            });
            let qp = cx.opt(&o, "queryParameters", |cx, n, p| {
                cx.each(n, p, 1, 10, Cx::query_parameter)
            });
            let port = cx.opt(&o, "port", Cx::port);
            let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
            if bad("prefix", prefix.is_some())
                || bad("path", path.is_some())
                || bad("headers", headers.is_some())
                || bad("method", method.is_some())
                || bad("scheme", scheme.is_some())
                || bad("queryParameters", qp.is_some())
                || bad("port", port.is_some())
            {
                return None;
            }
            Some(HttpRouteMatch {
                prefix,
                path,
                headers: headers.unwrap_or_default(),
                method,
                scheme,
                query_parameters: qp.unwrap_or_default(),
                port,
            })
        });
        let action = self.req(&o, "action", Cx::route_action);
        let (retry, timeout, rate_limit) = self.request_route_policies(&o, false)?;
        Some(HttpRoute {
            r#match: m?,
            action: action?,
            retry_policy: retry,
            timeout,
            rate_limit,
        })
    }

    pub(super) fn retry_policy(&mut self, n: &Node, path: &str, grpc: bool) -> Option<RetryPolicy> {
        let keys: &[&str] = if grpc {
            &[
                "maxRetries",
                "perRetryTimeout",
                "httpRetryEvents",
                "tcpRetryEvents",
                "grpcRetryEvents",
            ]
        } else {
            &[
                "maxRetries",
                "perRetryTimeout",
                "httpRetryEvents",
                "tcpRetryEvents",
            ]
        };
        let o = self.obj(n, path, keys)?;
        let max_retries = self.req(&o, "maxRetries", |cx, n, p| {
            cx.u32_in(n, p, 0, i32::MAX as u32)
        });
        let per_retry_timeout = self.req(&o, "perRetryTimeout", Cx::duration);
        let http = self.opt(&o, "httpRetryEvents", |cx, n, p| {
            cx.each(n, p, 1, 25, |cx, n, p| {
                cx.pick(
                    n,
                    p,
                    &[
                        ("server-error", HttpRetryEvent::ServerError),
                        ("gateway-error", HttpRetryEvent::GatewayError),
                        ("client-error", HttpRetryEvent::ClientError),
                        ("stream-error", HttpRetryEvent::StreamError),
                    ],
                )
            })
        });
        let tcp = self.opt(&o, "tcpRetryEvents", |cx, n, p| {
            cx.each(n, p, 1, 1, |cx, n, p| {
                cx.pick(
                    n,
                    p,
                    &[("connection-error", TcpRetryEvent::ConnectionError)],
                )
            })
        });
        let grpc_events = if grpc {
            self.opt(&o, "grpcRetryEvents", |cx, n, p| {
                cx.each(n, p, 1, 5, |cx, n, p| {
                    cx.pick(
                        n,
                        p,
                        &[
                            ("cancelled", GrpcRetryEvent::Cancelled),
                            ("deadline-exceeded", GrpcRetryEvent::DeadlineExceeded),
                            ("internal", GrpcRetryEvent::Internal),
                            ("resource-exhausted", GrpcRetryEvent::ResourceExhausted),
                            ("unavailable", GrpcRetryEvent::Unavailable),
                        ],
                    )
                })
            })
        } else {
            None
        };
        let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
        if bad("httpRetryEvents", http.is_some())
            || bad("tcpRetryEvents", tcp.is_some())
            || (grpc && bad("grpcRetryEvents", grpc_events.is_some()))
        {
            return None;
        }
        let none = http.is_none() && tcp.is_none() && grpc_events.is_none();
        if none {
            let names = if grpc {
                "`grpcRetryEvents`, `httpRetryEvents` or `tcpRetryEvents`"
            } else {
                "`httpRetryEvents` or `tcpRetryEvents`"
            };
            self.err(
                o.pos,
                path,
                format!("a retry policy needs at least one of {names}"),
            );
            return None;
        }
        Some(RetryPolicy {
            max_retries: max_retries?,
            per_retry_timeout: per_retry_timeout?,
            http_retry_events: http.unwrap_or_default(),
            tcp_retry_events: tcp.unwrap_or_default(),
            grpc_retry_events: grpc_events.unwrap_or_default(),
        })
    }

    pub(super) fn grpc_route(&mut self, n: &Node, path: &str) -> Option<GrpcRoute> {
        let o = self.obj(
            n,
            path,
            &["match", "action", "retryPolicy", "timeout", "rateLimit"],
        )?;
        let m = self.req(&o, "match", |cx, n, p| {
            let o = cx.obj(n, p, &["serviceName", "methodName", "metadata", "port"])?;
            let service_name = cx.opt(&o, "serviceName", Cx::nonempty);
            let method_name = cx.opt(&o, "methodName", |cx, n, p| cx.string_len(n, p, 1, 50));
            let metadata = cx.opt(&o, "metadata", |cx, n, p| {
                cx.each(n, p, 1, 10, Cx::header_match)
            });
            let port = cx.opt(&o, "port", Cx::port);
            if o.get("methodName").is_some() && o.get("serviceName").is_none() {
                cx.err(
                    o.key_pos("methodName"),
                    &o.at("methodName"),
                    "`methodName` requires `serviceName`",
                );
                return None;
            }
            let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
            if bad("serviceName", service_name.is_some())
                || bad("methodName", method_name.is_some())
                || bad("metadata", metadata.is_some())
                || bad("port", port.is_some())
            {
                return None;
            }
            Some(GrpcRouteMatch {
                service_name,
                method_name,
                metadata: metadata.unwrap_or_default(),
                port,
            })
        });
        let action = self.req(&o, "action", Cx::route_action);
        let (retry, timeout, rate_limit) = self.request_route_policies(&o, true)?;
        Some(GrpcRoute {
            r#match: m?,
            action: action?,
            retry_policy: retry,
            timeout,
            rate_limit,
        })
    }

    /// The `retryPolicy`, `timeout` and `rateLimit` an httpRoute, http2Route or grpcRoute may
    /// carry; `None` when one is present but invalid (its diagnostic is recorded).
    fn request_route_policies(
        &mut self,
        o: &Obj<'_>,
        grpc: bool,
    ) -> Option<(Option<RetryPolicy>, Option<HttpTimeout>, Option<RateLimit>)> {
        let retry = self.opt(o, "retryPolicy", |cx, n, p| cx.retry_policy(n, p, grpc));
        let timeout = self.opt(o, "timeout", Cx::http_timeout);
        let rate_limit = self.opt(o, "rateLimit", Cx::rate_limit);
        if (o.get("retryPolicy").is_some() && retry.is_none())
            || (o.get("timeout").is_some() && timeout.is_none())
            || (o.get("rateLimit").is_some() && rate_limit.is_none())
        {
            return None;
        }
        Some((retry, timeout, rate_limit))
    }

    pub(super) fn tcp_route(&mut self, n: &Node, path: &str) -> Option<TcpRoute> {
        let o = self.obj(n, path, &["match", "action", "timeout", "rateLimit"])?;
        if o.get("rateLimit").is_some() {
            self.err(
                o.key_pos("rateLimit"),
                &o.at("rateLimit"),
                "`rateLimit` is not supported on a tcpRoute (it limits requests of httpRoute, \
                 http2Route and grpcRoute); for a connection rate, put `rateLimit` on the tcp \
                 listener of the target virtual node",
            );
            return None;
        }
        let m = self.opt(&o, "match", |cx, n, p| {
            let o = cx.obj(n, p, &["port"])?;
            let port = cx.opt(&o, "port", Cx::port);
            if o.get("port").is_some() && port.is_none() {
                return None;
            }
            Some(TcpRouteMatch { port })
        });
        let action = self.req(&o, "action", Cx::route_action);
        let timeout = self.opt(&o, "timeout", Cx::tcp_timeout);
        if (o.get("match").is_some() && m.is_none())
            || (o.get("timeout").is_some() && timeout.is_none())
        {
            return None;
        }
        Some(TcpRoute {
            r#match: m,
            action: action?,
            timeout,
        })
    }

    // ---- VirtualGateway and GatewayRoute ---------------------------------------------------
}
