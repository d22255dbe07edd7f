//! The one-node shape most end-to-end tests start from, built in one call: a node (where the
//! test starts its agent), a `client` pod, two backend pods `color-v1` and `color-v2` running a
//! server, a pod outside the mesh, the DNS records that name them, and the path of the mesh
//! file. The client and the color pods are enrolled (their workload files written); the
//! outside pod is not.
//!
//! ```text
//! client (app: client)                  10.244.1.2   enrolled
//! color-v1 (app: color, version: v1)    10.244.1.3   enrolled, server "v1" on 8080
//! color-v2 (app: color, version: v2)    10.244.1.4   enrolled, server "v2" on 8080
//! outside (default: nothing/elsewhere)  10.244.1.5   not enrolled
//! ```
//!
//! Pods are made in that order, so their addresses are always the same. A test adds what is
//! particular to it (more pods, more servers, certificates) to the [`Scenario`] it gets back.
//! Tests with agents on several nodes give each agent [`peer_node_args`].
//!
//! Those are the defaults the end-to-end tests rely on. `cargo xtask demo` and `cargo xtask
//! metrics-plot` build the same shape under their own names ([`ScenarioBuilder::namespace`],
//! [`ScenarioBuilder::client`], [`ScenarioBuilder::server_names`]), with more pods made
//! between the color pods and the outside pod ([`ScenarioBuilder::pod`]), and in a testbed
//! they made first ([`ScenarioBuilder::build_in`]).

use std::net::IpAddr;
use std::path::PathBuf;

use crate::agent::{echo_server, http_server, strait_ok};
use crate::kubelet::CgroupDriver;
use crate::{Node, Pod, PodSpec, Process, Testbed, addr};

/// The server the color pods (and, if asked, the outside pod) run on port 8080, both families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Servers {
    /// `strait-peer serve` (TCP: it answers each connection with its name).
    Peer,
    /// `strait-http serve` (HTTP/1.1 and HTTP/2: it answers each request with its name).
    Http,
}

/// A built scenario. Dropping it (the [`Testbed`] first) removes everything.
pub struct Scenario {
    pub tb: Testbed,
    pub node: Node,
    pub client: Pod,
    pub v1: Pod,
    pub v2: Pod,
    /// The pods asked for with [`ScenarioBuilder::pod`], in that order (not enrolled).
    pub pods: Vec<Pod>,
    pub outside: Pod,
    /// `<temp dir>/mesh.yaml`, written by [`ScenarioBuilder::mesh`] or [`Scenario::write_mesh`].
    pub mesh: PathBuf,
    /// The servers, in the order they were started (v1, v2, then the outside pod's).
    pub servers: Vec<Process>,
}

/// What [`Scenario::builder`] collects; [`ScenarioBuilder::build`] makes it.
#[derive(Debug, Clone)]
pub struct ScenarioBuilder {
    test: String,
    driver: CgroupDriver,
    namespace: String,
    client: String,
    servers: Servers,
    server_names: [String; 2],
    every_address: bool,
    pods: Vec<PodSpec>,
    outside: PodSpec,
    outside_server: Option<String>,
    outside_servers: Option<Servers>,
    services: Vec<(String, Vec<IpAddr>)>,
    refused: Vec<String>,
    mesh: Option<String>,
}

impl Scenario {
    /// A scenario for the test `test` (it names the testbed): by default the pods `client`,
    /// `color-v1` and `color-v2` in namespace `app`, `strait-http` servers named `v1` and `v2`,
    /// color records with each pod's IPv4 address, and an outside pod `nothing` in namespace
    /// `elsewhere` that runs nothing.
    pub fn builder(test: &str) -> ScenarioBuilder {
        ScenarioBuilder {
            test: test.to_owned(),
            driver: CgroupDriver::Systemd,
            namespace: "app".to_owned(),
            client: "client".to_owned(),
            servers: Servers::Http,
            server_names: ["v1".to_owned(), "v2".to_owned()],
            every_address: false,
            pods: Vec::new(),
            outside: PodSpec::new("nothing", "elsewhere"),
            outside_server: None,
            outside_servers: None,
            services: Vec::new(),
            refused: Vec::new(),
            mesh: None,
        }
    }

    /// Writes `text` as the mesh file ([`Scenario::mesh`]), for a mesh that needs the
    /// testbed's paths (certificates, logs).
    pub fn write_mesh(&self, text: &str) -> anyhow::Result<()> {
        std::fs::write(&self.mesh, text)?;
        Ok(())
    }

    /// `<temp dir>/certs`, where [`Scenario::issue_certs`] puts the mesh's certificates.
    pub fn certs(&self) -> PathBuf {
        self.tb.temp_dir().join("certs")
    }

