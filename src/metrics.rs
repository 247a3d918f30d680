//! Prometheus metrics: one recorder per process (installed on first use and shared by every
//! gateway in it), the metric names, and small helpers that keep label sets low-cardinality.
//!
//! Labels only ever carry configured names (apps), fixed vocabularies (cast types, outcomes,
//! quota kinds, route templates) or Umeng's documented error codes; never ids, tokens or
//! anything else a caller controls.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::quota::QuotaState;

/// HTTP requests answered: `route` (the matched path template, or `unmatched`), `method`,
/// `status`.
pub const HTTP_REQUESTS: &str = "http_requests_total";
/// Seconds from the request's arrival to its answer: `route`, `method`.
pub const HTTP_DURATION: &str = "http_request_duration_seconds";
/// Push requests by how they ended: `app`, `type`, `outcome` (see [`PushOutcome`]).
pub const PUSHES: &str = "pushes_total";
/// Seconds spent in one Umeng call: `endpoint` (send, status, cancel, upload).
pub const UMENG_DURATION: &str = "umeng_request_duration_seconds";
/// Umeng calls that did not succeed: `code` (Umeng's error code, `not_sent` or `unknown`).
pub const UMENG_ERRORS: &str = "umeng_errors_total";
/// Slots left in the current quota window: `app`, `kind`.
pub const QUOTA_REMAINING: &str = "quota_remaining";
/// Repeats answered from history without calling Umeng: `app`.
pub const IDEMPOTENT_REPLAYS: &str = "idempotent_replays_total";
/// Pushes refused because a quota window was full: `app`, `kind`, `source` (`local` or
/// `umeng` for Umeng's 2050).
pub const QUOTA_REJECTIONS: &str = "quota_rejections_total";
/// Of the `local` quota rejections, those answered from this replica's memory of a full
/// window without asking the database: `app`, `kind`.
pub const QUOTA_FULL_WINDOW_ANSWERS: &str = "quota_full_window_answers_total";
/// Database pool connections at scrape time: `state` (`idle`, `in_use`).
pub const DB_POOL_CONNECTIONS: &str = "db_pool_connections";
/// Gauge: the Umeng circuit breaker (0 closed, 1 half-open, 2 open).
pub const UMENG_BREAKER: &str = "umeng_breaker_state";
/// Callback delivery attempts by how they ended: `outcome` (`delivered`, `failed_attempt`,
/// `gave_up`).
pub const CALLBACK_DELIVERIES: &str = "callback_deliveries_total";
/// Asynchronous pushes not final yet, by `app` and `state` (awaiting_send,
/// awaiting_send_at, awaiting_quota, pending: being sent).
pub const QUEUE_DEPTH: &str = "push_queue_depth";
/// How long the oldest due asynchronous push has waited past its due time, by `app`.
pub const QUEUE_OLDEST_DUE: &str = "push_queue_oldest_due_seconds";
/// Delivery worker attempts by `app` and `outcome` (accepted, failed, rate_limited,
/// not_sent, timeout, unknown).
pub const DELIVERY_ATTEMPTS: &str = "delivery_attempts_total";
/// The delivery worker's claims of due pushes, by `result` (`took`: it took at least one
/// push; `empty`: it found none it could take; `failed`: the database refused it). Pushes
/// per claim are `delivery_attempts_total` over the `took` claims.
pub const DELIVERY_CLAIMS: &str = "delivery_claims_total";

/// Buckets for both latency histograms (seconds): Umeng answers in well under 2 s normally
/// and may take up to the configured 30 s timeout.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// How often histograms are drained outside of scrapes, so memory stays flat when nobody
/// scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(10);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's Prometheus handle; the first call installs the global recorder. If another
/// recorder was installed first (an embedding program's), this handle renders nothing.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(UMENG_DURATION.into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), LATENCY_BUCKETS)
            });
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            // Only an empty bucket list fails; ours is not empty.
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        if ::metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        describe();
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP_EVERY);
                upkeep.run_upkeep();
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the metrics upkeep thread");
        }
        handle
    })
}

