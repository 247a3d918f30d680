//! umeng-push-gateway: an HTTP gateway in front of Umeng U-Push.
#![forbid(unsafe_code)]

/// Background work: task-status poller, pending sweeper, retention purge.
pub mod background;
/// Signed callbacks: signing, the worker.
pub mod callbacks;
/// Settings from file and environment, validated once.
pub mod config;
/// The ops console at `/ui/`: server-rendered pages over the same store queries as the API.
pub mod console;
/// A push after admission: the outcome table and the Umeng circuit breaker.
pub mod delivery;
/// The HTTP error type (RFC 9457 problem+json).
pub mod error;
/// The send pipeline: admit, upload, send, record.
pub mod gateway;
/// The HTTP API routers.
pub mod http;
/// Prometheus metrics: the recorder and the metric names.
pub mod metrics;
/// The simplified push request callers send, and its translation to Umeng.
pub mod push;
/// Quota buckets and calendar windows.
pub mod quota;
/// A redacting wrapper for secrets.
pub mod secret;
/// The stand-alone Umeng simulator.
pub mod simulator;
/// Building and running the gateway.
pub mod startup;
/// Persistence: one trait, PostgreSQL and SQLite.
pub mod store;
/// Refreshing one task-class push from Umeng's `/api/status`.
pub mod task_status;
/// Logging setup.
pub mod telemetry;
/// Umeng's protocol: request model, validation, signature, client, error codes.
pub mod umeng;
