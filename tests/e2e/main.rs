//! strait's end-to-end tests, one binary with a module per area so the testbed library and
//! its dependencies link once.
//!
//! Each module is a file next to this one and says what it tests; `common` holds the one-node
//! bed and mesh several modules share. Run one module with
//! `cargo test -p strait-tests --test e2e -- <module>::`, one test with
//! `cargo test -p strait-tests --test e2e -- <module>::<test> --exact`.
//! `cargo xtask test` runs the binary once per module, one module after another
//! (xtask/src/test.rs says why), as docs/architecture.md ("Testbed rules") describes.
//!
//! Every test needs root; without it a test fails (never skips) with the reason.

mod common;

mod attacks;
mod check;
mod cni;
mod datapath;
mod drain;
mod fastpath;
mod http;
mod identity;
mod identity_service;
mod ingress;
mod kubernetes;
mod mtls;
mod prometheus;
mod reload;
mod resilience;
mod telemetry;
mod testbed;
mod tunnel;
mod ui;
