//! Compositions: one request fans out to several backend calls whose JSON
//! answers are merged and reshaped into one response (SPEC §2).
//!
//! [`plan`] compiles a composition once per config; [`exec`] runs it per
//! request, [`call`] sends one call's requests and [`batch`] turns a
//! `for_each` call's items into requests (and batches) and back;
//! [`template`] and [`query`] are the two expression languages;
//! [`answer`] parses a call's answer only as far as the composition reads it.

pub mod answer;
pub mod batch;
pub mod cache;
pub mod call;
pub mod context;
pub mod exec;
pub mod plan;
pub mod query;
pub mod template;

pub use call::CallRecord;
pub use exec::{run, Exchange, Outcome};
pub use plan::CompositionPlan;
