//! Addresses from DNS: the service addresses of virtual services (what a pod's resolver gets
//! for the virtual service name; in Kubernetes the Service's ClusterIP) and the endpoints of
//! virtual nodes (`serviceDiscovery.dns`).
//!
//! Each name is re-resolved when its TTL runs out. A lookup that fails for a transient reason
//! (timeout, server failure) keeps the last good answer, so a DNS hiccup never takes a service
//! out of the mesh; a name that no longer exists (NXDOMAIN, no records) resolves to nothing.
//! Static addresses (the `addresses` extensions) never reach this module.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Never re-resolve more often than this, whatever the TTL says.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Re-resolve at least this often, so a long TTL still notices changes eventually.
const MAX_REFRESH: Duration = Duration::from_secs(300);
/// After a failed lookup, try again this soon.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the system DNS configuration (/etc/resolv.conf): {0}; pass --dns-server")]
    SystemConfig(String),
    #[error("cannot build the DNS resolver: {0}")]
    Build(String),
}

/// Resolved addresses by DNS name.
pub type Answers = Arc<BTreeMap<String, Vec<IpAddr>>>;

/// A DNS client that asks for both A and AAAA records.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

/// What a lookup found, and until when it holds.
pub enum Lookup {
    Found {
        addrs: Vec<IpAddr>,
        valid_until: Instant,
    },
    /// The name does not exist, or has no address records.
    NotFound,
    /// The lookup failed for a reason that may go away (timeout, SERVFAIL, no server).
    Failed(String),
}

impl Resolver {
    /// `server`: the DNS server to ask; `None` reads /etc/resolv.conf.
    pub fn new(server: Option<IpAddr>) -> Result<Resolver, Error> {
        Resolver::at(server.map(|ip| SocketAddr::new(ip, 53)))
    }

    /// [`Resolver::new`] with the server's port too.
    fn at(server: Option<SocketAddr>) -> Result<Resolver, Error> {
        let mut builder = match server {
            Some(addr) => {
                let mut config = NameServerConfig::udp_and_tcp(addr.ip());
                for connection in &mut config.connections {
                    connection.port = addr.port();
                }
                TokioResolver::builder_with_config(
                    ResolverConfig::from_parts(None, vec![], vec![config]),
                    TokioRuntimeProvider::default(),
                )
            }
            None => {
                TokioResolver::builder_tokio().map_err(|e| Error::SystemConfig(e.to_string()))?
            }
        };
        let options = builder.options_mut();
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        options.timeout = Duration::from_secs(2);
        options.attempts = 2;
        let inner = builder.build().map_err(|e| Error::Build(e.to_string()))?;
        Ok(Resolver { inner })
    }

    pub async fn lookup(&self, name: &str) -> Lookup {
        match self.inner.lookup_ip(name).await {
            Ok(answer) => {
                let mut addrs: Vec<IpAddr> = answer.iter().collect();
                addrs.sort();
                addrs.dedup();
                if addrs.is_empty() {
                    Lookup::NotFound
                } else {
                    Lookup::Found {
                        addrs,
                        valid_until: Instant::from_std(answer.valid_until()),
                    }
                }
            }
            Err(error) if error.is_no_records_found() || error.is_nx_domain() => Lookup::NotFound,
            Err(error) => Lookup::Failed(error.to_string()),
        }
    }
}

/// How long start-up waits for the first DNS round before it goes on with the names answered
/// so far (docs/operations.md, "What start-up waits for").
pub const FIRST_ROUND_BOUND: Duration = Duration::from_secs(2);

