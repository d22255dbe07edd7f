//! Pieces every resource uses: durations, port mappings, listener timeouts, references,
//! logging and key/value pairs.

use super::*;

impl Cx<'_> {
    pub(super) fn duration(&mut self, n: &Node, path: &str) -> Option<Duration> {
        let o = self.obj(n, path, &["unit", "value"])?;
        let unit = self.req(&o, "unit", |cx, n, p| {
            cx.pick(n, p, &[("s", DurationUnit::S), ("ms", DurationUnit::Ms)])
        });
        // App Mesh sets no upper bound, but the data path adds durations to clocks: anything
        // past MAX_DURATION_SECONDS is a typo or an attack, not a timeout.
        let max = match unit {
            Some(DurationUnit::Ms) => MAX_DURATION_SECONDS * 1000,
            _ => MAX_DURATION_SECONDS,
        };
        let value = self.req(&o, "value", |cx, n, p| {
            let value = cx.int(n, p, 0, i64::MAX)?;
            if value > max {
                cx.err(
                    n.pos,
                    p,
                    format!("expected at most {max} (one year; 0 disables a timeout), got {value}"),
                );
                return None;
            }
            Some(value)
        });
        Some(Duration {
            unit: unit?,
            value: value? as u64,
        })
    }

    pub(super) fn port_mapping(
        &mut self,
        n: &Node,
        path: &str,
        gateway: bool,
    ) -> Option<PortMapping> {
        let o = self.obj(n, path, &["port", "protocol"])?;
        let port = self.req(&o, "port", Cx::port);
        let protocol = self.req(&o, "protocol", |cx, n, p| {
            if gateway {
                cx.pick(n, p, GATEWAY_PROTOCOLS)
            } else {
                cx.pick(n, p, PROTOCOLS)
            }
        });
        Some(PortMapping {
            port: port?,
            protocol: protocol?,
        })
    }

    pub(super) fn http_timeout(&mut self, n: &Node, path: &str) -> Option<HttpTimeout> {
        let o = self.obj(n, path, &["perRequest", "idle"])?;
        let per_request = self.opt(&o, "perRequest", Cx::duration);
        let idle = self.opt(&o, "idle", Cx::duration);
        let bad = (o.get("perRequest").is_some() && per_request.is_none())
            || (o.get("idle").is_some() && idle.is_none());
        (!bad).then_some(HttpTimeout { per_request, idle })
    }

    pub(super) fn tcp_timeout(&mut self, n: &Node, path: &str) -> Option<TcpTimeout> {
        let o = self.obj(n, path, &["idle"])?;
        let idle = self.opt(&o, "idle", Cx::duration);
        if o.get("idle").is_some() && idle.is_none() {
            return None;
        }
        Some(TcpTimeout { idle })
    }

    pub(super) fn logging(&mut self, n: &Node, path: &str) -> Option<Logging> {
        let o = self.obj(n, path, &["accessLog"])?;
        let access_log = self.opt(&o, "accessLog", |cx, n, p| {
            let o = cx.obj(n, p, &["file"])?;
            cx.opt(&o, "file", |cx, n, p| {
                let o = cx.obj(n, p, &["path", "format"])?;
                let path = cx.req(&o, "path", |cx, n, p| {
                    let path = cx.string_len(n, p, 1, 255)?;
                    // The agent writes as root: a path may not climb out of the access log
                    // directory (the rest is checked where the directory is known).
                    match crate::telemetry::access_log::check_components(&path) {
                        Ok(()) => Some(path),
                        Err(error) => {
                            cx.err(n.pos, p, error.to_string());
                            None
                        }
                    }
                });
                let format = cx.opt(&o, "format", |cx, n, p| {
                    let o = cx.obj(n, p, &["text", "json"])?;
                    let (which, v) = cx.one_of(&o, &["text", "json"], true)?;
                    let p = o.at(which);
                    if which == "text" {
                        cx.nonempty(v, &p).map(LogFormat::Text)
                    } else {
                        cx.each(v, &p, 1, usize::MAX, Cx::key_value)
                            .map(LogFormat::Json)
                    }
                });
                Some(FileAccessLog {
                    path: path?,
                    format,
                })
            })
        });
        Some(Logging { access_log })
    }

    pub(super) fn key_value(&mut self, n: &Node, path: &str) -> Option<KeyValue> {
        let o = self.obj(n, path, &["key", "value"])?;
        let key = self.req(&o, "key", Cx::nonempty);
        let value = self.req(&o, "value", Cx::nonempty);
        Some(KeyValue {
            key: key?,
            value: value?,
        })
    }

    /// `{xRef: {name, namespace?}}` or `{xARN: "arn:..."}`, recorded for the reference check.
    pub(super) fn reference(
        &mut self,
        o: &Obj<'_>,
        kind: RefKind,
        ref_key: &str,
        arn_key: &str,
        port: Option<(u16, Pos, String)>,
    ) -> Option<ResourceId> {
        let (r, a) = (o.get(ref_key), o.get(arn_key));
        let (id, pos, path) = match (r, a) {
            (Some(_), Some(_)) => {
                self.err(
                    o.key_pos(arn_key),
                    &o.at(arn_key),
                    format!("`{ref_key}` and `{arn_key}` are mutually exclusive"),
                );
                return None;
            }
            (None, None) => {
                self.err(
                    o.pos,
                    &o.path,
                    format!("expected exactly one of `{ref_key}` or `{arn_key}`"),
                );
                return None;
            }
            (Some(r), None) => {
                let p = o.at(ref_key);
                let ro = self.obj(r, &p, &["name", "namespace", "uid"])?;
                let name = self.req(&ro, "name", Cx::nonempty)?;
                let ns = match ro.get("namespace") {
                    Some(n) => self.nonempty(n, &ro.at("namespace"))?,
                    None => self.ns.clone(),
                };
                (ResourceId::new(ns, name), r.pos, p)
            }
            (None, Some(a)) => {
                let p = o.at(arn_key);
                let s = self.string(a, &p)?;
                let name = match parse_arn(&s, kind) {
                    Ok(name) => name,
                    Err(msg) => {
                        self.err(a.pos, &p, msg);
                        return None;
                    }
                };
                (ResourceId::new(self.ns.clone(), name), a.pos, p)
            }
        };
        let path = self.full_path(&path);
        self.out.refs.push(PendingRef {
            kind,
            id: id.clone(),
            pos,
            file: self.file.to_path_buf(),
            path,
            port,
        });
        Some(id)
    }

    // ---- Mesh ------------------------------------------------------------------------------
}