    /// `strait ca init` in `<temp dir>/ca`, then `strait ca issue` of the mesh file's
    /// certificates (into the paths it names) valid for `days`.
    pub fn issue_certs(&self, days: i64) -> anyhow::Result<()> {
        let ca = self.tb.temp_dir().join("ca").display().to_string();
        strait_ok(&self.node, &["ca", "init", "--dir", &ca])?;
        strait_ok(
            &self.node,
            &[
                "ca",
                "issue",
                "--mesh",
                &self.mesh.display().to_string(),
                "--ca-dir",
                &ca,
                "--days",
                &days.to_string(),
            ],
        )?;
        Ok(())
    }
}

impl ScenarioBuilder {
    /// The node's kubelet cgroup driver (how its pod cgroups are named).
    pub fn cgroup_driver(mut self, driver: CgroupDriver) -> Self {
        self.driver = driver;
        self
    }

    /// The namespace of the client and color pods, and of the color records
    /// (`color-v1.<namespace>.svc.cluster.local`).
    pub fn namespace(mut self, namespace: &str) -> Self {
        self.namespace = namespace.to_owned();
        self
    }

    /// The client pod's name, which is also its `app` label.
    pub fn client(mut self, name: &str) -> Self {
        self.client = name.to_owned();
        self
    }

    /// The server the color pods run.
    pub fn servers(mut self, servers: Servers) -> Self {
        self.servers = servers;
        self
    }

    /// The names the color pods' servers answer with (by default `v1` and `v2`).
    pub fn server_names(mut self, v1: &str, v2: &str) -> Self {
        self.server_names = [v1.to_owned(), v2.to_owned()];
        self
    }

    /// One more pod, made after the color pods and before the outside pod (so it takes the
    /// address after color-v2's), with no server and not enrolled: [`Scenario::pods`].
    pub fn pod(mut self, spec: PodSpec) -> Self {
        self.pods.push(spec);
        self
    }

    /// The color records carry each pod's IPv4 and IPv6 addresses (two endpoints per pod)
    /// instead of its IPv4 address only.
    pub fn every_address(mut self) -> Self {
        self.every_address = true;
        self
    }

    /// The pod outside the mesh, and the name of the server it runs (the color pods' kind), if
    /// any.
    pub fn outside(mut self, spec: PodSpec, server: Option<&str>) -> Self {
        self.outside = spec;
        self.outside_server = server.map(str::to_owned);
        self
    }

    /// The kind of server the outside pod runs, when it runs one (by default the color pods'
    /// kind).
    pub fn outside_servers(mut self, servers: Servers) -> Self {
        self.outside_servers = Some(servers);
        self
    }

    /// A DNS record for a virtual service: `name` answers `addrs` (service addresses).
    pub fn service(mut self, name: &str, addrs: &[IpAddr]) -> Self {
        self.services.push((name.to_owned(), addrs.to_vec()));
        self
    }

    /// A DNS record `name` that answers the outside pod's IPv4 address: an endpoint that
    /// refuses connections when the outside pod runs no server.
    pub fn refused(mut self, name: &str) -> Self {
        self.refused.push(name.to_owned());
        self
    }

    /// The mesh file's text, written when the scenario is built.
    pub fn mesh(mut self, text: impl Into<String>) -> Self {
        self.mesh = Some(text.into());
        self
    }

    /// Makes the testbed, node, pods, DNS records and servers, enrolls the client and color
    /// pods, and writes the mesh file if one was given.
    pub fn build(self) -> anyhow::Result<Scenario> {
        let tb = Testbed::new(&self.test)?;
        self.build_in(tb)
    }

    /// [`ScenarioBuilder::build`] in a testbed the caller made (say, to install a Ctrl-C
    /// handler with its cleanup handle before anything is created); the name given to
    /// [`Scenario::builder`] is then not used.
    pub fn build_in(self, tb: Testbed) -> anyhow::Result<Scenario> {
        let node = tb.add_node_with_driver("node1", self.driver)?;
        let [client_spec, v1_spec, v2_spec] = self.mesh_pods();
        let client = node.add_pod(&client_spec)?;
        let v1 = node.add_pod(&v1_spec)?;
        let v2 = node.add_pod(&v2_spec)?;
        let pods = self
            .pods
            .iter()
            .map(|spec| node.add_pod(spec))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let outside = node.add_pod(&self.outside)?;
        for (name, addrs) in &self.services {
            tb.dns_record(name, addrs)?;
        }
        let addresses = |pod: &Pod| -> Vec<IpAddr> {
            if self.every_address {
                pod.ips()
            } else {
                vec![pod.ipv4().into()]
            }
        };
        let [v1_record, v2_record] = self.color_records();
        tb.dns_record(&v1_record, &addresses(&v1))?;
        tb.dns_record(&v2_record, &addresses(&v2))?;
        for name in &self.refused {
            tb.dns_record(name, &[outside.ipv4().into()])?;
        }
        let serve = |servers: Servers, pod: &Pod, name: &str| match servers {
            Servers::Peer => echo_server(&tb, pod, 8080, name),
            Servers::Http => http_server(&tb, pod, 8080, name),
        };
        let [v1_name, v2_name] = &self.server_names;
        let mut servers = vec![
            serve(self.servers, &v1, v1_name)?,
            serve(self.servers, &v2, v2_name)?,
        ];
        if let Some(name) = &self.outside_server {
            let kind = self.outside_servers.unwrap_or(self.servers);
            servers.push(serve(kind, &outside, name)?);
        }
        for pod in [&client, &v1, &v2] {
            node.write_workload(pod)?;
        }
        let scenario = Scenario {
            mesh: tb.temp_dir().join("mesh.yaml"),
            tb,
            node,
            client,
            v1,
            v2,
            pods,
            outside,
            servers,
        };
        if let Some(text) = &self.mesh {
            scenario.write_mesh(text)?;
        }
        Ok(scenario)
    }

