//! What the templates see: times in Beijing time (with UTC for hovering), status badges,
//! pushes as rows and as a detail page. Built from the store's and the API's types only.

use serde::Serialize;
use serde_json::Value;
use time::macros::{format_description, offset};
use time::OffsetDateTime;

use super::i18n::Lang;
use crate::store::{DeliveryMode, PushRecord, PushStatus, PushSummary};

/// The most characters of one JSON body shown on a page.
pub const MAX_BODY_CHARS: usize = 32 * 1024;

/// A time as shown: Beijing time, with the UTC instant for `datetime` and hovering.
#[derive(Debug, Serialize)]
pub struct TimeView {
    pub bj: String,
    pub utc: String,
}

impl TimeView {
    pub fn of(t: OffsetDateTime) -> TimeView {
        let bj = t
            .to_offset(offset!(+8))
            .format(format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))
            .unwrap_or_default();
        let utc = t
            .to_offset(offset!(UTC))
            .format(format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
            ))
            .unwrap_or_default();
        TimeView { bj, utc }
    }

    pub fn of_unix(secs: i64) -> Option<TimeView> {
        OffsetDateTime::from_unix_timestamp(secs)
            .ok()
            .map(TimeView::of)
    }
}

/// Badge colour of a status: ok, bad, warn or muted.
pub fn status_class(s: PushStatus) -> &'static str {
    match s {
        PushStatus::Accepted
        | PushStatus::Done
        | PushStatus::Queued
        | PushStatus::Sending
        | PushStatus::Scheduled => "ok",
        PushStatus::Failed
        | PushStatus::SendFailed
        | PushStatus::Expired
        | PushStatus::NoMatch
        | PushStatus::TaskLost => "bad",
        PushStatus::Unknown
        | PushStatus::Pending
        | PushStatus::AwaitingSend
        | PushStatus::AwaitingSendAt
        | PushStatus::AwaitingQuota
        | PushStatus::Partial => "warn",
        PushStatus::Cancelled | PushStatus::Withdrawn => "muted",
    }
}

/// The overview chart's outcome group of a status.
pub fn outcome(s: PushStatus) -> usize {
    match s {
        PushStatus::Accepted
        | PushStatus::Done
        | PushStatus::Queued
        | PushStatus::Sending
        | PushStatus::Scheduled => 0,
        PushStatus::Failed
        | PushStatus::SendFailed
        | PushStatus::Expired
        | PushStatus::NoMatch
        | PushStatus::TaskLost => 1,
        PushStatus::Unknown | PushStatus::Partial => 2,
        PushStatus::Pending
        | PushStatus::AwaitingSend
        | PushStatus::AwaitingSendAt
        | PushStatus::AwaitingQuota => 3,
        PushStatus::Cancelled | PushStatus::Withdrawn => 4,
    }
}

/// The outcome groups' keys (text keys are `o_<key>`, CSS classes `seg-<key>`).
pub const OUTCOMES: [&str; 5] = ["ok", "failed", "unknown", "pending", "cancelled"];

#[derive(Debug, Serialize)]
pub struct StatusView {
    pub value: &'static str,
    pub label: &'static str,
    pub class: &'static str,
}

pub fn status_view(s: PushStatus, lang: Lang) -> StatusView {
    StatusView {
        value: s.as_str(),
        label: lang.t(status_key(s)),
        class: status_class(s),
    }
}

fn status_key(s: PushStatus) -> &'static str {
    match s {
        PushStatus::Pending => "s_pending",
        PushStatus::Accepted => "s_accepted",
        PushStatus::Failed => "s_failed",
        PushStatus::Unknown => "s_unknown",
        PushStatus::Queued => "s_queued",
        PushStatus::Sending => "s_sending",
        PushStatus::Done => "s_done",
        PushStatus::SendFailed => "s_send_failed",
        PushStatus::Cancelled => "s_cancelled",
        PushStatus::Expired => "s_expired",
        PushStatus::NoMatch => "s_no_match",
        PushStatus::Scheduled => "s_scheduled",
        PushStatus::TaskLost => "s_task_lost",
        PushStatus::AwaitingSend => "s_awaiting_send",
        PushStatus::AwaitingSendAt => "s_awaiting_send_at",
        PushStatus::AwaitingQuota => "s_awaiting_quota",
        PushStatus::Withdrawn => "s_withdrawn",
        PushStatus::Partial => "s_partial",
    }
}

