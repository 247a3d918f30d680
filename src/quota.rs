//! Umeng's per-type send quotas: which pushes count, against which bucket, in which window.
//!
//! The counting itself is done atomically by the store (see `store::Store::admit`); this
//! module only names buckets and windows. Windows are calendar windows in Beijing time
//! (UTC+8, no daylight saving), so a window of `unit` seconds starts at
//! `floor((epoch + 8h) / unit) * unit - 8h`.

use serde::{Deserialize, Serialize};

/// Seconds Beijing time is ahead of UTC. China has no daylight saving time.
pub const BEIJING_OFFSET_SECS: i64 = 8 * 3600;

/// A quota bucket. Unicast-class sends (unicast, listcast, customizedcast by alias) have
/// no documented limit and no bucket.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum QuotaKind {
    Broadcast,
    Groupcast,
    Filecast,
    /// customizedcast with a `file_id`: its own bucket, separate from filecast.
    CustomizedcastFile,
}

impl QuotaKind {
    pub const ALL: [QuotaKind; 4] = [
        QuotaKind::Broadcast,
        QuotaKind::Groupcast,
        QuotaKind::Filecast,
        QuotaKind::CustomizedcastFile,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            QuotaKind::Broadcast => "broadcast",
            QuotaKind::Groupcast => "groupcast",
            QuotaKind::Filecast => "filecast",
            QuotaKind::CustomizedcastFile => "customizedcast_file",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Umeng's documented default limit for this bucket.
    pub fn default_limit(self) -> QuotaLimit {
        match self {
            QuotaKind::Broadcast => QuotaLimit {
                limit: 10,
                window: WindowUnit::Day,
            },
            QuotaKind::Groupcast => QuotaLimit {
                limit: 5,
                window: WindowUnit::Minute,
            },
            QuotaKind::Filecast => QuotaLimit {
                limit: 300,
                window: WindowUnit::Hour,
            },
            QuotaKind::CustomizedcastFile => QuotaLimit {
                limit: 300,
                window: WindowUnit::Hour,
            },
        }
    }
}

impl std::fmt::Display for QuotaKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The length of a calendar window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WindowUnit {
    Minute,
    Hour,
    Day,
}

impl WindowUnit {
    pub fn seconds(self) -> i64 {
        match self {
            WindowUnit::Minute => 60,
            WindowUnit::Hour => 3600,
            WindowUnit::Day => 86400,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WindowUnit::Minute => "minute",
            WindowUnit::Hour => "hour",
            WindowUnit::Day => "day",
        }
    }

    /// Start (epoch seconds) of the Beijing-time calendar window containing `epoch_secs`.
    pub fn window_start(self, epoch_secs: i64) -> i64 {
        let unit = self.seconds();
        (epoch_secs + BEIJING_OFFSET_SECS).div_euclid(unit) * unit - BEIJING_OFFSET_SECS
    }
}

/// A limit: at most `limit` production sends per calendar `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaLimit {
    pub limit: u32,
    pub window: WindowUnit,
}

/// The state of one bucket after an admission attempt or a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct QuotaState {
    pub kind: QuotaKind,
    pub limit: u32,
    pub window: WindowUnit,
    /// Slots used in the current window (after this admission, when admitted).
    pub used: u32,
    /// Start of the window, epoch seconds.
    pub window_start: i64,
    /// Seconds from the database's `now` to the end of the window (at least 1).
    pub reset_after_secs: i64,
}

impl QuotaState {
    pub fn remaining(&self) -> u32 {
        self.limit.saturating_sub(self.used)
    }

    pub fn window_end(&self) -> i64 {
        self.window_start + self.window.seconds()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beijing_day_starts_at_16_00_utc() {
        // 2026-12-03T15:59:59Z is 23:59:59 in Beijing; one second later is a new day.
        let before = 1_796_313_599; // 2026-12-03T15:59:59Z
        assert_eq!(WindowUnit::Day.window_start(before), 1_796_227_200); // 2026-12-02T16:00:00Z
        assert_eq!(WindowUnit::Day.window_start(before + 1), before + 1);
    }

    #[test]
    fn minute_and_hour_windows_align_to_the_clock() {
        let t = 1_796_313_599;
        assert_eq!(WindowUnit::Minute.window_start(t), t - 59);
        assert_eq!(WindowUnit::Hour.window_start(t), t - 3599);
    }
}
