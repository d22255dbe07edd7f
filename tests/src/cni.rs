//! A CNI runtime, as containerd and CRI-O run one: a network configuration list executed per
//! the CNI spec (one plugin process after the other, the configuration on stdin with `name`,
//! `cniVersion`, `prevResult` and `runtimeConfig` filled in, `CNI_*` in the environment, DEL
//! in reverse order), in a node's network namespace. The plugins are real: Debian's
//! `containernetworking-plugins` (in [`PLUGIN_DIR`]) and `strait-cni`.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use crate::node::Node;

/// Where Debian's `containernetworking-plugins` installs the reference plugins.
pub const PLUGIN_DIR: &str = "/usr/lib/cni";
/// How long one plugin may run.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// What one plugin printed.
#[derive(Debug, Clone)]
pub struct PluginOutput {
    pub plugin: String,
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub success: bool,
}

/// One pod's attachment: what a runtime keeps between ADD and DEL.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// `CNI_ARGS`, as Kubernetes runtimes pass them.
    pub args: String,
    /// `runtimeConfig` for plugins that declare the capability (e.g. `portMappings`).
    pub runtime_config: BTreeMap<String, Value>,
}

impl Attachment {
    /// A pod's attachment with the `CNI_ARGS` containerd passes.
    pub fn kubernetes(
        container_id: &str,
        netns: &Path,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Attachment {
        Attachment {
            container_id: container_id.to_string(),
            netns: netns.to_path_buf(),
            ifname: "eth0".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}"
            ),
            runtime_config: BTreeMap::new(),
        }
    }
}

/// A runtime for one node and one configuration list.
pub struct Runtime {
    node: Node,
    list: Value,
    /// `CNI_PATH`.
    path: Vec<PathBuf>,
}

impl Runtime {
    /// `list` is a `.conflist` document; plugins are looked for in `path`, in order.
    pub fn new(node: &Node, list: Value, path: Vec<PathBuf>) -> anyhow::Result<Runtime> {
        if !list["plugins"].is_array() {
            bail!("a configuration list needs `plugins`: {list}");
        }
        Ok(Runtime {
            node: node.clone(),
            list,
            path,
        })
    }

    fn find(&self, kind: &str) -> anyhow::Result<PathBuf> {
        self.path
            .iter()
            .map(|dir| dir.join(kind))
            .find(|p| p.exists())
            .with_context(|| {
                format!(
                    "CNI plugin `{kind}` not found in {:?}; install Debian's containernetworking-plugins (`cargo xtask setup`)",
                    self.path
                )
            })
    }

    /// The stdin of one plugin of the list.
    fn plugin_config(&self, plugin: &Value, att: &Attachment, prev: Option<&Value>) -> Value {
        let mut config = plugin.clone();
        config["name"] = self.list["name"].clone();
        config["cniVersion"] = self.list["cniVersion"].clone();
        if let Some(prev) = prev {
            config["prevResult"] = prev.clone();
        }
        let wanted: BTreeMap<String, Value> = plugin["capabilities"]
            .as_object()
            .map(|caps| {
                caps.iter()
                    .filter(|(_, on)| on.as_bool() == Some(true))
                    .filter_map(|(cap, _)| {
                        Some((cap.clone(), att.runtime_config.get(cap)?.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if !wanted.is_empty() {
            config["runtimeConfig"] = json!(wanted);
        }
        config
    }

    /// Runs one plugin with `command`.
    pub fn exec(
        &self,
        command: &str,
        plugin: &Value,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> anyhow::Result<PluginOutput> {
        let kind = plugin["type"].as_str().context("a plugin without `type`")?;
        let binary = self.find(kind)?;
        let stdin = self.plugin_config(plugin, att, prev).to_string();
        let cni_path = std::env::join_paths(&self.path)?;
        let mut child = self
            .node
            .command(&binary)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", &att.args)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("run CNI plugin {}", binary.display()))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(stdin.as_bytes())?;
        let mut out = child.stdout.take().context("stdout")?;
        let mut err = child.stderr.take().context("stderr")?;
        let out_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let err_reader = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + PLUGIN_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("CNI plugin {kind} {command} ran over {PLUGIN_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        Ok(PluginOutput {
            plugin: kind.to_string(),
            stdin,
            stdout: out_reader.join().unwrap_or_default(),
            stderr: err_reader.join().unwrap_or_default(),
            success: status.success(),
        })
    }

    fn plugins(&self) -> Vec<Value> {
        self.list["plugins"].as_array().cloned().unwrap_or_default()
    }

    /// ADD through the whole list, each plugin getting the previous one's result. Returns
    /// every plugin's output; stops at the first failure (the last output is the failure).
    pub fn add(&self, att: &Attachment) -> anyhow::Result<Vec<PluginOutput>> {
        let mut outputs = Vec::new();
        let mut prev: Option<Value> = None;
        for plugin in self.plugins() {
            let output = self.exec("ADD", &plugin, att, prev.as_ref())?;
            let success = output.success;
            if success {
                prev = Some(serde_json::from_str(&output.stdout).with_context(|| {
                    format!(
                        "plugin {} printed no JSON result: {:?}",
                        output.plugin, output.stdout
                    )
                })?);
            }
            outputs.push(output);
            if !success {
                break;
            }
        }
        Ok(outputs)
    }

    /// DEL through the list in reverse order, with the cached result as `prevResult`; every
    /// plugin runs even when one fails.
    pub fn del(
        &self,
        att: &Attachment,
        result: Option<&Value>,
    ) -> anyhow::Result<Vec<PluginOutput>> {
        let mut outputs = Vec::new();
        for plugin in self.plugins().iter().rev() {
            outputs.push(self.exec("DEL", plugin, att, result)?);
        }
        Ok(outputs)
    }

    /// CHECK through the list with the cached result.
    pub fn check(&self, att: &Attachment, result: &Value) -> anyhow::Result<Vec<PluginOutput>> {
        let mut outputs = Vec::new();
        for plugin in self.plugins() {
            let output = self.exec("CHECK", &plugin, att, Some(result))?;
            let success = output.success;
            outputs.push(output);
            if !success {
                break;
            }
        }
        Ok(outputs)
    }

    /// The loopback network a runtime sets up first, on `lo`.
    pub fn loopback(node: &Node, version: &str) -> anyhow::Result<Runtime> {
        Runtime::new(
            node,
            json!({"cniVersion": version, "name": "cni-loopback", "plugins": [{"type": "loopback"}]}),
            vec![PathBuf::from(PLUGIN_DIR)],
        )
    }
}
