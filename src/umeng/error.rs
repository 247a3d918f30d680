//! Errors from talking to Umeng, split by what they mean for the caller: not sent,
//! definitely rejected, or unknown (Umeng may have accepted the request).

use serde::Serialize;
use serde_json::Value;

/// What kind of FAIL answer Umeng gave, classified once from its `error_code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The request is wrong; sending it again will fail again.
    Client,
    /// Server-side or transient; retry with backoff (idempotency permitting).
    Retryable,
    /// A send-frequency limit is full (2050, and the old 2012/2026).
    Quota,
    /// Credentials, signature, clock or IP allow-list.
    Auth,
    /// iOS certificate state in Umeng's console.
    Certificate,
}

impl ErrorClass {
    /// Classifies an Umeng `error_code`. Unknown codes are client errors.
    pub fn of(code: &str) -> ErrorClass {
        let Ok(n) = code.trim().parse::<u32>() else {
            return ErrorClass::Client;
        };
        match n {
            2050 | 2012 | 2026 => ErrorClass::Quota,
            2027 | 2028 | 2036 | 2052 | 2021 | 2004 | 2054 | 1018 | 2007 => ErrorClass::Auth,
            2032..=2035 | 5001 | 5007..=5010 => ErrorClass::Certificate,
            3000..=3999
            | 4000
            | 4001
            | 4002
            | 4009
            | 4013
            | 4021
            | 4023
            | 4027
            | 5006
            | 6002..=6004
            | 2013
            | 2014
            | 2017
            | 2020
            | 2023
            | 2038 => ErrorClass::Retryable,
            _ => ErrorClass::Client,
        }
    }

    /// A stable lower-case label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Client => "client",
            ErrorClass::Retryable => "retryable",
            ErrorClass::Quota => "quota",
            ErrorClass::Auth => "auth",
            ErrorClass::Certificate => "certificate",
        }
    }
}

/// What an attempt's result means for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Nothing reached Umeng; sending again cannot duplicate.
    NotSent,
    /// Umeng answered and did not accept the message.
    Rejected,
    /// Umeng may or may not have accepted it.
    Unknown,
}

/// An error from an Umeng call. Messages never contain the secret, the sign or the
/// signed URL.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UmengError {
    /// Failed before any byte of the request was sent (DNS, connect, TLS): safe to retry.
    #[error("request not sent to Umeng: {reason}")]
    NotSent { reason: String },
    /// Sent, but no usable answer (timeout, reset, HTTP 5xx, not an Umeng envelope, a
    /// SUCCESS without the id it must carry): Umeng may have accepted it.
    #[error("outcome unknown: {reason}")]
    Unknown {
        reason: String,
        /// No answer came in time (as opposed to an answer that could not be used).
        timed_out: bool,
        /// Umeng's answer, when it was JSON.
        raw: Option<Value>,
    },
    /// Umeng answered `{"ret":"FAIL"}`.
    #[error("Umeng error {code} ({}): {message}", class.as_str())]
    Fail {
        /// `data.error_code`, as a string even when Umeng sent a number.
        code: String,
        /// `data.error_msg`.
        message: String,
        /// The classification of `code`.
        class: ErrorClass,
        /// HTTP status of the answer (Umeng uses 400).
        http_status: u16,
        /// The whole answer.
        raw: Value,
    },
}

impl UmengError {
    /// No usable answer, though one came (not a timeout).
    pub fn unclear(reason: impl Into<String>) -> Self {
        UmengError::Unknown {
            reason: reason.into(),
            timed_out: false,
            raw: None,
        }
    }

    /// No answer in time.
    pub fn timeout(reason: impl Into<String>) -> Self {
        UmengError::Unknown {
            reason: reason.into(),
            timed_out: true,
            raw: None,
        }
    }

    /// A FAIL error, classified from its code.
    pub fn fail(
        code: impl Into<String>,
        message: impl Into<String>,
        http_status: u16,
        raw: Value,
    ) -> Self {
        let code = code.into();
        let class = ErrorClass::of(&code);
        UmengError::Fail {
            code,
            message: message.into(),
            class,
            http_status,
            raw,
        }
    }

    /// Whether the message definitely did not reach or was refused by Umeng, so a slot can
    /// be refunded and the idempotency key freed. Retryable FAIL codes (Umeng's internal
    /// errors) count as unknown: a server that failed internally may have queued it.
    pub fn outcome(&self) -> Outcome {
        match self {
            UmengError::NotSent { .. } => Outcome::NotSent,
            UmengError::Unknown { .. } => Outcome::Unknown,
            UmengError::Fail {
                class: ErrorClass::Retryable,
                ..
            } => Outcome::Unknown,
            UmengError::Fail { .. } => Outcome::Rejected,
        }
    }

