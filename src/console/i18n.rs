//! The console's two languages: Simplified Chinese and English, from the language cookie,
//! else `Accept-Language`, else English.

use std::collections::BTreeMap;

use axum::http::{header, HeaderMap};

use super::session::{read_cookie, LANG_COOKIE};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    En,
    ZhCn,
}

impl Lang {
    pub fn code(self) -> &'static str {
        match self {
            Lang::En => "en",
            Lang::ZhCn => "zh-CN",
        }
    }

    pub fn parse(code: &str) -> Option<Lang> {
        match code {
            "en" => Some(Lang::En),
            "zh-CN" => Some(Lang::ZhCn),
            _ => None,
        }
    }

    /// The other language (the switch link offers it).
    pub fn other(self) -> Lang {
        match self {
            Lang::En => Lang::ZhCn,
            Lang::ZhCn => Lang::En,
        }
    }

    /// The language's name in itself.
    pub fn label(self) -> &'static str {
        match self {
            Lang::En => "English",
            Lang::ZhCn => "简体中文",
        }
    }

    /// The chosen language: the cookie set by the switch, else the best `Accept-Language`
    /// match (any `zh` is Simplified Chinese), else English.
    pub fn of(headers: &HeaderMap) -> Lang {
        if let Some(lang) = read_cookie(headers, LANG_COOKIE).and_then(Lang::parse) {
            return lang;
        }
        let Some(accept) = headers
            .get(header::ACCEPT_LANGUAGE)
            .and_then(|v| v.to_str().ok())
        else {
            return Lang::En;
        };
        let mut best: Option<(f32, Lang)> = None;
        for item in accept.split(',').take(32) {
            let mut parts = item.trim().split(';');
            let tag = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .find_map(|p| p.trim().strip_prefix("q="))
                .and_then(|q| q.parse::<f32>().ok())
                .unwrap_or(1.0);
            let lang = if tag == "zh" || tag.starts_with("zh-") {
                Lang::ZhCn
            } else if tag == "en" || tag.starts_with("en-") {
                Lang::En
            } else {
                continue;
            };
            if q > 0.0 && best.is_none_or(|(bq, _)| q > bq) {
                best = Some((q, lang));
            }
        }
        best.map_or(Lang::En, |(_, l)| l)
    }

    /// Every text of the console in this language, by key.
    pub fn texts(self) -> BTreeMap<&'static str, &'static str> {
        TEXTS
            .iter()
            .map(|(k, en, zh)| (*k, if self == Lang::En { *en } else { *zh }))
            .collect()
    }

    /// One text by key (the key itself when missing).
    pub fn t(self, key: &'static str) -> &'static str {
        TEXTS
            .iter()
            .find(|(k, _, _)| *k == key)
            .map_or(key, |(_, en, zh)| if self == Lang::En { en } else { zh })
    }
}

