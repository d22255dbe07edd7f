//! `strait-cni install` and `strait-cni uninstall`: put the plugin on a node and chain it into
//! the node's CNI configuration, or take it out again (deploy/daemonset.yaml's init container,
//! deploy/uninstall.yaml).
//!
//! The runtime uses the first configuration file of its configuration folder in name order
//! (`*.conflist`, `*.conf`, `*.json`), so that is the one chained into: `strait-cni` is
//! appended to its `plugins` (a single-plugin `.conf` becomes a `.conflist` holding it and
//! strait-cni). Both commands are idempotent, and every file is replaced by rename, so a
//! runtime never reads half a file.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The plugin's name in `/opt/cni/bin` and its `type` in a configuration.
pub const PLUGIN: &str = "strait-cni";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{0}\nusage: strait-cni install --bin-dir DIR --conf-dir DIR [--agent-socket PATH] [--fail-policy closed|open]\n       strait-cni uninstall --bin-dir DIR --conf-dir DIR"
    )]
    Usage(String),
    #[error(
        "no CNI configuration (*.conflist, *.conf, *.json) in {0} yet: the node's network plugin writes it; run install again once it is there"
    )]
    NoConfiguration(PathBuf),
    #[error("{path}: {message}")]
    Configuration { path: PathBuf, message: String },
    /// The cause is in the message: `main` prints the message alone.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |cause| Error::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// Options of `install`.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    pub agent_socket: Option<String>,
    pub fail_policy: Option<String>,
}

/// Parses the command line of `install` / `uninstall` and runs it.
pub fn main(command: &str, args: &[String]) -> Result<String, Error> {
    let mut options = Options::default();
    let mut bin_dir = None;
    let mut conf_dir = None;
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag, Some(value.to_string())),
            None => (arg.as_str(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| iter.next().cloned())
                .ok_or_else(|| Error::Usage(format!("{flag} needs a value")))
        };
        match flag {
            "--bin-dir" => bin_dir = Some(PathBuf::from(value()?)),
            "--conf-dir" => conf_dir = Some(PathBuf::from(value()?)),
            "--agent-socket" if command == "install" => options.agent_socket = Some(value()?),
            "--fail-policy" if command == "install" => {
                let policy = value()?;
                if policy != "closed" && policy != "open" {
                    return Err(Error::Usage(format!(
                        "--fail-policy: `{policy}`: expected closed or open"
                    )));
                }
                options.fail_policy = Some(policy);
            }
            other => return Err(Error::Usage(format!("unknown argument `{other}`"))),
        }
    }
    options.bin_dir = bin_dir.ok_or_else(|| Error::Usage("--bin-dir is required".into()))?;
    options.conf_dir = conf_dir.ok_or_else(|| Error::Usage("--conf-dir is required".into()))?;
    match command {
        "install" => {
            let binary = std::env::current_exe().map_err(io(Path::new("/proc/self/exe")))?;
            install(&options, &binary)
        }
        "uninstall" => uninstall(&options),
        other => Err(Error::Usage(format!("unknown command `{other}`"))),
    }
}

/// The configuration file the runtime uses: the first in name order.
pub fn first_configuration(conf_dir: &Path) -> Result<Option<PathBuf>, Error> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.is_file()
                && path
                    .extension()
                    .is_some_and(|e| e == "conflist" || e == "conf" || e == "json")
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{}.strait-tmp", name.unwrap_or_default()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Our entry in a plugin list.
fn entry(options: &Options) -> Value {
    let mut entry = json!({"type": PLUGIN});
    if let Some(socket) = &options.agent_socket {
        entry["agentSocket"] = json!(socket);
    }
    if let Some(policy) = &options.fail_policy {
        entry["failPolicy"] = json!(policy);
    }
    entry
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN)
}

/// Copies `binary` into the bin folder and chains the plugin into the first configuration.
pub fn install(options: &Options, binary: &Path) -> Result<String, Error> {
    let bytes = std::fs::read(binary).map_err(io(binary))?;
    let target = options.bin_dir.join(PLUGIN);
    write_atomic(&target, &bytes, 0o755)?;
    let path = first_configuration(&options.conf_dir)?
        .ok_or_else(|| Error::NoConfiguration(options.conf_dir.clone()))?;
    let text = std::fs::read(&path).map_err(io(&path))?;
    let bad = |message: String| Error::Configuration {
        path: path.clone(),
        message,
    };
    let mut config: Value = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("line {}, column {}: {e}", e.line(), e.column())))?;
    let object = config
        .as_object_mut()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let (out_path, mut list) = if object.contains_key("plugins") {
        (path.clone(), config)
    } else {
        // A single-plugin .conf: the same network as a list, so a plugin can follow it.
        let mut plugin = config.clone();
        let plugin_object = plugin.as_object_mut().expect("checked above");
        let version = plugin_object.remove("cniVersion");
        let name = plugin_object.remove("name");
        (
            path.with_extension("conflist"),
            json!({"cniVersion": version, "name": name, "plugins": [plugin]}),
        )
    };
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| bad("field `plugins`: expected a list of plugin configurations".into()))?;
    plugins.retain(|p| !is_ours(p));
    if plugins.is_empty() {
        return Err(bad(
            "field `plugins` is empty: strait-cni must follow the plugin that sets up the pod's interface".into(),
        ));
    }
    plugins.push(entry(options));
    let mut text = serde_json::to_vec_pretty(&list).map_err(|e| bad(e.to_string()))?;
    text.push(b'\n');
    write_atomic(&out_path, &text, 0o644)?;
    if out_path != path {
        std::fs::remove_file(&path).map_err(io(&path))?;
    }
    Ok(format!(
        "installed {} and chained {PLUGIN} into {}",
        target.display(),
        out_path.display()
    ))
}

