//! Stable eBPF ids for virtual services.
//!
//! connect4/connect6 check a pod's call against two maps written one after the other: the
//! service map (address -> service id) and the backend map ((pod, service id) pairs). If ids
//! were positions in the mesh's sorted service list, a reload that adds or removes a service
//! would renumber the others, and between the two map updates a pod would briefly be allowed
//! or denied the wrong services. Here a service keeps its id for as long as it is in the mesh;
//! a new service gets a new id, and an id is reused only after its service left.

use std::collections::BTreeMap;

use crate::mesh::ResourceId;

/// The first id; 0 means "no id" in the maps.
const FIRST: u32 = 1;
/// `strait_ebpf::SERVICE_ID_REFUSED` and above are never handed out.
const LAST: u32 = strait_ebpf::SERVICE_ID_REFUSED - 1;

#[derive(Debug, Clone)]
pub struct ServiceIds {
    ids: BTreeMap<ResourceId, u32>,
    next: u32,
}

impl Default for ServiceIds {
    fn default() -> Self {
        Self {
            ids: BTreeMap::new(),
            next: FIRST,
        }
    }
}

impl ServiceIds {
    /// Makes the ids cover exactly `services`: the ones already known keep theirs, new ones get
    /// fresh ids, the ones gone are forgotten.
    pub fn update<'a>(&mut self, services: impl IntoIterator<Item = &'a ResourceId>) {
        let wanted: Vec<&ResourceId> = services.into_iter().collect();
        self.ids.retain(|id, _| wanted.contains(&id));
        for service in wanted {
            if !self.ids.contains_key(service) {
                let id = self.allocate();
                self.ids.insert(service.clone(), id);
            }
        }
    }

    /// The id of a service in the mesh.
    pub fn get(&self, service: &ResourceId) -> Option<u32> {
        self.ids.get(service).copied()
    }

    /// The next id no service holds: counting up, and once at the end, the lowest free one
    /// (four billion services would have to come and go first).
    fn allocate(&mut self) -> u32 {
        let in_use = |id: u32| self.ids.values().any(|v| *v == id);
        if self.next <= LAST && !in_use(self.next) {
            let id = self.next;
            self.next += 1;
            return id;
        }
        let id = (FIRST..=LAST)
            .find(|id| !in_use(*id))
            .expect("BUG: more virtual services than eBPF service ids");
        self.next = id + 1;
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<ResourceId> {
        names.iter().map(|n| ResourceId::new("app", *n)).collect()
    }

    #[test]
    fn a_service_keeps_its_id_while_others_come_and_go() {
        let mut s = ServiceIds::default();
        s.update(&ids(&["color", "echo"]));
        let color = s.get(&ResourceId::new("app", "color")).unwrap();
        let echo = s.get(&ResourceId::new("app", "echo")).unwrap();
        assert_ne!(color, echo);
        // A service sorted before both arrives, then one leaves: the others keep their ids.
        s.update(&ids(&["aardvark", "color", "echo"]));
        assert_eq!(s.get(&ResourceId::new("app", "color")), Some(color));
        assert_eq!(s.get(&ResourceId::new("app", "echo")), Some(echo));
        let aardvark = s.get(&ResourceId::new("app", "aardvark")).unwrap();
        assert!(![color, echo].contains(&aardvark));
        s.update(&ids(&["aardvark", "echo"]));
        assert_eq!(s.get(&ResourceId::new("app", "color")), None);
        assert_eq!(s.get(&ResourceId::new("app", "echo")), Some(echo));
        assert_eq!(s.get(&ResourceId::new("app", "aardvark")), Some(aardvark));
    }

    #[test]
    fn ids_are_reused_only_once_they_run_out() {
        let mut s = ServiceIds {
            ids: BTreeMap::new(),
            next: LAST,
        };
        s.update(&ids(&["a"]));
        assert_eq!(s.get(&ResourceId::new("app", "a")), Some(LAST));
        s.update(&ids(&["a", "b"]));
        assert_eq!(s.get(&ResourceId::new("app", "b")), Some(FIRST));
        assert_eq!(s.get(&ResourceId::new("app", "a")), Some(LAST));
    }
}