/// (key, English, Simplified Chinese)
const TEXTS: &[(&str, &str, &str)] = &[
    ("title", "Push gateway console", "推送网关控制台"),
    ("nav_overview", "Overview", "概览"),
    ("nav_history", "History", "推送记录"),
    ("nav_queue", "Queue", "发送队列"),
    ("nav_quotas", "Quotas", "配额"),
    ("signed_in_as", "Signed in as", "当前客户端"),
    ("sign_out", "Sign out", "退出"),
    ("sign_in", "Sign in", "登录"),
    ("sign_in_intro", "Sign in with an API token of a client that has the read scope.", "请使用具有 read 权限的客户端 API 令牌登录。"),
    ("token", "API token", "API 令牌"),
    ("bad_token", "This token is not accepted.", "令牌无效。"),
    ("no_read_scope", "This client lacks the read scope.", "该客户端没有 read 权限。"),
    ("signed_out", "You are signed out.", "您已退出。"),
    ("session_expired", "Sign in to continue.", "请登录后继续。"),
    ("skip", "Skip to content", "跳到正文"),
    ("language", "Language", "语言"),
    ("filters", "Filters", "筛选"),
    ("any", "Any", "全部"),
    ("app", "App", "应用"),
    ("type", "Type", "类型"),
    ("status", "Status", "状态"),
    ("client", "Client", "客户端"),
    ("out_biz_no", "out_biz_no", "业务编号 out_biz_no"),
    ("msg_id", "msg_id", "msg_id"),
    ("task_id", "task_id", "task_id"),
    ("file_id", "file_id", "file_id"),
    ("from", "From (Beijing time)", "开始（北京时间）"),
    ("to", "To (Beijing time)", "结束（北京时间）"),
    ("apply", "Apply filters", "筛选"),
    ("clear", "Clear", "清除"),
    ("created", "Created", "创建时间"),
    ("id", "Push id", "推送 ID"),
    ("description", "Description", "描述"),
    ("notif_title", "Notification title", "通知标题"),
    ("error", "Error", "错误"),
    ("reference", "msg_id / task_id", "msg_id / task_id"),
    ("no_pushes", "No pushes match these filters.", "没有符合条件的推送。"),
    ("older", "Older pushes →", "更早的推送 →"),
    ("newest", "← Newest", "← 最新"),
    ("times_note", "Times are Beijing time (UTC+8); hover for UTC.", "时间为北京时间（UTC+8），悬停显示 UTC。"),
    ("push", "Push", "推送"),
    ("summary", "Summary", "摘要"),
    ("timeline", "Timeline", "时间线"),
    ("parts", "Parts", "分片"),
    ("part", "part", "分片"),
    ("part_of", "Part of", "所属推送"),
    ("audience", "Audience", "受众数"),
    ("attempts_col", "Attempts", "尝试次数"),
    ("tl_created", "Recorded by the gateway", "网关记录"),
    ("tl_sent", "Sent to Umeng", "发送至友盟"),
    ("tl_attempt", "Umeng call", "友盟调用"),
    ("tl_callback", "Callback", "回调"),
    ("attempts", "attempt(s)", "次尝试"),
    ("tl_answered", "Umeng answered", "友盟应答"),
    ("tl_task", "Task status checked", "查询任务状态"),
    ("request", "The caller's request", "调用方请求"),
    ("umeng_request", "Body sent to Umeng", "发送给友盟的请求体"),
    ("umeng_response", "Umeng's answer", "友盟应答"),
    ("task_status", "Last task status from Umeng", "友盟最近的任务状态"),
    ("counters", "Task counters", "任务计数"),
    ("total_count", "Total", "总数"),
    ("sent_count", "Sent", "已送达"),
    ("open_count", "Opened", "已打开"),
    ("dismiss_count", "Dismissed", "已忽略"),
    ("nothing", "—", "—"),
    ("platform", "Platform", "平台"),
    ("production_mode", "Production mode", "正式模式"),
    ("yes", "yes", "是"),
    ("no", "no", "否"),
    ("http_status", "HTTP status", "HTTP 状态"),
    ("latency", "Umeng latency", "友盟耗时"),
    ("quota", "Quota bucket", "配额类别"),
    ("refunded", "slot given back", "配额已退回"),
    ("actions", "Actions", "操作"),
    ("refresh", "Refresh task status", "刷新任务状态"),
    ("cancel", "Cancel task…", "取消任务…"),
    ("cancel_title", "Cancel this task?", "确定取消该任务？"),
    ("cancel_explain", "Umeng stops sending this task. Devices that already received it keep it. This cannot be undone.", "友盟将停止发送该任务，已送达的设备不受影响。此操作无法撤销。"),
    ("cancel_confirm", "Yes, cancel the task", "确定取消任务"),
    ("cancel_keep", "No, keep it", "不，保留"),
    ("done_refreshed", "Task status refreshed.", "任务状态已刷新。"),
    ("done_cancelled", "Task cancelled.", "任务已取消。"),
    ("withdraw", "Withdraw…", "撤回…"),
    ("withdraw_title", "Withdraw this push?", "确定撤回该推送？"),
    ("withdraw_explain", "The gateway has not sent this push yet: it is withdrawn here and never reaches Umeng. A quota slot it holds is given back. This cannot be undone.", "网关尚未发送该推送：撤回后友盟不会收到它，已占用的配额将退回。此操作无法撤销。"),
    ("withdraw_confirm", "Yes, withdraw the push", "确定撤回推送"),
    ("done_withdrawn", "Push withdrawn before it was sent: Umeng never received it.", "推送已在发送前撤回，友盟未收到。"),
    ("bucket", "Bucket", "类别"),
    ("window", "Window", "窗口"),
    ("used", "Used", "已用"),
    ("limit", "Limit", "上限"),
    ("remaining", "Remaining", "剩余"),
    ("resets", "Resets", "重置"),
    ("resets_in", "in", "剩余"),
    ("w_minute", "minute", "每分钟"),
    ("w_hour", "hour", "每小时"),
    ("w_day", "day", "每天"),
    ("quotas_note", "Windows are calendar windows in Beijing time. Test-mode pushes are not counted.", "窗口按北京时间自然分钟/小时/天计算，测试模式推送不计入。"),
    ("no_quotas", "No app is visible to this client.", "该客户端没有可见的应用。"),
    ("last_24h", "Pushes per hour, last 24 hours", "最近 24 小时每小时推送数"),
    ("chart_desc", "Stacked bars: pushes created each hour, by outcome.", "堆叠柱状图：每小时创建的推送，按结果分类。"),
    ("o_ok", "Accepted", "已接受"),
    ("o_failed", "Failed", "失败"),
    ("o_unknown", "Unknown", "未知"),
    ("o_pending", "Pending", "处理中"),
    ("o_cancelled", "Cancelled", "已取消"),
    ("hour", "Hour (Beijing)", "小时（北京时间）"),
    ("total", "Total", "合计"),
    ("chart_table", "The numbers", "数据表"),
    ("error_codes", "Umeng error codes, last 24 hours", "最近 24 小时友盟错误码"),
    ("code", "Code", "错误码"),
    ("count", "Pushes", "推送数"),
    ("no_errors", "No Umeng errors in the last 24 hours.", "最近 24 小时没有友盟错误。"),
    ("pending_now", "pushes are pending now", "条推送正在处理"),
    ("see_them", "see them", "查看"),
    ("queue_note", "Pending counts synchronous pushes whose request is waiting for Umeng and asynchronous ones a delivery worker is sending. Asynchronous pushes not sent yet are on the Queue page.", "处理中包括请求正在等待友盟应答的同步推送和投递进程正在发送的异步推送。尚未发送的异步推送见“发送队列”页面。"),
    ("queue_intro", "Asynchronous pushes the gateway has not finished sending, across all replicas: due now or after a retry's wait, held until their send_at, waiting for a free quota slot, or being sent by a delivery worker.", "网关尚未发送完成的异步推送（所有实例）：到期待发送或等待重试、等待定时发送（send_at）、等待配额，或正由投递进程发送。"),
    ("q_by_state", "By app and state", "按应用和状态"),
    ("q_pushes", "Pushes", "推送数"),
    ("q_oldest_wait", "Oldest due, waiting for", "最早到期的已等待"),
    ("q_none_due", "none due", "无到期"),
    ("q_empty", "Nothing is waiting: every asynchronous push has been sent.", "队列为空：所有异步推送均已发送。"),
    ("q_waiting", "Waiting pushes", "等待中的推送"),
    ("q_due", "Goes out / next try", "发送 / 下次尝试"),
    ("q_in", "in", "剩余"),
    ("q_due_for", "due for", "已到期"),
    ("q_being_sent", "being sent now", "正在发送"),
    ("q_attempts", "Attempts", "尝试次数"),
    ("q_last_error", "Last error", "最近错误"),
    ("q_cut", "Only the newest pushes of a state are listed here; all of them are in History:", "每种状态只列出最新的推送，全部推送见推送记录："),
    ("delivery", "Delivery", "投递方式"),
    ("delivery_sync", "synchronous (sent during the caller's request)", "同步（在调用方请求期间发送）"),
    ("delivery_async", "asynchronous (sent by a delivery worker)", "异步（由投递进程发送）"),
    ("send_at", "Goes out at (send_at)", "定时发送（send_at）"),
    ("next_attempt_at", "Next try", "下次尝试"),
    ("deliver_by", "Deliver by", "投递截止"),
    ("breaker", "Umeng circuit breaker (this replica)", "友盟熔断器（本实例）"),
    ("breaker_closed", "closed: calls go through", "关闭：正常调用"),
    ("breaker_open", "open: Umeng is unreachable, pushes get 503 at once", "打开：友盟不可达，推送立即返回 503"),
    ("breaker_half_open", "half-open: probing Umeng", "半开：正在探测友盟"),
    ("error_title", "Something went wrong", "出错了"),
    ("forbidden", "Refused: the form was not sent from this console, or your sign-in has ended.", "已拒绝：表单不是从本控制台提交的，或登录已失效。"),
    ("not_found", "There is no such page.", "没有这个页面。"),
    ("back", "Back", "返回"),
    ("s_pending", "pending", "处理中"),
    ("s_accepted", "accepted", "已接受"),
    ("s_failed", "failed", "失败"),
    ("s_unknown", "unknown", "未知"),
    ("s_queued", "queued", "排队中"),
    ("s_sending", "sending", "发送中"),
    ("s_done", "done", "已完成"),
    ("s_send_failed", "send failed", "发送失败"),
    ("s_cancelled", "cancelled", "已取消"),
    ("s_expired", "expired", "已过期"),
    ("s_no_match", "no match", "无匹配设备"),
    ("s_scheduled", "scheduled", "定时中"),
    ("s_task_lost", "task lost", "任务丢失"),
    ("s_awaiting_send", "awaiting send", "等待发送"),
    ("s_awaiting_send_at", "held until send_at", "等待定时发送"),
    ("s_awaiting_quota", "awaiting quota", "等待配额"),
    ("s_withdrawn", "withdrawn", "已撤回"),
    ("s_partial", "partial", "部分成功"),
];

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_LANGUAGE, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn accept_language_picks_the_best_supported_language() {
        assert_eq!(Lang::of(&HeaderMap::new()), Lang::En);
        assert_eq!(
            Lang::of(&with_accept("zh-CN,zh;q=0.9,en;q=0.8")),
            Lang::ZhCn
        );
        assert_eq!(Lang::of(&with_accept("en-US,en;q=0.9,zh;q=0.5")), Lang::En);
        assert_eq!(Lang::of(&with_accept("fr, zh-TW;q=0.7")), Lang::ZhCn);
        assert_eq!(Lang::of(&with_accept("de")), Lang::En);
        let mut h = with_accept("en");
        h.insert(header::COOKIE, HeaderValue::from_static("umgw_lang=zh-CN"));
        assert_eq!(Lang::of(&h), Lang::ZhCn);
    }

    #[test]
    fn every_text_has_both_languages() {
        let mut keys = std::collections::HashSet::new();
        for (k, en, zh) in TEXTS {
            assert!(keys.insert(k), "{k} twice");
            assert!(!en.is_empty() && !zh.is_empty(), "{k}");
        }
    }
}
