//! `strait status`: what a running agent's admin API says, as tables for a person.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot reach the agent's admin API at {addr} (is `strait run` running, and with --admin {addr}?)"
    )]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("GET {path} from {addr}: {message}")]
    Request {
        addr: SocketAddr,
        path: String,
        message: String,
    },
}

/// How long the admin API may take to accept, and then to answer one request.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// One GET to the admin API (HTTP/1.1, on a runtime of its own: `strait status` is a short
/// command with nothing else to run); returns the status code and body.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), Error> {
    let fail = |message: String| Error::Request {
        addr,
        path: path.to_string(),
        message,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail(format!("cannot start a runtime: {e}")))?;
    runtime.block_on(async {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
            .map_err(|source| Error::Connect { addr, source })?;
        let answer = async {
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                    .await
                    .map_err(|e| fail(e.to_string()))?;
            tokio::spawn(connection);
            let request = http::Request::get(path)
                .header(http::header::HOST, addr.to_string())
                .body(Empty::<Bytes>::new())
                .map_err(|e| fail(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let code = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| fail(e.to_string()))?
                .to_bytes();
            Ok((code, String::from_utf8_lossy(&body).into_owned()))
        };
        tokio::time::timeout(ANSWER_TIMEOUT, answer)
            .await
            .map_err(|_| fail(format!("no answer within {ANSWER_TIMEOUT:?}")))?
    })
}

