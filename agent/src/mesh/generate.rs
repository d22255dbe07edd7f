//! Synthetic mesh files for scale checks and benchmarks.
//!
//! [`large_mesh`] writes one Mesh, `nodes` VirtualNodes (each with a listener, DNS discovery
//! and a backend), `nodes` VirtualServices (the first `routers` provided by a router, the rest
//! by their node) and `routers` VirtualRouters with `routes_per_router` routes of every kind,
//! all valid. The default scale is [`large_mesh_default`].

use std::fmt::Write;

/// 2,000 nodes, 2,000 services, 500 routers × 10 routes.
pub fn large_mesh_default() -> String {
    large_mesh(2000, 500, 10)
}

pub fn large_mesh(nodes: usize, routers: usize, routes_per_router: usize) -> String {
    assert!(
        nodes > 0 && routers <= nodes,
        "BUG: need 0 < routers <= nodes"
    );
    let mut y = String::with_capacity(nodes * 1200 + routers * routes_per_router * 500);
    // 20 namespaces; resource i lives in ns{i % 20}.
    let ns = |i: usize| format!("ns{}", i % 20);
    y.push_str(
        "apiVersion: appmesh.k8s.aws/v1beta2
kind: Mesh
metadata:
  name: big
spec:
  namespaceSelector: {}
  egressFilter:
    type: DROP_ALL
",
    );
    for i in 0..nodes {
        let backend = (i + 1) % nodes;
        let _ = write!(
            y,
            "---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualNode
metadata:
  name: node-{i}
  namespace: {ns}
spec:
  podSelector:
    matchLabels:
      app: node-{i}
  listeners:
    - portMapping:
        port: 8080
        protocol: http
      healthCheck:
        protocol: http
        path: /ping
        healthyThreshold: 2
        unhealthyThreshold: 3
        intervalMillis: 5000
        timeoutMillis: 2000
  serviceDiscovery:
    dns:
      hostname: node-{i}.{ns}.svc.cluster.local
  backends:
    - virtualService:
        virtualServiceRef:
          name: svc-{backend}
          namespace: {bns}
",
            ns = ns(i),
            bns = ns(backend),
        );
    }
    for i in 0..nodes {
        let provider = if i < routers {
            format!("virtualRouter:\n      virtualRouterRef:\n        name: router-{i}")
        } else {
            format!("virtualNode:\n      virtualNodeRef:\n        name: node-{i}")
        };
        let _ = write!(
            y,
            "---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualService
metadata:
  name: svc-{i}
  namespace: {ns}
spec:
  awsName: svc-{i}.{ns}.svc.cluster.local
  provider:
    {provider}
",
            ns = ns(i),
        );
    }
    for r in 0..routers {
        let _ = write!(
            y,
            "---
apiVersion: appmesh.k8s.aws/v1beta2
kind: VirtualRouter
metadata:
  name: router-{r}
  namespace: {ns}
spec:
  listeners:
    - portMapping:
        port: 8080
        protocol: http
  routes:
",
            ns = ns(r),
        );
        for k in 0..routes_per_router {
            // A second target in the router's namespace (nodes r, r+20, r+40... share it).
            let other = (r + 20 * (k + 1)) % nodes;
            let other = if ns(other) == ns(r) { other } else { r };
            let _ = write!(
                y,
                "    - name: route-{k}
      priority: {k}
      httpRoute:
        match:
          prefix: /r{k}
          headers:
            - name: x-route
              match:
                exact: \"{k}\"
        action:
          weightedTargets:
            - virtualNodeRef:
                name: node-{other}
              weight: 90
            - virtualNodeRef:
                name: node-{r}
              weight: 10
        retryPolicy:
          maxRetries: 2
          perRetryTimeout:
            unit: ms
            value: 500
          httpRetryEvents: [server-error]
        timeout:
          perRequest:
            unit: s
            value: 15
",
            );
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn default_scale_parses_and_validates() {
        let text = super::large_mesh_default();
        let loaded = crate::mesh::parse_str(&text, Path::new("big.yaml")).unwrap();
        let c = &loaded.config;
        assert_eq!(c.virtual_nodes.len(), 2000);
        assert_eq!(c.virtual_services.len(), 2000);
        assert_eq!(c.virtual_routers.len(), 500);
        assert!(c.virtual_routers.iter().all(|r| r.spec.routes.len() == 10));
        assert!(loaded.warnings.is_empty(), "{:?}", &loaded.warnings[..1]);
    }
}
