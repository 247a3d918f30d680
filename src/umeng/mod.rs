//! The Umeng U-Push protocol: typed send bodies, local validation of Umeng's rules, the
//! request signature, error classification and an HTTP client for send/status/cancel/upload.

pub mod client;
pub mod error;
pub mod model;
pub mod sign;
pub mod validate;

pub use client::{AppCredentials, ClientConfig, SendAttempt, SendSuccess, TaskStatus, UmengClient};
pub use error::{ErrorClass, Outcome, UmengError};
pub use model::SendBody;
pub use validate::validate;

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// The platform of an Umeng app. Each appkey belongs to exactly one platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Android,
    Ios,
}

impl Platform {
    /// `"android"` or `"ios"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Android => "android",
            Platform::Ios => "ios",
        }
    }

    /// Length in characters of a device token on this platform (Android 44, iOS 64).
    pub fn token_len(self) -> usize {
        match self {
            Platform::Android => 44,
            Platform::Ios => 64,
        }
    }

    /// Umeng's documented payload limit in bytes (Android 2048, iOS 2012).
    pub fn default_payload_limit(self) -> usize {
        match self {
            Platform::Android => 2048,
            Platform::Ios => 2012,
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Umeng's `type` field: how the audience of a send is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CastType {
    Unicast,
    Listcast,
    Broadcast,
    Groupcast,
    Filecast,
    Customizedcast,
}

impl CastType {
    /// Every cast type, in Umeng's documentation order.
    pub const ALL: [CastType; 6] = [
        CastType::Unicast,
        CastType::Listcast,
        CastType::Broadcast,
        CastType::Groupcast,
        CastType::Filecast,
        CastType::Customizedcast,
    ];

    /// The wire name, e.g. `"unicast"`.
    pub fn as_str(self) -> &'static str {
        match self {
            CastType::Unicast => "unicast",
            CastType::Listcast => "listcast",
            CastType::Broadcast => "broadcast",
            CastType::Groupcast => "groupcast",
            CastType::Filecast => "filecast",
            CastType::Customizedcast => "customizedcast",
        }
    }

    /// Parses a wire name.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Whether a send of this type becomes an Umeng task (answers `task_id`, can be queried
    /// and cancelled, honours `start_time` and `out_biz_no`): broadcast, groupcast, filecast,
    /// and customizedcast with a `file_id`.
    pub fn is_task_class(self, has_file_id: bool) -> bool {
        match self {
            CastType::Broadcast | CastType::Groupcast | CastType::Filecast => true,
            CastType::Customizedcast => has_file_id,
            CastType::Unicast | CastType::Listcast => false,
        }
    }
}

impl std::fmt::Display for CastType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One validation failure: which field, and which rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldError {
    /// JSON path of the field, e.g. `payload.body.url` or `device_tokens[3]`.
    pub field: String,
    /// The rule, human readable.
    pub message: String,
}

impl FieldError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Beijing time (UTC+8, no daylight saving), the zone of Umeng's policy times.
pub const BEIJING: UtcOffset = time::macros::offset!(+8);

const POLICY_TIME_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");

/// Formats an instant as Umeng's policy time: `yyyy-MM-dd HH:mm:ss` in Beijing time.
/// Sub-second precision is dropped.
pub fn format_policy_time(t: OffsetDateTime) -> String {
    let local = t.to_offset(BEIJING);
    // Formatting a year in 0..=9999 with this description cannot fail; fall back to a
    // visibly wrong value rather than panicking for out-of-range years.
    local
        .format(POLICY_TIME_FORMAT)
        .unwrap_or_else(|_| String::from("invalid"))
}

/// Parses Umeng's policy time (`yyyy-MM-dd HH:mm:ss`, Beijing time).
pub fn parse_policy_time(s: &str) -> Option<OffsetDateTime> {
    PrimitiveDateTime::parse(s, POLICY_TIME_FORMAT)
        .ok()
        .map(|p| p.assume_offset(BEIJING))
}

/// A short, non-reversible label for a device token or alias in logs: its length and
/// first 4 characters.
pub fn redact_token(token: &str) -> String {
    let head: String = token.chars().take(4).collect();
    format!("{head}…({} chars)", token.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_class_types() {
        assert!(CastType::Broadcast.is_task_class(false));
        assert!(CastType::Groupcast.is_task_class(false));
        assert!(CastType::Filecast.is_task_class(true));
        assert!(CastType::Customizedcast.is_task_class(true));
        assert!(!CastType::Customizedcast.is_task_class(false));
        assert!(!CastType::Unicast.is_task_class(false));
        assert!(!CastType::Listcast.is_task_class(false));
    }

    #[test]
    fn cast_type_round_trips_through_serde_and_as_str() {
        for c in CastType::ALL {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(CastType::parse(c.as_str()), Some(c));
        }
        assert_eq!(serde_json::to_string(&Platform::Ios).unwrap(), "\"ios\"");
    }

    #[test]
    fn policy_times_are_beijing() {
        let t = time::macros::datetime!(2026-12-01 01:00:00.75 UTC);
        assert_eq!(format_policy_time(t), "2026-12-01 09:00:00");
        let back = parse_policy_time("2026-12-01 09:00:00").unwrap();
        assert_eq!(back, time::macros::datetime!(2026-12-01 01:00:00 UTC));
        assert!(parse_policy_time("2026-12-01T09:00:00").is_none());
        assert!(parse_policy_time("2026-12-01 9:00:00").is_none());
    }

    #[test]
    fn redacted_tokens_show_only_a_prefix() {
        assert_eq!(redact_token("AaBbCcDd"), "AaBb…(8 chars)");
    }
}
