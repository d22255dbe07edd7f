//! The workload file: what the agent reads to learn that a pod exists on its node. One JSON file
//! per pod in the node's workloads directory, written atomically (temp file + rename), removed
//! when the pod leaves the mesh. The agent keeps its own copy of this struct; the field names are
//! the contract.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One pod, as the agent sees it.
///
/// ```json
/// {"name":"client","namespace":"app","labels":{"app":"client"},
///  "ips":["10.244.1.2","fd00:244:1::2"],"netns":"/run/netns/st1a2b3cn1p2",
///  "cgroup":"/sys/fs/cgroup/unified/strait-test-1a2b3c/node1/app_client"}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadFile {
    /// The pod's name (a DNS-1123 label).
    pub name: String,
    /// The pod's Kubernetes namespace.
    pub namespace: String,
    /// The pod's labels; the mesh maps them to a VirtualNode.
    pub labels: BTreeMap<String, String>,
    /// The pod's addresses, IPv4 first.
    pub ips: Vec<IpAddr>,
    /// The pod's network namespace file (a bind mount under /run/netns).
    pub netns: PathBuf,
    /// The pod's cgroup v2 directory.
    pub cgroup: PathBuf,
}

impl WorkloadFile {
    /// The file name a workload is stored under: `<namespace>_<name>.json` (Kubernetes names
    /// never contain '_', so this is unique per pod).
    pub fn file_name(&self) -> String {
        format!("{}_{}.json", self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_names_are_the_contract() {
        let w = WorkloadFile {
            name: "client".into(),
            namespace: "app".into(),
            labels: BTreeMap::from([("app".into(), "client".into())]),
            ips: vec![
                "10.244.1.2".parse().unwrap(),
                "fd00:244:1::2".parse().unwrap(),
            ],
            netns: "/run/netns/x".into(),
            cgroup: "/sys/fs/cgroup/unified/y".into(),
        };
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(
            json,
            r#"{"name":"client","namespace":"app","labels":{"app":"client"},"ips":["10.244.1.2","fd00:244:1::2"],"netns":"/run/netns/x","cgroup":"/sys/fs/cgroup/unified/y"}"#
        );
        assert_eq!(serde_json::from_str::<WorkloadFile>(&json).unwrap(), w);
        assert_eq!(w.file_name(), "app_client.json");
    }
}
