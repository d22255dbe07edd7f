//! Trace context: the headers that carry a trace from service to service, read on a request
//! the proxy receives and written on the request it sends, and the sampling decision.
//!
//! Formats read (the first one present wins, in this order):
//! - W3C Trace Context `traceparent` (+ `tracestate`), <https://www.w3.org/TR/trace-context/>;
//! - B3 single header `b3: {trace}-{span}[-{sampled}[-{parent}]]` and the B3 multi headers
//!   `X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled`, `X-B3-Flags`
//!   (<https://github.com/openzipkin/b3-propagation>), what App Mesh's Jaeger/Zipkin tracing used;
//! - AWS X-Ray `X-Amzn-Trace-Id: Root=1-{8 hex}-{24 hex};Parent={16 hex};Sampled={0|1|?}`, what
//!   App Mesh's X-Ray tracing used.
//!
//! Written on the upstream request: always `traceparent` (and `tracestate` if one came in), plus
//! every other format that came in, each with the same trace id and the proxy's client span id
//! as the new parent. A request that carried no context and loses the sampling draw is left
//! alone (no headers, no span): nothing would ever be exported for it.
//!
//! What it leaves to others: recording and exporting spans ([`super::otlp`]), and when a span
//! starts and ends (the HTTP proxy, through [`super::request`]).

use std::time::SystemTime;

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const X_B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const X_B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const X_B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const X_B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const X_B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
pub const X_AMZN_TRACE_ID: HeaderName = HeaderName::from_static("x-amzn-trace-id");

/// Which formats a request carried (each is written back on the upstream request).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Formats {
    pub w3c: bool,
    pub b3_single: bool,
    pub b3_multi: bool,
    pub xray: bool,
}

/// A trace context read from a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub trace_id: [u8; 16],
    /// The caller's span; None when only a trace id came (an X-Ray `Root` without `Parent`).
    pub parent: Option<[u8; 8]>,
    /// The caller's sampling decision; None when it left it to us (B3 without `sampled`,
    /// X-Ray `Sampled=?`).
    pub sampled: Option<bool>,
    pub tracestate: Option<String>,
    /// X-Ray keys other than Root, Parent, Sampled and Self (`Lineage=...`), kept as they came.
    pub xray_extra: Vec<String>,
    pub formats: Formats,
}

/// The proxy's client span for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    /// Recorded and exported (else only propagated).
    pub sampled: bool,
    pub tracestate: Option<String>,
    pub start: SystemTime,
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Exactly `2 * N` hex digits; all-zero ids are invalid in every format.
fn parse_id<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes = s.as_bytes();
    if bytes.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = hex_digit(pair[0])? << 4 | hex_digit(pair[1])?;
    }
    (out != [0u8; N]).then_some(out)
}

