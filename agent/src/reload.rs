//! Watching the mesh file and reading it again when it changes.
//!
//! A change is read and checked whole ([`load`]); a valid mesh with new bytes is handed to
//! the caller to put in force, an invalid one is refused, logged, counted
//! (`strait_mesh_reloads_total`) and shown in `/config_dump`, and the previous mesh stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use notify::Watcher;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;

use crate::admin::{self, ConfigDump, Rejected};
use crate::logging::Chain;
use crate::mesh::{self, MeshConfig};
use crate::workloads;

/// Why a mesh was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Mesh(#[from] mesh::Error),
    #[error("{}", render_diagnostics(.0))]
    MissingFiles(Vec<mesh::Diagnostic>),
}

fn render_diagnostics(diagnostics: &[mesh::Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    result: &'static str,
}

/// `strait_mesh_reloads_total`, by result.
#[derive(Clone, Default)]
pub struct Metrics(Family<ReloadLabels, Counter>);

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "strait_mesh_reloads",
            "Mesh file reloads, by result (applied or rejected)",
            self.0.clone(),
        );
    }

    fn count(&self, result: &'static str) {
        self.0.get_or_create(&ReloadLabels { result }).inc();
    }
}

/// Reads the mesh file (or directory) and checks it against this node's files; logs the
/// warnings.
pub fn load(path: &Path, access_log_dir: &Path) -> Result<MeshConfig, Error> {
    let loaded = mesh::load_file(path)?;
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    check_files(&loaded.config, access_log_dir)?;
    Ok(loaded.config)
}

/// What a change of the mesh file came to.
pub enum Reloaded {
    /// The same bytes as the mesh in force, or as the last file refused.
    Unchanged,
    /// A valid new mesh, to be put in force.
    Applied(Arc<MeshConfig>),
    /// Refused; the previous mesh stays.
    Rejected,
}

/// The mesh file's watcher.
pub struct Watch {
    path: PathBuf,
    access_log_dir: PathBuf,
    updates: mpsc::Receiver<()>,
    /// The digest of the file last read, valid or not.
    last_seen: Option<String>,
    metrics: Metrics,
}

impl Watch {
    /// Starts watching `path`; `current` is the digest of the mesh in force.
    pub fn start(path: &Path, access_log_dir: &Path, current: &str, metrics: Metrics) -> Watch {
        Watch {
            path: path.to_path_buf(),
            access_log_dir: access_log_dir.to_path_buf(),
            updates: watch_mesh_file(path),
            last_seen: Some(current.to_owned()),
            metrics,
        }
    }

    /// Waits for the next change (None: the watcher is gone).
    pub async fn changed(&mut self) -> Option<()> {
        self.updates.recv().await
    }

    /// Reads the file after a change. `current` is the mesh in force; `admin`'s config dump
    /// is updated (the new mesh, or the rejection beside the mesh that stays).
    pub fn reload(&mut self, current: &MeshConfig, admin: &admin::State) -> Reloaded {
        // The same bytes as last time (a touch, an unrelated event): nothing to do, and an
        // invalid file is not reported twice.
        let digest = mesh::digest(std::slice::from_ref(&self.path)).ok();
        if digest.is_some() && digest == self.last_seen {
            return Reloaded::Unchanged;
        }
        self.last_seen = digest;
        match load(&self.path, &self.access_log_dir) {
            Ok(new_mesh) => {
                if new_mesh.source.sha256 == current.source.sha256 {
                    return Reloaded::Unchanged;
                }
                self.metrics.count("applied");
                tracing::info!(sha256 = %new_mesh.source.sha256, "mesh file reloaded");
                let last_rejected = admin.config.load().last_rejected.clone();
                admin.config.store(Arc::new(ConfigDump {
                    last_rejected,
                    ..config_dump(&new_mesh)
                }));
                Reloaded::Applied(Arc::new(new_mesh))
            }
            Err(error) => {
                self.metrics.count("rejected");
                let error = Chain(&error).to_string();
                tracing::error!("mesh file rejected; the previous mesh stays in force:\n{error}");
                let mut dump = (**admin.config.load()).clone();
                dump.last_rejected = Some(Rejected {
                    at_unix: unix_now(),
                    errors: error.lines().map(str::to_owned).collect(),
                });
                admin.config.store(Arc::new(dump));
                Reloaded::Rejected
            }
        }
    }
}

/// The checks that need this node's files: access log paths against the access log
/// directory (logs the warnings; any error refuses the mesh).
///
/// TLS files are not checked here: a node opens only the certificates of virtual nodes it
/// runs a pod of, when it needs them (identity::local), so files of other nodes' virtual
/// nodes need not exist here.
fn check_files(config: &MeshConfig, access_log_dir: &Path) -> Result<(), Error> {
    let mut errors = Vec::new();
    for diagnostic in mesh::check_access_logs(config, access_log_dir) {
        match diagnostic.severity {
            mesh::Severity::Error => errors.push(diagnostic),
            _ => tracing::warn!("{diagnostic}"),
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Error::MissingFiles(errors))
    }
}

/// What `/config_dump` shows of a mesh (no rejection yet).
pub fn config_dump(mesh: &MeshConfig) -> ConfigDump {
    ConfigDump {
        file: mesh.source.path.display().to_string(),
        sha256: mesh.source.sha256.clone(),
        loaded_at_unix: mesh
            .source
            .loaded_at
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        mesh: serde_json::to_value(mesh).unwrap_or(serde_json::Value::Null),
        last_rejected: None,
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Watches the mesh file's directory (not the file: a ConfigMap update swaps a symlinked
/// directory, and editors replace files by rename), or the mesh directory itself, and signals
/// every change.
fn watch_mesh_file(path: &Path) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    let is_dir = path.is_dir();
    let dir = if is_dir {
        path
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }
    .to_path_buf();
    let (kick_tx, mut kick_rx) = mpsc::unbounded_channel::<()>();
    let file_name = path.file_name().map(|n| n.to_os_string());
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only the mesh file (or, for a directory, its mesh files) and Kubernetes' `..data` /
        // `..<timestamp>` entries matter; other files come and go without a reload.
        let relevant = event.is_ok_and(|event| {
            workloads::is_change(&event)
                && event.paths.iter().any(|p| {
                    let mesh_file = if is_dir {
                        p.extension()
                            .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
                    } else {
                        p.file_name() == file_name.as_deref()
                    };
                    mesh_file
                        || p.file_name()
                            .is_some_and(|name| name.to_string_lossy().starts_with(".."))
                })
        });
        if relevant {
            let _ = kick_tx.send(());
        }
    });
    let mut watcher = match watcher {
        Ok(watcher) => watcher,
        Err(error) => {
            tracing::error!(%error, "cannot watch the mesh file; reload needs a restart");
            return rx;
        }
    };
    if let Err(error) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
        tracing::error!(dir = %dir.display(), %error, "cannot watch the mesh file's directory; reload needs a restart");
        return rx;
    }
    tokio::spawn(async move {
        let _watcher = watcher;
        while kick_rx.recv().await.is_some() {
            // Let a burst of writes settle before reading the file.
            tokio::time::sleep(Duration::from_millis(100)).await;
            while kick_rx.try_recv().is_ok() {}
            if tx.send(()).await.is_err() {
                return;
            }
        }
    });
    rx
}
