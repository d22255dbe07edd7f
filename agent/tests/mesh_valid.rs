//! The valid corpus (`testdata/mesh/valid/*.yaml`): every file loads, and the model holds
//! what the manifest says.

use std::path::{Path, PathBuf};

use strait::mesh::*;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/mesh/valid")
}

fn load(name: &str) -> Loaded {
    let path = corpus_dir().join(name);
    match load_file(&path) {
        Ok(l) => l,
        Err(e) => panic!("{name} should load:\n{e}"),
    }
}

fn id(ns: &str, name: &str) -> ResourceId {
    ResourceId::new(ns, name)
}

fn secs(value: u64) -> Duration {
    Duration {
        unit: DurationUnit::S,
        value,
    }
}

fn millis(value: u64) -> Duration {
    Duration {
        unit: DurationUnit::Ms,
        value,
    }
}

#[test]
fn every_valid_file_loads_without_warnings_unless_it_is_about_warnings() {
    let mut n = 0;
    for entry in std::fs::read_dir(corpus_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        n += 1;
        let loaded = load_file(&path).unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
        let name = path.file_name().unwrap().to_str().unwrap();
        if name != "aws-only.yaml" {
            assert!(
                loaded.warnings.is_empty(),
                "{name}: unexpected warnings: {:#?}",
                loaded.warnings
            );
        }
        // The admin API dumps the model as JSON.
        serde_json::to_string(&loaded.config).unwrap();
    }
    assert!(n >= 7, "corpus went missing: {n} files");
}