/// A B3 trace id: 16 or 32 hex digits (a 64-bit id is the low half of the 128-bit one).
fn parse_b3_trace_id(s: &str) -> Option<[u8; 16]> {
    match s.len() {
        32 => parse_id::<16>(s),
        16 => {
            let low = parse_id::<8>(s)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

fn get<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

fn w3c(headers: &HeaderMap) -> Option<Incoming> {
    let value = get(headers, &TRACEPARENT)?;
    let mut fields = value.split('-');
    let version = fields.next()?;
    let trace_id = parse_id::<16>(fields.next()?)?;
    let parent = parse_id::<8>(fields.next()?)?;
    let flags = fields.next()?;
    // Version 00 has exactly four fields; a later version may add some (read what we know);
    // ff is forbidden.
    if version.len() != 2 || version.eq_ignore_ascii_case("ff") || flags.len() != 2 {
        return None;
    }
    let version_num = u8::from_str_radix(version, 16).ok()?;
    if version_num == 0 && fields.next().is_some() {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(Incoming {
        trace_id,
        parent: Some(parent),
        sampled: Some(flags & 1 == 1),
        tracestate: get(headers, &TRACESTATE)
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        xray_extra: Vec::new(),
        formats: Formats::default(),
    })
}

fn b3_sampled(s: &str) -> Option<bool> {
    match s {
        "1" | "d" | "true" => Some(true),
        "0" | "false" => Some(false),
        _ => None,
    }
}

fn b3_single(headers: &HeaderMap) -> Option<Incoming> {
    let value = get(headers, &B3)?;
    let mut fields = value.split('-');
    let trace_id = parse_b3_trace_id(fields.next()?)?;
    let parent = parse_id::<8>(fields.next()?)?;
    let sampled = fields.next().and_then(b3_sampled);
    Some(Incoming {
        trace_id,
        parent: Some(parent),
        sampled,
        tracestate: None,
        xray_extra: Vec::new(),
        formats: Formats::default(),
    })
}

fn b3_multi(headers: &HeaderMap) -> Option<Incoming> {
    let trace_id = parse_b3_trace_id(get(headers, &X_B3_TRACE_ID)?)?;
    let parent = parse_id::<8>(get(headers, &X_B3_SPAN_ID)?)?;
    let debug = get(headers, &X_B3_FLAGS) == Some("1");
    let sampled = if debug {
        Some(true)
    } else {
        get(headers, &X_B3_SAMPLED).and_then(b3_sampled)
    };
    Some(Incoming {
        trace_id,
        parent: Some(parent),
        sampled,
        tracestate: None,
        xray_extra: Vec::new(),
        formats: Formats::default(),
    })
}

fn xray(headers: &HeaderMap) -> Option<Incoming> {
    let value = get(headers, &X_AMZN_TRACE_ID)?;
    let (mut root, mut parent, mut sampled, mut extra) = (None, None, None, Vec::new());
    for part in value.split(';') {
        let part = part.trim();
        let Some((key, val)) = part.split_once('=') else {
            continue;
        };
        match key {
            "Root" => {
                // 1-{8 hex epoch seconds}-{24 hex random}: together the 128-bit trace id.
                let mut f = val.split('-');
                if f.next()? != "1" {
                    return None;
                }
                let (epoch, random) = (f.next()?, f.next()?);
                if epoch.len() != 8 || random.len() != 24 || f.next().is_some() {
                    return None;
                }
                root = Some(parse_id::<16>(&format!("{epoch}{random}"))?);
            }
            "Parent" => parent = parse_id::<8>(val),
            "Sampled" => {
                sampled = match val {
                    "1" => Some(true),
                    "0" => Some(false),
                    _ => None,
                }
            }
            "Self" => {}
            _ => extra.push(part.to_owned()),
        }
    }
    Some(Incoming {
        trace_id: root?,
        parent,
        sampled,
        tracestate: None,
        xray_extra: extra,
        formats: Formats::default(),
    })
}

/// Reads the request's trace context, if it carries one (see the module docs for the order).
pub fn extract(headers: &HeaderMap) -> Option<Incoming> {
    let formats = Formats {
        w3c: headers.contains_key(&TRACEPARENT),
        b3_single: headers.contains_key(&B3),
        b3_multi: headers.contains_key(&X_B3_TRACE_ID),
        xray: headers.contains_key(&X_AMZN_TRACE_ID),
    };
    if formats == Formats::default() {
        return None;
    }
    let mut incoming = w3c(headers)
        .or_else(|| b3_single(headers))
        .or_else(|| b3_multi(headers))
        .or_else(|| xray(headers))?;
    incoming.formats = formats;
    Some(incoming)
}

/// Decides whether a request is traced and, if so (or if a context came in), writes the
/// upstream context into `headers`. Returns the client span, sampled or not; None when the
/// request is not traced at all.
pub fn start(headers: &mut HeaderMap, sampling: f64, rng: &mut impl rand::Rng) -> Option<Span> {
    let incoming = extract(headers);
    let sampled = match incoming.as_ref().and_then(|i| i.sampled) {
        Some(decided) => decided,
        None => sampling > 0.0 && rng.random::<f64>() < sampling,
    };
    if incoming.is_none() && !sampled {
        return None;
    }
    let mut span_id = [0u8; 8];
    while span_id == [0u8; 8] {
        rng.fill(&mut span_id);
    }
    let span = match incoming {
        Some(incoming) => {
            let span = Span {
                trace_id: incoming.trace_id,
                span_id,
                parent: incoming.parent,
                sampled,
                tracestate: incoming.tracestate.clone(),
                start: SystemTime::now(),
            };
            inject(headers, &span, incoming.formats, &incoming.xray_extra);
            span
        }
        // Not from a context, so sampled here (the early return above).
        None => {
            let mut trace_id = [0u8; 16];
            while trace_id == [0u8; 16] {
                rng.fill(&mut trace_id);
            }
            let span = Span {
                trace_id,
                span_id,
                parent: None,
                sampled,
                tracestate: None,
                start: SystemTime::now(),
            };
            inject(headers, &span, Formats::default(), &[]);
            span
        }
    };
    Some(span)
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: String) {
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(name, value);
    }
}

/// Writes `span` as the upstream request's parent in W3C and in each format in `formats`.
pub fn inject(headers: &mut HeaderMap, span: &Span, formats: Formats, xray_extra: &[String]) {
    let trace = hex(&span.trace_id);
    let id = hex(&span.span_id);
    let flag = if span.sampled { "1" } else { "0" };
    set(
        headers,
        TRACEPARENT,
        format!("00-{trace}-{id}-0{}", u8::from(span.sampled)),
    );
    match &span.tracestate {
        Some(state) => set(headers, TRACESTATE, state.clone()),
        None => {
            headers.remove(&TRACESTATE);
        }
    }
    // B3 ids: 64-bit trace ids stay 64-bit for old Zipkin tracers.
    let b3_trace = if span.trace_id[..8] == [0u8; 8] {
        hex(&span.trace_id[8..])
    } else {
        trace.clone()
    };
    if formats.b3_single {
        let mut value = format!("{b3_trace}-{id}-{flag}");
        if let Some(parent) = span.parent {
            value.push('-');
            value.push_str(&hex(&parent));
        }
        set(headers, B3, value);
    }
    if formats.b3_multi {
        set(headers, X_B3_TRACE_ID, b3_trace);
        set(headers, X_B3_SPAN_ID, id.clone());
        match span.parent {
            Some(parent) => set(headers, X_B3_PARENT_SPAN_ID, hex(&parent)),
            None => {
                headers.remove(&X_B3_PARENT_SPAN_ID);
            }
        }
        set(headers, X_B3_SAMPLED, flag.to_owned());
        headers.remove(&X_B3_FLAGS);
    }
    if formats.xray {
        let mut value = format!(
            "Root=1-{}-{};Parent={id};Sampled={flag}",
            &trace[..8],
            &trace[8..]
        );
        for extra in xray_extra {
            value.push(';');
            value.push_str(extra);
        }
        set(headers, X_AMZN_TRACE_ID, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn rng() -> rand::rngs::StdRng {
        rand::rngs::StdRng::seed_from_u64(7)
    }

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const PARENT: &str = "00f067aa0ba902b7";

    #[test]
    fn w3c_is_read_and_gets_a_new_parent() {
        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]);
        let span = start(&mut h, 0.0, &mut rng()).unwrap();
        assert_eq!(hex(&span.trace_id), TRACE);
        assert_eq!(span.parent.map(|p| hex(&p)).as_deref(), Some(PARENT));
        assert!(span.sampled);
        let sent = h["traceparent"].to_str().unwrap();
        assert_eq!(sent, format!("00-{TRACE}-{}-01", hex(&span.span_id)));
        assert_ne!(hex(&span.span_id), PARENT);
        assert_eq!(h["tracestate"], "congo=t61rcWkgMzE");
        // Nothing else is added.
        assert!(!h.contains_key("b3") && !h.contains_key("x-amzn-trace-id"));
    }

    #[test]
    fn w3c_rejects_malformed_values() {
        for bad in [
            format!("00-{TRACE}-{PARENT}-01-extra"),
            format!("ff-{TRACE}-{PARENT}-01"),
            format!("00-{}-{PARENT}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{}-{PARENT}-01", &TRACE[1..]),
            format!("00-{TRACE}-{PARENT}-zz"),
        ] {
            assert_eq!(
                extract(&headers(&[("traceparent", &bad)])),
                None,
                "{bad} must be refused"
            );
        }
        // A later version may carry more fields.
        assert!(
            extract(&headers(&[(
                "traceparent",
                &format!("01-{TRACE}-{PARENT}-00-x")
            )]))
            .is_some()
        );
    }

    #[test]
    fn not_sampled_upstream_is_respected_and_still_propagated() {
        let mut h = headers(&[("traceparent", &format!("00-{TRACE}-{PARENT}-00"))]);
        let span = start(&mut h, 1.0, &mut rng()).unwrap();
        assert!(!span.sampled);
        assert!(h["traceparent"].to_str().unwrap().ends_with("-00"));
    }

    #[test]
    fn b3_single_header_round_trips() {
        let mut h = headers(&[("b3", &format!("{TRACE}-{PARENT}-1-05e3ac9a4f6e3b90"))]);
        let span = start(&mut h, 0.0, &mut rng()).unwrap();
        assert_eq!(hex(&span.trace_id), TRACE);
        assert!(span.sampled);
        assert_eq!(
            h["b3"].to_str().unwrap(),
            format!("{TRACE}-{}-1-{PARENT}", hex(&span.span_id))
        );
        assert!(h.contains_key("traceparent"));
        // 64-bit trace ids, and a sampling-only header.
        let i = extract(&headers(&[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7-0")])).unwrap();
        assert_eq!(hex(&i.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert_eq!(i.sampled, Some(false));
        let mut h = headers(&[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7")]);
        let span = start(&mut h, 0.0, &mut rng()).unwrap();
        assert!(!span.sampled, "no decision came and sampling is 0");
        assert!(h["b3"].to_str().unwrap().starts_with("a3ce929d0e0e4736-"));
        assert_eq!(extract(&headers(&[("b3", "1")])), None);
    }

    #[test]
    fn b3_multi_headers_round_trip() {
        let mut h = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", PARENT),
            ("x-b3-sampled", "1"),
        ]);
        let span = start(&mut h, 0.0, &mut rng()).unwrap();
        assert!(span.sampled);
        assert_eq!(h["x-b3-traceid"], TRACE);
        assert_eq!(h["x-b3-spanid"].to_str().unwrap(), hex(&span.span_id));
        assert_eq!(h["x-b3-parentspanid"], PARENT);
        assert_eq!(h["x-b3-sampled"], "1");
        // Debug flag means sampled.
        let i = extract(&headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", PARENT),
            ("x-b3-flags", "1"),
        ]))
        .unwrap();
        assert_eq!(i.sampled, Some(true));
    }

    #[test]
    fn xray_round_trips_and_keeps_extra_keys() {
        let mut h = headers(&[(
            "x-amzn-trace-id",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1;Lineage=a87bd80c:0",
        )]);
        let span = start(&mut h, 0.0, &mut rng()).unwrap();
        assert_eq!(hex(&span.trace_id), "5759e988bd862e3fe1be46a994272793");
        assert_eq!(
            span.parent.map(|p| hex(&p)).as_deref(),
            Some("53995c3f42cd8ad8")
        );
        assert!(span.sampled);
        assert_eq!(
            h["x-amzn-trace-id"].to_str().unwrap(),
            format!(
                "Root=1-5759e988-bd862e3fe1be46a994272793;Parent={};Sampled=1;Lineage=a87bd80c:0",
                hex(&span.span_id)
            )
        );
        assert_eq!(
            h["traceparent"].to_str().unwrap(),
            format!(
                "00-5759e988bd862e3fe1be46a994272793-{}-01",
                hex(&span.span_id)
            )
        );
        // A Root without Parent (the first hop behind a load balancer), sampling undecided.
        let i = extract(&headers(&[(
            "x-amzn-trace-id",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=?",
        )]))
        .unwrap();
        assert_eq!((i.parent, i.sampled), (None, None));
        assert_eq!(
            extract(&headers(&[("x-amzn-trace-id", "Root=2-5759e988-bd86")])),
            None
        );
    }

    #[test]
    fn w3c_wins_over_the_others_and_all_are_rewritten() {
        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("b3", "11111111111111111111111111111111-2222222222222222-0"),
            (
                "x-amzn-trace-id",
                "Root=1-5759e988-bd862e3fe1be46a994272793",
            ),
        ]);
        let span = start(&mut h, 0.0, &mut rng()).unwrap();
        assert_eq!(hex(&span.trace_id), TRACE);
        let id = hex(&span.span_id);
        assert_eq!(
            h["b3"].to_str().unwrap(),
            format!("{TRACE}-{id}-1-{PARENT}")
        );
        assert_eq!(
            h["x-amzn-trace-id"].to_str().unwrap(),
            format!("Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent={id};Sampled=1")
        );
    }

    #[test]
    fn new_traces_follow_the_sampling_rate() {
        let mut rng = rng();
        let mut h = HeaderMap::new();
        assert_eq!(start(&mut h, 0.0, &mut rng), None);
        assert!(h.is_empty(), "an untraced request is left alone");
        let span = start(&mut h, 1.0, &mut rng).unwrap();
        assert!(span.sampled && span.parent.is_none());
        assert_eq!(
            h["traceparent"].to_str().unwrap(),
            format!("00-{}-{}-01", hex(&span.trace_id), hex(&span.span_id))
        );
        let traced = (0..10_000)
            .filter(|_| start(&mut HeaderMap::new(), 0.1, &mut rng).is_some())
            .count();
        assert!((800..1200).contains(&traced), "{traced} of 10000 at 10 %");
    }
}
