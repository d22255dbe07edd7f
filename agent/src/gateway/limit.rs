//! A gateway listener's `rateLimit` (strait extension), per listener per node.
//!
//! At the edge a caller is not a mesh workload, so the limit's buckets are keyed by what the
//! agent can tell about the client:
//!
//! - `requestsPerSecond`/`burst`: one bucket for every client of the listener together;
//! - `perCaller`: one bucket per client. A client that presented a certificate the listener's
//!   `tls.validation` verified is the identity in it (its SPIFFE ID, else its first subject
//!   alternative name): mTLS at the edge names the caller, wherever it connects from. Any
//!   other client is its address as the gateway pod sees it (the TCP peer; `x-forwarded-for`
//!   is the client's to write and is not trusted): an IPv4 address, or the /64 an IPv6 address
//!   is in (one site's, which its host may change at will);
//! - `overrides`: a client whose verified certificate names an `identity` listed there, or is
//!   one of a listed virtual node's identities, gets that limit instead of `perCaller`'s.
//!   Without `tls.validation` no client has a certificate, so validation refuses `overrides`
//!   on such a listener.
//!
//! A client refused by its own bucket takes nothing from the total. `shadow: true` refuses
//! nothing and counts what it would have refused. Refusals are counted in
//! `strait_rate_limited` with the gateway as `virtual_node` (`gateway.rs`).
//!
//! Client buckets are bounded: at most [`MAX_CLIENTS`] per listener per node (about 3 MiB).
//! When a new client would pass that, the buckets that are full again are forgotten (they say
//! nothing a new one would not), and if that is not enough the least recently used half:
//! a forgotten client starts again with a full bucket, so many addresses can loosen the
//! per-client limit but never the total, and memory stays bounded whatever the clients do.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::mesh::{MeshConfig, RateLimit, RateLimitCaller, ResourceId};
use crate::proxy::admission::bucket::TokenBucket;

/// Client buckets kept per listener per node.
pub const MAX_CLIENTS: usize = 16_384;

/// Who is calling a gateway listener, as far as the limit can tell.
#[derive(Debug, Clone, Default)]
pub struct Client {
    /// The TCP peer's address.
    pub ip: Option<IpAddr>,
    /// The subject alternative names of a verified client certificate.
    pub sans: Vec<String>,
    /// The virtual nodes whose identities those names are.
    pub virtual_nodes: BTreeSet<ResourceId>,
}

/// A client's bucket key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Identity(String),
    Address(IpAddr),
    Unknown,
}

impl Client {
    fn key(&self) -> Key {
        if let Some(id) = self
            .sans
            .iter()
            .find(|s| s.starts_with("spiffe://"))
            .or(self.sans.first())
        {
            return Key::Identity(id.clone());
        }
        match self.ip.map(|ip| ip.to_canonical()) {
            Some(IpAddr::V6(v6)) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                Key::Address(IpAddr::V6(prefix.into()))
            }
            Some(v4) => Key::Address(v4),
            None => Key::Unknown,
        }
    }

    fn matches(&self, named: &RateLimitCaller) -> bool {
        match named {
            RateLimitCaller::VirtualNode(vn) => self.virtual_nodes.contains(vn),
            RateLimitCaller::Identity(id) => self.sans.contains(id),
        }
    }
}

/// Which bucket was empty, and how long until it has a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    /// `total`, `caller` (`perCaller`) or `override`.
    pub scope: &'static str,
    pub wait: Duration,
}

struct ClientBucket {
    bucket: TokenBucket,
    used: Instant,
}

struct Listener {
    rate: RateLimit,
    total: Option<TokenBucket>,
    clients: HashMap<Key, ClientBucket>,
}

/// The gateway listeners' rate limits on this node, kept across mesh reloads that leave a
/// listener's limit as it was.
#[derive(Default)]
pub struct Limits {
    listeners: Mutex<BTreeMap<(ResourceId, u16), Listener>>,
}

impl Limits {
    pub fn update(&self, mesh: &MeshConfig) {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = BTreeMap::new();
        for gw in &mesh.virtual_gateways {
            for l in &gw.spec.listeners {
                let Some(rate) = &l.rate_limit else { continue };
                let key = (gw.id.clone(), l.port_mapping.port);
                let state = match listeners.remove(&key) {
                    Some(old) if old.rate == *rate => old,
                    _ => Listener {
                        rate: rate.clone(),
                        total: None,
                        clients: HashMap::new(),
                    },
                };
                next.insert(key, state);
            }
        }
        *listeners = next;
    }