fn describe() {
    use ::metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests answered, by route template, method and status"
    );
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "HTTP request duration, by route template and method"
    );
    describe_counter!(PUSHES, "Push requests by app, cast type and outcome");
    describe_histogram!(
        UMENG_DURATION,
        Unit::Seconds,
        "Duration of Umeng API calls, by endpoint"
    );
    describe_counter!(
        UMENG_ERRORS,
        "Umeng calls that did not succeed, by error code"
    );
    describe_gauge!(
        QUOTA_REMAINING,
        "Slots left in the current quota window, by app and kind"
    );
    describe_counter!(
        IDEMPOTENT_REPLAYS,
        "Repeated out_biz_no answered from history, by app"
    );
    describe_counter!(
        QUOTA_REJECTIONS,
        "Pushes refused for a full quota window, by app, kind and source"
    );
    describe_counter!(
        QUOTA_FULL_WINDOW_ANSWERS,
        "Local quota rejections answered from this replica's memory of a full window, by app and kind"
    );
    describe_gauge!(DB_POOL_CONNECTIONS, "Database pool connections, by state");
    describe_counter!(
        CALLBACK_DELIVERIES,
        "Callback deliveries by outcome: delivered, failed_attempt, gave_up"
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Asynchronous pushes not final yet, by app and state"
    );
    describe_gauge!(
        QUEUE_OLDEST_DUE,
        Unit::Seconds,
        "How long the oldest due asynchronous push has waited past its due time, by app"
    );
    describe_counter!(
        DELIVERY_ATTEMPTS,
        "Delivery worker attempts by app and outcome"
    );
    describe_counter!(
        DELIVERY_CLAIMS,
        "Delivery worker claims of due pushes, by result"
    );
}

/// The outcomes of `delivery_attempts_total`.
pub const DELIVERY_OUTCOMES: [&str; 6] = [
    "accepted",
    "failed",
    "rate_limited",
    "not_sent",
    "timeout",
    "unknown",
];

/// Count one delivery worker attempt.
pub fn delivery_attempt(app: &str, outcome: &str) {
    let outcome = DELIVERY_OUTCOMES
        .into_iter()
        .find(|o| *o == outcome)
        .unwrap_or("unknown");
    ::metrics::counter!(DELIVERY_ATTEMPTS, "app" => app.to_owned(), "outcome" => outcome)
        .increment(1);
}

/// How a delivery worker's claim ended, as the `result` label of `delivery_claims_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimResult {
    /// It took at least one push.
    Took,
    /// It found nothing it could take.
    Empty,
    /// The database refused it.
    Failed,
}

impl ClaimResult {
    pub const ALL: [ClaimResult; 3] = [ClaimResult::Took, ClaimResult::Empty, ClaimResult::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            ClaimResult::Took => "took",
            ClaimResult::Empty => "empty",
            ClaimResult::Failed => "failed",
        }
    }
}

/// Count one claim of the delivery worker.
pub fn delivery_claim(result: ClaimResult) {
    ::metrics::counter!(DELIVERY_CLAIMS, "result" => result.as_str()).increment(1);
}

/// Set the queue gauges of one app: `depth` per state (every state given, zeros
/// included), and the oldest due push's wait.
pub fn queue(app: &str, depth: &[(&'static str, u64)], oldest_due_secs: f64) {
    for (state, n) in depth {
        ::metrics::gauge!(QUEUE_DEPTH, "app" => app.to_owned(), "state" => *state).set(*n as f64);
    }
    ::metrics::gauge!(QUEUE_OLDEST_DUE, "app" => app.to_owned()).set(oldest_due_secs);
}

/// How a callback delivery attempt ended, as the `outcome` label of
/// `callback_deliveries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackOutcome {
    /// The receiver answered 2xx.
    Delivered,
    /// Anything else; the event will be tried again.
    FailedAttempt,
    /// The event's last attempt failed (or it ran out of time): no more attempts.
    GaveUp,
}

impl CallbackOutcome {
    pub const ALL: [CallbackOutcome; 3] = [
        CallbackOutcome::Delivered,
        CallbackOutcome::FailedAttempt,
        CallbackOutcome::GaveUp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CallbackOutcome::Delivered => "delivered",
            CallbackOutcome::FailedAttempt => "failed_attempt",
            CallbackOutcome::GaveUp => "gave_up",
        }
    }
}

