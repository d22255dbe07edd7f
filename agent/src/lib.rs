//! strait: a sidecarless service mesh agent. (Skeleton.)

pub mod mesh;
