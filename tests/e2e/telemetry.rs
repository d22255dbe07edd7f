//! End-to-end tests of telemetry: a real agent on a testbed node, a client pod calling an HTTP
//! virtual service with a 90/10 canary, real servers (`strait-http serve`) and a real OTLP/HTTP
//! receiver (`strait-http collect`) on the node's loopback.
//!
//! What is checked is what an operator would check: after a known number of requests with a
//! known split and error mix, `strait_requests_total` by labels and the histogram counts equal
//! what the client saw; the retries equal what the retry policy implies; one access log line per
//! request in the configured JSON format, with App Mesh's response flags; a `traceparent` the
//! client sent reaches the server with the same trace id and a new parent span id, and the
//! receiver gets that span with the right parent/child links and attributes; /workloads shows
//! the identity and certificate expiry; `--telemetry off` records nothing.
//!
//! Needs root; without it these tests fail with the reason.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use testbed::agent::{Agent, strait_ok};
use testbed::{Node, Pod, Process, Scenario, Testbed, run};

const COLOR: &str = "color.app.svc.cluster.local";
const COLOR_V4: &str = "10.96.0.30";
const HTTP_BIN: &str = env!("CARGO_BIN_EXE_strait-http");
const COLLECTOR: &str = "127.0.0.1:4318";
const CERT_DAYS: i64 = 30;

/// The canary mesh (tests/fixtures/color-canary.yaml) with `client`'s access log.
fn mesh_yaml(log: &Path, certs: &Path) -> String {
    let logging = format!(
        r#"  logging:
    accessLog:
      file:
        path: {}
        format:
          json:
            - {{key: method, value: "%REQ(:METHOD)%"}}
            - {{key: path, value: "%REQ(:PATH)%"}}
            - {{key: code, value: "%RESPONSE_CODE%"}}
            - {{key: flags, value: "%RESPONSE_FLAGS%"}}
            - {{key: route, value: "%ROUTE_NAME%"}}
            - {{key: cluster, value: "%UPSTREAM_CLUSTER%"}}
            - {{key: upstream, value: "%UPSTREAM_HOST%"}}
            - {{key: duration, value: "%DURATION%"}}
            - {{key: request_id, value: "%REQ(X-REQUEST-ID)%"}}
            - {{key: protocol, value: "%PROTOCOL%"}}"#,
        log.display()
    );
    testbed::fixture(
        "color-canary.yaml",
        &[
            ("mesh", "telemetry"),
            ("client_logging", &logging),
            ("certs", &certs.display().to_string()),
            ("dead_health_check", ""),
            ("service", COLOR),
        ],
    )
    .expect("BUG: the fixture and its values disagree")
}

struct Bed {
    tb: Testbed,
    node: Node,
    client: Pod,
    mesh: PathBuf,
    access_log: PathBuf,
    _servers: Vec<Process>,
}

fn bed(test: &str) -> anyhow::Result<Bed> {
    // `dead` names the outside pod, where nothing listens: connects to it are refused.
    let scenario = Scenario::builder(test)
        .service(COLOR, &[COLOR_V4.parse()?])
        .refused("dead.app.svc.cluster.local")
        .build()?;
    let access_log = scenario.tb.temp_dir().join("access.log");
    scenario.write_mesh(&mesh_yaml(&access_log, &scenario.certs()))?;
    scenario.issue_certs(CERT_DAYS)?;
    let Scenario {
        tb,
        node,
        client,
        mesh,
        servers,
        ..
    } = scenario;
    Ok(Bed {
        tb,
        node,
        client,
        mesh,
        access_log,
        _servers: servers,
    })
}

fn start_agent(bed: &Bed, extra: &[&str]) -> anyhow::Result<Agent> {
    // Access logs go only under the operator's access log directory.
    let logs = bed.tb.temp_dir().display().to_string();
    let mut args = vec!["--access-log-dir", &logs];
    args.extend_from_slice(extra);
    let agent = Agent::start(&bed.tb, &bed.node, &bed.mesh, &args)?;
    for pod in ["app/client", "app/color-v1", "app/color-v2"] {
        agent.wait_enrolled(pod, true, Duration::from_secs(20))?;
    }
    Ok(agent)
}

