//! Start order (`supervisor.after`): which services a service still waits for, cycles among
//! them, and the order services stop in. The [`Registry`] is where each service task
//! publishes its state; [`deps_of`] and [`stop_layers`] are pure.

use std::collections::{BTreeMap, BTreeSet};

use keepup_deploy::wire::ServiceState;
use tokio::sync::watch;

use crate::machine::Deps;

/// What the registry knows of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its state.
    pub state: ServiceState,
    /// The services it starts after.
    pub after: Vec<String>,
}

/// Every supervised service's state and `after` list, watched by the service tasks.
pub type Services = BTreeMap<String, Entry>;

/// The agent's registry of service states (cheap to clone).
#[derive(Debug, Clone)]
pub struct Registry(watch::Sender<Services>);

impl Default for Registry {
    fn default() -> Registry {
        Registry(watch::Sender::new(Services::new()))
    }
}

impl Registry {
    /// Records `name`'s entry; wakes the watchers only when it changed.
    pub fn publish(&self, name: &str, entry: Entry) {
        self.0.send_if_modified(|m| {
            if m.get(name) == Some(&entry) {
                return false;
            }
            m.insert(name.to_string(), entry);
            true
        });
    }

    /// Forgets `name` (its manifest was removed).
    pub fn remove(&self, name: &str) {
        self.0.send_if_modified(|m| m.remove(name).is_some());
    }

    /// A watcher.
    pub fn subscribe(&self) -> watch::Receiver<Services> {
        self.0.subscribe()
    }
}

/// What `after` allows `name` now: clear when every service it follows is running (ready),
/// a cycle when following `after` entries leads back to `name`.
pub fn deps_of(name: &str, after: &[String], services: &Services) -> Deps {
    if let Some(cycle) = cycle_through(name, after, services) {
        return Deps::Cycle(cycle);
    }
    let blocked: Vec<(String, String)> = after
        .iter()
        .filter_map(|dep| match services.get(dep) {
            None => Some((dep.clone(), "not supervised on this host".to_string())),
            Some(e) if e.state.is_ready() => None,
            Some(e) => Some((dep.clone(), e.state.to_string())),
        })
        .collect();
    if blocked.is_empty() {
        Deps::Clear
    } else {
        Deps::Blocked(blocked)
    }
}

/// A path of `after` edges from `name` back to itself (`[name, a, b, name]`), if any.
fn cycle_through(name: &str, after: &[String], services: &Services) -> Option<Vec<String>> {
    fn walk(
        at: &str,
        target: &str,
        services: &Services,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        let Some(e) = services.get(at) else {
            return false;
        };
        for next in &e.after {
            if next == target {
                path.push(next.clone());
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(next, target, services, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    for first in after {
        let mut path = vec![name.to_string(), first.clone()];
        if first == name {
            return Some(path);
        }
        let mut seen = BTreeSet::from([first.clone()]);
        if walk(first, name, services, &mut path, &mut seen) {
            return Some(path);
        }
    }
    None
}

/// The order to stop services in: layers, each stopped (in parallel) once the layers
/// before it are done. A service is stopped before everything it starts after; members of a
/// cycle stop together.
pub fn stop_layers(after: &BTreeMap<String, Vec<String>>) -> Vec<Vec<String>> {
    let mut left: BTreeSet<&String> = after.keys().collect();
    let mut layers = Vec::new();
    while !left.is_empty() {
        // Those no remaining service starts after.
        let layer: Vec<String> = left
            .iter()
            .filter(|s| {
                !left
                    .iter()
                    .any(|o| o != *s && after.get(*o).is_some_and(|a| a.contains(s)))
            })
            .map(|s| (*s).clone())
            .collect();
        let layer = if layer.is_empty() {
            // A cycle: the rest together.
            left.iter().map(|s| (*s).clone()).collect()
        } else {
            layer
        };
        for s in &layer {
            left.remove(s);
        }
        layers.push(layer);
    }
    layers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(state: ServiceState, after: &[&str]) -> Entry {
        Entry {
            state,
            after: after.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_dependant_waits_for_what_it_follows_and_says_why() {
        let mut m = Services::new();
        m.insert("db".into(), svc(ServiceState::Starting, &[]));
        m.insert("web".into(), svc(ServiceState::Waiting, &["db", "cache"]));
        let after = vec!["db".to_string(), "cache".to_string()];
        assert_eq!(
            deps_of("web", &after, &m),
            Deps::Blocked(vec![
                ("db".into(), "starting".into()),
                ("cache".into(), "not supervised on this host".into())
            ])
        );
        m.insert("db".into(), svc(ServiceState::Running, &[]));
        m.insert("cache".into(), svc(ServiceState::GivenUp, &[]));
        assert_eq!(
            deps_of("web", &after, &m),
            Deps::Blocked(vec![("cache".into(), "given-up".into())])
        );
        m.insert("cache".into(), svc(ServiceState::Running, &[]));
        assert_eq!(deps_of("web", &after, &m), Deps::Clear);
        assert_eq!(deps_of("db", &[], &m), Deps::Clear);
    }

    #[test]
    fn cycles_are_named() {
        let mut m = Services::new();
        m.insert("a".into(), svc(ServiceState::Waiting, &["b"]));
        m.insert("b".into(), svc(ServiceState::Waiting, &["c"]));
        m.insert("c".into(), svc(ServiceState::Waiting, &["a"]));
        m.insert("d".into(), svc(ServiceState::Waiting, &["a"]));
        assert_eq!(
            deps_of("a", &["b".into()], &m),
            Deps::Cycle(vec!["a".into(), "b".into(), "c".into(), "a".into()])
        );
        // d follows the cycle but is not in it: it waits.
        assert!(matches!(deps_of("d", &["a".into()], &m), Deps::Blocked(_)));
    }

    #[test]
    fn dependants_stop_first() {
        let mut after = BTreeMap::new();
        after.insert("db".to_string(), vec![]);
        after.insert(
            "web".to_string(),
            vec!["db".to_string(), "cache".to_string()],
        );
        after.insert("cache".to_string(), vec!["db".to_string()]);
        after.insert("lone".to_string(), vec![]);
        assert_eq!(
            stop_layers(&after),
            vec![
                vec!["lone".to_string(), "web".to_string()],
                vec!["cache".to_string()],
                vec!["db".to_string()]
            ]
        );
        let mut cyc = BTreeMap::new();
        cyc.insert("a".to_string(), vec!["b".to_string()]);
        cyc.insert("b".to_string(), vec!["a".to_string()]);
        assert_eq!(
            stop_layers(&cyc),
            vec![vec!["a".to_string(), "b".to_string()]]
        );
    }
}