    /// The client, color-v1 and color-v2 pods, in the order they are made.
    fn mesh_pods(&self) -> [PodSpec; 3] {
        let ns = &self.namespace;
        let color = |version: &str| {
            PodSpec::new(&format!("color-{version}"), ns)
                .label("app", "color")
                .label("version", version)
        };
        [
            PodSpec::new(&self.client, ns).label("app", &self.client),
            color("v1"),
            color("v2"),
        ]
    }

    /// The DNS names of color-v1's and color-v2's endpoints (their service discovery).
    fn color_records(&self) -> [String; 2] {
        ["v1", "v2"].map(|v| format!("color-{v}.{}.svc.cluster.local", self.namespace))
    }
}

/// The `--peer-node` arguments that tell an agent where the pods of each of `others` are: its
/// IPv4 pod range (and with `ipv6` its IPv6 range) at its underlay address.
pub fn peer_node_args<'a>(others: impl IntoIterator<Item = &'a Node>, ipv6: bool) -> Vec<String> {
    let mut args = Vec::new();
    for other in others {
        args.push("--peer-node".into());
        args.push(format!(
            "{}/24={}",
            addr::pod_subnet_v4(other.index()),
            other.underlay_ip()
        ));
        if ipv6 {
            args.push("--peer-node".into());
            args.push(format!(
                "{}/64={}",
                addr::pod_subnet_v6(other.index()),
                other.underlay_ip()
            ));
        }
    }
    args
}

/// The arguments that make an agent take its identities from the identity service at `url`
/// (`strait ca serve`), proving its node with the node certificate folder `node_cert` and
/// keeping what it is issued in `identity_dir`.
pub fn identity_service_args(
    url: &str,
    node_cert: &std::path::Path,
    identity_dir: &std::path::Path,
) -> Vec<String> {
    vec![
        "--identity-service".to_string(),
        url.to_string(),
        "--node-cert".to_string(),
        node_cert.display().to_string(),
        "--identity-dir".to_string(),
        identity_dir.display().to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::{Scenario, Servers};
    use crate::PodSpec;

    /// The end-to-end tests' meshes name these pods and records: the defaults must not move.
    #[test]
    fn the_defaults_are_the_end_to_end_shape() {
        let builder = Scenario::builder("t");
        assert_eq!(
            builder.mesh_pods(),
            [
                PodSpec::new("client", "app").label("app", "client"),
                PodSpec::new("color-v1", "app")
                    .label("app", "color")
                    .label("version", "v1"),
                PodSpec::new("color-v2", "app")
                    .label("app", "color")
                    .label("version", "v2"),
            ]
        );
        assert_eq!(
            builder.color_records(),
            [
                "color-v1.app.svc.cluster.local",
                "color-v2.app.svc.cluster.local"
            ]
        );
        assert_eq!(builder.server_names, ["v1", "v2"]);
        assert_eq!(builder.servers, Servers::Http);
        assert_eq!(builder.outside, PodSpec::new("nothing", "elsewhere"));
        assert!(builder.pods.is_empty() && builder.outside_servers.is_none());
    }

    #[test]
    fn names_and_namespace_follow_the_options() {
        let builder = Scenario::builder("t")
            .namespace("demo")
            .client("front")
            .server_names("color-v1", "color-v2");
        let [client, v1, _] = builder.mesh_pods();
        assert_eq!(client, PodSpec::new("front", "demo").label("app", "front"));
        assert_eq!(
            v1,
            PodSpec::new("color-v1", "demo")
                .label("app", "color")
                .label("version", "v1")
        );
        assert_eq!(
            builder.color_records(),
            [
                "color-v1.demo.svc.cluster.local",
                "color-v2.demo.svc.cluster.local"
            ]
        );
        assert_eq!(builder.server_names, ["color-v1", "color-v2"]);
    }
}