    /// Takes a token from the client's bucket and the total one, or neither. A `shadow`
    /// limit refuses nothing: `Ok(Some(_))` says what it would have refused.
    pub fn admit(
        &self,
        gateway: &ResourceId,
        port: u16,
        client: &Client,
    ) -> Result<Option<Refusal>, Refusal> {
        self.admit_at(gateway, port, client, Instant::now())
    }

    fn admit_at(
        &self,
        gateway: &ResourceId,
        port: u16,
        client: &Client,
        now: Instant,
    ) -> Result<Option<Refusal>, Refusal> {
        let mut listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let Some(state) = listeners.get_mut(&(gateway.clone(), port)) else {
            return Ok(None);
        };
        match state.take(client, now) {
            Ok(()) => Ok(None),
            Err(refusal) if state.rate.shadow => {
                tracing::debug!(%gateway, port, scope = refusal.scope, wait = ?refusal.wait, "rate limit (shadow) would refuse a request");
                Ok(Some(refusal))
            }
            Err(refusal) => Err(refusal),
        }
    }

    /// Client buckets held for a listener (for tests of the bound).
    #[cfg(test)]
    fn clients(&self, gateway: &ResourceId, port: u16) -> usize {
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners
            .get(&(gateway.clone(), port))
            .map_or(0, |l| l.clients.len())
    }
}

impl Listener {
    fn take(&mut self, client: &Client, now: Instant) -> Result<(), Refusal> {
        let (scope, limit) = match self
            .rate
            .overrides
            .iter()
            .find(|o| o.callers.iter().any(|c| client.matches(c)))
        {
            Some(o) => ("override", Some(o.limit)),
            None => ("caller", self.rate.per_caller),
        };
        let mut own = None;
        if let Some(limit) = limit {
            let key = client.key();
            if !self.clients.contains_key(&key) && self.clients.len() >= MAX_CLIENTS {
                self.forget(now);
            }
            let entry = self.clients.entry(key).or_insert_with(|| ClientBucket {
                bucket: TokenBucket::new(limit, now),
                used: now,
            });
            entry.used = now;
            entry
                .bucket
                .check(now)
                .map_err(|wait| Refusal { scope, wait })?;
            own = Some(entry);
        }
        if let Some(t) = self.rate.total {
            let total = self.total.get_or_insert_with(|| TokenBucket::new(t, now));
            total.try_take(now).map_err(|wait| Refusal {
                scope: "total",
                wait,
            })?;
        }
        if let Some(entry) = own {
            entry.bucket.take();
        }
        Ok(())
    }

