//! Access logs where App Mesh wrote them: `logging.accessLog.file.path` of a virtual node,
//! in App Mesh's formats: Envoy's default text line, a custom Envoy format string (`text`), or
//! key/value JSON (`json`).
//!
//! Writing is off the data path: a connection or request hands a finished line to a bounded
//! queue and goes on; a thread per file writes it. When the queue is full the line is dropped
//! and counted, never waited for. A file that is rotated away (renamed or deleted) is reopened
//! at its path within a second.
//!
//! Supported operators: `START_TIME`, `DURATION`, `REQ(H)` / `REQ(H?ALT)`, `RESP(H)`,
//! `PROTOCOL`, `RESPONSE_CODE`, `RESPONSE_FLAGS`, `GRPC_STATUS`, `BYTES_RECEIVED`, `BYTES_SENT`,
//! `UPSTREAM_HOST`, `UPSTREAM_CLUSTER`, `DOWNSTREAM_REMOTE_ADDRESS`,
//! `DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT`, `DOWNSTREAM_LOCAL_ADDRESS`, `ROUTE_NAME`,
//! `HOSTNAME`, each with an optional `:N` length limit, and strait's `STRAIT_REPORTER`
//! (`source`: written by the calling agent; `destination`: by the agent delivering to the
//! server, in the server virtual node's log). Anything else renders as `-`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;

use crate::mesh::{FileAccessLog, LogFormat};

/// Envoy's default access log format, which App Mesh used when no format was given.
pub const ENVOY_DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// Lines waiting for one file before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// What one connection or request did, for its access log line.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    pub start: Option<SystemTime>,
    pub duration: Duration,
    /// `HTTP/1.1`, `HTTP/2`, or `TCP`.
    pub protocol: &'static str,
    /// Request headers by lower-case name; pseudo-headers `:method`, `:path`, `:authority`.
    pub request_headers: BTreeMap<String, String>,
    pub response_headers: BTreeMap<String, String>,
    pub response_code: Option<u16>,
    /// Envoy's response flags (`UF` upstream connection failure, `UT` upstream timeout, ...).
    pub response_flags: String,
    pub grpc_status: Option<i32>,
    /// Bytes from the downstream (the calling workload).
    pub bytes_received: u64,
    /// Bytes to the downstream.
    pub bytes_sent: u64,
    pub upstream_host: Option<SocketAddr>,
    /// The upstream "cluster": the target virtual node.
    pub upstream_cluster: String,
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub route_name: String,
    /// `source` or `destination` (see `RequestLabels::reporter`); empty: `source`.
    pub reporter: &'static str,
}

/// A piece of a format string.
#[derive(Debug, Clone, PartialEq)]
pub enum Token {
    Literal(String),
    Operator {
        name: String,
        argument: Option<String>,
        max_len: Option<usize>,
    },
}

/// A parsed format: a text template, or JSON keys with templates.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    Text(Vec<Token>),
    Json(Vec<(String, Vec<Token>)>),
}

impl Format {
    pub fn from_mesh(format: Option<&LogFormat>) -> Format {
        match format {
            None => Format::Text(parse(ENVOY_DEFAULT_FORMAT)),
            Some(LogFormat::Text(text)) => Format::Text(parse(text)),
            Some(LogFormat::Json(pairs)) => Format::Json(
                pairs
                    .iter()
                    .map(|kv| (kv.key.clone(), parse(&kv.value)))
                    .collect(),
            ),
        }
    }

    /// Renders one line, ending in a newline.
    pub fn render(&self, entry: &Entry) -> String {
        match self {
            Format::Text(tokens) => {
                let mut line: String = tokens.iter().map(|t| render_token(t, entry)).collect();
                if !line.ends_with('\n') {
                    line.push('\n');
                }
                line
            }
            Format::Json(pairs) => {
                let mut object = serde_json::Map::new();
                for (key, tokens) in pairs {
                    object.insert(key.clone(), json_value(tokens, entry));
                }
                let mut line = serde_json::Value::Object(object).to_string();
                line.push('\n');
                line
            }
        }
    }
}

