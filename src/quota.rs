//! Umeng's per-type send quotas: which pushes count, against which bucket, in which window.
//!
//! The counting itself is done atomically by the store (see `store::Store::admit`); this
//! module only names buckets and windows. Windows are calendar windows in Beijing time
//! (UTC+8, no daylight saving), so a window of `unit` seconds starts at
//! `floor((epoch + 8h) / unit) * unit - 8h`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// This replica's memory of quota windows the database called full, so that a flood of
/// requests for a full window is answered 429 without a database round trip each.
///
/// Only ever answers "full": the database stays the one authority on admitting. A window
/// is remembered when an admission is refused for it (or took its last slot), and
/// forgotten when it ends, when this replica gives a slot of it back (a refund), or
/// `recheck` after it was last confirmed full. Once `recheck` has passed, the next request
/// for the window goes to the database and the others are still answered from memory
/// until it has its answer. So a slot given back by another replica is seen here at most
/// `recheck` later (plus one admission); a slot given back here, at once.
#[derive(Debug)]
pub struct FullWindows {
    recheck: Duration,
    /// By appkey; one entry per bucket. Apps are configured, so this stays small.
    full: Mutex<HashMap<String, [Option<FullWindow>; 4]>>,
}

#[derive(Debug, Clone, Copy)]
struct FullWindow {
    state: QuotaState,
    /// When the next request for this window is let through to the database.
    recheck_at: Instant,
}

impl FullWindows {
    /// `recheck` zero turns the memory off: every admission goes to the database.
    pub fn new(recheck: Duration) -> Self {
        FullWindows {
            recheck,
            full: Mutex::new(HashMap::new()),
        }
    }

    /// Learn a window's state from the database: remembered if it has no slot left,
    /// forgotten otherwise.
    pub fn learn(&self, appkey: &str, state: &QuotaState) {
        if self.recheck.is_zero() {
            return;
        }
        let mut full = self.full.lock().unwrap_or_else(|e| e.into_inner());
        if state.remaining() == 0 {
            let slots = full.entry(appkey.to_owned()).or_default();
            slots[slot(state.kind)] = Some(FullWindow {
                state: *state,
                recheck_at: Instant::now() + self.recheck,
            });
        } else if let Some(slots) = full.get_mut(appkey) {
            slots[slot(state.kind)] = None;
        }
    }

    /// Forget a bucket's window: this replica gave one of its slots back.
    pub fn forget(&self, appkey: &str, kind: QuotaKind) {
        let mut full = self.full.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slots) = full.get_mut(appkey) {
            slots[slot(kind)] = None;
        }
    }

    /// The state of `kind`'s window of `appkey` if it is known to be full at `now` (epoch
    /// seconds), with `reset_after_secs` counted from `now`. `None` sends the admission to
    /// the database: the window is not known full, it has ended, its limit is not
    /// `limit`, or it is time to check it again (the caller is then the one that checks).
    pub fn full_now(
        &self,
        appkey: &str,
        kind: QuotaKind,
        limit: QuotaLimit,
        now: i64,
    ) -> Option<QuotaState> {
        if self.recheck.is_zero() {
            return None;
        }
        let mut full = self.full.lock().unwrap_or_else(|e| e.into_inner());
        let entry = &mut full.get_mut(appkey)?[slot(kind)];
        let known = entry.as_mut()?;
        let state = known.state;
        if state.limit != limit.limit || state.window != limit.window || now >= state.window_end() {
            *entry = None;
            return None;
        }
        let at = Instant::now();
        if at >= known.recheck_at {
            // This caller asks the database; the others keep the answer until it is back.
            known.recheck_at = at + self.recheck;
            return None;
        }
        Some(QuotaState {
            reset_after_secs: (state.window_end() - now).max(1),
            ..state
        })
    }
}