    /// Makes room for a new client: full buckets go, then, if still at the bound, the least
    /// recently used half.
    fn forget(&mut self, now: Instant) {
        self.clients.retain(|_, c| !c.bucket.is_full(now));
        if self.clients.len() < MAX_CLIENTS {
            return;
        }
        let mut used: Vec<Instant> = self.clients.values().map(|c| c.used).collect();
        let middle = used.len() / 2;
        let (_, median, _) = used.select_nth_unstable(middle);
        let median = *median;
        self.clients.retain(|_, c| c.used > median);
        tracing::info!(
            kept = self.clients.len(),
            "gateway rate limit: {MAX_CLIENTS} client buckets reached; the least recently used were forgotten"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesh::{Bucket, RateLimitOverride};

    fn id() -> ResourceId {
        ResourceId::new("ingress", "gw")
    }

    fn limits(rate: RateLimit) -> Limits {
        let limits = Limits::default();
        limits.listeners.lock().unwrap().insert(
            (id(), 8088),
            Listener {
                rate,
                total: None,
                clients: HashMap::new(),
            },
        );
        limits
    }

    fn bucket(requests_per_second: u32, burst: u32) -> Bucket {
        Bucket {
            requests_per_second,
            burst: Some(burst),
        }
    }

    fn from(ip: &str) -> Client {
        Client {
            ip: Some(ip.parse().unwrap()),
            ..Client::default()
        }
    }

    fn passed(limits: &Limits, client: &Client, n: usize, now: Instant) -> usize {
        (0..n)
            .filter(|_| {
                limits
                    .admit_at(&id(), 8088, client, now)
                    .is_ok_and(|r| r.is_none())
            })
            .count()
    }

    #[test]
    fn clients_are_limited_by_address_or_certificate_and_overrides_win() {
        let limits = limits(RateLimit {
            total: None,
            per_caller: Some(bucket(1, 2)),
            overrides: vec![RateLimitOverride {
                callers: vec![RateLimitCaller::Identity("spiffe://m/ns/a/vn/vip".into())],
                limit: bucket(1, 5),
            }],
            shadow: false,
        });
        let now = Instant::now();
        assert_eq!(passed(&limits, &from("10.0.0.1"), 4, now), 2);
        assert_eq!(passed(&limits, &from("10.0.0.2"), 4, now), 2);
        // An IPv4 client reaching an IPv6 socket is the same client.
        assert_eq!(passed(&limits, &from("::ffff:10.0.0.1"), 1, now), 0);
        // One IPv6 /64 is one client; another /64 another.
        assert_eq!(passed(&limits, &from("fd00:1:2:3::1"), 1, now), 1);
        assert_eq!(passed(&limits, &from("fd00:1:2:3::2"), 4, now), 1);
        assert_eq!(passed(&limits, &from("fd00:1:2:4::1"), 4, now), 2);
        // A certificate is the client wherever it connects from; the override is its limit.
        let vip = |ip: &str| Client {
            sans: vec!["spiffe://m/ns/a/vn/vip".into()],
            ..from(ip)
        };
        assert_eq!(passed(&limits, &vip("10.0.0.1"), 3, now), 3);
        assert_eq!(passed(&limits, &vip("10.0.0.9"), 3, now), 2);
        let refused = limits.admit_at(&id(), 8088, &vip("10.0.0.9"), now);
        assert_eq!(refused.unwrap_err().scope, "override");
        // Refilled after a second.
        assert_eq!(
            passed(
                &limits,
                &from("10.0.0.1"),
                4,
                now + Duration::from_millis(1001)
            ),
            1
        );
    }

    #[test]
    fn the_client_buckets_stay_bounded_whatever_the_addresses() {
        let limits = limits(RateLimit {
            total: Some(bucket(1_000_000, 1_000_000)),
            per_caller: Some(bucket(1, 1)),
            overrides: Vec::new(),
            shadow: false,
        });
        let start = Instant::now();
        for i in 0..(MAX_CLIENTS as u32 * 3) {
            let ip = IpAddr::V4((0x0a00_0000 + i).into());
            let client = Client {
                ip: Some(ip),
                ..Client::default()
            };
            let now = start + Duration::from_micros(u64::from(i));
            assert!(limits.admit_at(&id(), 8088, &client, now).is_ok());
            assert!(limits.clients(&id(), 8088) <= MAX_CLIENTS);
        }
        // The most recent client is remembered: its second request is refused.
        let last = Client {
            ip: Some(IpAddr::V4(
                (0x0a00_0000 + MAX_CLIENTS as u32 * 3 - 1).into(),
            )),
            ..Client::default()
        };
        let now = start + Duration::from_micros(MAX_CLIENTS as u64 * 3);
        assert!(limits.admit_at(&id(), 8088, &last, now).is_err());
    }

    #[test]
    fn a_client_refused_by_its_own_bucket_takes_nothing_from_the_total_and_shadow_refuses_nothing()
    {
        let limits = limits(RateLimit {
            total: Some(bucket(1, 3)),
            per_caller: Some(bucket(1, 1)),
            overrides: Vec::new(),
            shadow: false,
        });
        let now = Instant::now();
        assert_eq!(passed(&limits, &from("10.0.0.1"), 5, now), 1);
        assert_eq!(passed(&limits, &from("10.0.0.2"), 1, now), 1);
        assert_eq!(passed(&limits, &from("10.0.0.3"), 1, now), 1);
        let refused = limits.admit_at(&id(), 8088, &from("10.0.0.4"), now);
        assert_eq!(refused.unwrap_err().scope, "total");
        let shadow = super::tests::limits(RateLimit {
            total: Some(bucket(1, 1)),
            per_caller: None,
            overrides: Vec::new(),
            shadow: true,
        });
        let shadowed = (0..5)
            .filter(|_| {
                shadow
                    .admit_at(&id(), 8088, &from("10.0.0.1"), now)
                    .is_ok_and(|r| r.is_some())
            })
            .count();
        assert_eq!(
            shadowed, 4,
            "one passes, four would be refused but are let through"
        );
    }
}