/// Splits an Envoy format string into literals and `%OPERATOR(arg):N%` tokens.
fn parse(format: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut literal = String::new();
    let mut rest = format;
    while let Some(start) = rest.find('%') {
        literal.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let Some(end) = after.find('%') else {
            literal.push_str(&rest[start..]);
            rest = "";
            break;
        };
        let body = &after[..end];
        if body.is_empty() {
            // `%%` is a literal percent sign.
            literal.push('%');
        } else {
            if !literal.is_empty() {
                tokens.push(Token::Literal(std::mem::take(&mut literal)));
            }
            tokens.push(operator(body));
        }
        rest = &after[end + 1..];
    }
    literal.push_str(rest);
    if !literal.is_empty() {
        tokens.push(Token::Literal(literal));
    }
    tokens
}

fn operator(body: &str) -> Token {
    let (head, max_len) = match body.rsplit_once(')') {
        Some((head, tail)) => (
            format!("{head})"),
            tail.strip_prefix(':').and_then(|n| n.parse().ok()),
        ),
        None => match body.split_once(':') {
            Some((head, n)) => (head.to_string(), n.parse().ok()),
            None => (body.to_string(), None),
        },
    };
    let (name, argument) = match head.split_once('(') {
        Some((name, arg)) => (
            name.to_string(),
            Some(arg.trim_end_matches(')').to_string()),
        ),
        None => (head, None),
    };
    Token::Operator {
        name,
        argument,
        max_len,
    }
}

fn header(headers: &BTreeMap<String, String>, argument: &str) -> Option<String> {
    // `REQ(X-ENVOY-ORIGINAL-PATH?:PATH)`: the first header that is present.
    argument
        .split('?')
        .find_map(|name| headers.get(&name.to_ascii_lowercase()).cloned())
}

fn value(name: &str, argument: Option<&str>, entry: &Entry) -> Option<String> {
    match name {
        "START_TIME" => entry.start.map(iso8601),
        "DURATION" => Some(entry.duration.as_millis().to_string()),
        "REQ" => header(&entry.request_headers, argument?),
        "RESP" => header(&entry.response_headers, argument?),
        "PROTOCOL" => Some(entry.protocol.to_string()).filter(|p| !p.is_empty()),
        "RESPONSE_CODE" => Some(entry.response_code.unwrap_or(0).to_string()),
        "RESPONSE_FLAGS" => Some(entry.response_flags.clone()).filter(|f| !f.is_empty()),
        "GRPC_STATUS" => entry.grpc_status.map(|s| s.to_string()),
        "BYTES_RECEIVED" => Some(entry.bytes_received.to_string()),
        "BYTES_SENT" => Some(entry.bytes_sent.to_string()),
        "UPSTREAM_HOST" => entry.upstream_host.map(|a| a.to_string()),
        "UPSTREAM_CLUSTER" => Some(entry.upstream_cluster.clone()).filter(|c| !c.is_empty()),
        "DOWNSTREAM_REMOTE_ADDRESS" => entry.downstream_remote.map(|a| a.to_string()),
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => {
            entry.downstream_remote.map(|a| a.ip().to_string())
        }
        "DOWNSTREAM_LOCAL_ADDRESS" => entry.downstream_local.map(|a| a.to_string()),
        "ROUTE_NAME" => Some(entry.route_name.clone()).filter(|r| !r.is_empty()),
        "HOSTNAME" => hostname(),
        // strait's own: which side wrote the line.
        "STRAIT_REPORTER" => Some(if entry.reporter.is_empty() {
            "source".to_owned()
        } else {
            entry.reporter.to_owned()
        }),
        _ => None,
    }
}

