//! Request and response headers on the way through the proxy.
//!
//! - Hop-by-hop headers (RFC 9110 section 7.6.1) belong to one connection and are removed:
//!   `Connection` and every header it names, `Keep-Alive`, `Proxy-Connection`, `TE` (except
//!   `TE: trailers`, which gRPC needs end to end), `Transfer-Encoding` and `Upgrade`. For a
//!   protocol upgrade (WebSocket) `Upgrade` and `Connection: upgrade` are kept, since asking for
//!   the upgrade is the point of the request.
//! - `x-forwarded-for` gets the calling pod's address appended, `x-forwarded-proto` is set to
//!   `http` when absent (the client spoke plaintext to the agent), and `x-request-id` is set to a
//!   random UUID when absent, so the request can be followed through logs.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use rand::RngCore as _;

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// True for a gRPC request or response (`content-type: application/grpc...`).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// The protocol as telemetry and the access log name it.
pub fn protocol_name(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_10 => "HTTP/1.0",
        _ => "HTTP/1.1",
    }
}

/// True for an HTTP/1.1 request asking to switch protocols (`Connection: upgrade` plus
/// `Upgrade`).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes the hop-by-hop headers; keeps `Upgrade` and `Connection: upgrade` when `upgrade`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    // One pass over the names says which of them are there: most messages carry none of them
    // or only `Connection`, and each look-up or removal below hashes its name (this runs for
    // every request and every response).
    let mut present = HopByHop::default();
    for name in headers.keys() {
        present.note(name);
    }
    if present.connection {
        // `keep-alive`, `close` and `upgrade` (nearly every `Connection` header) name headers
        // dealt with below: skipping them keeps the common case free of allocations.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|token| {
                !["keep-alive", "close", "upgrade"]
                    .iter()
                    .any(|known| token.eq_ignore_ascii_case(known))
            })
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in named {
            if !(upgrade && name == header::UPGRADE) {
                headers.remove(name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    if present.keep_alive {
        headers.remove(KEEP_ALIVE);
    }
    if present.proxy_connection {
        headers.remove(PROXY_CONNECTION);
    }
    if present.transfer_encoding {
        headers.remove(header::TRANSFER_ENCODING);
    }
    if present.te {
        let te_trailers = headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
        headers.remove(header::TE);
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if present.upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// Which hop-by-hop headers a message has (the names [`remove_hop_by_hop`] removes on sight).
#[derive(Default)]
struct HopByHop {
    connection: bool,
    keep_alive: bool,
    proxy_connection: bool,
    transfer_encoding: bool,
    te: bool,
    upgrade: bool,
}

impl HopByHop {
    fn note(&mut self, name: &HeaderName) {
        let seen = if name == header::CONNECTION {
            &mut self.connection
        } else if name == KEEP_ALIVE {
            &mut self.keep_alive
        } else if name == PROXY_CONNECTION {
            &mut self.proxy_connection
        } else if name == header::TRANSFER_ENCODING {
            &mut self.transfer_encoding
        } else if name == header::TE {
            &mut self.te
        } else if name == header::UPGRADE {
            &mut self.upgrade
        } else {
            return;
        };
        *seen = true;
    }
}

/// Prepares a request's headers for the upstream: hop-by-hop headers out, `x-forwarded-for`,
/// `x-forwarded-proto` and `x-request-id` in (see the module docs). Each header is looked up
/// once (the entry API), as this runs for every request.
pub fn prepare_request(headers: &mut HeaderMap, client: Option<IpAddr>, upgrade: bool) {
    use http::header::Entry;
    remove_hop_by_hop(headers, upgrade);
    if let Some(client) = client {
        match headers.entry(X_FORWARDED_FOR) {
            Entry::Occupied(mut entry) => {
                let joined = match entry.get().to_str() {
                    Ok(existing) if !existing.trim().is_empty() => {
                        HeaderValue::from_str(&format!("{existing}, {client}"))
                    }
                    _ => address_value(client),
                };
                // Every earlier value goes: the joined one, or none if it cannot be written.
                match joined {
                    Ok(value) => {
                        entry.insert(value);
                    }
                    Err(_) => {
                        entry.remove();
                    }
                }
            }
            Entry::Vacant(entry) => {
                if let Ok(value) = address_value(client) {
                    entry.insert(value);
                }
            }
        }
    }
    headers
        .entry(X_FORWARDED_PROTO)
        .or_insert_with(|| HeaderValue::from_static("http"));
    match headers.entry(X_REQUEST_ID) {
        Entry::Occupied(entry) if entry.get().to_str().is_ok_and(|id| !id.is_empty()) => {}
        Entry::Occupied(mut entry) => {
            entry.insert(uuid_v4());
        }
        Entry::Vacant(entry) => {
            entry.insert(uuid_v4());
        }
    }
}

/// An address as a header value, written in place (this runs for nearly every request).
fn address_value(ip: IpAddr) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
    use std::io::Write as _;
    // The longest text form of an address (IPv4-mapped IPv6) has 45 characters.
    let mut text = std::io::Cursor::new([0u8; 48]);
    write!(text, "{ip}").expect("an address fits in 48 bytes");
    let len = usize::try_from(text.position()).expect("a position within 48 bytes");
    HeaderValue::from_bytes(&text.get_ref()[..len])
}

/// The request's id (`x-request-id`) as [`prepare_request`] left it.
pub fn request_id(headers: &HeaderMap) -> &str {
    headers
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// A random (version 4) UUID, RFC 9562, in its text form (written in place: this runs for
/// every request without an id).
fn uuid_v4() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let mut text = [0u8; 36];
    let mut at = 0;
    for (i, byte) in b.iter().enumerate() {
        // 8-4-4-4-12 hex digits.
        if matches!(i, 4 | 6 | 8 | 10) {
            text[at] = b'-';
            at += 1;
        }
        text[at] = HEX[usize::from(byte >> 4)];
        text[at + 1] = HEX[usize::from(byte & 0x0f)];
        at += 2;
    }
    HeaderValue::from_bytes(&text).expect("hex digits and dashes are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_go_and_named_ones_with_them() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip, trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "close"),
            ("x-app", "kept"),
        ]);
        remove_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["te", "x-app"]);
        assert_eq!(h["te"], "trailers");
    }

    /// A message with no hop-by-hop header (most requests) or only `Connection` (most
    /// responses) loses just that.
    #[test]
    fn only_the_hop_by_hop_headers_there_are_removed() {
        let mut h = map(&[("host", "a"), ("x-app", "1"), ("x-app", "2")]);
        let before = h.clone();
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
        let mut h = map(&[("connection", "keep-alive"), ("content-length", "5")]);
        remove_hop_by_hop(&mut h, false);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-length"]);
    }

    /// `x-forwarded-for` sent on two lines: the first line's value, joined with the client's
    /// address, replaces both; an empty `x-request-id` is replaced by a new id.
    #[test]
    fn a_repeated_forwarded_for_becomes_one_value() {
        let mut h = map(&[
            ("x-forwarded-for", "192.0.2.9"),
            ("x-forwarded-for", "198.51.100.7"),
        ]);
        prepare_request(&mut h, Some("10.244.1.2".parse().unwrap()), false);
        let values: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(values, ["192.0.2.9, 10.244.1.2"]);
        let mut h = map(&[("x-request-id", ""), ("x-request-id", "second")]);
        prepare_request(&mut h, None, false);
        assert_eq!(h.get_all("x-request-id").iter().count(), 1);
        assert_eq!(request_id(&h).len(), 36, "an empty id is replaced");
    }

    #[test]
    fn an_upgrade_keeps_its_upgrade_headers() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(is_upgrade(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn forwarding_headers_and_request_id() {
        let mut h = map(&[("x-forwarded-for", "192.0.2.9")]);
        prepare_request(&mut h, Some("10.244.1.2".parse().unwrap()), false);
        assert_eq!(h["x-forwarded-for"], "192.0.2.9, 10.244.1.2");
        for long in [
            "::ffff:255.255.255.255",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let mut h = HeaderMap::new();
            prepare_request(&mut h, Some(long.parse().unwrap()), false);
            assert_eq!(h["x-forwarded-for"], long);
        }
        assert_eq!(h["x-forwarded-proto"], "http");
        let id = request_id(&h);
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        let groups: Vec<usize> = id.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12]);
        assert!(id.bytes().all(|c| c == b'-' || c.is_ascii_hexdigit()));
        assert!(!id.bytes().any(|c| c.is_ascii_uppercase()));
        let variant = u8::from_str_radix(&id[19..20], 16).unwrap();
        assert!((8..=11).contains(&variant), "RFC 9562 variant bits 10xx");
        let mut h = map(&[("x-request-id", "abc"), ("x-forwarded-proto", "https")]);
        prepare_request(&mut h, None, false);
        assert_eq!(request_id(&h), "abc");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert!(!h.contains_key("x-forwarded-for"));
    }
}