#[test]
fn color_tcp() {
    let c = load("color-tcp.yaml").config;
    assert_eq!(c.mesh.name, "color-mesh");
    assert_eq!(c.mesh.spec.egress_filter, EgressFilter::DropAll);
    assert!(c.namespace_in_mesh("color"));
    assert!(!c.namespace_in_mesh("default"));
    assert_eq!(c.namespaces["color"]["mesh"], "color-mesh");
    assert_eq!(c.virtual_nodes.len(), 3);

    let blue = c.virtual_node(&id("color", "blue")).unwrap();
    let sel = blue.spec.pod_selector.as_ref().unwrap();
    assert_eq!(sel.match_labels["version"], "blue");
    assert_eq!(
        blue.spec.service_discovery,
        Some(ServiceDiscovery::Static {
            addresses: vec!["10.0.1.10".parse().unwrap(), "10.0.1.11".parse().unwrap()]
        })
    );

    let green = c.virtual_node(&id("color", "green")).unwrap();
    let sel = green.spec.pod_selector.as_ref().unwrap();
    let labels = |v: &str| {
        [("app", "color"), ("version", v)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert!(sel.matches(&labels("green")));
    assert!(!sel.matches(&labels("blue")));
    assert_eq!(
        green.spec.service_discovery,
        Some(ServiceDiscovery::Dns {
            hostname: "green.color.svc.cluster.local".into(),
            response_type: DnsResponseType::LoadBalancer
        })
    );

    let client = c.virtual_node(&id("color", "client")).unwrap();
    assert_eq!(client.spec.pod_selector, Some(LabelSelector::default()));
    assert!(client.spec.listeners.is_empty());
    assert_eq!(
        client.spec.backends[0].virtual_service,
        id("color", "color")
    );

    let router = c.virtual_router(&id("color", "color")).unwrap();
    let route = &router.spec.routes[0];
    assert_eq!(route.name, "split");
    assert_eq!(route.priority, None);
    let RouteKind::Tcp(tcp) = &route.kind else {
        panic!("{route:?}")
    };
    assert_eq!(tcp.r#match, Some(TcpRouteMatch { port: Some(9000) }));
    assert_eq!(
        tcp.action.weighted_targets,
        vec![
            WeightedTarget {
                virtual_node: id("color", "blue"),
                weight: 90,
                port: None
            },
            WeightedTarget {
                virtual_node: id("color", "green"),
                weight: 10,
                port: Some(9000)
            },
        ]
    );
    assert_eq!(
        tcp.timeout,
        Some(TcpTimeout {
            idle: Some(secs(600))
        })
    );

    let vs = c.virtual_service(&id("color", "color")).unwrap();
    assert_eq!(vs.hostname(), "color.color.svc.cluster.local");
    assert_eq!(
        vs.spec.addresses,
        vec![
            "10.96.0.20".parse::<std::net::IpAddr>().unwrap(),
            "fd00::20".parse().unwrap()
        ]
    );
    assert_eq!(
        vs.spec.provider,
        Some(Provider::VirtualRouter(id("color", "color")))
    );
    assert_eq!(
        summary(&c),
        "Mesh color-mesh (egress DROP_ALL)\n3 VirtualNodes (2 listeners, 1 backend)\n1 \
         VirtualService\n1 VirtualRouter (1 route)\n0 VirtualGateways\n0 GatewayRoutes"
    );
}

#[test]
fn http_routes() {
    let c = load("http-routes.yaml").config;
    let r = c.virtual_router(&id("shop", "cart")).unwrap();
    assert_eq!(r.spec.listeners.len(), 2);
    let names: Vec<&str> = r.spec.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["canary", "by-path", "exact-path", "default", "h2"]);

    let canary = &r.spec.routes[0];
    assert_eq!(canary.priority, Some(0));
    let RouteKind::Http(h) = &canary.kind else {
        panic!()
    };
    let m = &h.r#match;
    assert_eq!(m.prefix.as_deref(), Some("/"));
    assert_eq!(m.port, Some(8080));
    assert_eq!(m.method, Some(HttpMethod::Post));
    assert_eq!(m.scheme, Some(HttpScheme::Https));
    let methods: Vec<Option<MatchMethod>> = m.headers.iter().map(|h| h.r#match.clone()).collect();
    assert_eq!(
        methods,
        vec![
            Some(MatchMethod::Exact("1".into())),
            Some(MatchMethod::Prefix("curl/".into())),
            Some(MatchMethod::Suffix("-west".into())),
            Some(MatchMethod::Regex("^t[0-9]+$".into())),
            Some(MatchMethod::Range { start: 2, end: 5 }),
            None,
        ]
    );
    assert!(m.headers[5].invert && !m.headers[0].invert);
    assert_eq!(
        m.query_parameters,
        vec![
            QueryParameterMatch {
                name: "beta".into(),
                exact: Some("true".into())
            },
            QueryParameterMatch {
                name: "trace".into(),
                exact: None
            },
        ]
    );

    let RouteKind::Http(by_path) = &r.spec.routes[1].kind else {
        panic!()
    };
    assert_eq!(
        by_path.r#match.path,
        Some(PathMatch::Regex("/items/[0-9]+".into()))
    );
    assert_eq!(
        by_path.timeout,
        Some(HttpTimeout {
            per_request: Some(millis(2500)),
            idle: Some(secs(60))
        })
    );
    assert_eq!(
        by_path
            .timeout
            .as_ref()
            .unwrap()
            .per_request
            .unwrap()
            .as_std(),
        std::time::Duration::from_millis(2500)
    );
    // strait extension: the route's rate limit, the listener rateLimit's shape.
    assert_eq!(
        by_path.rate_limit,
        Some(RateLimit {
            total: Some(Bucket {
                requests_per_second: 50,
                burst: None
            }),
            per_caller: Some(Bucket {
                requests_per_second: 5,
                burst: Some(10)
            }),
            overrides: vec![RateLimitOverride {
                callers: vec![RateLimitCaller::VirtualNode(id("shop", "cart-v1"))],
                limit: Bucket {
                    requests_per_second: 20,
                    burst: None
                },
            }],
            shadow: true,
        })
    );

    let RouteKind::Http(default) = &r.spec.routes[3].kind else {
        panic!()
    };
    assert_eq!(r.spec.routes[3].priority, Some(1000));
    let retry = default.retry_policy.as_ref().unwrap();
    assert_eq!(retry.max_retries, 3);
    assert_eq!(retry.per_retry_timeout, millis(500));
    assert_eq!(
        retry.http_retry_events,
        vec![
            HttpRetryEvent::ServerError,
            HttpRetryEvent::GatewayError,
            HttpRetryEvent::ClientError,
            HttpRetryEvent::StreamError
        ]
    );
    assert_eq!(retry.tcp_retry_events, vec![TcpRetryEvent::ConnectionError]);
    assert!(retry.grpc_retry_events.is_empty());
    assert_eq!(default.action.weighted_targets.len(), 2);
    // perRequest 0 disables the timeout (App Mesh semantics); the model keeps the 0.
    assert_eq!(default.timeout.as_ref().unwrap().per_request, Some(secs(0)));

    let h2 = &r.spec.routes[4];
    assert_eq!(h2.kind.protocol(), Protocol::Http2);
    assert_eq!(h2.kind.match_port(), Some(8443));

    let v2 = c.virtual_node(&id("shop", "cart-v2")).unwrap();
    assert!(matches!(
        v2.spec.service_discovery,
        Some(ServiceDiscovery::Dns {
            response_type: DnsResponseType::Endpoints,
            ..
        })
    ));
}

#[test]
fn grpc() {
    let c = load("grpc.yaml").config;
    let r = c.virtual_router(&id("rpc", "greeter")).unwrap();
    let RouteKind::Grpc(g) = &r.spec.routes[0].kind else {
        panic!()
    };
    assert_eq!(
        g.r#match.service_name.as_deref(),
        Some("helloworld.Greeter")
    );
    assert_eq!(g.r#match.method_name.as_deref(), Some("SayHello"));
    assert_eq!(g.r#match.metadata.len(), 2);
    assert!(g.r#match.metadata[1].invert);
    let retry = g.retry_policy.as_ref().unwrap();
    assert_eq!(retry.grpc_retry_events.len(), 5);
    assert_eq!(retry.http_retry_events, vec![HttpRetryEvent::StreamError]);
    assert_eq!(g.timeout.as_ref().unwrap().per_request, Some(secs(5)));
    let RouteKind::Grpc(all) = &r.spec.routes[1].kind else {
        panic!()
    };
    assert_eq!(all.r#match, GrpcRouteMatch::default());

    let node = c.virtual_node(&id("rpc", "greeter")).unwrap();
    let l = &node.spec.listeners[0];
    let hc = l.health_check.as_ref().unwrap();
    assert_eq!(
        (hc.protocol, hc.interval_millis, hc.timeout_millis),
        (Protocol::Grpc, 300_000, 60_000)
    );
    assert_eq!(
        l.connection_pool,
        Some(ConnectionPool::Grpc { max_requests: 512 })
    );
    assert_eq!(
        l.timeout,
        Some(ListenerTimeout::Grpc(HttpTimeout {
            per_request: Some(secs(30)),
            idle: Some(secs(300))
        }))
    );
    let sel = c.mesh.spec.namespace_selector.as_ref().unwrap();
    assert_eq!(sel.match_expressions[0].operator, SelectorOperator::Exists);
}

#[test]
fn node_full() {
    let c = load("node-full.yaml").config;
    assert_eq!(c.mesh.spec.aws_name.as_deref(), Some("shop-prod"));
    assert_eq!(
        c.mesh.spec.service_discovery,
        Some(MeshServiceDiscovery {
            ip_preference: Some(IpPreference::Ipv4Only)
        })
    );
    let p = c.virtual_node(&id("shop", "payments")).unwrap();
    assert_eq!(p.labels["team"], "billing");
    assert_eq!(p.spec.aws_name.as_deref(), Some("payments_shop"));
    let l = &p.spec.listeners[0];
    assert_eq!(
        l.health_check,
        Some(HealthCheck {
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            interval_millis: 5000,
            timeout_millis: 2000,
            protocol: Protocol::Http,
            port: Some(8080),
            path: Some("/ping".into()),
        })
    );
    assert_eq!(
        l.outlier_detection,
        Some(OutlierDetection {
            max_server_errors: 5,
            interval: secs(10),
            base_ejection_duration: secs(30),
            max_ejection_percent: 50,
        })
    );
    assert_eq!(
        l.connection_pool,
        Some(ConnectionPool::Http {
            max_connections: 100,
            max_pending_requests: Some(50)
        })
    );
    let tls = l.tls.as_ref().unwrap();
    assert_eq!(tls.mode, TlsMode::Strict);
    assert_eq!(
        tls.certificate,
        TlsCertificate::File {
            certificate_chain: "/etc/strait/certs/payments.pem".into(),
            private_key: "/etc/strait/certs/payments-key.pem".into()
        }
    );
    let v = tls.validation.as_ref().unwrap();
    assert_eq!(
        v.trust,
        TlsTrust::File {
            certificate_chain: "/etc/strait/certs/ca.pem".into()
        }
    );
    assert_eq!(
        v.subject_alternative_names,
        vec!["spiffe://shop.local/ns/shop/sa/frontend".to_string()]
    );
    assert_eq!(
        l.rate_limit,
        Some(RateLimit {
            total: Some(Bucket {
                requests_per_second: 200,
                burst: Some(400)
            }),
            per_caller: Some(Bucket {
                requests_per_second: 20,
                burst: None
            }),
            overrides: vec![RateLimitOverride {
                callers: vec![
                    RateLimitCaller::VirtualNode(ResourceId::new("shop", "ledger")),
                    RateLimitCaller::Identity("spiffe://shop.local/ns/shop/sa/frontend".into()),
                ],
                limit: Bucket {
                    requests_per_second: 100,
                    burst: Some(150)
                },
            }],
            shadow: true,
        })
    );
    assert_eq!(
        p.spec.listeners[1].timeout,
        Some(ListenerTimeout::Tcp(TcpTimeout {
            idle: Some(millis(30000))
        }))
    );

    // ARN → the resource name in the referrer's namespace.
    let b = &p.spec.backends[0];
    assert_eq!(b.virtual_service, id("shop", "ledger"));
    let cp = b.client_policy.as_ref().unwrap();
    let ctls = cp.tls.as_ref().unwrap();
    assert!(ctls.enforce);
    assert_eq!(ctls.ports, vec![8443]);
    assert!(matches!(
        ctls.certificate,
        Some(TlsCertificate::File { .. })
    ));
    assert_eq!(
        cp.circuit_breaker,
        Some(CircuitBreaker {
            max_connections: Some(64),
            max_pending_requests: Some(32),
            max_requests: Some(256),
            max_retries: Some(3),
        })
    );
    let defaults = p
        .spec
        .backend_defaults
        .as_ref()
        .unwrap()
        .client_policy
        .as_ref()
        .unwrap();
    assert!(
        defaults.tls.as_ref().unwrap().enforce,
        "enforce defaults to true"
    );
    assert_eq!(
        defaults.circuit_breaker.as_ref().unwrap().max_requests,
        Some(1000)
    );
    let log = p
        .spec
        .logging
        .as_ref()
        .unwrap()
        .access_log
        .as_ref()
        .unwrap();
    assert_eq!(log.path, "/dev/stdout");
    let Some(LogFormat::Json(fields)) = &log.format else {
        panic!()
    };
    assert_eq!(fields[0].key, "code");
    assert_eq!(fields[0].value, "%RESPONSE_CODE%");

    let ledger = c.virtual_node(&id("shop", "ledger")).unwrap();
    let fmt = &ledger
        .spec
        .logging
        .as_ref()
        .unwrap()
        .access_log
        .as_ref()
        .unwrap()
        .format;
    assert_eq!(
        fmt,
        &Some(LogFormat::Text(
            "[%START_TIME%] %REQ(:METHOD)% %RESPONSE_CODE%\n".into()
        ))
    );
    let vs = c.virtual_service(&id("shop", "ledger")).unwrap();
    assert_eq!(
        vs.spec.provider,
        Some(Provider::VirtualNode(id("shop", "ledger")))
    );
}

#[test]
fn gateway() {
    let c = load("gateway.yaml").config;
    let gw = c.virtual_gateway(&id("edge", "ingress")).unwrap();
    assert_eq!(gw.spec.listeners.len(), 2);
    let l = &gw.spec.listeners[0];
    assert_eq!(l.port_mapping.protocol, Protocol::Http);
    assert_eq!(
        l.health_check.as_ref().unwrap().path.as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        l.connection_pool,
        Some(ConnectionPool::Http {
            max_connections: 1024,
            max_pending_requests: None
        })
    );
    assert_eq!(l.tls.as_ref().unwrap().mode, TlsMode::Strict);
    let cp = gw
        .spec
        .backend_defaults
        .as_ref()
        .unwrap()
        .client_policy
        .as_ref()
        .unwrap();
    assert!(!cp.tls.as_ref().unwrap().enforce);

    let routes: Vec<String> = c
        .gateway_routes_for(gw)
        .iter()
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(routes, ["web/shop-http", "edge/rpc", "web/shop-exact"]);

    let shop = c.gateway_route(&id("web", "shop-http")).unwrap();
    assert_eq!(shop.spec.priority, Some(10));
    let GatewayRouteKind::Http(h) = &shop.spec.kind else {
        panic!()
    };
    assert_eq!(h.r#match.prefix.as_deref(), Some("/shop"));
    assert_eq!(
        h.r#match.hostname,
        Some(HostnameMatch::Suffix(".example.com".into()))
    );
    assert_eq!(h.r#match.method, Some(HttpMethod::Get));
    assert_eq!(h.r#match.port, Some(8443));
    assert_eq!(
        h.action.target,
        GatewayRouteTarget {
            virtual_service: id("web", "shop"),
            port: Some(8080)
        }
    );
    let rw = h.action.rewrite.as_ref().unwrap();
    assert_eq!(rw.prefix.as_ref().unwrap().value.as_deref(), Some("/"));
    assert_eq!(rw.hostname, Some(Toggle::Disabled));

    let exact = c.gateway_route(&id("web", "shop-exact")).unwrap();
    let GatewayRouteKind::Http2(h2) = &exact.spec.kind else {
        panic!()
    };
    assert_eq!(h2.r#match.path, Some(PathMatch::Exact("/login".into())));
    let rw = h2.action.rewrite.as_ref().unwrap();
    assert_eq!(rw.path.as_deref(), Some("/auth/login"));
    assert_eq!(
        rw.prefix.as_ref().unwrap().default_prefix,
        Some(Toggle::Disabled)
    );

    let rpc = c.gateway_route(&id("edge", "rpc")).unwrap();
    assert_eq!(rpc.spec.virtual_gateway, Some(id("edge", "ingress")));
    let GatewayRouteKind::Grpc(g) = &rpc.spec.kind else {
        panic!()
    };
    assert_eq!(g.r#match.service_name.as_deref(), Some("shop.Catalog"));
    assert_eq!(g.action.target.virtual_service, id("web", "shop"));
    assert_eq!(g.action.rewrite_hostname, Some(Toggle::Enabled));
    assert_eq!(rpc.spec.kind.target().virtual_service, id("web", "shop"));
}

#[test]
fn aws_only_fields_load_with_warnings() {
    let loaded = load("aws-only.yaml");
    let messages: Vec<String> = loaded
        .warnings
        .iter()
        .map(|d| format!("{}: {}", d.path, d.message))
        .collect();
    let expect = [
        "Mesh aws: spec.meshOwner: AWS-only",
        "VirtualNode aws/api: spec.listeners[0].tls.validation.trust.sds: SDS",
        "VirtualNode aws/api: spec.serviceDiscovery.awsCloudMap: AWS-only",
        "VirtualNode aws/api: spec.backends[0].virtualService.clientPolicy.tls.certificate.sds: SDS",
    ];
    for e in expect {
        assert!(
            messages.iter().any(|m| m.starts_with(e)),
            "missing warning {e:?} in {messages:#?}"
        );
    }
    assert_eq!(messages.len(), expect.len(), "{messages:#?}");
    let c = loaded.config;
    let api = c.virtual_node(&id("aws", "api")).unwrap();
    assert!(matches!(
        api.spec.service_discovery,
        Some(ServiceDiscovery::AwsCloudMap { .. })
    ));
    assert_eq!(c.mesh.spec.mesh_owner.as_deref(), Some("123456789012"));
}

#[test]
fn kubectl_list() {
    let c = load("kubectl-list.yaml").config;
    assert_eq!(c.mesh.name, "listed");
    let app = c.virtual_node(&id("default", "app")).unwrap();
    assert_eq!(app.spec.listeners[0].port_mapping.port, 80);
    assert_eq!(
        c.virtual_service(&id("default", "app"))
            .unwrap()
            .spec
            .provider,
        Some(Provider::VirtualNode(id("default", "app")))
    );
}
