//! strait: a sidecarless service mesh agent.
//!
//! One agent per node. eBPF programs (see [`redirect`]) capture the connects of enrolled pods
//! to mesh services and hand them to the agent's shared proxy ([`proxy`]), which applies the
//! App Mesh resources of the mesh file ([`mesh`], compiled into [`routing`] tables).

pub mod admin;
pub mod app;
pub mod ca;
pub mod check;
pub mod cli;
pub mod config;
pub mod discovery;
pub mod gateway;
pub mod handover;
pub mod heap;
pub mod identity;
pub mod kubernetes;
pub mod logging;
pub mod mesh;
pub mod netns;
pub mod node;
pub mod proxy;
pub mod redirect;
pub mod reload;
pub mod routing;
pub mod scheduling;
pub mod service_ids;
pub mod state;
pub mod status;
pub mod telemetry;
pub mod workloads;