/// One line of history.
#[derive(Debug, Serialize)]
pub struct PushRow {
    pub id: String,
    pub short_id: String,
    pub created: TimeView,
    pub app: String,
    pub cast_type: String,
    pub status: StatusView,
    pub client: String,
    pub out_biz_no: Option<String>,
    pub reference: Option<String>,
    pub error_code: Option<String>,
    pub description: Option<String>,
}

/// `s` cut to at most `max` characters (with an ellipsis when cut).
pub fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

impl PushRow {
    pub fn of(p: &PushSummary, lang: Lang) -> PushRow {
        PushRow {
            short_id: p
                .id
                .chars()
                .rev()
                .take(12)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect(),
            id: p.id.clone(),
            created: TimeView::of(p.created_at),
            app: p.app.clone(),
            cast_type: p.cast_type.clone(),
            status: status_view(p.status, lang),
            client: p.client.clone(),
            out_biz_no: p.out_biz_no.clone(),
            reference: p.task_id.clone().or_else(|| p.msg_id.clone()),
            error_code: p.error_code.clone(),
            description: p.description.as_deref().map(|d| cut(d, 80)),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct TimelineEntry {
    pub at: TimeView,
    pub label: &'static str,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Counter {
    pub label: &'static str,
    pub value: String,
}

/// Everything the detail page shows of one push.
#[derive(Debug, Serialize)]
pub struct PushDetail {
    pub row: PushRow,
    pub platform: String,
    pub production_mode: bool,
    pub msg_id: Option<String>,
    pub task_id: Option<String>,
    pub file_id: Option<String>,
    pub error_msg: Option<String>,
    pub http_status: Option<u16>,
    pub latency_ms: Option<i64>,
    pub quota: Option<String>,
    pub quota_refunded: bool,
    pub title: Option<String>,
    pub timeline: Vec<TimelineEntry>,
    pub counters: Vec<Counter>,
    pub request: String,
    pub umeng_request: Option<String>,
    pub umeng_response: Option<String>,
    pub task_status: Option<String>,
    /// "sync" or "async", and its label.
    pub delivery: &'static str,
    pub delivery_label: &'static str,
    pub send_at: Option<TimeView>,
    pub next_attempt_at: Option<TimeView>,
    pub deliver_by: Option<TimeView>,
    /// A task whose status can be asked for.
    pub refreshable: bool,
    /// A task that may still be cancelled, or a push not sent yet that may be withdrawn.
    pub cancellable: bool,
    /// Not sent yet: Cancel withdraws it here, Umeng never hears of it.
    pub withdrawable: bool,
    /// A parent (app group or split list): its parts.
    pub parts: Vec<PartRow>,
    /// A part: its parent's id and its number.
    pub parent_id: Option<String>,
    pub part_no: Option<u32>,
}

/// One part of a parent, as the detail page lists it.
#[derive(Debug, Serialize)]
pub struct PartRow {
    pub id: String,
    pub part: u32,
    pub app: String,
    pub platform: String,
    pub audience: Option<u32>,
    pub status: StatusView,
    /// Its msg_id or task_id.
    pub reference: Option<String>,
    pub error: Option<String>,
    pub attempts: usize,
}

impl PartRow {
    fn of(p: &crate::store::PushPart, lang: Lang) -> PartRow {
        PartRow {
            id: p.id.clone(),
            part: p.part,
            app: p.app.clone(),
            platform: p.platform.clone(),
            audience: p.audience,
            status: status_view(p.status, lang),
            reference: p.task_id.clone().or_else(|| p.msg_id.clone()),
            error: p.error_code.as_ref().map(|c| match &p.error_msg {
                Some(m) => format!("{c}: {}", cut(m, 120)),
                None => c.clone(),
            }),
            attempts: p.attempts.len(),
        }
    }
}

/// A JSON body pretty-printed and cut to [`MAX_BODY_CHARS`].
pub fn pretty(v: &Value) -> String {
    let s = serde_json::to_string_pretty(v).unwrap_or_default();
    cut(&s, MAX_BODY_CHARS)
}

impl PushDetail {
    pub fn of(p: &PushRecord, lang: Lang) -> PushDetail {
        let mut timeline = vec![TimelineEntry {
            at: TimeView::of(p.created_at),
            label: lang.t("tl_created"),
            detail: format!("{} · {} · {}", p.client, p.app, p.cast_type),
        }];
        if let Some(t) = p.sent_at {
            timeline.push(TimelineEntry {
                at: TimeView::of(t),
                label: lang.t("tl_sent"),
                detail: String::new(),
            });
        }
        for a in &p.attempts {
            let code = a
                .error_code
                .as_deref()
                .map(|c| format!(" {c}"))
                .unwrap_or_default();
            timeline.push(TimelineEntry {
                at: TimeView::of(a.started_at),
                label: lang.t("tl_attempt"),
                detail: format!(
                    "#{} {} → {}{} · {} ms",
                    a.number, a.call, a.outcome, code, a.latency_ms
                ),
            });
        }
        if let Some(t) = p.finished_at {
            let detail = match (&p.error_code, &p.error_msg) {
                (Some(code), Some(msg)) => format!("{code}: {}", cut(msg, 200)),
                (Some(code), None) => code.clone(),
                _ => p
                    .task_id
                    .as_ref()
                    .map(|t| format!("task_id {t}"))
                    .or_else(|| p.msg_id.as_ref().map(|m| format!("msg_id {m}")))
                    .unwrap_or_default(),
            };
            timeline.push(TimelineEntry {
                at: TimeView::of(t),
                label: lang.t("tl_answered"),
                detail,
            });
        }
        for c in &p.callbacks {
            let last = c
                .attempts
                .last()
                .map(|a| match (a.http_status, &a.error) {
                    (Some(status), _) => format!(" · HTTP {status}"),
                    (None, Some(e)) => format!(" · {}", cut(e, 80)),
                    (None, None) => String::new(),
                })
                .unwrap_or_default();
            timeline.push(TimelineEntry {
                at: TimeView::of(c.finished_at.unwrap_or(c.created_at)),
                label: lang.t("tl_callback"),
                detail: format!(
                    "{} → {} · {} {}{last}",
                    c.event_type,
                    c.state.as_str(),
                    c.attempts.len(),
                    lang.t("attempts")
                ),
            });
        }
        if let Some(t) = p.task_checked_at {
            timeline.push(TimelineEntry {
                at: TimeView::of(t),
                label: lang.t("tl_task"),
                detail: status_view(p.status, lang).label.to_owned(),
            });
        }
        let counters = p
            .task_status
            .as_ref()
            .map(|ts| {
                ["total_count", "sent_count", "open_count", "dismiss_count"]
                    .into_iter()
                    .filter_map(|k| {
                        let v = ts.get(k)?;
                        let value = match v {
                            Value::String(s) => cut(s, 20),
                            Value::Number(n) => n.to_string(),
                            _ => return None,
                        };
                        Some(Counter {
                            label: lang.t(k),
                            value,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let title = p
            .request
            .pointer("/notification/title")
            .or_else(|| p.request.pointer("/notification/alert/title"))
            .and_then(Value::as_str)
            .map(|t| cut(t, 200));
        // A parent acts through its parts: any task part, any part not sent yet.
        let has_task = (p.task_class && p.task_id.is_some())
            || p.parts.iter().any(|part| part.task_id.is_some());
        let withdrawable =
            p.status.is_waiting() || p.parts.iter().any(|part| part.status.is_waiting());
        let open_task = if p.parts.is_empty() {
            has_task && !p.status.is_final_task_state()
        } else {
            p.parts
                .iter()
                .any(|part| part.task_id.is_some() && !part.status.is_final_task_state())
        };
        PushDetail {
            row: PushRow::of(&PushSummary::of(p), lang),
            platform: p.platform.clone(),
            production_mode: p.production_mode,
            msg_id: p.msg_id.clone(),
            task_id: p.task_id.clone(),
            file_id: p.file_id.clone(),
            error_msg: p.error_msg.as_deref().map(|m| cut(m, 500)),
            http_status: p.http_status,
            latency_ms: p.latency_ms,
            quota: p.quota_kind.map(|k| k.as_str().to_owned()),
            quota_refunded: p.quota_refunded,
            title,
            timeline,
            counters,
            request: pretty(&p.request),
            umeng_request: p.umeng_request.as_ref().map(pretty),
            umeng_response: p.umeng_response.as_ref().map(pretty),
            task_status: p.task_status.as_ref().map(pretty),
            delivery: delivery_value(p.delivery),
            delivery_label: lang.t(match p.delivery {
                DeliveryMode::Sync => "delivery_sync",
                DeliveryMode::Async => "delivery_async",
            }),
            send_at: p.send_at.map(TimeView::of),
            next_attempt_at: p.next_attempt_at.map(TimeView::of),
            deliver_by: p.deliver_by.map(TimeView::of),
            refreshable: has_task,
            cancellable: withdrawable || open_task,
            withdrawable,
            parts: p.parts.iter().map(|part| PartRow::of(part, lang)).collect(),
            parent_id: p.parent_id.clone(),
            part_no: p.part_no,
        }
    }
}

fn delivery_value(d: DeliveryMode) -> &'static str {
    match d {
        DeliveryMode::Sync => "sync",
        DeliveryMode::Async => "async",
    }
}

/// "2 h 05 min", "4 min 09 s", "12 s" (or the Chinese units).
pub fn duration(secs: i64, lang: Lang) -> String {
    let secs = secs.max(0);
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let (uh, um, us) = match lang {
        Lang::En => ("h", "min", "s"),
        Lang::ZhCn => ("小时", "分", "秒"),
    };
    if h > 0 {
        format!("{h} {uh} {m:02} {um}")
    } else if m > 0 {
        format!("{m} {um} {s:02} {us}")
    } else {
        format!("{s} {us}")
    }
}

/// One push waiting in the queue (or being sent by a delivery worker).
#[derive(Debug, Serialize)]
pub struct QueueRow {
    pub row: PushRow,
    /// When it goes out or is tried next: `next_attempt_at`, else `send_at`.
    pub due: Option<TimeView>,
    /// "in 59 min 58 s", "due 12 s ago", or "being sent".
    pub due_in: String,
    /// Due and not yet taken (for the colour).
    pub overdue: bool,
    pub attempts: u32,
    #[serde(skip)]
    pub due_at: Option<OffsetDateTime>,
}

impl QueueRow {
    pub fn of(p: &PushSummary, now: OffsetDateTime, lang: Lang) -> QueueRow {
        let due_at = p.next_attempt_at.or(p.send_at);
        let (due_in, overdue) = match (p.status, due_at) {
            (PushStatus::Pending, _) => (lang.t("q_being_sent").to_owned(), false),
            (_, Some(t)) if t > now => (
                format!(
                    "{} {}",
                    lang.t("q_in"),
                    duration((t - now).whole_seconds(), lang)
                ),
                false,
            ),
            (_, Some(t)) => (
                format!(
                    "{} {}",
                    lang.t("q_due_for"),
                    duration((now - t).whole_seconds(), lang)
                ),
                true,
            ),
            (_, None) => (String::new(), false),
        };
        QueueRow {
            row: PushRow::of(p, lang),
            due: due_at.map(TimeView::of),
            due_in,
            overdue,
            attempts: p.attempt_count,
            due_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_show_beijing_time_and_utc() {
        let t = TimeView::of_unix(1_764_482_400).unwrap(); // 2025-11-30T06:00:00Z
        assert_eq!(t.bj, "2025-11-30 14:00:00");
        assert_eq!(t.utc, "2025-11-30T06:00:00Z");
    }

    #[test]
    fn the_timeline_shows_every_umeng_call_and_callback() {
        use crate::store::callbacks::{CallbackAttempt, CallbackEvent, CallbackState};
        use crate::store::Attempt;
        let at = OffsetDateTime::from_unix_timestamp(1_764_482_400).unwrap();
        let mut p = crate::store::sample_record(Value::Null, None);
        p.attempts = vec![Attempt {
            number: 1,
            call: "send".into(),
            started_at: at,
            outcome: "not_sent".into(),
            error_code: None,
            latency_ms: 3,
        }];
        p.callbacks = vec![CallbackEvent {
            id: "evt".into(),
            event_type: "push.accepted".into(),
            url: "https://hooks.example/x".into(),
            state: CallbackState::Delivered,
            created_at: at,
            next_attempt_at: None,
            finished_at: Some(at),
            attempts: vec![CallbackAttempt {
                number: 1,
                at,
                http_status: Some(204),
                error: None,
                latency_ms: 9,
            }],
        }];

        let d = PushDetail::of(&p, Lang::En);

        let details: Vec<&str> = d.timeline.iter().map(|e| e.detail.as_str()).collect();
        assert!(
            details.contains(&"#1 send → not_sent · 3 ms"),
            "{details:?}"
        );
        assert!(
            details.contains(&"push.accepted → delivered · 1 attempt(s) · HTTP 204"),
            "{details:?}"
        );
    }

    #[test]
    fn cut_counts_characters_not_bytes() {
        assert_eq!(cut("推送网关控制台", 4), "推送网关…");
        assert_eq!(cut("abc", 3), "abc");
    }
}
