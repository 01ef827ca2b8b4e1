//! One compile pass for a config's policies: each policy's `config` parsed
//! once into its typed form, checked and built into its filter by the same
//! code ([`compile`]: pure, every error with its file and path). Validation
//! (`config::validate`) and the snapshot both call it, so a config that
//! validated cannot fail to compile, and no policy is skipped. Binding the
//! filters to the node's services ([`PolicyPlan::bind`]) is a separate
//! step after it.

use std::collections::HashSet;
use std::sync::Arc;

use super::filter::{Bind, Compile};
use super::filters::AnyFilter;
use super::identity::Identities;
use super::Services;
use crate::config::load::Origins;
use crate::config::{Config, ConfigError};

/// One compiled policy.
#[derive(Debug)]
pub struct Planned {
    pub name: String,
    pub global: bool,
    pub filter: AnyFilter,
}

/// A config's policies compiled, not yet bound to a node.
#[derive(Debug)]
pub struct PolicyPlan {
    pub policies: Vec<Planned>,
}

impl PolicyPlan {
    /// The plan when every policy compiled.
    pub fn complete(planned: Vec<Option<Planned>>) -> Option<PolicyPlan> {
        planned.into_iter().collect::<Option<Vec<_>>>().map(|policies| PolicyPlan { policies })
    }

    /// Writes into `config` (the one this plan was compiled from) what the
    /// compile learnt that the config should say: each wasm module file's
    /// SHA-256 as `module_sha256`, so the config names the bytes it runs
    /// (a module rebuilt under the same path is a change to the config,
    /// and a node whose file differs refuses it).
    pub fn record_in(&self, config: &mut Config) {
        for (policy, planned) in config.policies.iter_mut().zip(&self.policies) {
            let AnyFilter::Wasm(wasm) = &planned.filter else { continue };
            if let (Some(digest), serde_json::Value::Object(c)) = (wasm.module_sha256(), &mut policy.config) {
                c.insert("module_sha256".into(), serde_json::Value::String(digest.to_string()));
            }
        }
    }
}

/// A config's policies bound to the node: what chains are built from.
#[derive(Debug, Default)]
pub struct BoundPolicies(Vec<BoundPolicy>);

#[derive(Debug)]
pub struct BoundPolicy {
    pub name: String,
    pub global: bool,
    /// Shared by every chain that lists the policy (one rate-limit quota,
    /// one cache).
    pub filter: Arc<AnyFilter>,
}

impl BoundPolicies {
    pub fn iter(&self) -> impl Iterator<Item = &BoundPolicy> {
        self.0.iter()
    }
}

/// Every policy of `config` compiled; the errors of each policy, in the
/// order of `config.policies` (each at `policies.NAME.config...`, with the
/// policy's file from `origins`), when any has one.
pub fn compile(config: &Config, origins: &Origins) -> Result<PolicyPlan, Vec<ConfigError>> {
    let (plan, errors) = compile_each(config, origins);
    if plan.iter().all(Option::is_some) {
        return Ok(PolicyPlan::complete(plan).expect("every policy compiled"));
    }
    let mut errors: Vec<ConfigError> = errors.into_iter().flatten().collect();
    if errors.is_empty() {
        // Only errors hidden under a field that failed to load: say which.
        for (p, planned) in config.policies.iter().zip(&plan) {
            if planned.is_none() {
                errors.push(ConfigError { file: None, path: format!("policies.{}.config", p.name), message: "cannot be compiled".into() });
            }
        }
    }
    Err(errors)
}

