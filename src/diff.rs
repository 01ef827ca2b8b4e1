//! What changes between two configs, entity by entity: the answer of
//! `POST /config?dry_run=true`, and later of `manifold sync`.

use serde::Serialize;

use crate::config::Config;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EntityRef {
    pub kind: &'static str,
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConfigDiff {
    pub created: Vec<EntityRef>,
    pub updated: Vec<EntityRef>,
    pub deleted: Vec<EntityRef>,
}

fn diff_list<T: PartialEq>(kind: &'static str, old: &[T], new: &[T], name: impl Fn(&T) -> &str, out: &mut ConfigDiff) {
    for n in new {
        match old.iter().find(|o| name(o) == name(n)) {
            None => out.created.push(EntityRef { kind, name: name(n).to_string() }),
            Some(o) if o != n => out.updated.push(EntityRef { kind, name: name(n).to_string() }),
            Some(_) => {}
        }
    }
    for o in old {
        if !new.iter().any(|n| name(n) == name(o)) {
            out.deleted.push(EntityRef { kind, name: name(o).to_string() });
        }
    }
}

impl ConfigDiff {
    pub fn between(old: &Config, new: &Config) -> ConfigDiff {
        let mut d = ConfigDiff::default();
        diff_list("routes", &old.routes, &new.routes, |e| &e.name, &mut d);
        diff_list("compositions", &old.compositions, &new.compositions, |e| &e.name, &mut d);
        diff_list("consumers", &old.consumers, &new.consumers, |e| &e.name, &mut d);
        diff_list("policies", &old.policies, &new.policies, |e| &e.name, &mut d);
        d
    }

    pub fn is_empty(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty() && self.deleted.is_empty()
    }
}
