//! Mesh files several end-to-end tests share, kept as YAML in `tests/fixtures/` (embedded at
//! build time) with `${name}` placeholders that [`fixture`] fills.
//!
//! A placeholder inside a line is replaced by its value. A placeholder that is a whole line
//! stands for a block of lines: the value's lines replace it (the caller indents them), and an
//! empty value removes the line. Every placeholder must be given a value and every value must
//! be used, so a fixture and its callers cannot drift apart silently.

use anyhow::{Context as _, bail};

/// The fixtures, by file name.
const FIXTURES: &[(&str, &str)] = &[
    ("color-tcp.yaml", include_str!("../fixtures/color-tcp.yaml")),
    (
        "color-canary.yaml",
        include_str!("../fixtures/color-canary.yaml"),
    ),
];

/// The fixture `name` (a file in `tests/fixtures/`) with its placeholders filled from `values`.
pub fn fixture(name: &str, values: &[(&str, &str)]) -> anyhow::Result<String> {
    let text = FIXTURES
        .iter()
        .find(|(file, _)| *file == name)
        .map(|(_, text)| *text)
        .with_context(|| {
            format!("no fixture {name} (add it to FIXTURES in tests/src/fixture.rs)")
        })?;
    fill(text, values).with_context(|| format!("fixture tests/fixtures/{name}"))
}

fn fill(text: &str, values: &[(&str, &str)]) -> anyhow::Result<String> {
    let mut used = vec![false; values.len()];
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches('\n');
        if let Some(i) = values
            .iter()
            .position(|(key, _)| bare == format!("${{{key}}}"))
        {
            used[i] = true;
            let block = values[i].1;
            if !block.is_empty() {
                out.push_str(block);
                if !block.ends_with('\n') {
                    out.push('\n');
                }
            }
            continue;
        }
        let mut line = line.to_owned();
        for (i, (key, value)) in values.iter().enumerate() {
            let placeholder = format!("${{{key}}}");
            if line.contains(&placeholder) {
                used[i] = true;
                line = line.replace(&placeholder, value);
            }
        }
        if let Some(start) = line.find("${") {
            let name = line[start + 2..].split('}').next().unwrap_or_default();
            bail!(
                "placeholder ${{{name}}} has no value in: {}",
                line.trim_end()
            );
        }
        out.push_str(&line);
    }
    if let Some(i) = used.iter().position(|u| !u) {
        bail!(
            "the value for `{}` is not used: no ${{{}}} in it",
            values[i].0,
            values[i].0
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::fill;

    #[test]
    fn placeholders_in_lines_and_blocks_are_filled() {
        let text = "a: ${x}\n${block}\nb: ${x}-${y}\n";
        let filled = fill(text, &[("x", "1"), ("y", "2"), ("block", "  c: 3")]).unwrap();
        assert_eq!(filled, "a: 1\n  c: 3\nb: 1-2\n");
        let empty = fill(text, &[("x", "1"), ("y", "2"), ("block", "")]).unwrap();
        assert_eq!(empty, "a: 1\nb: 1-2\n");
    }

    #[test]
    fn a_missing_or_unused_value_is_an_error() {
        let missing = fill("a: ${x}\n", &[]).unwrap_err().to_string();
        assert!(missing.contains("${x} has no value"), "{missing}");
        let unused = fill("a: 1\n", &[("x", "1")]).unwrap_err().to_string();
        assert!(unused.contains("`x` is not used"), "{unused}");
    }

    #[test]
    fn every_fixture_names_its_placeholders() {
        for (name, text) in super::FIXTURES {
            assert!(
                text.contains("${"),
                "{name} has no placeholder: a plain file would do"
            );
            assert!(
                text.starts_with("apiVersion: appmesh.k8s.aws/v1beta2\nkind: Mesh\n"),
                "{name}"
            );
        }
    }
}
