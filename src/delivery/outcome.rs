//! The one table that maps an Umeng send result to what it means for the push. Every
//! caller that records an attempt (the synchronous path today) decides from it.

use crate::metrics::PushOutcome;
use crate::store::PushStatus;
use crate::umeng::{ErrorClass, Outcome, SendSuccess, UmengError};

/// What an attempt's result means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The push's state after it.
    pub status: PushStatus,
    /// What happens to the quota slot taken at admission.
    pub quota: QuotaEffect,
    /// The `pushes_total` outcome label.
    pub metric: PushOutcome,
    /// Umeng answered (SUCCESS or FAIL): the path to Umeng works (the circuit breaker).
    pub reached_umeng: bool,
    /// Sending the same request again is safe and may succeed: nothing was sent, or Umeng
    /// dedupes the retry (a task-class push carrying its `out_biz_no`), and the error is
    /// not one that repeats.
    pub retryable: bool,
}

/// The quota action, before the bucket's window is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaEffect {
    /// Keep the slot: accepted, or it may have been.
    Keep,
    /// Give it back: Umeng definitely did not take the push.
    Refund,
    /// Umeng said its window is full (2050): mark it full here too.
    Saturate,
}

/// Classifies one send. `dedupes` is true when a re-send is deduped by Umeng: a task-class
/// push that carries an `out_biz_no`. A task-class SUCCESS without a `task_id` is
/// classified as unknown by the caller before it gets here (see [`missing_task_id`]).
pub fn classify(result: &Result<SendSuccess, UmengError>, dedupes: bool) -> Verdict {
    let unknown = |reached_umeng| Verdict {
        status: PushStatus::Unknown,
        quota: QuotaEffect::Keep,
        metric: PushOutcome::Unknown,
        reached_umeng,
        retryable: dedupes,
    };
    let failed = |quota, reached_umeng, retryable| Verdict {
        status: PushStatus::Failed,
        quota,
        metric: PushOutcome::Failed,
        reached_umeng,
        retryable,
    };
    match result {
        Ok(_) => Verdict {
            status: PushStatus::Accepted,
            quota: QuotaEffect::Keep,
            metric: PushOutcome::Accepted,
            reached_umeng: true,
            retryable: false,
        },
        // Nothing reached Umeng: safe to send again.
        Err(UmengError::NotSent { .. }) => failed(QuotaEffect::Refund, false, true),
        // Sent, no usable answer: it may have been accepted.
        Err(UmengError::Unknown { raw, .. }) => unknown(raw.is_some()),
        Err(e @ UmengError::Fail { class, .. }) => match (class, e.outcome()) {
            (ErrorClass::Quota, _) => Verdict {
                metric: PushOutcome::RateLimited,
                ..failed(QuotaEffect::Saturate, true, false)
            },
            // Umeng's internal errors: it may have queued the push.
            (_, Outcome::Unknown) => unknown(true),
            _ => failed(QuotaEffect::Refund, true, e.is_retryable()),
        },
    }
}

/// A task-class SUCCESS without `task_id` cannot be polled or cancelled, and Umeng may or
/// may not have queued the task: it is treated as an answer that could not be used.
pub fn missing_task_id(
    result: Result<SendSuccess, UmengError>,
    task_class: bool,
) -> Result<SendSuccess, UmengError> {
    match result {
        Ok(ok) if task_class && ok.task_id.is_none() => Err(UmengError::Unknown {
            reason: "Umeng answered SUCCESS without a task_id for a task-class push".into(),
            timed_out: false,
            raw: Some(ok.raw),
        }),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn ok(task_id: Option<&str>) -> Result<SendSuccess, UmengError> {
        Ok(SendSuccess {
            msg_id: None,
            task_id: task_id.map(str::to_owned),
            raw: json!({"ret": "SUCCESS"}),
        })
    }

    fn fail(code: &str) -> Result<SendSuccess, UmengError> {
        Err(UmengError::fail(code, "m", 400, Value::Null))
    }

    #[test]
    fn the_table() {
        let not_sent = Err(UmengError::NotSent {
            reason: "refused".into(),
        });
        let timeout = Err(UmengError::timeout("t"));
        let cases = [
            // result, dedupes, status, quota, reached, retryable
            (
                ok(Some("t")),
                true,
                PushStatus::Accepted,
                QuotaEffect::Keep,
                true,
                false,
            ),
            (
                not_sent,
                false,
                PushStatus::Failed,
                QuotaEffect::Refund,
                false,
                true,
            ),
            (
                timeout.clone(),
                false,
                PushStatus::Unknown,
                QuotaEffect::Keep,
                false,
                false,
            ),
            (
                timeout,
                true,
                PushStatus::Unknown,
                QuotaEffect::Keep,
                false,
                true,
            ),
            (
                fail("6003"),
                false,
                PushStatus::Unknown,
                QuotaEffect::Keep,
                true,
                false,
            ),
            (
                fail("6003"),
                true,
                PushStatus::Unknown,
                QuotaEffect::Keep,
                true,
                true,
            ),
            (
                fail("2050"),
                true,
                PushStatus::Failed,
                QuotaEffect::Saturate,
                true,
                false,
            ),
            (
                fail("2003"),
                true,
                PushStatus::Failed,
                QuotaEffect::Refund,
                true,
                false,
            ),
            (
                fail("2028"),
                false,
                PushStatus::Failed,
                QuotaEffect::Refund,
                true,
                true,
            ),
        ];
        for (result, dedupes, status, quota, reached, retryable) in cases {
            let v = classify(&result, dedupes);
            assert_eq!(
                (v.status, v.quota, v.reached_umeng, v.retryable),
                (status, quota, reached, retryable),
                "{result:?} dedupes={dedupes}"
            );
        }
        assert_eq!(
            classify(&fail("2050"), false).metric,
            PushOutcome::RateLimited
        );
    }

    #[test]
    fn a_task_without_task_id_is_unknown() {
        let r = missing_task_id(ok(None), true);
        assert!(matches!(
            &r,
            Err(UmengError::Unknown {
                raw: Some(_),
                timed_out: false,
                ..
            })
        ));
        assert_eq!(classify(&r, true).status, PushStatus::Unknown);
        assert!(missing_task_id(ok(None), false).is_ok());
    }
}
