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
    servers: Servers,
    every_address: bool,
    outside: PodSpec,
    outside_server: Option<String>,
    services: Vec<(String, Vec<IpAddr>)>,
    refused: Vec<String>,
    mesh: Option<String>,
}

impl Scenario {
    /// A scenario for the test `test` (it names the testbed): by default `strait-http` servers,
    /// color records with each pod's IPv4 address, and an outside pod `nothing` in namespace
    /// `elsewhere` that runs nothing.
    pub fn builder(test: &str) -> ScenarioBuilder {
        ScenarioBuilder {
            test: test.to_owned(),
            driver: CgroupDriver::Systemd,
            servers: Servers::Http,
            every_address: false,
            outside: PodSpec::new("nothing", "elsewhere"),
            outside_server: None,
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

    /// The server the color pods run.
    pub fn servers(mut self, servers: Servers) -> Self {
        self.servers = servers;
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
        let node = tb.add_node_with_driver("node1", self.driver)?;
        let client = node.add_pod(&PodSpec::new("client", "app").label("app", "client"))?;
        let color = |version: &str| {
            node.add_pod(
                &PodSpec::new(&format!("color-{version}"), "app")
                    .label("app", "color")
                    .label("version", version),
            )
        };
        let v1 = color("v1")?;
        let v2 = color("v2")?;
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
        tb.dns_record("color-v1.app.svc.cluster.local", &addresses(&v1))?;
        tb.dns_record("color-v2.app.svc.cluster.local", &addresses(&v2))?;
        for name in &self.refused {
            tb.dns_record(name, &[outside.ipv4().into()])?;
        }
        let serve = |pod: &Pod, name: &str| match self.servers {
            Servers::Peer => echo_server(&tb, pod, 8080, name),
            Servers::Http => http_server(&tb, pod, 8080, name),
        };
        let mut servers = vec![serve(&v1, "v1")?, serve(&v2, "v2")?];
        if let Some(name) = &self.outside_server {
            servers.push(serve(&outside, name)?);
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
            outside,
            servers,
        };
        if let Some(text) = &self.mesh {
            scenario.write_mesh(text)?;
        }
        Ok(scenario)
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