/// Takes the plugin out of every configuration list and deletes the binary.
pub fn uninstall(options: &Options) -> Result<String, Error> {
    let mut changed = Vec::new();
    if options.conf_dir.exists() {
        for entry in std::fs::read_dir(&options.conf_dir).map_err(io(&options.conf_dir))? {
            let path = entry.map_err(io(&options.conf_dir))?.path();
            if !path
                .extension()
                .is_some_and(|e| e == "conflist" || e == "json")
            {
                continue;
            }
            let Ok(mut config) =
                serde_json::from_slice::<Value>(&std::fs::read(&path).map_err(io(&path))?)
            else {
                continue;
            };
            let Some(plugins) = config.get_mut("plugins").and_then(Value::as_array_mut) else {
                continue;
            };
            let before = plugins.len();
            plugins.retain(|p| !is_ours(p));
            if plugins.len() != before {
                let mut text = serde_json::to_vec_pretty(&config).expect("a JSON value");
                text.push(b'\n');
                write_atomic(&path, &text, 0o644)?;
                changed.push(path.display().to_string());
            }
        }
    }
    let binary = options.bin_dir.join(PLUGIN);
    match std::fs::remove_file(&binary) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&binary)(e)),
        _ => {}
    }
    Ok(format!(
        "removed {} and unchained {PLUGIN} from {}",
        binary.display(),
        if changed.is_empty() {
            "no configuration (it was in none)".to_string()
        } else {
            changed.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path) -> Options {
        Options {
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            agent_socket: None,
            fail_policy: Some("closed".into()),
        }
    }

    #[test]
    fn install_chains_into_the_first_list_once_and_uninstall_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let o = options(dir.path());
        std::fs::create_dir_all(&o.bin_dir).unwrap();
        std::fs::create_dir_all(&o.conf_dir).unwrap();
        let binary = dir.path().join("built");
        std::fs::write(&binary, b"\x7fELF").unwrap();
        assert!(matches!(
            install(&o, &binary),
            Err(Error::NoConfiguration(_))
        ));
        let list = json!({"cniVersion": "1.0.0", "name": "k8s", "plugins": [
            {"type": "bridge", "ipam": {"type": "host-local"}}, {"type": "portmap"}]});
        std::fs::write(o.conf_dir.join("10-k8s.conflist"), list.to_string()).unwrap();
        std::fs::write(o.conf_dir.join("99-other.conflist"), list.to_string()).unwrap();
        install(&o, &binary).unwrap();
        install(&o, &binary).unwrap();
        let read = |name: &str| -> Value {
            serde_json::from_slice(&std::fs::read(o.conf_dir.join(name)).unwrap()).unwrap()
        };
        let types: Vec<String> = read("10-k8s.conflist")["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "strait-cni"]);
        assert_eq!(
            read("10-k8s.conflist")["plugins"][2]["failPolicy"],
            "closed"
        );
        assert_eq!(read("99-other.conflist"), list);
        assert_eq!(std::fs::read(o.bin_dir.join(PLUGIN)).unwrap(), b"\x7fELF");
        uninstall(&o).unwrap();
        assert_eq!(read("10-k8s.conflist"), list);
        assert!(!o.bin_dir.join(PLUGIN).exists());
        uninstall(&o).unwrap();
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let dir = tempfile::tempdir().unwrap();
        let o = options(dir.path());
        std::fs::create_dir_all(&o.bin_dir).unwrap();
        std::fs::create_dir_all(&o.conf_dir).unwrap();
        let binary = dir.path().join("built");
        std::fs::write(&binary, b"x").unwrap();
        std::fs::write(
            o.conf_dir.join("10-net.conf"),
            r#"{"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0"}"#,
        )
        .unwrap();
        install(&o, &binary).unwrap();
        assert!(!o.conf_dir.join("10-net.conf").exists());
        let list: Value =
            serde_json::from_slice(&std::fs::read(o.conf_dir.join("10-net.conflist")).unwrap())
                .unwrap();
        assert_eq!(list["cniVersion"], "0.4.0");
        assert_eq!(list["name"], "net");
        assert_eq!(
            list["plugins"][0],
            json!({"type": "bridge", "bridge": "cni0"})
        );
        assert_eq!(list["plugins"][1]["type"], "strait-cni");
    }

    #[test]
    fn bad_arguments_say_what_is_expected() {
        let error = main("install", &["--bin-dir".into()]).unwrap_err();
        assert!(
            error.to_string().contains("--bin-dir needs a value"),
            "{error}"
        );
        let error = main("install", &["--bin-dir=/x".into()]).unwrap_err();
        assert!(
            error.to_string().contains("--conf-dir is required"),
            "{error}"
        );
        let error = main(
            "install",
            &[
                "--bin-dir=/x".into(),
                "--conf-dir=/y".into(),
                "--fail-policy=maybe".into(),
            ],
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("expected closed or open"),
            "{error}"
        );
    }
}