pub fn callback_delivery(outcome: CallbackOutcome) {
    ::metrics::counter!(CALLBACK_DELIVERIES, "outcome" => outcome.as_str()).increment(1);
}

/// Show every callback outcome (at 0) from the start, so rates and alerts work before the
/// first delivery.
pub fn register_callback_outcomes() {
    for outcome in CallbackOutcome::ALL {
        ::metrics::counter!(CALLBACK_DELIVERIES, "outcome" => outcome.as_str()).increment(0);
    }
}

/// The Umeng endpoints `umeng_request_duration_seconds` is labelled with.
pub const UMENG_ENDPOINTS: [&str; 4] = ["send", "status", "cancel", "upload"];

/// Create the push, Umeng and quota series at zero for every configured app, cast type,
/// outcome, endpoint and bucket, so dashboards and alerts see them before the first push
/// (an absent series and a zero look different to PromQL).
pub fn preregister<'a>(apps: impl IntoIterator<Item = (&'a str, Vec<String>)>) {
    for (app, kinds) in apps {
        for cast_type in crate::umeng::CastType::ALL {
            for outcome in PushOutcome::ALL {
                ::metrics::counter!(PUSHES, "app" => app.to_owned(), "type" => cast_type.as_str(), "outcome" => outcome.as_str())
                    .increment(0);
            }
        }
        ::metrics::counter!(IDEMPOTENT_REPLAYS, "app" => app.to_owned()).increment(0);
        for outcome in DELIVERY_OUTCOMES {
            ::metrics::counter!(DELIVERY_ATTEMPTS, "app" => app.to_owned(), "outcome" => outcome)
                .increment(0);
        }
        for kind in kinds {
            for source in ["local", "umeng"] {
                ::metrics::counter!(QUOTA_REJECTIONS, "app" => app.to_owned(), "kind" => kind.clone(), "source" => source)
                    .increment(0);
            }
            ::metrics::counter!(QUOTA_FULL_WINDOW_ANSWERS, "app" => app.to_owned(), "kind" => kind.clone())
                .increment(0);
        }
    }
    for endpoint in UMENG_ENDPOINTS {
        // Registering a histogram renders it with zero counts.
        let _ = ::metrics::histogram!(UMENG_DURATION, "endpoint" => endpoint);
    }
    for code in ["not_sent", "unknown"] {
        ::metrics::counter!(UMENG_ERRORS, "code" => code).increment(0);
    }
    for result in ClaimResult::ALL {
        ::metrics::counter!(DELIVERY_CLAIMS, "result" => result.as_str()).increment(0);
    }
}

/// How a push request ended, as the `outcome` label of `pushes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// Umeng accepted it.
    Accepted,
    /// Definitely not sent (Umeng FAIL, unreachable, upload failed).
    Failed,
    /// Sent, no definite answer (timeout, 5xx, Umeng internal error).
    Unknown,
    /// A quota window was full (locally or Umeng's 2050).
    RateLimited,
    /// A repeat answered from history.
    Replayed,
    /// Refused by validation before anything was spent.
    Invalid,
    /// The same out_biz_no is being sent right now.
    InFlight,
    /// The out_biz_no was used for a different request.
    Mismatch,
    /// Refused at once while the Umeng circuit breaker is open.
    Unavailable,
    /// Accepted for asynchronous delivery (202); its final outcome is counted again when
    /// the delivery worker ends it.
    Queued,
}

