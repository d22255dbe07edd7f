//! `strait-cni`: the chained CNI plugin that hands each pod to the node's strait agent
//! ([`plugin`]), the protocol both sides speak ([`protocol`]), and the `install` / `uninstall`
//! commands the DaemonSet's init container and the uninstall job run ([`install`]).
//! See docs/kubernetes.md, "strait-cni".

pub mod install;
pub mod plugin;
pub mod protocol;