    /// `true` when Umeng certainly did not accept the message (not sent, or rejected).
    pub fn is_definite_failure(&self) -> bool {
        self.outcome() != Outcome::Unknown
    }

    /// Whether sending the same request again may succeed (transport problems and
    /// retryable codes; also 2028, after re-signing with a fresh timestamp). Whether a
    /// retry is *safe* depends on [`UmengError::outcome`] and on idempotency.
    pub fn is_retryable(&self) -> bool {
        match self {
            UmengError::NotSent { .. } | UmengError::Unknown { .. } => true,
            UmengError::Fail { class, code, .. } => {
                *class == ErrorClass::Retryable || code == "2028"
            }
        }
    }

    /// The Umeng error code, for FAIL answers.
    pub fn code(&self) -> Option<&str> {
        match self {
            UmengError::Fail { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The code a push's record and answer carry: Umeng's `error_code` for a FAIL, else
    /// `not_sent`, `timeout` or `unknown`.
    pub fn record_code(&self) -> &str {
        match self {
            UmengError::Fail { code, .. } => code,
            UmengError::NotSent { .. } => "not_sent",
            UmengError::Unknown {
                timed_out: true, ..
            } => "timeout",
            UmengError::Unknown { .. } => "unknown",
        }
    }

    /// The class, for FAIL answers.
    pub fn class(&self) -> Option<ErrorClass> {
        match self {
            UmengError::Fail { class, .. } => Some(*class),
            _ => None,
        }
    }

    /// A low-cardinality label for metrics: `not_sent`, `unknown`, or the FAIL class.
    pub fn metric_label(&self) -> &'static str {
        match self {
            UmengError::NotSent { .. } => "not_sent",
            UmengError::Unknown { .. } => "unknown",
            UmengError::Fail { class, .. } => class.as_str(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        for (code, class) in [
            ("2050", ErrorClass::Quota),
            ("2012", ErrorClass::Quota),
            ("2026", ErrorClass::Quota),
            ("2027", ErrorClass::Auth),
            ("2028", ErrorClass::Auth),
            ("2036", ErrorClass::Auth),
            ("2052", ErrorClass::Auth),
            ("2021", ErrorClass::Auth),
            ("2004", ErrorClass::Auth),
            ("2054", ErrorClass::Auth),
            ("1018", ErrorClass::Auth),
            ("2032", ErrorClass::Certificate),
            ("2035", ErrorClass::Certificate),
            ("5001", ErrorClass::Certificate),
            ("5007", ErrorClass::Certificate),
            ("5010", ErrorClass::Certificate),
            ("6002", ErrorClass::Retryable),
            ("6003", ErrorClass::Retryable),
            ("6004", ErrorClass::Retryable),
            ("3000", ErrorClass::Retryable),
            ("3004", ErrorClass::Retryable),
            ("4000", ErrorClass::Retryable),
            ("4001", ErrorClass::Retryable),
            ("4009", ErrorClass::Retryable),
            ("4013", ErrorClass::Retryable),
            ("4021", ErrorClass::Retryable),
            ("4023", ErrorClass::Retryable),
            ("4027", ErrorClass::Retryable),
            ("2013", ErrorClass::Retryable),
            ("2014", ErrorClass::Retryable),
            ("2020", ErrorClass::Retryable),
            ("2023", ErrorClass::Retryable),
            ("2038", ErrorClass::Retryable),
            ("1001", ErrorClass::Client),
            ("2022", ErrorClass::Client),
            ("4020", ErrorClass::Client),
            ("5002", ErrorClass::Client),
            ("6001", ErrorClass::Client),
            ("abc", ErrorClass::Client),
            ("", ErrorClass::Client),
        ] {
            assert_eq!(ErrorClass::of(code), class, "code {code}");
        }
    }

    #[test]
    fn outcomes() {
        let ns = UmengError::NotSent { reason: "x".into() };
        assert_eq!(ns.outcome(), Outcome::NotSent);
        assert!(ns.is_definite_failure());
        let unk = UmengError::unclear("x");
        assert!(!unk.is_definite_failure());
        let quota = UmengError::fail("2050", "limit", 400, Value::Null);
        assert_eq!(quota.outcome(), Outcome::Rejected);
        assert_eq!(quota.class(), Some(ErrorClass::Quota));
        let internal = UmengError::fail("6003", "db", 400, Value::Null);
        assert_eq!(internal.outcome(), Outcome::Unknown);
        assert!(internal.is_retryable());
        assert!(UmengError::fail("2028", "ts", 400, Value::Null).is_retryable());
        assert!(!UmengError::fail("1001", "p", 400, Value::Null).is_retryable());
        assert_eq!(
            UmengError::fail("2027", "bad sign", 400, Value::Null).to_string(),
            "Umeng error 2027 (auth): bad sign"
        );
    }
}
