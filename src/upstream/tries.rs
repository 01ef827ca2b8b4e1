//! The tries of one backend request through an upstream, for plain routes
//! and composition calls alike: admission by the circuit breaker, the
//! pick among usable targets, what every answer tells passive health, and
//! whether (and where) a failed try is sent again.
//!
//! ```text
//! let mut tries = Tries::start(plan, plan.key(&input), retryable, deadline, labels)?;
//! loop {
//!     let result = send(tries.target(), ...).await;
//!     if tries.again(&result) { continue }
//!     return (result, tries.finish())      // the guard lives as long as the answer
//! }
//! ```

use std::sync::Arc;

use http::Response;
use tokio::time::Instant;

use super::balance::{InFlight, Picked, RetryPolicy, Target, UpstreamPlan};
use super::UpstreamError;
use crate::metrics::Metrics;

/// Where a try's counts go: the upstream's route or composition and call.
#[derive(Clone, Copy)]
pub struct Labels<'a> {
    pub route: &'a str,
    /// The composition call, `""` for a plain route.
    pub call: &'a str,
    pub metrics: Option<&'a Arc<Metrics>>,
}

/// Why a request was not sent at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The circuit breaker: `max_in_flight` are in flight already.
    Overloaded,
    /// Every target is unhealthy or ejected.
    NoTarget,
}

impl Refused {
    /// What the client is told (503 `upstream_unavailable` either way).
    pub fn message(self) -> &'static str {
        match self {
            Refused::Overloaded => "the upstream has too many requests in flight",
            Refused::NoTarget => "no target of the upstream is healthy",
        }
    }
}

/// One request's tries through an upstream.
pub struct Tries<'p> {
    plan: &'p Arc<UpstreamPlan>,
    /// The request's consistent-hash key, for every pick.
    key: Option<u64>,
    retry: Option<&'p RetryPolicy>,
    deadline: Instant,
    labels: Labels<'p>,
    picked: Picked<'p>,
    /// Targets tried before the current one.
    tried: Vec<u32>,
    admitted: Option<InFlight>,
    retry_guard: Option<InFlight>,
}

impl<'p> Tries<'p> {
    /// Admits the request and picks its first target. `retryable`: the
    /// request may be sent again (an idempotent method, a body held
    /// whole); a retry is then up to the upstream's `retries`.
    pub fn start(
        plan: &'p Arc<UpstreamPlan>,
        key: Option<u64>,
        retryable: bool,
        deadline: Instant,
        labels: Labels<'p>,
    ) -> Result<Tries<'p>, Refused> {
        let upstream = plan.name.as_deref().unwrap_or("");
        let admitted = match plan.admit() {
            Ok(guard) => guard,
            Err(super::Overloaded) => {
                if let Some(m) = labels.metrics {
                    m.upstream_circuit_open(upstream, labels.route, labels.call);
                }
                return Err(Refused::Overloaded);
            }
        };
        let Some(picked) = plan.pick_for(key) else {
            if let Some(m) = labels.metrics {
                m.upstream_no_target(upstream, labels.route, labels.call);
            }
            return Err(Refused::NoTarget);
        };
        let retry = plan.retry.as_ref().filter(|_| retryable);
        Ok(Tries { plan, key, retry, deadline, labels, picked, tried: Vec::new(), admitted, retry_guard: None })
    }

    /// The target of the current try.
    pub fn target(&self) -> &Target {
        self.picked.target()
    }

    /// Whether another try may follow this one (so its request must be
    /// kept): there are retries left.
    pub fn may_retry(&self) -> bool {
        self.retry.is_some_and(|r| self.tried.len() < r.max as usize)
    }

    /// Takes in the outcome of the current try (passive health counts it)
    /// and says whether to send the request again: then [`Tries::target`]
    /// is the next target and `outcome` is to be dropped.
    pub fn again<B>(&mut self, outcome: &Result<Response<B>, UpstreamError>) -> bool {
        let upstream = self.plan.name.as_deref().unwrap_or("");
        if self.plan.observe(&self.picked.set, self.picked.index, outcome) {
            if let Some(m) = self.labels.metrics {
                m.upstream_ejected(upstream, &self.picked.target().label);
            }
        }
        let Some(reason) = self.retry.and_then(|r| r.reason(self.tried.len(), self.deadline, outcome)) else {
            return false;
        };
        // A request no target received (no connection was made) cost no
        // backend anything: sending it elsewhere adds no work to the pool,
        // so the budget, which caps the extra work retries make, does not
        // count it.
        let unreceived = matches!(outcome, Err(e) if e.unsent && e.cause == super::Cause::Connect);
        let guard = if unreceived {
            None
        } else {
            let Some(guard) = self.plan.admit_retry() else {
                if let Some(m) = self.labels.metrics {
                    m.upstream_retry_refused(upstream, self.labels.route, self.labels.call);
                }
                return false;
            };
            Some(guard)
        };
        self.tried.push(self.picked.index);
        let Some(next) = self.plan.pick_retry(self.key, &self.tried) else {
            // Nothing usable is left: this outcome is the answer.
            self.tried.pop();
            return false;
        };
        if let Some(m) = self.labels.metrics {
            m.upstream_retried(upstream, self.labels.route, self.labels.call, &reason);
        }
        if guard.is_some() {
            self.retry_guard = guard;
        }
        self.picked = next;
        true
    }

    /// Ends the tries: the guard that holds the request's counts until its
    /// answer has ended (`None` when the upstream counts nothing).
    pub fn finish(self) -> Option<InFlight> {
        InFlight::join(InFlight::join(self.admitted, self.picked.in_flight), self.retry_guard)
    }
}
