//! Types shared between strait's eBPF programs and the agent. (Skeleton: filled in by the eBPF work.)
#![no_std]
