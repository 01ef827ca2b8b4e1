//! Policies around routes and compositions, as a chain of filters compiled
//! once per config and run in SPEC §2's fixed phase order whatever order
//! they are listed in.
//!
//! - [`filter`]: the [`Filter`](filter::Filter) trait every policy type
//!   implements (request, upstream request, request body, response), its
//!   compile and bind contexts, and [`Phase`](filter::Phase);
//! - [`filters`]: one file per policy type (and, in its module docs, how
//!   to add one);
//! - [`compile`]: the one compile pass (typed configs to filters, every
//!   error with its file and path), then the binding to the node;
//! - [`chain`]: one route's or composition's filters in phase order, and
//!   what travels from the request phase to the answer ([`Admission`]);
//! - [`services`]: what outlives configs ([`Services`]: Redis, JWK Sets,
//!   verified passwords, metrics, upstream health, the call store);
//! - [`identity`]: consumers and who holds which credential;
//! - the machinery some filters share: [`cluster`] (the Redis script and
//!   fallback), [`jwt`] (verification, the JWKS refresher), [`mtls`],
//!   [`cors`], [`transform`], [`cache`].

pub mod cache;
pub mod chain;
pub mod cluster;
pub mod compile;
pub mod cors;
pub mod filter;
pub mod filters;
pub mod identity;
pub mod jwt;
pub mod mtls;
pub mod services;
pub mod transform;

pub use chain::{client_ip, finish, rate_headers, Admission, PolicyChain, Refusal, RequestFacts};
pub use filters::rate_limit::RateInfo;
pub use identity::{ConsumerInfo, Identities, X_CONSUMER_GROUPS, X_CONSUMER_NAME};
pub use services::Services;
