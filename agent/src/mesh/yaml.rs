//! A small positioned YAML tree built from `saphyr-parser` events.
//!
//! Every node keeps the line and column where it starts, so the decoder can point at the exact
//! value (or key) that is wrong. Scalars are resolved with the YAML 1.2 core schema (what
//! Kubernetes' YAML reader uses for `true`, `1`, `~`...); quoted scalars are always strings.
//! Aliases are expanded (with a budget against "billion laughs" inputs) and nesting is bounded,
//! so hostile input cannot exhaust memory or the stack.
//!
//! Why not `saphyr`'s own `MarkedYaml` loader (same project as the parser): it expands an
//! alias by cloning the anchored node with no budget, and builds the whole tree before a depth
//! could be checked, so a few hundred bytes of nested aliases ("billion laughs") would exhaust
//! memory before the decoder saw anything; it also stores mappings in a hash map, where a
//! repeated key silently replaces the first and its position is gone. Building the tree from
//! the parser's events here keeps both guards and every position, in about 400 lines.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Pos {
    pub line: usize,
    pub col: usize,
}

impl Pos {
    fn of(span: &Span) -> Self {
        Pos {
            line: span.start.line(),
            col: span.start.col() + 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub pos: Pos,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Entries in document order; duplicates are kept (the decoder reports them).
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// A short description for "expected X, got Y" messages.
    pub fn describe(&self) -> String {
        match self {
            Value::Null => "null".to_string(),
            Value::Bool(b) => format!("boolean {b}"),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => format!("number {f}"),
            Value::Str(s) => {
                let short: String = s.chars().take(60).collect();
                format!("string {short:?}")
            }
            Value::Seq(_) => "a list".to_string(),
            Value::Map(_) => "a mapping".to_string(),
        }
    }

    /// The text of a scalar used as a mapping key.
    pub fn key_text(&self) -> Option<String> {
        match self {
            Value::Null => Some(String::new()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Str(s) => Some(s.clone()),
            Value::Seq(_) | Value::Map(_) => None,
        }
    }
}

/// One `---` document of the stream.
#[derive(Debug)]
pub(crate) struct Document {
    pub root: Option<Node>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Deepest nesting accepted. Real manifests stay under 20.
const MAX_DEPTH: usize = 64;
/// Most nodes that alias expansion may add to a stream.
const ALIAS_BUDGET: usize = 100_000;

enum Frame {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<(Node, Node)>,
        key: Option<Node>,
    },
}

/// Parses a whole stream. On a syntax error the documents read so far are returned too.
pub(crate) fn parse_stream(text: &str) -> (Vec<Document>, Option<SyntaxError>) {
    let mut docs = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Node> = HashMap::new();
    let mut budget = ALIAS_BUDGET;
    let mut current: Option<Document> = None;

    for item in Parser::new_from_str(text) {
        let (event, span) = match item {
            Ok(ev) => ev,
            Err(e) => {
                let m = e.marker();
                return (
                    docs,
                    Some(SyntaxError {
                        pos: Pos {
                            line: m.line(),
                            col: m.col() + 1,
                        },
                        message: format!("invalid YAML: {}", e.info()),
                    }),
                );
            }
        };
        let pos = Pos::of(&span);
        let done: Option<(Node, usize)> = match event {
            Event::Nothing | Event::StreamStart => None,
            Event::StreamEnd => break,
            Event::DocumentStart(_) => {
                current = Some(Document { root: None });
                anchors.clear();
                None
            }
            Event::DocumentEnd => {
                if let Some(d) = current.take() {
                    docs.push(d);
                }
                None
            }
            Event::Alias(id) => match anchors.get(&id) {
                Some(n) => {
                    let size = count_nodes(n, budget.saturating_add(1));
                    if size > budget {
                        return (
                            docs,
                            Some(SyntaxError {
                                pos,
                                message: "YAML aliases expand to too many nodes".to_string(),
                            }),
                        );
                    }
                    budget -= size;
                    let mut n = n.clone();
                    n.pos = pos;
                    Some((n, 0))
                }
                None => {
                    return (
                        docs,
                        Some(SyntaxError {
                            pos,
                            message: "invalid YAML: alias to an unknown anchor".to_string(),
                        }),
                    );
                }
            },
            Event::Scalar(text, style, anchor, tag) => {
                let forced_str = tag
                    .as_ref()
                    .is_some_and(|t| t.handle == "tag:yaml.org,2002:" && t.suffix == "str");
                let value = if style == ScalarStyle::Plain && !forced_str {
                    resolve_plain(&text)
                } else {
                    Value::Str(text.into_owned())
                };
                Some((Node { pos, value }, anchor))
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if stack.len() >= MAX_DEPTH {
                    return (
                        docs,
                        Some(SyntaxError {
                            pos,
                            message: format!("nesting deeper than {MAX_DEPTH} levels"),
                        }),
                    );
                }
                if matches!(event, Event::SequenceStart(..)) {
                    stack.push(Frame::Seq {
                        pos,
                        anchor,
                        items: Vec::new(),
                    });
                } else {
                    stack.push(Frame::Map {
                        pos,
                        anchor,
                        entries: Vec::new(),
                        key: None,
                    });
                }
                None
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(Frame::Seq { pos, anchor, items }) => Some((
                    Node {
                        pos,
                        value: Value::Seq(items),
                    },
                    anchor,
                )),
                Some(Frame::Map {
                    pos,
                    anchor,
                    entries,
                    ..
                }) => Some((
                    Node {
                        pos,
                        value: Value::Map(entries),
                    },
                    anchor,
                )),
                None => None,
            },
        };
        let Some((node, anchor)) = done else {
            continue;
        };
        if anchor != 0 {
            anchors.insert(anchor, node.clone());
        }
        match stack.last_mut() {
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => *key = Some(node),
                Some(k) => entries.push((k, node)),
            },
            None => {
                if let Some(d) = current.as_mut() {
                    d.root = Some(node);
                }
            }
        }
    }
    if let Some(d) = current.take() {
        docs.push(d);
    }
    (docs, None)
}

/// Counts nodes, stopping once `limit` is passed.
fn count_nodes(n: &Node, limit: usize) -> usize {
    let mut total = 0;
    let mut todo = vec![n];
    while let Some(n) = todo.pop() {
        total += 1;
        if total > limit {
            return total;
        }
        match &n.value {
            Value::Seq(items) => todo.extend(items.iter()),
            Value::Map(entries) => todo.extend(entries.iter().flat_map(|(k, v)| [k, v])),
            _ => {}
        }
    }
    total
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve_plain(s: &str) -> Value {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return Value::Float(f64::INFINITY);
        }
        "-.inf" | "-.Inf" | "-.INF" => return Value::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Value::Float(f64::NAN),
        _ => {}
    }
    let bytes = s.as_bytes();
    if let Some(hex) = s.strip_prefix("0x")
        && !hex.is_empty()
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
        && let Ok(i) = i64::from_str_radix(hex, 16)
    {
        return Value::Int(i);
    }
    if let Some(oct) = s.strip_prefix("0o")
        && !oct.is_empty()
        && oct.bytes().all(|b| (b'0'..=b'7').contains(&b))
        && let Ok(i) = i64::from_str_radix(oct, 8)
    {
        return Value::Int(i);
    }
    let digits = bytes.strip_prefix(b"-").or(bytes.strip_prefix(b"+"));
    let digits = digits.unwrap_or(bytes);
    if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) {
        return match s.parse::<i64>() {
            Ok(i) => Value::Int(i),
            // Too big for i64: still a number, so range checks report it sensibly.
            Err(_) => Value::Float(s.parse::<f64>().unwrap_or(f64::INFINITY)),
        };
    }
    let is_float_text = !digits.is_empty()
        && digits.iter().any(u8::is_ascii_digit)
        && digits
            .iter()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if is_float_text && let Ok(f) = s.parse::<f64>() {
        return Value::Float(f);
    }
    Value::Str(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(text: &str) -> Node {
        let (docs, err) = parse_stream(text);
        assert_eq!(err, None);
        docs.into_iter().next().unwrap().root.unwrap()
    }

    #[test]
    fn scalars_follow_the_core_schema() {
        let n =
            root("a: 1\nb: '1'\nc: true\nd: ~\ne: 1.5\nf: yes\ng: 0x1f\nh: !!str 7\ni: 1.2.3\n");
        let Value::Map(entries) = n.value else {
            panic!()
        };
        let values: Vec<Value> = entries.into_iter().map(|(_, v)| v.value).collect();
        assert_eq!(
            values,
            vec![
                Value::Int(1),
                Value::Str("1".into()),
                Value::Bool(true),
                Value::Null,
                Value::Float(1.5),
                Value::Str("yes".into()),
                Value::Int(31),
                Value::Str("7".into()),
                Value::Str("1.2.3".into()),
            ]
        );
    }

    #[test]
    fn positions_are_one_based() {
        let n = root("a:\n  b: [1, 2]\n");
        let Value::Map(entries) = &n.value else {
            panic!()
        };
        let (k, v) = &entries[0];
        assert_eq!(k.pos, Pos { line: 1, col: 1 });
        let Value::Map(inner) = &v.value else {
            panic!()
        };
        assert_eq!(inner[0].0.pos, Pos { line: 2, col: 3 });
        let Value::Seq(items) = &inner[0].1.value else {
            panic!()
        };
        assert_eq!(items[1].pos, Pos { line: 2, col: 10 });
    }

    #[test]
    fn documents_and_aliases() {
        let (docs, err) = parse_stream("a: &x {b: 1}\nc: *x\n---\n---\nz: 1\n");
        assert_eq!(err, None);
        assert_eq!(docs.len(), 3);
        assert!(docs[1].root.is_none() || docs[1].root.as_ref().unwrap().value == Value::Null);
        let Value::Map(entries) = &docs[0].root.as_ref().unwrap().value else {
            panic!()
        };
        assert_eq!(entries[0].1.value, entries[1].1.value);
    }

    #[test]
    fn hostile_inputs_are_bounded() {
        let deep = "[".repeat(10_000);
        assert!(parse_stream(&deep).1.is_some());
        let mut laughs = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 0..12 {
            let prev = if i == 0 {
                "a".to_string()
            } else {
                format!("l{}", i - 1)
            };
            laughs.push_str(&format!(
                "l{i}: &l{i} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]\n"
            ));
        }
        let (_, err) = parse_stream(&laughs);
        assert!(err.unwrap().message.contains("too many"));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let (_, err) = parse_stream("a: [1, 2\nb: 3\n");
        let err = err.unwrap();
        assert!(err.pos.line >= 1, "{err:?}");
    }
}