/// Runs `strait-http load` in the client pod; returns its JSON report.
fn load(pod: &Pod, path: &str, count: u32) -> anyhow::Result<Value> {
    let url = format!("http://{COLOR}:8080{path}");
    let output = run(
        pod.command(HTTP_BIN).args([
            "load",
            &url,
            "--count",
            &count.to_string(),
            "--concurrency",
            "2",
        ]),
        Duration::from_secs(120),
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "strait-http load {url}: no JSON report: {stdout:?} {:?}",
            String::from_utf8_lossy(&output.stderr)
        )
    })?;
    let answered: u64 = report["statuses"]
        .as_object()
        .map(|s| s.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    ensure!(
        answered == u64::from(count),
        "{count} requests to {path}, {answered} answered: {report}"
    );
    Ok(report)
}

fn count_of(report: &Value, field: &str, key: &str) -> u64 {
    report[field][key].as_u64().unwrap_or(0)
}

/// One sample of the Prometheus text format: its labels and value.
type Sample = (BTreeMap<String, String>, f64);

fn samples(text: &str, name: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(rest) => match rest.split_once("} ") {
                Some((labels, value)) => (labels, value),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(value) => ("", value),
                None => continue,
            },
        };
        let mut map = BTreeMap::new();
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            if let Some((k, v)) = pair.split_once("=\"") {
                map.insert(k.to_owned(), v.trim_end_matches('"').to_owned());
            }
        }
        if let Ok(value) = value.trim().parse::<f64>() {
            out.push((map, value));
        }
    }
    out
}