/// Keeps a set of names resolved. The wanted names come in on `names`; the answers go out on
/// the returned channel whenever one changes, and are saved to `saved` (a small JSON file).
///
/// Returns once every name has been answered, or after [`FIRST_ROUND_BOUND`]. A name still
/// unanswered then gets the addresses the previous agent had for it (read from `saved`) until
/// its own answer comes: a new agent taking over (an upgrade, a restart) must not start by
/// telling the kernel that a service it cannot resolve yet does not exist, or DROP_ALL pods'
/// connects to it would fail. A name the previous agent did not have either waits for its
/// answer. The file stands in for the pinned service map, whose entries carry the previous
/// agent's service ids, which mean nothing to this one.
pub async fn keep_resolved(
    resolver: Resolver,
    mut names: watch::Receiver<BTreeSet<String>>,
    saved: PathBuf,
) -> watch::Receiver<Answers> {
    let mut state = State::default();
    let wanted = names.borrow_and_update().clone();
    let mut lookups = state.start(&resolver, &wanted);
    let bound = tokio::time::sleep(FIRST_ROUND_BOUND);
    tokio::pin!(bound);
    loop {
        tokio::select! {
            joined = lookups.join_next() => match joined {
                Some(Ok((name, lookup))) => state.apply(name, lookup),
                Some(Err(_)) => {}
                None => break,
            },
            () = &mut bound => break,
        }
    }
    let unanswered: Vec<&String> = wanted
        .iter()
        .filter(|name| !state.answers.contains_key(*name))
        .collect();
    if !unanswered.is_empty() {
        let previous = read_saved(&saved);
        for name in unanswered {
            match previous.get(name) {
                Some(addrs) => {
                    tracing::warn!(%name, ?addrs, "no DNS answer yet; keeping the previous agent's addresses until one comes");
                    state.answers.insert(name.clone(), addrs.clone());
                }
                None => {
                    tracing::warn!(%name, "no DNS answer yet, and no previous agent's addresses; the name's services start once it resolves");
                }
            }
        }
    }
    save(&saved, &state.answers);
    let (tx, rx) = watch::channel(Arc::new(state.answers.clone()));
    let publish = move |state: &State| {
        let changed = tx.send_if_modified(|current| {
            if **current == state.answers {
                false
            } else {
                *current = Arc::new(state.answers.clone());
                true
            }
        });
        if changed {
            save(&saved, &state.answers);
        }
        !tx.is_closed()
    };
    tokio::spawn(async move {
        // The first round's lookups still under way.
        while let Some(joined) = lookups.join_next().await {
            if let Ok((name, lookup)) = joined {
                state.apply(name, lookup);
                publish(&state);
            }
        }
        loop {
            let wake = state.next_due();
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                changed = names.changed() => if changed.is_err() { return },
            }
            let wanted = names.borrow_and_update().clone();
            state.refresh(&resolver, &wanted).await;
            if !publish(&state) {
                return;
            }
        }
    });
    rx
}

/// The answers a previous agent saved; none if there is no file or it cannot be read.
fn read_saved(path: &Path) -> BTreeMap<String, Vec<IpAddr>> {
    use std::os::unix::fs::PermissionsExt as _;
    // Addresses decide what pods may reach: only from a folder no one else can write to (the
    // hand-over socket's, 0700).
    if let Some(dir) = path.parent()
        && let Ok(meta) = std::fs::metadata(dir)
        && meta.permissions().mode() & 0o022 != 0
    {
        tracing::warn!(dir = %dir.display(), "ignoring the saved DNS answers: their folder is writable by group or others");
        return BTreeMap::new();
    }
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
            tracing::warn!(path = %path.display(), %error, "ignoring the saved DNS answers: not valid JSON");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

/// Saves `answers` for the next agent (written aside, then renamed over: never half a file).
fn save(path: &Path, answers: &BTreeMap<String, Vec<IpAddr>>) {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".new");
    let aside = PathBuf::from(aside);
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        use std::os::unix::fs::DirBuilderExt as _;
        // The hand-over socket's folder, made as the hand-over makes it (later in start-up).
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir);
    }
    let written = serde_json::to_vec(answers)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&aside, bytes))
        .and_then(|()| std::fs::rename(&aside, path));
    if let Err(error) = written {
        tracing::warn!(path = %path.display(), %error, "cannot save the DNS answers for the next agent (an upgrade would wait for DNS instead)");
    }
}

#[derive(Default)]
struct State {
    answers: BTreeMap<String, Vec<IpAddr>>,
    due: BTreeMap<String, Instant>,
}

impl State {
    /// Drops names no longer wanted and resolves every wanted name that is due.
    ///
    /// The lookups start one at a time, the task yielding to the runtime between two starts.
    /// Names that share a TTL fall due together, and starting a lookup is work done at once
    /// (a socket per query, the send): started all in one go, a round of a few dozen names
    /// kept the agent's worker thread from the proxied connections for milliseconds, every
    /// round. Yielding lets their I/O in between; the lookups still run concurrently, so a
    /// round takes as long as its slowest lookup, not the sum.
    async fn refresh(&mut self, resolver: &Resolver, wanted: &BTreeSet<String>) {
        let mut lookups = JoinSet::new();
        for name in self.due_names(wanted) {
            spawn_lookup(&mut lookups, resolver, name);
            tokio::task::yield_now().await;
        }
        while let Some(joined) = lookups.join_next().await {
            if let Ok((name, lookup)) = joined {
                self.apply(name, lookup);
            }
        }
    }

