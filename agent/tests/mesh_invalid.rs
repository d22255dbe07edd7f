//! The invalid corpus (`testdata/mesh/invalid/*.yaml`): each file is rejected with exactly the
//! diagnostics in its sibling `.expected` file (file:line:column, severity, field path and
//! message, one per line, errors and warnings alike).
//!
//! After a deliberate message change, `STRAIT_BLESS=1 cargo test --test mesh_invalid` rewrites
//! the `.expected` files; review the diff before committing it.

use std::path::Path;

use strait::mesh::{Error, parse_str};

#[test]
fn every_invalid_file_gives_exactly_the_expected_diagnostics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/mesh/invalid");
    let bless = std::env::var_os("STRAIT_BLESS").is_some();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10, "corpus went missing");
    let mut failures = Vec::new();
    for path in files {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let got = match parse_str(&text, Path::new(&name)) {
            Ok(_) => "(loaded without errors)\n".to_string(),
            Err(Error::Invalid { diagnostics }) => diagnostics
                .iter()
                .map(|d| format!("{d}\n"))
                .collect::<String>(),
            Err(e) => format!("(unexpected error: {e})\n"),
        };
        let expected_path = path.with_extension("expected");
        if bless {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if got != expected {
            failures.push(format!("{name}:\n--- expected\n{expected}--- got\n{got}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn invalid_display_lists_every_diagnostic_one_per_line() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/mesh/invalid");
    let text = std::fs::read_to_string(dir.join("ranges.yaml")).unwrap();
    let err = parse_str(&text, Path::new("ranges.yaml")).unwrap_err();
    let Error::Invalid { diagnostics } = &err else {
        panic!("{err}")
    };
    let shown = err.to_string();
    let mut lines = shown.lines();
    assert!(lines.next().unwrap().starts_with("invalid mesh file ("));
    assert_eq!(lines.count(), diagnostics.len());
    for d in diagnostics {
        assert!(shown.contains(&d.to_string()));
        assert!(d.line > 0 && d.column > 0, "{d}");
    }
}