fn slot(kind: QuotaKind) -> usize {
    match kind {
        QuotaKind::Broadcast => 0,
        QuotaKind::Groupcast => 1,
        QuotaKind::Filecast => 2,
        QuotaKind::CustomizedcastFile => 3,
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

    const GROUPCAST: QuotaLimit = QuotaLimit {
        limit: 5,
        window: WindowUnit::Minute,
    };

    /// The state of a groupcast window starting at `start` with `used` slots taken.
    fn groupcast(start: i64, used: u32) -> QuotaState {
        QuotaState {
            kind: QuotaKind::Groupcast,
            limit: 5,
            window: WindowUnit::Minute,
            used,
            window_start: start,
            reset_after_secs: 60,
        }
    }

    #[test]
    fn a_full_window_is_known_full_until_it_ends_with_reset_counted_from_now() {
        let memory = FullWindows::new(Duration::from_secs(3600));
        let start = WindowUnit::Minute.window_start(1_796_313_599);
        assert_eq!(
            memory.full_now("k", QuotaKind::Groupcast, GROUPCAST, start),
            None
        );
        memory.learn("k", &groupcast(start, 5));
        let known = memory.full_now("k", QuotaKind::Groupcast, GROUPCAST, start + 45);
        assert_eq!(
            known,
            Some(QuotaState {
                reset_after_secs: 15,
                ..groupcast(start, 5)
            })
        );
        // Another appkey, another bucket: not known.
        assert_eq!(
            memory.full_now("other", QuotaKind::Groupcast, GROUPCAST, start),
            None
        );
        assert_eq!(
            memory.full_now("k", QuotaKind::Broadcast, GROUPCAST, start),
            None
        );
        // The next window is not full, and the memory of this one is gone.
        assert_eq!(
            memory.full_now("k", QuotaKind::Groupcast, GROUPCAST, start + 60),
            None
        );
        assert_eq!(
            memory.full_now("k", QuotaKind::Groupcast, GROUPCAST, start + 1),
            None
        );
    }

    #[test]
    fn room_in_the_window_a_refund_or_another_limit_forget_it() {
        let memory = FullWindows::new(Duration::from_secs(3600));
        let start = WindowUnit::Minute.window_start(1_796_313_599);
        let full = |m: &FullWindows| m.full_now("k", QuotaKind::Groupcast, GROUPCAST, start);

        memory.learn("k", &groupcast(start, 4));
        assert_eq!(full(&memory), None, "a window with room is not remembered");
        memory.learn("k", &groupcast(start, 5));
        assert!(full(&memory).is_some());
        memory.learn("k", &groupcast(start, 4));
        assert_eq!(full(&memory), None, "room seen later forgets it");

        memory.learn("k", &groupcast(start, 5));
        memory.forget("k", QuotaKind::Groupcast);
        assert_eq!(full(&memory), None, "a slot given back forgets it");

        memory.learn("k", &groupcast(start, 5));
        let raised = QuotaLimit {
            limit: 6,
            ..GROUPCAST
        };
        assert_eq!(
            memory.full_now("k", QuotaKind::Groupcast, raised, start),
            None
        );
        assert_eq!(full(&memory), None, "a window of another limit is dropped");

        // Umeng's 2050 may leave more used than the limit: still full.
        memory.learn("k", &groupcast(start, 7));
        assert!(full(&memory).is_some());
    }

    #[test]
    fn after_the_recheck_one_caller_asks_the_database_and_the_others_wait_for_it() {
        let memory = FullWindows::new(Duration::from_millis(20));
        let start = WindowUnit::Minute.window_start(1_796_313_599);
        let full = |m: &FullWindows| m.full_now("k", QuotaKind::Groupcast, GROUPCAST, start);
        memory.learn("k", &groupcast(start, 5));
        assert!(full(&memory).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            full(&memory),
            None,
            "the first caller after the recheck asks"
        );
        assert!(full(&memory).is_some(), "the others are still answered");
        // The database's answer renews (or ends) the memory.
        memory.learn("k", &groupcast(start, 5));
        assert!(full(&memory).is_some());
    }

    #[test]
    fn a_zero_recheck_remembers_nothing() {
        let memory = FullWindows::new(Duration::ZERO);
        let start = WindowUnit::Minute.window_start(1_796_313_599);
        memory.learn("k", &groupcast(start, 5));
        assert_eq!(
            memory.full_now("k", QuotaKind::Groupcast, GROUPCAST, start),
            None
        );
    }
}
