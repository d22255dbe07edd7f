//! The Mesh, VirtualNode (listeners, service discovery) and VirtualService specs.

use super::*;

impl Cx<'_> {
    pub(super) fn mesh_spec(&mut self, n: &Node) -> Option<MeshSpec> {
        let o = self.obj(
            n,
            "spec",
            &[
                "awsName",
                "namespaceSelector",
                "egressFilter",
                "meshOwner",
                "meshServiceDiscovery",
            ],
        )?;
        let aws_name = self.opt(&o, "awsName", Cx::nonempty);
        let namespace_selector = self.opt(&o, "namespaceSelector", Cx::selector);
        if o.get("namespaceSelector").is_none() {
            self.warn(
                o.pos,
                &o.at("namespaceSelector"),
                "no namespaceSelector: strait puts every namespace in this mesh (the file \
                 describes one mesh; App Mesh itself would select none); add a namespaceSelector \
                 to restrict it",
            );
        }
        let egress = self.opt(&o, "egressFilter", |cx, n, p| {
            let o = cx.obj(n, p, &["type"])?;
            cx.req(&o, "type", |cx, n, p| {
                cx.pick(
                    n,
                    p,
                    &[
                        ("ALLOW_ALL", EgressFilter::AllowAll),
                        ("DROP_ALL", EgressFilter::DropAll),
                    ],
                )
            })
        });
        let mesh_owner = self.opt(&o, "meshOwner", Cx::nonempty);
        if mesh_owner.is_some() {
            self.warn(
                o.key_pos("meshOwner"),
                &o.at("meshOwner"),
                "AWS-only (meshes shared through AWS RAM): strait ignores it",
            );
        }
        let service_discovery = self.opt(&o, "meshServiceDiscovery", |cx, n, p| {
            let o = cx.obj(n, p, &["ipPreference"])?;
            let ip_preference = cx.opt(&o, "ipPreference", |cx, n, p| {
                cx.pick(
                    n,
                    p,
                    &[
                        ("IPv4_PREFERRED", IpPreference::Ipv4Preferred),
                        ("IPv6_PREFERRED", IpPreference::Ipv6Preferred),
                        ("IPv4_ONLY", IpPreference::Ipv4Only),
                        ("IPv6_ONLY", IpPreference::Ipv6Only),
                    ],
                )
            });
            Some(MeshServiceDiscovery { ip_preference })
        });
        if o.get("egressFilter").is_some() && egress.is_none() {
            return None;
        }
        Some(MeshSpec {
            aws_name,
            namespace_selector,
            egress_filter: egress.unwrap_or_default(),
            mesh_owner,
            service_discovery,
        })
    }

    // ---- VirtualNode -------------------------------------------------------------------------

    pub(super) fn virtual_node_spec(&mut self, n: &Node) -> Option<VirtualNodeSpec> {
        let o = self.obj(
            n,
            "spec",
            &[
                "awsName",
                "podSelector",
                "listeners",
                "serviceDiscovery",
                "backends",
                "backendGroups",
                "backendDefaults",
                "logging",
                "meshRef",
            ],
        )?;
        let aws_name = self.opt(&o, "awsName", Cx::nonempty);
        let pod_selector = self.opt(&o, "podSelector", Cx::selector);
        let listeners = self.opt(&o, "listeners", |cx, n, p| {
            cx.each(n, p, 0, usize::MAX, Cx::node_listener)
        });
        if let Some(ls) = &listeners {
            self.duplicate_ports(
                ls.iter().map(|l| l.port_mapping.port),
                o.get("listeners"),
                &o.at("listeners"),
            );
        }
        let service_discovery = self.opt(&o, "serviceDiscovery", Cx::service_discovery);
        let backends = self.opt(&o, "backends", |cx, n, p| {
            cx.each(n, p, 0, usize::MAX, |cx, n, p| {
                let o = cx.obj(n, p, &["virtualService"])?;
                cx.req(&o, "virtualService", |cx, n, p| {
                    let o = cx.obj(
                        n,
                        p,
                        &["virtualServiceRef", "virtualServiceARN", "clientPolicy"],
                    )?;
                    let vs = cx.reference(
                        &o,
                        RefKind::VirtualService,
                        "virtualServiceRef",
                        "virtualServiceARN",
                        None,
                    );
                    let client_policy =
                        cx.opt(&o, "clientPolicy", |cx, n, p| cx.client_policy(n, p, true));
                    Some(Backend {
                        virtual_service: vs?,
                        client_policy,
                    })
                })
            })
        });
        if o.get("backendGroups").is_some() {
            self.warn(
                o.key_pos("backendGroups"),
                &o.at("backendGroups"),
                "backendGroups is an App Mesh controller convenience that strait does not read; \
                 list the backends explicitly",
            );
        }
        let backend_defaults = self.opt(&o, "backendDefaults", Cx::backend_defaults);
        let logging = self.opt(&o, "logging", Cx::logging);
        let has_listeners = listeners.as_ref().is_some_and(|l| !l.is_empty());
        if has_listeners && o.get("serviceDiscovery").is_none() {
            self.err(
                o.pos,
                &o.at("serviceDiscovery"),
                "required when the node has listeners (one of `dns`, `awsCloudMap` or the strait \
                 extension `static`)",
            );
            return None;
        }
        let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
        if bad("listeners", listeners.is_some())
            || bad("serviceDiscovery", service_discovery.is_some())
            || bad("backends", backends.is_some())
            || bad("podSelector", pod_selector.is_some())
        {
            return None;
        }
        Some(VirtualNodeSpec {
            aws_name,
            pod_selector,
            listeners: listeners.unwrap_or_default(),
            service_discovery,
            backends: backends.unwrap_or_default(),
            backend_defaults,
            logging,
        })
    }

    pub(super) fn duplicate_ports(
        &mut self,
        ports: impl Iterator<Item = u16>,
        list: Option<&Node>,
        path: &str,
    ) {
        let mut seen = BTreeSet::new();
        for (i, port) in ports.enumerate() {
            if !seen.insert(port) {
                let pos = match list.map(|n| &n.value) {
                    Some(Value::Seq(items)) => items.get(i).map_or(Pos::default(), |n| n.pos),
                    _ => Pos::default(),
                };
                self.err(
                    pos,
                    &join(&index(path, i), "portMapping.port"),
                    format!("another listener already uses port {port}"),
                );
            }
        }
    }

    pub(super) fn node_listener(&mut self, n: &Node, path: &str) -> Option<Listener> {
        let o = self.obj(
            n,
            path,
            &[
                "portMapping",
                "healthCheck",
                "outlierDetection",
                "connectionPool",
                "tls",
                "timeout",
                "rateLimit",
            ],
        )?;
        let port_mapping = self.req(&o, "portMapping", |cx, n, p| cx.port_mapping(n, p, false));
        let health_check = self.opt(&o, "healthCheck", |cx, n, p| cx.health_check(n, p, false));
        let outlier_detection = self.opt(&o, "outlierDetection", |cx, n, p| {
            let o = cx.obj(
                n,
                p,
                &[
                    "maxServerErrors",
                    "interval",
                    "baseEjectionDuration",
                    "maxEjectionPercent",
                ],
            )?;
            let max_server_errors =
                cx.req(&o, "maxServerErrors", |cx, n, p| cx.int(n, p, 1, i64::MAX));
            let interval = cx.req(&o, "interval", Cx::duration);
            let base = cx.req(&o, "baseEjectionDuration", Cx::duration);
            let pct = cx.req(&o, "maxEjectionPercent", |cx, n, p| cx.u32_in(n, p, 0, 100));
            Some(OutlierDetection {
                max_server_errors: max_server_errors? as u64,
                interval: interval?,
                base_ejection_duration: base?,
                max_ejection_percent: pct?,
            })
        });
        let connection_pool = self.opt(&o, "connectionPool", |cx, n, p| {
            cx.connection_pool(n, p, false)
        });
        if let (Some(pm), Some(pool)) = (&port_mapping, &connection_pool) {
            let kind = match pool {
                ConnectionPool::Tcp { .. } => "tcp",
                ConnectionPool::Http { .. } => "http",
                ConnectionPool::Http2 { .. } => "http2",
                ConnectionPool::Grpc { .. } => "grpc",
            };
            if kind != pm.protocol.as_str() {
                let p = o.at("connectionPool");
                self.err(
                    o.key_pos("connectionPool"),
                    &join(&p, kind),
                    format!(
                        "a `{kind}` connection pool, but the listener's protocol is {}: give \
                         `connectionPool.{}` instead",
                        pm.protocol.as_str(),
                        pm.protocol.as_str()
                    ),
                );
                return None;
            }
        }
        let tls = self.opt(&o, "tls", |cx, n, p| cx.listener_tls(n, p, false));
        let timeout = self.opt(&o, "timeout", |cx, n, p| {
            let keys = &["tcp", "http", "http2", "grpc"];
            let o = cx.obj(n, p, keys)?;
            let (which, v) = cx.one_of(&o, keys, true)?;
            let p = o.at(which);
            if let Some(pm) = port_mapping
                && pm.protocol.as_str() != which
            {
                cx.warn(
                    o.key_pos(which),
                    &p,
                    format!(
                        "a `{which}` timeout on a {} listener is ignored",
                        pm.protocol
                    ),
                );
            }
            match which {
                "tcp" => cx.tcp_timeout(v, &p).map(ListenerTimeout::Tcp),
                "http" => cx.http_timeout(v, &p).map(ListenerTimeout::Http),
                "http2" => cx.http_timeout(v, &p).map(ListenerTimeout::Http2),
                _ => cx.http_timeout(v, &p).map(ListenerTimeout::Grpc),
            }
        });
        let rate_limit = self.opt(&o, "rateLimit", Cx::rate_limit);
        let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
        if bad("healthCheck", health_check.is_some())
            || bad("outlierDetection", outlier_detection.is_some())
            || bad("connectionPool", connection_pool.is_some())
            || bad("tls", tls.is_some())
            || bad("timeout", timeout.is_some())
            || bad("rateLimit", rate_limit.is_some())
        {
            return None;
        }
        Some(Listener {
            port_mapping: port_mapping?,
            health_check,
            outlier_detection,
            connection_pool,
            tls,
            timeout,
            rate_limit,
        })
    }

    pub(super) fn service_discovery(&mut self, n: &Node, path: &str) -> Option<ServiceDiscovery> {
        let keys = &["dns", "awsCloudMap", "static"];
        let o = self.obj(n, path, keys)?;
        let (which, v) = self.one_of(&o, keys, true)?;
        let p = o.at(which);
        match which {
            "dns" => {
                let o = self.obj(v, &p, &["hostname", "responseType"])?;
                let hostname = self.req(&o, "hostname", |cx, n, p| cx.string_len(n, p, 1, 253));
                let response_type = self.opt(&o, "responseType", |cx, n, p| {
                    cx.pick(
                        n,
                        p,
                        &[
                            ("ENDPOINTS", DnsResponseType::Endpoints),
                            ("LOADBALANCER", DnsResponseType::LoadBalancer),
                        ],
                    )
                });
                if o.get("responseType").is_some() && response_type.is_none() {
                    return None;
                }
                Some(ServiceDiscovery::Dns {
                    hostname: hostname?,
                    response_type: response_type.unwrap_or_default(),
                })
            }
            "awsCloudMap" => {
                let o = self.obj(v, &p, &["namespaceName", "serviceName", "attributes"])?;
                let ns = self.req(&o, "namespaceName", |cx, n, p| cx.string_len(n, p, 1, 1024));
                let svc = self.req(&o, "serviceName", |cx, n, p| cx.string_len(n, p, 1, 1024));
                let attributes = self
                    .opt(&o, "attributes", |cx, n, p| {
                        cx.each(n, p, 0, usize::MAX, Cx::key_value)
                    })
                    .unwrap_or_default();
                self.warn(
                    v.pos,
                    &p,
                    "AWS-only: strait cannot query AWS Cloud Map, so this node gets no endpoints \
                     from it; use `dns` or the strait extension `static`",
                );
                Some(ServiceDiscovery::AwsCloudMap {
                    namespace_name: ns?,
                    service_name: svc?,
                    attributes,
                })
            }
            _ => {
                let o = self.obj(v, &p, &["addresses"])?;
                let addresses = self.req(&o, "addresses", |cx, n, p| {
                    cx.each(n, p, 1, usize::MAX, Cx::ip)
                })?;
                Some(ServiceDiscovery::Static { addresses })
            }
        }
    }

    // ---- VirtualService ----------------------------------------------------------------------

    pub(super) fn virtual_service_spec(&mut self, n: &Node) -> Option<VirtualServiceSpec> {
        let o = self.obj(n, "spec", &["awsName", "provider", "addresses", "meshRef"])?;
        let aws_name = self.opt(&o, "awsName", Cx::nonempty);
        let provider = self.opt(&o, "provider", |cx, n, p| {
            let keys = &["virtualNode", "virtualRouter"];
            let o = cx.obj(n, p, keys)?;
            let (which, v) = cx.one_of(&o, keys, true)?;
            let p = o.at(which);
            if which == "virtualNode" {
                let o = cx.obj(v, &p, &["virtualNodeRef", "virtualNodeARN"])?;
                cx.reference(
                    &o,
                    RefKind::VirtualNode,
                    "virtualNodeRef",
                    "virtualNodeARN",
                    None,
                )
                .map(Provider::VirtualNode)
            } else {
                let o = cx.obj(v, &p, &["virtualRouterRef", "virtualRouterARN"])?;
                cx.reference(
                    &o,
                    RefKind::VirtualRouter,
                    "virtualRouterRef",
                    "virtualRouterARN",
                    None,
                )
                .map(Provider::VirtualRouter)
            }
        });
        let addresses = self.opt(&o, "addresses", |cx, n, p| {
            cx.each(n, p, 1, usize::MAX, Cx::ip)
        });
        if o.get("provider").is_none() {
            self.warn(
                o.pos,
                &o.at("provider"),
                "no provider (virtualNode or virtualRouter): strait has nowhere to send this \
                 service's traffic, so connections to it are refused",
            );
        }
        let bad = |key: &str, ok: bool| o.get(key).is_some() && !ok;
        if bad("provider", provider.is_some()) || bad("addresses", addresses.is_some()) {
            return None;
        }
        Some(VirtualServiceSpec {
            aws_name,
            provider,
            addresses: addresses.unwrap_or_default(),
        })
    }

    // ---- VirtualRouter and routes ------------------------------------------------------------
}