impl PushOutcome {
    pub const ALL: [PushOutcome; 10] = [
        PushOutcome::Accepted,
        PushOutcome::Failed,
        PushOutcome::Unknown,
        PushOutcome::RateLimited,
        PushOutcome::Replayed,
        PushOutcome::Invalid,
        PushOutcome::InFlight,
        PushOutcome::Mismatch,
        PushOutcome::Unavailable,
        PushOutcome::Queued,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PushOutcome::Accepted => "accepted",
            PushOutcome::Failed => "failed",
            PushOutcome::Unknown => "unknown",
            PushOutcome::RateLimited => "rate_limited",
            PushOutcome::Replayed => "replayed",
            PushOutcome::Invalid => "invalid",
            PushOutcome::InFlight => "in_flight",
            PushOutcome::Mismatch => "mismatch",
            PushOutcome::Unavailable => "umeng_unavailable",
            PushOutcome::Queued => "queued",
        }
    }
}

/// Count one push request.
pub fn push(app: &str, cast_type: &str, outcome: PushOutcome) {
    ::metrics::counter!(PUSHES, "app" => app.to_owned(), "type" => cast_type.to_owned(), "outcome" => outcome.as_str())
        .increment(1);
    if outcome == PushOutcome::Replayed {
        ::metrics::counter!(IDEMPOTENT_REPLAYS, "app" => app.to_owned()).increment(1);
    }
}

/// Count a quota rejection; `from_umeng` for Umeng's 2050.
pub fn quota_rejection(app: &str, kind: &str, from_umeng: bool) {
    let source = if from_umeng { "umeng" } else { "local" };
    ::metrics::counter!(QUOTA_REJECTIONS, "app" => app.to_owned(), "kind" => kind.to_owned(), "source" => source)
        .increment(1);
}

/// Count a 429 answered from the memory of a full window (also counted by
/// [`quota_rejection`]).
pub fn quota_full_window_answer(app: &str, kind: &str) {
    ::metrics::counter!(QUOTA_FULL_WINDOW_ANSWERS, "app" => app.to_owned(), "kind" => kind.to_owned())
        .increment(1);
}

/// Set `quota_remaining` from a window's state.
pub fn quota_remaining(app: &str, state: &QuotaState) {
    ::metrics::gauge!(QUOTA_REMAINING, "app" => app.to_owned(), "kind" => state.kind.to_string())
        .set(f64::from(state.remaining()));
}

/// Record one Umeng call: its duration, and its error code when it failed.
pub fn umeng_call(endpoint: &'static str, elapsed: Duration, error_code: Option<&str>) {
    ::metrics::histogram!(UMENG_DURATION, "endpoint" => endpoint).record(elapsed.as_secs_f64());
    if let Some(code) = error_code {
        ::metrics::counter!(UMENG_ERRORS, "code" => code_label(code)).increment(1);
    }
}

/// Umeng's numeric codes and the gateway's own `not_sent` / `unknown` pass; anything else
/// an upstream might put there becomes `other`, so it cannot blow up the label set.
fn code_label(code: &str) -> String {
    let numeric = !code.is_empty() && code.len() <= 6 && code.bytes().all(|b| b.is_ascii_digit());
    if numeric || matches!(code, "not_sent" | "unknown") {
        code.to_owned()
    } else {
        "other".to_owned()
    }
}

/// Record one answered HTTP request.
pub fn http_request(route: &str, method: &str, status: u16, elapsed: Duration) {
    ::metrics::counter!(HTTP_REQUESTS, "route" => route.to_owned(), "method" => method.to_owned(), "status" => status.to_string())
        .increment(1);
    ::metrics::histogram!(HTTP_DURATION, "route" => route.to_owned(), "method" => method.to_owned())
        .record(elapsed.as_secs_f64());
}

/// Set `db_pool_connections` from the pool's current state.
pub fn db_pool(idle: u32, in_use: u32) {
    ::metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "idle").set(f64::from(idle));
    ::metrics::gauge!(DB_POOL_CONNECTIONS, "state" => "in_use").set(f64::from(in_use));
}

/// The Umeng circuit breaker's state: 0 closed, 1 half-open, 2 open.
pub fn umeng_breaker(state: f64) {
    ::metrics::gauge!(UMENG_BREAKER).set(state);
}