fn render_token(token: &Token, entry: &Entry) -> String {
    match token {
        Token::Literal(text) => text.clone(),
        Token::Operator {
            name,
            argument,
            max_len,
        } => {
            let mut text = value(name, argument.as_deref(), entry).unwrap_or_else(|| "-".into());
            if let Some(max) = max_len
                && text.chars().count() > *max
            {
                text = text.chars().take(*max).collect();
            }
            text
        }
    }
}

/// A JSON value for one key: a lone numeric operator stays a number, as in Envoy.
fn json_value(tokens: &[Token], entry: &Entry) -> serde_json::Value {
    if let [Token::Operator { name, .. }] = tokens
        && matches!(
            name.as_str(),
            "RESPONSE_CODE" | "BYTES_RECEIVED" | "BYTES_SENT" | "DURATION" | "GRPC_STATUS"
        )
    {
        let text = render_token(&tokens[0], entry);
        if let Ok(n) = text.parse::<u64>() {
            return n.into();
        }
    }
    tokens
        .iter()
        .map(|t| render_token(t, entry))
        .collect::<String>()
        .into()
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
}

/// `2026-11-27T14:02:03.123Z`, Envoy's default START_TIME.
pub fn iso8601(time: SystemTime) -> String {
    let utc = time::OffsetDateTime::from(time.max(UNIX_EPOCH));
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        utc.year(),
        u8::from(utc.month()),
        utc.day(),
        utc.hour(),
        utc.minute(),
        utc.second(),
        utc.millisecond()
    )
}

/// One access log destination: a format and a queue to the file's writer thread.
#[derive(Clone)]
pub struct AccessLog {
    format: Arc<Format>,
    queue: SyncSender<String>,
    dropped: Counter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .finish()
    }
}

impl AccessLog {
    /// Renders and queues a line; never blocks.
    pub fn log(&self, entry: &Entry) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.queue.try_send(self.format.render(entry))
        {
            self.dropped.inc();
        }
    }
}

/// Paths allowed outside the access-log directory: the agent's own standard streams (App Mesh
/// users log to `/dev/stdout`).
pub const STANDARD_STREAMS: [&str; 2] = ["/dev/stdout", "/dev/stderr"];

/// Why a mesh's access log path is refused.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error(
        "{path:?} has a `..` component; access logs stay in the access log directory, write a \
         path relative to it"
    )]
    ParentComponent { path: String },
    #[error(
        "{path:?} is outside the access log directory {dir} (--access-log-dir): write a path \
         relative to that directory, a path under it, or /dev/stdout"
    )]
    Outside { path: String, dir: PathBuf },
    #[error(
        "{link} is a symlink; access logs are opened without following symlinks (the agent runs \
         as root): replace it with a regular file or folder"
    )]
    Symlink { link: PathBuf },
}

