//! The parser never panics, whatever the input: a seeded, bounded mutation loop over the valid
//! corpus (byte edits, YAML punctuation, line shuffles, truncation) plus random text. Every
//! result must be `Ok` or `Err(Invalid)` with positioned diagnostics.

use std::path::Path;

use strait::mesh::{Error, parse_str};

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const PIECES: &[&str] = &[
    ":",
    " ",
    "-",
    "\n",
    "  ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "'",
    "\"",
    "&a",
    "*a",
    "!!str ",
    "|",
    ">",
    "#",
    "---\n",
    "~",
    "0",
    "-1",
    "65536",
    "1e400",
    "null",
    "true",
    "\t",
    "%",
    "?",
    "é",
    "virtualNodeRef",
    "weight",
    "port",
    "arn:aws:appmesh:r:1:mesh/m/virtualNode/x",
    "\\",
];

fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut s: Vec<char> = text.chars().collect();
    for _ in 0..=rng.below(4) {
        let at = rng.below(s.len() + 1);
        match rng.below(6) {
            0 => {
                let end = (at + rng.below(40)).min(s.len());
                s.drain(at..end);
            }
            1 | 2 => {
                let piece = PIECES[rng.below(PIECES.len())];
                s.splice(at..at, piece.chars());
            }
            3 => s.truncate(at),
            4 => {
                // Duplicate a line somewhere else.
                let text: String = s.iter().collect();
                let lines: Vec<&str> = text.lines().collect();
                if !lines.is_empty() {
                    let line = lines[rng.below(lines.len())].to_string() + "\n";
                    let at = at.min(s.len());
                    s.splice(at..at, line.chars());
                }
            }
            _ => {
                if at < s.len() {
                    s[at] = char::from_u32(rng.below(0x80) as u32).unwrap_or('x');
                }
            }
        }
    }
    s.into_iter().collect()
}

fn check(text: &str) {
    match parse_str(text, Path::new("fuzz.yaml")) {
        Ok(_) => {}
        Err(Error::Invalid { diagnostics }) => {
            assert!(
                !diagnostics.is_empty(),
                "Invalid without diagnostics for:\n{text}"
            );
        }
        Err(e) => panic!("unexpected error {e} for:\n{text}"),
    }
}

#[test]
fn mutated_corpus_never_panics() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata/mesh");
    let mut texts = Vec::new();
    for sub in ["valid", "invalid"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|e| e == "yaml") {
                texts.push(std::fs::read_to_string(p).unwrap());
            }
        }
    }
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    for text in &texts {
        for _ in 0..150 {
            let m = mutate(&mut rng, text);
            let result = std::panic::catch_unwind(|| check(&m));
            assert!(result.is_ok(), "parser panicked on:\n{m}");
        }
    }
}

#[test]
fn random_text_never_panics() {
    let mut rng = Rng(42);
    for _ in 0..2000 {
        let len = rng.below(200);
        let text: String = (0..len)
            .map(|_| {
                if rng.below(3) == 0 {
                    PIECES[rng.below(PIECES.len())].to_string()
                } else {
                    char::from_u32(rng.below(0x7f) as u32)
                        .unwrap_or('x')
                        .to_string()
                }
            })
            .collect();
        check(&text);
    }
}