fn get_json(addr: SocketAddr, path: &str) -> Result<Value, Error> {
    let (code, body) = get(addr, path)?;
    if code != 200 {
        return Err(Error::Request {
            addr,
            path: path.into(),
            message: format!("HTTP {code}: {}", body.trim()),
        });
    }
    serde_json::from_str(&body).map_err(|e| Error::Request {
        addr,
        path: path.into(),
        message: format!("not JSON: {e}"),
    })
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn strings(value: &Value) -> String {
    let list: Vec<String> = value.as_array().into_iter().flatten().map(text).collect();
    if list.is_empty() {
        "-".into()
    } else {
        list.join(", ")
    }
}

/// `in 89d 23h`, `in 5h 2m`, `EXPIRED 3d ago`.
fn remaining(seconds: i64) -> String {
    let (abs, expired) = (seconds.unsigned_abs(), seconds < 0);
    let (d, h, m) = (abs / 86_400, abs % 86_400 / 3600, abs % 3600 / 60);
    let span = if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else {
        format!("{m}m")
    };
    if expired {
        format!("EXPIRED {span} ago")
    } else {
        format!("in {span}")
    }
}

/// Ejected endpoints (outlier detection) and circuit breakers at a limit.
fn render_resilience(out: &mut String, resilience: &Value) {
    let _ = writeln!(
        out,
        "\nEJECTED ENDPOINT (outlierDetection)  VIRTUAL NODE                BACK IN  EJECTION"
    );
    let ejected = resilience["ejected_endpoints"].as_array();
    if ejected.is_none_or(|e| e.is_empty()) {
        let _ = writeln!(out, "none");
    }
    for e in ejected.into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<36} {:<27} {:<8} {}x base",
            text(&e["endpoint"]),
            text(&e["virtual_node"]),
            format!(
                "{:.1}s",
                e["remaining_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
            ),
            text(&e["times"])
        );
    }
    let _ = writeln!(
        out,
        "\nOPEN CIRCUIT BREAKER (caller -> service -> target)           LIMITS REACHED (in use/max)"
    );
    let open = resilience["open_breakers"].as_array();
    if open.is_none_or(|o| o.is_empty()) {
        let _ = writeln!(out, "none");
    }
    for b in open.into_iter().flatten() {
        let reached: Vec<String> = b["limits"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["in_use"].as_u64() >= l["max"].as_u64())
            .map(|l| {
                format!(
                    "{} {}/{}",
                    text(&l["limit"]),
                    text(&l["in_use"]),
                    text(&l["max"])
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "{:<60} {}",
            format!(
                "{} -> {} -> {}",
                text(&b["source_virtual_node"]),
                text(&b["virtual_service"]),
                text(&b["target_virtual_node"])
            ),
            reached.join(", ")
        );
    }
}

/// Renders the agent's state: readiness, the mesh in force, local workloads, eBPF counters.
pub fn render(addr: SocketAddr) -> Result<String, Error> {
    let (ready_code, _) = get(addr, "/ready")?;
    let config = get_json(addr, "/config_dump")?;
    let workloads = get_json(addr, "/workloads")?;
    let stats = get_json(addr, "/stats")?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "agent      {addr}  {}",
        if ready_code == 200 {
            "ready"
        } else {
            "NOT READY"
        }
    );
    let _ = writeln!(
        out,
        "mesh       {}  file {}  sha256 {}",
        text(&config["mesh"]["mesh"]["name"]),
        text(&config["file"]),
        text(&config["sha256"]).chars().take(12).collect::<String>()
    );
    if let Some(errors) = config["last_rejected"]["errors"].as_array() {
        let _ = writeln!(out, "last rejected mesh file:");
        for error in errors {
            let _ = writeln!(out, "  {}", text(error));
        }
    }
    let _ = writeln!(
        out,
        "\nWORKLOAD                        VIRTUAL NODE                ENROLLED  LISTENERS / ERROR / REASON"
    );
    for w in workloads.as_array().into_iter().flatten() {
        let detail = if w["enrolled"] == true {
            w["listeners"]
                .as_array()
                .map(|l| l.iter().map(text).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        } else if !w["error"].is_null() {
            text(&w["error"])
        } else {
            format!("not enrolled: {}", text(&w["reason"]))
        };
        let _ = writeln!(
            out,
            "{:<31} {:<27} {:<9} {detail}",
            text(&w["pod"]),
            text(&w["virtual_node"]),
            if w["enrolled"] == true { "yes" } else { "no" }
        );
    }
    let _ = writeln!(
        out,
        "\nWORKLOAD                        CERTIFICATE EXPIRES                         IDENTITIES (SPIFFE ID, DNS) / CERTIFICATE SANS"
    );
    for w in workloads.as_array().into_iter().flatten() {
        let identity = &w["identity"];
        if identity.is_null() {
            continue;
        }
        let names = strings(&identity["identities"]);
        let cert = &identity["certificate"];
        let (sans, expires) = if cert.is_null() {
            ("-".to_owned(), "no certificate (no tls)".to_owned())
        } else if !cert["error"].is_null() {
            (
                "-".to_owned(),
                format!("cannot read: {}", text(&cert["error"])),
            )
        } else {
            (
                strings(&cert["sans"]),
                format!(
                    "{} ({})",
                    text(&cert["not_after"]),
                    remaining(cert["expires_in_seconds"].as_i64().unwrap_or(0))
                ),
            )
        };
        let _ = writeln!(out, "{:<31} {expires:<43} {names}", text(&w["pod"]));
        let _ = writeln!(out, "{:<31} {:<43} SANs: {sans}", "", "");
    }
    // An older agent has no resilience status: leave the section out rather than fail.
    if let Ok(resilience) = get_json(addr, "/status/resilience") {
        render_resilience(&mut out, &resilience);
    }
    let _ = writeln!(out, "\nEBPF COUNTER     VALUE");
    if let Some(counters) = stats["redirect"].as_object() {
        for (reason, value) in counters {
            let _ = writeln!(out, "{reason:<16} {}", text(value));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resilience_section_lists_ejected_endpoints_and_limits_reached() {
        let resilience = serde_json::json!({
            "ejected_endpoints": [
                {"virtual_node": "shop/cart", "endpoint": "10.0.0.3:8080", "remaining_ms": 4200, "times": 2}
            ],
            "open_breakers": [{
                "source_virtual_node": "shop/front",
                "virtual_service": "shop/cart",
                "target_virtual_node": "shop/cart",
                "limits": [
                    {"limit": "max_requests", "in_use": 10, "max": 10},
                    {"limit": "max_retries", "in_use": 0, "max": 3}
                ],
                "open": ["max_requests"]
            }],
        });
        let mut out = String::new();
        render_resilience(&mut out, &resilience);
        assert!(out.contains("10.0.0.3:8080"), "{out}");
        assert!(out.contains("4.2s"), "{out}");
        assert!(out.contains("2x base"), "{out}");
        assert!(
            out.contains("shop/front -> shop/cart -> shop/cart"),
            "{out}"
        );
        assert!(out.contains("max_requests 10/10"), "{out}");
        assert!(!out.contains("max_retries"), "only limits reached: {out}");

        let mut out = String::new();
        render_resilience(
            &mut out,
            &serde_json::json!({"ejected_endpoints": [], "open_breakers": []}),
        );
        assert_eq!(out.matches("none").count(), 2, "{out}");
    }
}