/// The sum of `name` over samples whose labels include every pair in `want`.
fn sum(text: &str, name: &str, want: &[(&str, &str)]) -> u64 {
    samples(text, name)
        .iter()
        .filter(|(labels, _)| {
            want.iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
        .sum::<f64>() as u64
}

/// The access log's lines, once there are at least `want` (bounded wait).
fn access_log_lines(path: &Path, want: usize) -> anyhow::Result<Vec<Value>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let lines: Vec<Value> = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .context("an access log line is not JSON")?;
        if lines.len() >= want || Instant::now() >= deadline {
            return Ok(lines);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn request_metrics_and_access_logs_count_what_was_sent() -> anyhow::Result<()> {
    let bed = bed("telemetry-metrics")?;
    let agent = start_agent(&bed, &[])?;

    // The canary: 200 successes split 90/10.
    let ok = load(&bed.client, "/color", 200)?;
    ensure!(count_of(&ok, "statuses", "200") == 200, "{ok}");
    // Errors from the servers: every attempt answers 503, so App Mesh's implicit policy
    // retries each request twice.
    let failing = load(&bed.client, "/color?fail=100", 10)?;
    ensure!(count_of(&failing, "statuses", "503") == 10, "{failing}");
    // No endpoint accepts: 503 with UF, after two connect-failure retries each.
    let dead = load(&bed.client, "/dead", 5)?;
    ensure!(count_of(&dead, "statuses", "503") == 5, "{dead}");
    // No route matches: 404 with NR.
    let nowhere = load(&bed.client, "/nowhere", 4)?;
    ensure!(count_of(&nowhere, "statuses", "404") == 4, "{nowhere}");

    let text = agent.admin_get("/metrics")?;
    let base = [
        ("mesh", "telemetry"),
        ("source_virtual_node", "app/client"),
        ("target_virtual_service", "app/color"),
    ];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut labels: Vec<(&str, &str)> = base.to_vec();
        labels.extend_from_slice(extra);
        labels
    };
    for (node, server) in [("app/color-v1", "v1"), ("app/color-v2", "v2")] {
        let ok_labels = with(&[
            ("route", "split"),
            ("target_virtual_node", node),
            ("response_code_class", "2xx"),
        ]);
        let counted = sum(&text, "strait_requests_total", &ok_labels);
        assert_eq!(counted, count_of(&ok, "by_server", server), "2xx to {node}");
        assert_eq!(
            sum(&text, "strait_request_duration_seconds_count", &ok_labels),
            counted,
            "the histogram saw every request to {node}"
        );
        let err_labels = with(&[
            ("route", "split"),
            ("target_virtual_node", node),
            ("response_code_class", "5xx"),
        ]);
        assert_eq!(
            sum(&text, "strait_requests_total", &err_labels),
            count_of(&failing, "by_server", server),
            "5xx from {node}"
        );
    }
    assert_eq!(
        sum(
            &text,
            "strait_requests_total",
            &with(&[
                ("route", "dead"),
                ("target_virtual_node", "app/dead"),
                ("response_code_class", "5xx")
            ])
        ),
        5
    );
    assert_eq!(
        sum(
            &text,
            "strait_requests_total",
            &with(&[
                ("route", ""),
                ("target_virtual_node", ""),
                ("response_code_class", "4xx")
            ])
        ),
        4
    );
    assert_eq!(sum(&text, "strait_requests_total", &[]), 219);
    assert_eq!(
        sum(&text, "strait_request_duration_seconds_count", &[]),
        219
    );
    assert_eq!(
        sum(
            &text,
            "strait_request_retries_total",
            &with(&[("route", "split"), ("reason", "status")])
        ),
        20,
        "two retries per failing request"
    );
    assert_eq!(
        sum(
            &text,
            "strait_request_retries_total",
            &with(&[("route", "dead"), ("reason", "connect_failure")])
        ),
        10
    );
    // Durations are real: the 2xx requests took more than nothing and less than a second each.
    let seconds: f64 = samples(&text, "strait_request_duration_seconds_sum")
        .iter()
        .map(|(_, v)| v)
        .sum();
    assert!(seconds > 0.0 && seconds < 219.0, "{seconds}");
    // OpenMetrics when asked for.
    let om = run(
        bed.node.command("curl").args([
            "--silent",
            "--max-time",
            "5",
            "-H",
            "Accept: application/openmetrics-text",
            "http://127.0.0.1:15000/metrics",
        ]),
        Duration::from_secs(10),
    )?;
    let om = String::from_utf8_lossy(&om.stdout);
    assert!(
        om.trim_end().ends_with("# EOF"),
        "OpenMetrics ends with # EOF"
    );
    assert_eq!(sum(&om, "strait_requests_total", &[]), 219);

    // One access log line per request, in the configured JSON format.
    let lines = access_log_lines(&bed.access_log, 219)?;
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    for l in &lines {
        *codes
            .entry(format!("{} {}", l["code"], l["flags"]))
            .or_default() += 1;
    }
    assert_eq!(lines.len(), 219, "one line per request: {codes:?}");
    let by = |f: &dyn Fn(&Value) -> bool| lines.iter().filter(|l| f(l)).count();
    assert_eq!(by(&|l| l["code"] == 200 && l["route"] == "split"), 200);
    // Retried twice on 503 and still 503: the retries were used up (Envoy: URX).
    assert_eq!(by(&|l| l["code"] == 503 && l["flags"] == "URX"), 10);
    assert_eq!(
        by(&|l| l["code"] == 503 && l["flags"] == "UF,URX" && l["cluster"] == "app/dead"),
        5
    );
    assert_eq!(
        by(&|l| l["code"] == 404 && l["flags"] == "NR" && l["path"] == "/nowhere"),
        4
    );
    assert_eq!(
        by(&|l| l["method"] == "GET" && l["protocol"] == "HTTP/1.1"),
        219
    );
    // A request id is made when the request is forwarded; one refused before (NR) has none.
    assert_eq!(
        by(&|l| l["request_id"].as_str().is_some_and(|id| id.len() == 36)),
        215
    );
    assert_eq!(
        by(&|l| l["code"] == 200 && l["upstream"].as_str().is_some_and(|u| u.ends_with(":8080"))),
        200
    );

    // /workloads: the identity and the certificate's expiry.
    let workloads = agent.workloads()?;
    let v1 = workloads
        .iter()
        .find(|w| w["pod"] == "app/color-v1")
        .context("color-v1 in /workloads")?;
    let identity = &v1["identity"];
    assert_eq!(
        identity["identities"][0], "spiffe://telemetry/ns/app/vn/color-v1",
        "{v1}"
    );
    let cert = &identity["certificate"];
    let sans: Vec<&str> = cert["sans"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        sans.contains(&"spiffe://telemetry/ns/app/vn/color-v1"),
        "{cert}"
    );
    let left = cert["expires_in_seconds"].as_i64().unwrap_or(0);
    assert!(
        (CERT_DAYS - 1) * 86_400 < left && left <= CERT_DAYS * 86_400,
        "a {CERT_DAYS}-day certificate: {cert}"
    );
    let client = workloads
        .iter()
        .find(|w| w["pod"] == "app/client")
        .context("client in /workloads")?;
    assert!(client["identity"]["certificate"].is_null(), "{client}");
    let status = strait_ok(&bed.node, &["status", "--admin", "127.0.0.1:15000"])?;
    assert!(
        status.contains("spiffe://telemetry/ns/app/vn/color-v1")
            && (status.contains("(in 29d") || status.contains("(in 30d")),
        "strait status shows identities and expiry:\n{status}"
    );
    agent.stop()?;

    // --telemetry off: the requests still work; nothing is counted or logged.
    let agent = start_agent(&bed, &["--telemetry", "off"])?;
    let off = load(&bed.client, "/color", 20)?;
    ensure!(count_of(&off, "statuses", "200") == 20, "{off}");
    let text = agent.admin_get("/metrics")?;
    assert_eq!(sum(&text, "strait_requests_total", &[]), 0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(access_log_lines(&bed.access_log, 220)?.len(), 219);
    agent.stop()?;
    Ok(())
}

/// The spans the receiver got so far, by span id.
fn received_spans(path: &Path) -> anyhow::Result<Vec<(String, Value)>> {
    let mut spans = Vec::new();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    // The receiver may be writing its next export as we read: only whole lines count.
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    for line in complete.lines() {
        let export: Value = serde_json::from_str(line)?;
        ensure!(export["path"] == "/v1/traces", "{export}");
        ensure!(export["content_type"] == "application/json", "{export}");
        for resource in export["body"]["resourceSpans"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let service = resource["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .map(|a| a["value"]["stringValue"].as_str().unwrap_or("").to_owned())
                .unwrap_or_default();
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for span in scope["spans"].as_array().into_iter().flatten() {
                    spans.push((service.clone(), span.clone()));
                }
            }
        }
    }
    Ok(spans)
}

fn attribute<'a>(span: &'a Value, key: &str) -> &'a Value {
    span["attributes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
        .unwrap_or(&Value::Null)
}

/// curl in the client pod; returns the server's description of the request it got.
fn curl_seen(pod: &Pod, headers: &[&str]) -> anyhow::Result<Value> {
    let mut command = pod.command("curl");
    command.args(["--silent", "--show-error", "--fail", "--max-time", "10"]);
    for h in headers {
        command.args(["-H", h]);
    }
    command.arg(format!("http://{COLOR}:8080/color"));
    let output = run(&mut command, Duration::from_secs(20))?;
    if !output.status.success() {
        bail!("curl: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

#[test]
fn trace_context_is_propagated_and_spans_reach_the_collector() -> anyhow::Result<()> {
    let bed = bed("telemetry-traces")?;
    let spans_file = bed.tb.temp_dir().join("spans.jsonl");
    let collector = bed.tb.spawn(
        "otlp-collector",
        bed.node.command(HTTP_BIN).args([
            "collect",
            "--listen",
            COLLECTOR,
            "--out",
            &spans_file.display().to_string(),
        ]),
    )?;
    collector.wait_listening(4318, Duration::from_secs(10))?;
    let endpoint = format!("http://{COLLECTOR}");
    let agent = start_agent(
        &bed,
        &["--trace-sampling", "0", "--otlp-endpoint", &endpoint],
    )?;

    // W3C from the client: same trace id, a new parent span id, sampled.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let seen = curl_seen(
        &bed.client,
        &[
            &format!("traceparent: 00-{trace}-{parent}-01"),
            "tracestate: vendor=abc",
        ],
    )?;
    let upstream = seen["headers"]["traceparent"]
        .as_str()
        .context("the server got a traceparent")?;
    let fields: Vec<&str> = upstream.split('-').collect();
    assert_eq!(fields.len(), 4, "{upstream}");
    assert_eq!((fields[0], fields[1], fields[3]), ("00", trace, "01"));
    let proxy_span = fields[2].to_owned();
    assert_ne!(
        proxy_span, parent,
        "the upstream request has a new parent span"
    );
    assert_eq!(seen["headers"]["tracestate"], "vendor=abc");
    let w3c_server = seen["name"].as_str().unwrap_or("").to_owned();

    // B3 multi headers: rewritten with the proxy's span, W3C added.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let seen_b3 = curl_seen(
        &bed.client,
        &[
            &format!("X-B3-TraceId: {b3_trace}"),
            "X-B3-SpanId: e457b5a2e4d86bd1",
            "X-B3-Sampled: 1",
        ],
    )?;
    let b3_span = seen_b3["headers"]["x-b3-spanid"]
        .as_str()
        .context("x-b3-spanid upstream")?
        .to_owned();
    assert_eq!(seen_b3["headers"]["x-b3-traceid"], b3_trace);
    assert_eq!(seen_b3["headers"]["x-b3-parentspanid"], "e457b5a2e4d86bd1");
    assert_ne!(b3_span, "e457b5a2e4d86bd1");
    assert_eq!(
        seen_b3["headers"]["traceparent"],
        format!("00-{b3_trace}-{b3_span}-01")
    );

    // No context and sampling 0: nothing is added, nothing recorded.
    let plain = curl_seen(&bed.client, &[])?;
    assert!(plain["headers"].get("traceparent").is_none(), "{plain}");

    // The receiver gets exactly the two sampled client spans.
    let deadline = Instant::now() + Duration::from_secs(10);
    let spans = loop {
        let spans = received_spans(&spans_file)?;
        if spans.len() >= 2 || Instant::now() >= deadline {
            break spans;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    std::thread::sleep(Duration::from_millis(1000));
    let spans_now = received_spans(&spans_file)?;
    assert_eq!(
        spans_now.len(),
        2,
        "exactly the sampled requests: {spans:?}"
    );
    let (service, span) = spans_now
        .iter()
        .find(|(_, s)| s["traceId"] == trace)
        .context("the W3C request's span")?;
    assert_eq!(service, "app/client");
    assert_eq!(
        span["spanId"],
        proxy_span.as_str(),
        "the span the server saw as parent"
    );
    assert_eq!(span["parentSpanId"], parent, "child of the client's span");
    assert_eq!(span["kind"], 3, "a client span");
    assert_eq!(span["traceState"], "vendor=abc");
    assert_eq!(attribute(span, "http.request.method")["stringValue"], "GET");
    assert_eq!(
        attribute(span, "http.response.status_code")["intValue"],
        "200"
    );
    assert_eq!(attribute(span, "appmesh.route")["stringValue"], "split");
    assert_eq!(
        attribute(span, "appmesh.target_virtual_node")["stringValue"],
        format!("app/color-{w3c_server}")
    );
    assert_eq!(attribute(span, "appmesh.mesh")["stringValue"], "telemetry");
    let start: u128 = span["startTimeUnixNano"].as_str().unwrap_or("0").parse()?;
    let end: u128 = span["endTimeUnixNano"].as_str().unwrap_or("0").parse()?;
    assert!(start > 0 && end >= start, "{span}");
    let (_, b3) = spans_now
        .iter()
        .find(|(_, s)| s["traceId"] == b3_trace)
        .context("the B3 request's span")?;
    assert_eq!(b3["spanId"], b3_span.as_str());
    assert_eq!(b3["parentSpanId"], "e457b5a2e4d86bd1");
    let text = agent.admin_get("/metrics")?;
    assert_eq!(
        sum(&text, "strait_trace_spans_total", &[("result", "exported")]),
        2
    );

    // The collector goes away: requests are not held up, the span is dropped and counted.
    collector.kill()?;
    let started = Instant::now();
    curl_seen(
        &bed.client,
        &[&format!("traceparent: 00-{trace}-{parent}-01")],
    )?;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "a dead collector must not slow requests: {:?}",
        started.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = agent.admin_get("/metrics")?;
        if sum(
            &text,
            "strait_trace_spans_total",
            &[("result", "export_failed")],
        ) == 1
        {
            break;
        }
        if Instant::now() >= deadline {
            bail!("the failed export was not counted:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    agent.stop()?;
    Ok(())
}