/// [`compile`], policy by policy: for each, its filter (`None` when it has
/// errors) and its errors. Validation places each policy's errors beside
/// its other checks.
pub fn compile_each(config: &Config, origins: &Origins) -> (Vec<Option<Planned>>, Vec<Vec<ConfigError>>) {
    let ids = Arc::new(Identities::names(config));
    // Consumers that did not parse still exist for references: their own
    // errors were reported, a reference to them would only add noise.
    let consumers: HashSet<&str> =
        config.consumers.iter().map(|c| c.name.as_str()).chain(origins.unparsed_names("consumers").map(|(n, _)| n)).collect();
    let mut plan = Vec::with_capacity(config.policies.len());
    let mut errors = Vec::with_capacity(config.policies.len());
    for (i, p) in config.policies.iter().enumerate() {
        let file = origins.policies.get(i).cloned().flatten();
        let mut cx = Compile::new(&p.name, file, origins, &ids, &consumers);
        let filter = AnyFilter::compile(p.kind, &p.config, &mut cx).ok();
        // A filter is built only when its policy has no error at all.
        let filter = filter.filter(|_| !cx.has_errors());
        debug_assert!(filter.is_some() || cx.has_errors(), "policy {} failed without an error", p.name);
        plan.push(filter.map(|filter| Planned { name: p.name.clone(), global: p.global, filter }));
        errors.push(std::mem::take(&mut cx.errors));
    }
    (plan, errors)
}

impl PolicyPlan {
    /// Gives each filter what it uses of the node (JWK Sets, Redis, the
    /// password cache) and the consumers' credentials (`identities`, built
    /// from the config as it is kept: secrets hashed, which validation
    /// does only after compiling). Errors are what this node lacks.
    pub fn bind(self, node: &Arc<Services>, identities: &Arc<Identities>) -> Result<BoundPolicies, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut out = Vec::with_capacity(self.policies.len());
        for mut p in self.policies {
            let mut cx = Bind { name: &p.name, base: format!("policies.{}.config", p.name), identities, errors: Vec::new() };
            p.filter.bind(node, &mut cx);
            errors.append(&mut cx.errors);
            out.push(BoundPolicy { name: p.name, global: p.global, filter: Arc::new(p.filter) });
        }
        if errors.is_empty() {
            Ok(BoundPolicies(out))
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{parse_document, Format};

    fn loaded(yaml: &str) -> crate::config::LoadedConfig {
        let (loaded, errors) = parse_document(Some(Arc::from("policies.yaml")), yaml, Format::Yaml);
        assert!(errors.is_empty(), "{errors:?}");
        loaded
    }

    #[test]
    fn a_policy_that_does_not_compile_fails_the_plan_with_its_file_and_path() {
        let config = loaded(
            "policies:\n  - { name: open, type: acl, config: { allow: [staff] } }\n  - { name: web, type: cors, config: { origins: [] } }\n",
        );
        let errors = compile(&config.config, &config.origins).unwrap_err();
        let shown: Vec<_> = errors.iter().map(|e| (e.file.as_deref(), e.path.as_str())).collect();
        assert_eq!(shown, [(Some("policies.yaml"), "policies.web.config.origins")]);
    }

    #[test]
    fn every_policy_of_a_valid_config_is_in_the_plan_in_order() {
        let config = loaded(
            "policies:\n  - { name: limit, type: rate-limit, config: { limit: 5, window: 1m, by: ip } }\n  - { name: tag, type: correlation-id }\n  - { name: keys, type: key-auth, global: true }\n",
        );
        let plan = compile(&config.config, &config.origins).unwrap();
        let names: Vec<_> = plan.policies.iter().map(|p| (p.name.as_str(), p.filter.phase(), p.global)).collect();
        use crate::policy::filter::Phase;
        assert_eq!(
            names,
            [("limit", Phase::RateLimit, false), ("tag", Phase::CorrelationId, false), ("keys", Phase::Authentication, true)]
        );
        // A cluster limit on a node without Redis is the binding's error.
        let cluster = loaded("policies:\n  - { name: limit, type: rate-limit, config: { limit: 5, window: 1m, scope: cluster } }\n");
        let plan = compile(&cluster.config, &cluster.origins).unwrap();
        let errors = plan.bind(&Services::new(None), &Default::default()).unwrap_err();
        assert_eq!(errors[0].path, "policies.limit.config.scope");
    }
}
