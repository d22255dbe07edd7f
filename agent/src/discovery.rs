//! Addresses from DNS: the service addresses of virtual services (what a pod's resolver gets
//! for the virtual service name; in Kubernetes the Service's ClusterIP) and the endpoints of
//! virtual nodes (`serviceDiscovery.dns`).
//!
//! Each name is re-resolved when its TTL runs out. A lookup that fails for a transient reason
//! (timeout, server failure) keeps the last good answer, so a DNS hiccup never takes a service
//! out of the mesh; a name that no longer exists (NXDOMAIN, no records) resolves to nothing.
//! Static addresses (the `addresses` extensions) never reach this module.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use tokio::sync::watch;
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
        let mut builder = match server {
            Some(ip) => TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], vec![NameServerConfig::udp_and_tcp(ip)]),
                TokioRuntimeProvider::default(),
            ),
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

/// Keeps a set of names resolved. The wanted names come in on `names`; the answers go out on
/// the returned channel whenever one changes. Returns once every name has been asked once,
/// so the first routing table is complete: a restarting agent must not start by telling the
/// kernel that no service exists.
pub async fn keep_resolved(
    resolver: Resolver,
    mut names: watch::Receiver<BTreeSet<String>>,
) -> watch::Receiver<Answers> {
    let mut state = State::default();
    let wanted = names.borrow_and_update().clone();
    state.refresh(&resolver, &wanted).await;
    let (tx, rx) = watch::channel(Arc::new(state.answers.clone()));
    tokio::spawn(async move {
        loop {
            let wake = state.next_due();
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                changed = names.changed() => if changed.is_err() { return },
            }
            let wanted = names.borrow_and_update().clone();
            state.refresh(&resolver, &wanted).await;
            tx.send_if_modified(|current| {
                if **current == state.answers {
                    false
                } else {
                    *current = Arc::new(state.answers.clone());
                    true
                }
            });
        }
    });
    rx
}

#[derive(Default)]
struct State {
    answers: BTreeMap<String, Vec<IpAddr>>,
    due: BTreeMap<String, Instant>,
}

impl State {
    /// Drops names no longer wanted and resolves every wanted name that is due.
    async fn refresh(&mut self, resolver: &Resolver, wanted: &BTreeSet<String>) {
        self.answers.retain(|name, _| wanted.contains(name));
        self.due.retain(|name, _| wanted.contains(name));
        let now = Instant::now();
        for name in wanted {
            self.due.entry(name.clone()).or_insert(now);
        }
        let mut lookups = tokio::task::JoinSet::new();
        for (name, _) in self.due.iter().filter(|(_, at)| **at <= now) {
            let (resolver, name) = (resolver.clone(), name.clone());
            lookups.spawn(async move {
                let lookup = resolver.lookup(&name).await;
                (name, lookup)
            });
        }
        while let Some(Ok((name, lookup))) = lookups.join_next().await {
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
    }

    fn next_due(&self) -> Instant {
        self.due
            .values()
            .min()
            .copied()
            .unwrap_or_else(|| Instant::now() + MAX_REFRESH)
    }
}
