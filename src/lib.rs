//! Manifold: an API gateway whose speciality is composition.
//!
//! # Layout
//! A request flows `server → router → policies → (proxy | compose) → response`:
//! - [`server`]: listeners, one current-thread runtime per core, request
//!   hygiene ([`server::hygiene`]) and the per-request handler.
//! - [`snapshot`]: the compiled config (router, resolved routes) the request
//!   path reads, swapped whole on every change.
//! - [`proxy`]: plain routes: rewrite, forward, strip hop-by-hop headers.
//! - [`upstream`]: the one way to a backend, for routes and composition
//!   calls: HTTP/1.1 on the request's task, per-worker pools, TLS, timeouts,
//!   and errors that say whose fault they are.
//! - [`config`]: the declarative config: types, loading, validation.
//! - [`certs`]: certificates: PEM, key checks, details, the SNI table.
//! - [`admin`]: the admin API on its own listener; [`metrics`] its `/metrics`.
//! - [`otel`]: OpenTelemetry spans of requests and backend calls (feature `otel`).
//! - `wasm` (feature `wasm`): the proxy-wasm host that runs plugins.
//! - [`gateway`]: a whole node (proxy + admin), as `serve` and tests start it.
//! - [`demo`]: the fake backends `--demo` starts.
//! - [`cli`]: the `manifold` command line.
//! - [`errors`], [`ids`], [`body`], [`diff`]: the JSON errors of SPEC §4,
//!   request IDs and trace context, the body type, config diffs.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod body;
pub mod certs;
pub mod cli;
pub mod compose;
pub mod config;
pub mod demo;
pub mod diff;
pub mod errors;
pub mod gateway;
pub mod ids;
pub mod metrics;
pub mod otel;
pub mod policy;
pub mod proxy;
pub mod remote;
pub mod server;
pub mod snapshot;
pub mod store;
pub mod upstream;
#[cfg(feature = "wasm")]
pub mod wasm;