/// The lexical rule, also applied by validation: no `..` component (absolute or relative).
pub fn check_components(path: &str) -> Result<(), PathError> {
    if Path::new(path)
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(PathError::ParentComponent {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Where the mesh's `logging.accessLog.file.path` is written: `/dev/stdout` and `/dev/stderr`
/// as they are; a relative path under `dir`; an absolute path only if it is under `dir`.
/// Anything between `dir` and the file that exists and is a symlink is refused (the file itself
/// is also opened with `O_NOFOLLOW`, for links made after this check).
pub fn resolve(dir: &Path, path: &str) -> Result<PathBuf, PathError> {
    if STANDARD_STREAMS.contains(&path) {
        return Ok(PathBuf::from(path));
    }
    check_components(path)?;
    let full = if Path::new(path).is_absolute() {
        Path::new(path).to_path_buf()
    } else {
        dir.join(path)
    };
    let Ok(inside) = full.strip_prefix(dir) else {
        return Err(PathError::Outside {
            path: path.to_owned(),
            dir: dir.to_owned(),
        });
    };
    let mut at = dir.to_path_buf();
    for part in inside.components() {
        at.push(part);
        if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(PathError::Symlink { link: at });
        }
    }
    Ok(full)
}

/// The writer threads, one per file path, shared by every virtual node logging there.
#[derive(Clone, Default)]
pub struct Writers {
    files: Arc<Mutex<BTreeMap<PathBuf, SyncSender<String>>>>,
    /// Lines dropped because a file's queue was full.
    pub dropped: Counter,
}

impl Writers {
    /// An access log for a virtual node's `logging.accessLog.file`, written to `path` (what
    /// [`resolve`] made of it).
    pub fn open(&self, config: &FileAccessLog, path: PathBuf) -> AccessLog {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let queue = files
            .entry(path.clone())
            .or_insert_with(|| {
                let (tx, rx) = sync_channel(QUEUE);
                let thread_path = path.clone();
                let spawned = std::thread::Builder::new()
                    .name("strait-accesslog".into())
                    .spawn(move || write_loop(&thread_path, rx));
                if let Err(error) = spawned {
                    tracing::error!(path = %path.display(), %error, "cannot start the access log writer");
                }
                tx
            })
            .clone();
        AccessLog {
            format: Arc::new(Format::from_mesh(config.format.as_ref())),
            queue,
            dropped: self.dropped.clone(),
        }
    }
}

struct Output {
    writer: BufWriter<File>,
    identity: Option<(u64, u64)>,
}

fn open(path: &Path) -> Option<Output> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    // /dev/stdout is itself a link (to /proc/self/fd/1); every other path was checked against
    // the access log directory, and a link swapped in since must not be followed.
    if !STANDARD_STREAMS.iter().any(|s| Path::new(s) == path) {
        options.custom_flags(libc::O_NOFOLLOW).mode(0o640);
    }
    match options.open(path) {
        Ok(file) => {
            let identity = file.metadata().ok().map(|m| (m.dev(), m.ino()));
            Some(Output {
                writer: BufWriter::new(file),
                identity,
            })
        }
        Err(error) => {
            tracing::error!(path = %path.display(), %error, "cannot open the access log; lines are dropped until it can be opened");
            None
        }
    }
}

/// True when the path now names another file (or none): the log was rotated.
fn rotated(path: &Path, output: &Output) -> bool {
    if path.starts_with("/dev") {
        return false;
    }
    match std::fs::metadata(path) {
        Ok(m) => Some((m.dev(), m.ino())) != output.identity,
        Err(_) => true,
    }
}

fn write_loop(path: &Path, lines: Receiver<String>) {
    let mut output = open(path);
    let mut last_check = Instant::now();
    loop {
        let line = match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => Some(line),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
            if output.as_ref().is_none_or(|o| rotated(path, o)) {
                if let Some(mut old) = output.take() {
                    let _ = old.writer.flush();
                }
                output = open(path);
            }
        }
        let Some(out) = output.as_mut() else {
            continue;
        };
        match line {
            Some(line) => {
                let _ = out.writer.write_all(line.as_bytes());
                // Write what is queued now in one go, then flush, so a tail -f sees lines
                // promptly without a syscall per line under load.
                while let Ok(more) = lines.try_recv() {
                    let _ = out.writer.write_all(more.as_bytes());
                }
                let _ = out.writer.flush();
            }
            None => {
                let _ = out.writer.flush();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry {
        let mut request_headers = BTreeMap::new();
        request_headers.insert(":method".into(), "GET".into());
        request_headers.insert(":path".into(), "/color".into());
        request_headers.insert(":authority".into(), "color.app:8080".into());
        request_headers.insert("user-agent".into(), "curl/8".into());
        request_headers.insert("x-request-id".into(), "abc".into());
        Entry {
            start: Some(UNIX_EPOCH + Duration::from_millis(1_764_252_123_456)),
            duration: Duration::from_millis(12),
            protocol: "HTTP/1.1",
            request_headers,
            response_code: Some(200),
            bytes_received: 0,
            bytes_sent: 5,
            upstream_host: Some("10.244.1.3:8080".parse().unwrap()),
            ..Entry::default()
        }
    }

    #[test]
    fn default_format_is_envoys() {
        let line = Format::from_mesh(None).render(&entry());
        assert_eq!(
            line,
            "[2025-11-27T14:02:03.456Z] \"GET /color HTTP/1.1\" 200 - 0 5 12 - \"-\" \"curl/8\" \"abc\" \"color.app:8080\" \"10.244.1.3:8080\"\n"
        );
    }

    #[test]
    fn custom_text_with_alternatives_and_limits() {
        let format = Format::from_mesh(Some(&LogFormat::Text(
            "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %REQ(USER-AGENT):3% %%done %BOGUS%".into(),
        )));
        assert_eq!(format.render(&entry()), "/color cur %done -\n");
    }

    #[test]
    fn json_keeps_numbers_numeric() {
        let format = Format::from_mesh(Some(&LogFormat::Json(vec![
            crate::mesh::KeyValue {
                key: "code".into(),
                value: "%RESPONSE_CODE%".into(),
            },
            crate::mesh::KeyValue {
                key: "path".into(),
                value: "%REQ(:PATH)%".into(),
            },
        ])));
        let line = format.render(&entry());
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["code"], 200);
        assert_eq!(value["path"], "/color");
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(iso8601(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2024-02-29 (a leap day), 12:00:00.
        assert_eq!(
            iso8601(UNIX_EPOCH + Duration::from_secs(1_709_208_000)),
            "2024-02-29T12:00:00.000Z"
        );
    }

    #[test]
    fn paths_stay_in_the_directory_and_symlinks_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(resolve(d, "a/b.log").unwrap(), d.join("a/b.log"));
        let inside = d.join("c.log").display().to_string();
        assert_eq!(resolve(d, &inside).unwrap(), d.join("c.log"));
        assert_eq!(resolve(d, "/dev/stdout").unwrap(), Path::new("/dev/stdout"));
        assert!(matches!(
            resolve(d, "/etc/cron.d/x"),
            Err(PathError::Outside { .. })
        ));
        assert!(matches!(
            resolve(d, "../x.log"),
            Err(PathError::ParentComponent { .. })
        ));
        let sneaky = format!("{}/../x.log", d.display());
        assert!(matches!(
            resolve(d, &sneaky),
            Err(PathError::ParentComponent { .. })
        ));
        std::os::unix::fs::symlink("/etc", d.join("etc")).unwrap();
        assert!(matches!(
            resolve(d, "etc/cron.d/x"),
            Err(PathError::Symlink { .. })
        ));
        // A link made after the check is not followed when the file is opened.
        let victim = d.join("victim");
        std::fs::write(&victim, "original").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("late.log")).unwrap();
        assert!(open(&d.join("late.log")).is_none());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original");
    }

    #[test]
    fn lines_reach_the_file_and_a_rotated_file_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let writers = Writers::default();
        let log = writers.open(
            &FileAccessLog {
                path: "access.log".into(),
                format: Some(LogFormat::Text("%RESPONSE_CODE%".into())),
            },
            resolve(dir.path(), "access.log").unwrap(),
        );
        log.log(&entry());
        let wait_for = |path: &Path, want: &str| {
            for _ in 0..50 {
                if std::fs::read_to_string(path).is_ok_and(|t| t == want) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            panic!("{} never held {want:?}", path.display());
        };
        wait_for(&path, "200\n");
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        // The writer notices within a second; lines logged meanwhile may still land in the
        // old file, so keep logging until the new one appears.
        for _ in 0..30 {
            log.log(&entry());
            std::thread::sleep(Duration::from_millis(100));
            if path.exists() {
                break;
            }
        }
        assert!(path.exists(), "the log was reopened at its path");
        assert_eq!(writers.dropped.get(), 0);
    }
}
