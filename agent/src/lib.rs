//! strait: a sidecarless service mesh agent. (Skeleton.)