    /// Drops names no longer wanted and starts a lookup of every wanted name that is due, all
    /// at once (the first round, before the agent serves anything).
    fn start(
        &mut self,
        resolver: &Resolver,
        wanted: &BTreeSet<String>,
    ) -> JoinSet<(String, Lookup)> {
        let mut lookups = JoinSet::new();
        for name in self.due_names(wanted) {
            spawn_lookup(&mut lookups, resolver, name);
        }
        lookups
    }

    /// Drops names no longer wanted; the wanted names due for a lookup now (a new name is).
    fn due_names(&mut self, wanted: &BTreeSet<String>) -> Vec<String> {
        self.answers.retain(|name, _| wanted.contains(name));
        self.due.retain(|name, _| wanted.contains(name));
        let now = Instant::now();
        for name in wanted {
            self.due.entry(name.clone()).or_insert(now);
        }
        self.due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Takes in one lookup's result and when the name is due again.
    fn apply(&mut self, name: String, lookup: Lookup) {
        let now = Instant::now();
        let next = match lookup {
            Lookup::Found { addrs, valid_until } => {
                if self.answers.get(&name) != Some(&addrs) {
                    tracing::info!(%name, ?addrs, "DNS answer changed");
                }
                self.answers.insert(name.clone(), addrs);
                valid_until.clamp(now + MIN_REFRESH, now + MAX_REFRESH)
            }
            Lookup::NotFound => {
                if self.answers.get(&name).is_some_and(|a| !a.is_empty()) {
                    tracing::warn!(%name, "DNS name no longer resolves; removing its addresses");
                }
                self.answers.insert(name.clone(), Vec::new());
                now + RETRY_AFTER_FAILURE
            }
            Lookup::Failed(reason) => {
                tracing::warn!(%name, %reason, "DNS lookup failed; keeping the last answer");
                now + RETRY_AFTER_FAILURE
            }
        };
        self.due.insert(name, next);
    }

    fn next_due(&self) -> Instant {
        self.due
            .values()
            .min()
            .copied()
            .unwrap_or_else(|| Instant::now() + MAX_REFRESH)
    }
}

/// Starts a lookup of `name` on a task of its own; it ends with the name and what was found.
fn spawn_lookup(lookups: &mut JoinSet<(String, Lookup)>, resolver: &Resolver, name: String) {
    let resolver = resolver.clone();
    lookups.spawn(async move {
        let lookup = resolver.lookup(&name).await;
        (name, lookup)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DNS server that never answers: start-up goes on after the bound, with the previous
    /// agent's addresses for a name it had, and without a name it did not have.
    #[tokio::test]
    async fn start_up_waits_at_most_the_bound_and_keeps_the_previous_answers() {
        let silent_udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let server = silent_udp.local_addr().unwrap();
        // TCP too (the resolver falls back to it): connects are accepted by the kernel and
        // never answered.
        let _silent_tcp = std::net::TcpListener::bind(server).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("answers.json");
        let kept: IpAddr = "10.0.0.7".parse().unwrap();
        std::fs::write(&saved, format!(r#"{{"kept.example.": ["{kept}"]}}"#)).unwrap();
        let names = BTreeSet::from(["kept.example.".to_owned(), "new.example.".to_owned()]);
        let (_names_tx, names_rx) = watch::channel(names);
        let started = std::time::Instant::now();
        let answers =
            keep_resolved(Resolver::at(Some(server)).unwrap(), names_rx, saved.clone()).await;
        let waited = started.elapsed();
        assert!(
            waited >= FIRST_ROUND_BOUND && waited < FIRST_ROUND_BOUND + Duration::from_secs(2),
            "start-up waited {waited:?}"
        );
        let answers = answers.borrow().clone();
        assert_eq!(answers.get("kept.example."), Some(&vec![kept]));
        assert_eq!(answers.get("new.example."), None);
        // Saved again for the agent after this one.
        assert_eq!(read_saved(&saved), *answers);
    }

    #[test]
    fn unreadable_saved_answers_are_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("answers.json");
        assert!(read_saved(&path).is_empty());
        std::fs::write(&path, "not json").unwrap();
        assert!(read_saved(&path).is_empty());
        let answers = BTreeMap::from([("a.example.".to_owned(), vec!["::1".parse().unwrap()])]);
        save(&path, &answers);
        assert_eq!(read_saved(&path), answers);
    }
}
