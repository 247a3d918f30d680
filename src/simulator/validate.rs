//! The request rules of the simulated Umeng API (umeng-api.md §2-§4), on `serde_json::Value`.

use serde_json::{Map, Value};
use time::{Duration as TimeDuration, OffsetDateTime, PrimitiveDateTime, UtcOffset};

use super::SimPlatform;

/// An Umeng error answer: HTTP 400 + `{"ret":"FAIL","data":{"error_code","error_msg"}}` (§1.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ApiError {
    pub code: String,
    pub msg: String,
}

impl ApiError {
    pub(crate) fn new(code: &str, msg: impl Into<String>) -> Self {
        ApiError {
            code: code.to_owned(),
            msg: msg.into(),
        }
    }
}

fn fail<T>(code: &str, msg: impl Into<String>) -> Result<T, ApiError> {
    Err(ApiError::new(code, msg))
}

/// Beijing time: policy times (§3.4, §10 q4) and quota windows (§0) use it.
pub(crate) const BEIJING: UtcOffset = time::macros::offset!(+8);

/// Android payload limit in bytes of compact JSON (§3.2.4, DOC-NEW).
pub(crate) const ANDROID_PAYLOAD_MAX: usize = 2048;
/// iOS payload limit in bytes of compact JSON (§3.3).
pub(crate) const IOS_PAYLOAD_MAX: usize = 2012;
/// listcast tokens and customizedcast aliases per request (§3.1).
pub(crate) const MAX_TARGETS: usize = 500;
/// Largest filter, bytes of compact JSON (§4, DOC-NEW).
pub(crate) const FILTER_MAX_BYTES: usize = 3000;
/// Nesting limit for filter conditions; the doc states none (§10 q7), this only bounds work.
const FILTER_MAX_DEPTH: usize = 16;
/// Filter fields of DOC-OLD (§4).
const FILTER_FIELDS: [&str; 9] = [
    "app_version",
    "channel",
    "device_model",
    "province",
    "tag",
    "country",
    "language",
    "launch_from",
    "not_launch_from",
];

/// Reads a `timestamp` (§3.1): 10 digits (seconds) or 13 digits (milliseconds), as a JSON
/// string or a JSON integer. Returns epoch milliseconds; anything else is 2036.
pub(crate) fn parse_timestamp_ms(v: &Value) -> Result<i64, ApiError> {
    let digits = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_u64() => n.to_string(),
        _ => return fail("2036", "timestamp must be 10 or 13 digits"),
    };
    if !(digits.len() == 10 || digits.len() == 13) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return fail("2036", "timestamp must be 10 or 13 digits");
    }
    let n: i64 = digits
        .parse()
        .map_err(|_| ApiError::new("2036", "timestamp must be 10 or 13 digits"))?;
    Ok(if digits.len() == 10 { n * 1000 } else { n })
}

/// §3.1: `timestamp` present (2052), well formed (2036), within `window_ms` of now (2028).
pub(crate) fn check_timestamp(
    body: &Map<String, Value>,
    now_ms: i64,
    window_ms: i64,
) -> Result<(), ApiError> {
    let v = match body.get("timestamp") {
        None | Some(Value::Null) => return fail("2052", "timestamp is missing"),
        Some(v) => v,
    };
    let ts = parse_timestamp_ms(v)?;
    if (ts - now_ms).abs() > window_ms {
        return fail(
            "2028",
            "timestamp expired: it must be within 10 minutes of server time",
        );
    }
    Ok(())
}

/// Parses a policy time `yyyy-MM-dd HH:mm:ss` in Beijing time (§3.4).
pub(crate) fn parse_policy_time(s: &str) -> Option<OffsetDateTime> {
    let format = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
    let shape_ok = s.len() == 19
        && s.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 => b == b'-',
            10 => b == b' ',
            13 | 16 => b == b':',
            _ => b.is_ascii_digit(),
        });
    if !shape_ok {
        return None;
    }
    PrimitiveDateTime::parse(s, format)
        .ok()
        .map(|t| t.assume_offset(BEIJING))
}

/// A quota bucket of §7, each with its own calendar window in Beijing time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Bucket {
    Broadcast,
    Groupcast,
    Filecast,
    CustomizedcastFile,
}

impl Bucket {
    /// (limit, window in seconds), §7.
    pub(crate) fn limit(self) -> (u32, i64) {
        match self {
            Bucket::Broadcast => (10, 86_400),
            Bucket::Groupcast => (5, 60),
            Bucket::Filecast => (300, 3_600),
            Bucket::CustomizedcastFile => (300, 3_600),
        }
    }
}

/// What an accepted send creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SendPlan {
    /// Id prefix, §1.3.
    pub prefix: &'static str,
    /// Task-class (task_id, status, cancel) versus unicast-class (msg_id).
    pub task: bool,
    pub bucket: Option<Bucket>,
    pub production: bool,
    pub out_biz_no: Option<String>,
    pub start_at: Option<OffsetDateTime>,
    /// `policy.expire_time`: a task not finished by then ends in status 5.
    pub expire_at: Option<OffsetDateTime>,
    /// Devices targeted, for plausible counters.
    pub audience: u64,
    /// The documented test hook: the filter matches nobody, the task ends in status 6.
    pub nobody: bool,
}

fn non_empty_str<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    match m.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        _ => None,
    }
}

fn is_http_url(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    (lower.starts_with("http://") && lower.len() > 7)
        || (lower.starts_with("https://") && lower.len() > 8)
}

/// Validates a `/api/send` body for an app of `platform` (§3, §4). `file_entries` looks a
/// file_id up among this appkey's uploads and gives its number of entries.
pub(crate) fn validate_send(
    body: &Map<String, Value>,
    platform: SimPlatform,
    now: OffsetDateTime,
    file_entries: &dyn Fn(&str) -> Option<u64>,
) -> Result<SendPlan, ApiError> {
    // §3.1 type: missing 1016, invalid 2048.
    let cast = match body.get("type") {
        None | Some(Value::Null) => return fail("1016", "type is missing"),
        Some(Value::String(s)) if s.is_empty() => return fail("1016", "type is missing"),
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return fail("2048", "type is invalid"),
    };
    let target = check_target(cast, body, platform, file_entries)?;

    // §3.1 payload, §3.2 / §3.3.
    let payload = match body.get("payload") {
        Some(Value::Object(p)) => p,
        _ => return fail("1001", "payload is missing or not a JSON object"),
    };
    match platform {
        SimPlatform::Android => check_android_payload(payload)?,
        SimPlatform::Ios => check_ios_payload(payload)?,
    }
    let size = serde_json::to_vec(payload)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    let max = match platform {
        SimPlatform::Android => ANDROID_PAYLOAD_MAX,
        SimPlatform::Ios => IOS_PAYLOAD_MAX,
    };
    if size > max {
        return fail(
            "2022",
            format!("payload is too long: {size} bytes, at most {max}"),
        );
    }

    // §0 / §3.1: production_mode is the string "true"/"false", default true; a JSON boolean
    // is rejected (old 1017).
    let production = match body.get("production_mode") {
        None => true,
        Some(Value::String(s)) if s == "true" => true,
        Some(Value::String(s)) if s == "false" => false,
        Some(_) => {
            return fail(
                "1017",
                "production_mode must be the string \"true\" or \"false\"",
            )
        }
    };
    // §3.1 mipush: same strings-only rule (code chosen: 1017).
    match body.get("mipush") {
        None => {}
        Some(Value::String(s)) if s == "true" || s == "false" => {}
        Some(_) => return fail("1017", "mipush must be the string \"true\" or \"false\""),
    }

    let policy = check_policy(body.get("policy"), platform, target.task, now)?;

    Ok(SendPlan {
        prefix: target.prefix,
        task: target.task,
        bucket: target.bucket,
        production,
        out_biz_no: if target.task { policy.out_biz_no } else { None },
        start_at: if target.task { policy.start_at } else { None },
        expire_at: policy.expire_at,
        audience: target.audience,
        nobody: target.nobody,
    })
}

struct Target {
    prefix: &'static str,
    task: bool,
    bucket: Option<Bucket>,
    audience: u64,
    nobody: bool,
}

fn check_target(
    cast: &str,
    body: &Map<String, Value>,
    platform: SimPlatform,
    file_entries: &dyn Fn(&str) -> Option<u64>,
) -> Result<Target, ApiError> {
    let unicast_class = |prefix, audience| Target {
        prefix,
        task: false,
        bucket: None,
        audience,
        nobody: false,
    };
    let task_class = |prefix, bucket, audience, nobody| Target {
        prefix,
        task: true,
        bucket: Some(bucket),
        audience,
        nobody,
    };
    match cast {
        "unicast" => {
            let tokens = non_empty_str(body, "device_tokens")
                .ok_or_else(|| ApiError::new("1015", "device_tokens is missing"))?;
            if tokens.contains(',') {
                return fail("2015", "unicast takes exactly one device_token");
            }
            check_token(tokens, platform)?;
            Ok(unicast_class("uu", 1))
        }
        "listcast" => {
            let tokens = non_empty_str(body, "device_tokens")
                .ok_or_else(|| ApiError::new("1015", "device_tokens is missing"))?;
            let list: Vec<&str> = tokens.split(',').collect();
            if list.len() > MAX_TARGETS {
                return fail(
                    "2015",
                    format!("listcast takes at most {MAX_TARGETS} device_tokens"),
                );
            }
            for t in &list {
                check_token(t, platform)?;
            }
            Ok(unicast_class("ul", list.len() as u64))
        }
        "broadcast" => Ok(task_class("um", Bucket::Broadcast, 5_000, false)),
        "groupcast" => {
            // DOC-NEW: group_id replaces the filter and wins when both are present. It is
            // documented for Android only: an iOS groupcast needs filter (2016 without it).
            let group_id = platform == SimPlatform::Android
                && match body.get("group_id") {
                    Some(Value::String(s)) => !s.is_empty(),
                    Some(Value::Number(n)) => n.is_u64(),
                    _ => false,
                };
            if group_id {
                return Ok(task_class("us", Bucket::Groupcast, 1_000, false));
            }
            let filter = match body.get("filter") {
                Some(f @ Value::Object(_)) => f,
                _ => return fail("2016", "filter is missing or not a JSON object"),
            };
            validate_filter(filter)?;
            let nobody = *filter == serde_json::json!({"where": {"and": [{"tag": "nobody"}]}});
            Ok(task_class("us", Bucket::Groupcast, 1_200, nobody))
        }
        "filecast" => {
            let file_id = non_empty_str(body, "file_id")
                .ok_or_else(|| ApiError::new("2018", "file_id is missing"))?;
            let entries = file_entries(file_id)
                .ok_or_else(|| ApiError::new("2019", "no file exists for this file_id"))?;
            Ok(task_class("uf", Bucket::Filecast, entries, false))
        }
        "customizedcast" => {
            if non_empty_str(body, "alias_type").is_none() {
                return fail("2047", "alias_type is missing");
            }
            let alias = non_empty_str(body, "alias");
            let file_id = non_empty_str(body, "file_id");
            match (alias, file_id) {
                (None, None) => fail("2009", "customizedcast needs alias or file_id"),
                (Some(_), Some(_)) => fail("2049", "give either alias or file_id, not both"),
                (Some(alias), None) => {
                    let n = alias.split(',').count();
                    if n > MAX_TARGETS {
                        return fail(
                            "2011",
                            format!("customizedcast takes at most {MAX_TARGETS} aliases"),
                        );
                    }
                    Ok(unicast_class("ua", n as u64))
                }
                (None, Some(file_id)) => {
                    let entries = file_entries(file_id)
                        .ok_or_else(|| ApiError::new("2019", "no file exists for this file_id"))?;
                    Ok(task_class("uc", Bucket::CustomizedcastFile, entries, false))
                }
            }
        }
        _ => fail("2048", "type is invalid"),
    }
}

/// §3.1: Android tokens are 44 characters, iOS tokens 64.
fn check_token(token: &str, platform: SimPlatform) -> Result<(), ApiError> {
    let len = token.chars().count();
    let ok_chars = !token.chars().any(|c| c.is_whitespace() || c.is_control());
    match platform {
        SimPlatform::Android if len != 44 || !ok_chars => {
            fail("4020", "an Android device_token is a 44-character string")
        }
        SimPlatform::Ios if len != 64 || !ok_chars => {
            fail("5005", "an iOS device_token is a 64-character string")
        }
        _ => Ok(()),
    }
}

/// Validates a groupcast filter (§4): `{"where":{"and":[cond, ...]}}`; a condition is an
/// object with exactly one key: `and`/`or` (non-empty array of conditions), `not` (a single
/// condition object) or one of the nine fields with a non-empty string value. At most
/// 3000 bytes of compact JSON. Not an object: 2016; any other defect: 2031.
pub(crate) fn validate_filter(filter: &Value) -> Result<(), ApiError> {
    let obj = match filter {
        Value::Object(o) => o,
        _ => return fail("2016", "filter is missing or not a JSON object"),
    };
    let size = serde_json::to_vec(filter)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > FILTER_MAX_BYTES {
        return fail(
            "2031",
            format!("filter is too long: {size} bytes, at most {FILTER_MAX_BYTES}"),
        );
    }
    let where_ = match (obj.len(), obj.get("where")) {
        (1, Some(Value::Object(w))) => w,
        _ => return fail("2031", "filter must be {\"where\":{\"and\":[...]}}"),
    };
    let and = match (where_.len(), where_.get("and")) {
        (1, Some(Value::Array(a))) if !a.is_empty() => a,
        _ => {
            return fail(
                "2031",
                "the top level of filter.where must be a non-empty \"and\"",
            )
        }
    };
    and.iter().try_for_each(|c| check_condition(c, 1))
}

fn check_condition(cond: &Value, depth: usize) -> Result<(), ApiError> {
    if depth > FILTER_MAX_DEPTH {
        return fail("2031", "filter is nested too deeply");
    }
    let (key, value) = match cond {
        Value::Object(o) if o.len() == 1 => match o.iter().next() {
            Some(kv) => kv,
            None => return fail("2031", "empty filter condition"),
        },
        _ => {
            return fail(
                "2031",
                "each filter condition is an object with exactly one key",
            )
        }
    };
    match key.as_str() {
        "and" | "or" => match value {
            Value::Array(items) if !items.is_empty() => {
                items.iter().try_for_each(|c| check_condition(c, depth + 1))
            }
            _ => fail("2031", format!("\"{key}\" takes a non-empty array")),
        },
        "not" => match value {
            Value::Object(_) => check_condition(value, depth + 1),
            _ => fail("2031", "\"not\" takes a single condition object"),
        },
        field if FILTER_FIELDS.contains(&field) => match value {
            Value::String(s) if !s.is_empty() => Ok(()),
            _ => fail(
                "2031",
                format!("filter field \"{field}\" takes a non-empty string"),
            ),
        },
        other => fail("2031", format!("unknown filter field \"{other}\"")),
    }
}

/// §3.2 Android payload.
fn check_android_payload(p: &Map<String, Value>) -> Result<(), ApiError> {
    let display_type = match p.get("display_type") {
        None | Some(Value::Null) => return fail("1004", "display_type is missing"),
        Some(Value::String(s)) if s == "notification" || s == "message" => s.as_str(),
        Some(_) => return fail("1019", "display_type must be notification or message"),
    };
    let body = match p.get("body") {
        Some(Value::Object(b)) => b,
        _ => return fail("1002", "payload.body is missing or not a JSON object"),
    };
    if let Some(extra) = p.get("extra") {
        if !extra.is_object() {
            return fail("1026", "payload.extra must be a JSON object");
        }
    }
    let has_custom = match body.get("custom") {
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Object(_)) => true,
        _ => false,
    };
    if display_type == "message" {
        if !has_custom {
            return fail("1003", "display_type message needs body.custom");
        }
        return Ok(());
    }
    // notification; ticker is optional per DOC-NEW.
    if non_empty_str(body, "title").is_none() {
        return fail("1009", "notification needs body.title");
    }
    if non_empty_str(body, "text").is_none() {
        return fail("1010", "notification needs body.text");
    }
    let after_open = match body.get("after_open") {
        None => "go_app",
        Some(Value::String(s))
            if matches!(
                s.as_str(),
                "go_app" | "go_url" | "go_activity" | "go_custom"
            ) =>
        {
            s.as_str()
        }
        Some(_) => {
            return fail(
                "1002",
                "body.after_open must be go_app, go_url, go_activity or go_custom",
            )
        }
    };
    match after_open {
        "go_url" => {
            let url = non_empty_str(body, "url")
                .ok_or_else(|| ApiError::new("1022", "go_url needs body.url"))?;
            if !is_http_url(url) {
                return fail("1007", "body.url must start with http:// or https://");
            }
        }
        "go_activity" if non_empty_str(body, "activity").is_none() => {
            return fail("1024", "go_activity needs body.activity");
        }
        "go_custom" if !has_custom => return fail("1003", "go_custom needs body.custom"),
        _ => {}
    }
    if let Some(img) = body.get("img") {
        if !img.as_str().is_some_and(is_http_url) {
            return fail("1005", "body.img must start with http:// or https://");
        }
    }
    for (key, code) in [
        ("play_vibrate", "1011"),
        ("play_lights", "1012"),
        ("play_sound", "1013"),
    ] {
        match body.get(key) {
            None => {}
            Some(Value::String(s)) if s == "true" || s == "false" => {}
            Some(_) => {
                return fail(
                    code,
                    format!("body.{key} must be the string \"true\" or \"false\""),
                )
            }
        }
    }
    Ok(())
}

/// §3.3 iOS payload.
fn check_ios_payload(p: &Map<String, Value>) -> Result<(), ApiError> {
    let aps = match p.get("aps") {
        Some(Value::Object(a)) => a,
        _ => return fail("2025", "payload.aps is missing or not a JSON object"),
    };
    if p.contains_key("d") || p.contains_key("p") {
        return fail("5002", "p and d are reserved keys of the payload");
    }
    let silent = match aps.get("content-available") {
        Some(Value::Number(n)) => n.as_u64() == Some(1),
        Some(Value::String(s)) => s == "1",
        _ => false,
    };
    let alert_ok = match aps.get("alert") {
        None | Some(Value::Null) => silent,
        Some(Value::String(s)) => !s.is_empty() || silent,
        Some(Value::Object(a)) => {
            let strings = ["title", "subtitle", "body"]
                .iter()
                .all(|k| a.get(*k).is_none_or(Value::is_string));
            strings && (non_empty_str(a, "title").is_some() || non_empty_str(a, "body").is_some())
        }
        Some(_) => false,
    };
    if !alert_ok {
        return fail(
            "2025",
            "aps.alert must be a string or {title, subtitle, body} unless content-available is 1",
        );
    }
    Ok(())
}

struct Policy {
    start_at: Option<OffsetDateTime>,
    expire_at: Option<OffsetDateTime>,
    out_biz_no: Option<String>,
}

/// §3.4 policy. `task` says whether the send is task-class: start_time only applies there.
fn check_policy(
    policy: Option<&Value>,
    platform: SimPlatform,
    task: bool,
    now: OffsetDateTime,
) -> Result<Policy, ApiError> {
    let policy = match policy {
        None => {
            return Ok(Policy {
                start_at: None,
                expire_at: None,
                out_biz_no: None,
            })
        }
        Some(Value::Object(p)) => p,
        Some(_) => return fail("1027", "policy must be a JSON object"),
    };
    let week = now + TimeDuration::days(7);
    let time_field = |key: &str| -> Result<Option<OffsetDateTime>, ApiError> {
        match policy.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => parse_policy_time(s).map(Some).ok_or_else(|| {
                ApiError::new("2039", format!("policy.{key} must be yyyy-MM-dd HH:mm:ss"))
            }),
            Some(_) => fail("2039", format!("policy.{key} must be yyyy-MM-dd HH:mm:ss")),
        }
    };
    // start_time is task-class only; on a unicast-class send it is format-checked and ignored.
    let start_at = time_field("start_time")?;
    if let (Some(start), true) = (start_at, task) {
        if start <= now {
            return fail("2002", "start_time must be later than now");
        }
        if start > week {
            return fail("2046", "start_time must be within 7 days from now");
        }
    }
    let start_at = if task { start_at } else { None };
    let expire_at = time_field("expire_time")?;
    if let Some(expire) = expire_at {
        if expire <= now || start_at.is_some_and(|s| expire <= s) {
            return fail("2003", "expire_time must be later than start_time and now");
        }
        if expire > week {
            return fail("2040", "expire_time must be within 7 days from now");
        }
    }
    // max_send_num: an integer of at least 1000 (JSON integer or decimal string accepted).
    if let Some(v) = policy.get("max_send_num") {
        let n = match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse::<u64>().ok(),
            _ => None,
        };
        if n.is_none_or(|n| n < 1000) {
            return fail(
                "2024",
                "policy.max_send_num must be an integer of at least 1000",
            );
        }
    }
    if platform == SimPlatform::Ios {
        match policy.get("apns_collapse_id") {
            None => {}
            Some(Value::String(s)) if s.len() <= 64 => {}
            Some(_) => {
                return fail(
                    "1027",
                    "policy.apns_collapse_id must be a string of at most 64 bytes",
                )
            }
        }
    }
    let out_biz_no = match policy.get("out_biz_no") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return fail("1027", "policy.out_biz_no must be a string"),
    };
    Ok(Policy {
        start_at,
        expire_at,
        out_biz_no,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code(r: Result<(), ApiError>) -> Option<String> {
        r.err().map(|e| e.code)
    }

    #[test]
    fn timestamps_of_10_or_13_digits_as_string_or_number() {
        assert_eq!(
            parse_timestamp_ms(&json!("1700000000")),
            Ok(1_700_000_000_000)
        );
        assert_eq!(
            parse_timestamp_ms(&json!(1700000000)),
            Ok(1_700_000_000_000)
        );
        assert_eq!(
            parse_timestamp_ms(&json!("1700000000123")),
            Ok(1_700_000_000_123)
        );
        assert_eq!(
            parse_timestamp_ms(&json!(1700000000123u64)),
            Ok(1_700_000_000_123)
        );
        for bad in [
            json!("170000000"),
            json!("17000000001"),
            json!("17000000x0"),
            json!(" 1700000000"),
            json!(1700000000.5),
            json!(-1700000000),
            json!(true),
            json!(""),
        ] {
            assert_eq!(
                parse_timestamp_ms(&bad).map_err(|e| e.code),
                Err("2036".to_owned()),
                "{bad}"
            );
        }
    }

    #[test]
    fn timestamp_window_and_missing() {
        let now = 1_700_000_000_000;
        let window = 600_000;
        let body = |v: Value| {
            json!({ "timestamp": v })
                .as_object()
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(
            code(check_timestamp(&body(json!("1700000000")), now, window)),
            None
        );
        assert_eq!(
            code(check_timestamp(&body(json!("1699999399")), now, window)),
            Some("2028".to_owned())
        );
        assert_eq!(
            code(check_timestamp(&body(json!("1700000601")), now, window)),
            Some("2028".to_owned())
        );
        assert_eq!(
            code(check_timestamp(&body(Value::Null), now, window)),
            Some("2052".to_owned())
        );
        assert_eq!(
            code(check_timestamp(&Map::new(), now, window)),
            Some("2052".to_owned())
        );
    }

    #[test]
    fn policy_time_is_beijing() {
        let t = parse_policy_time("2024-01-01 08:00:00").expect("valid");
        assert_eq!(t.unix_timestamp(), 1_704_067_200); // 2024-01-01T00:00:00Z
        assert!(parse_policy_time("2024-01-01T08:00:00").is_none());
        assert!(parse_policy_time("2024-1-01 08:00:00").is_none());
        assert!(parse_policy_time("2024-02-30 08:00:00").is_none());
        assert!(parse_policy_time("+2024-01-01 08:00").is_none());
    }

    #[test]
    fn filter_accepts_the_documented_examples() {
        for and in [
            json!([{"tag":"registered_user"},{"app_version":"1.0"},{"launch_from":"2014-11-15"}]),
            json!([{"or":[{"tag":"美剧"},{"tag":"文艺"}]}]),
            json!([{"not":{"tag":"registered_user"}}]),
            json!([{"or":[{"not":{"channel":"360"}},{"app_version":"1.2"}]},{"not_launch_from":"2014-11-15"}]),
            json!([{"or":[{"app_version":">1.0"}]}]),
            json!([{"tag":"test"},{"tag":"Test"}]),
        ] {
            let f = json!({ "where": { "and": and } });
            assert_eq!(code(validate_filter(&f)), None, "{f}");
        }
    }

    #[test]
    fn filter_rejects_bad_shapes() {
        assert_eq!(code(validate_filter(&json!("x"))), Some("2016".to_owned()));
        assert_eq!(code(validate_filter(&json!([]))), Some("2016".to_owned()));
        for bad in [
            json!({}),
            json!({"where": {"or": [{"tag":"a"}]}}),
            json!({"where": {"and": []}}),
            json!({"where": {"and": {"tag":"a"}}}),
            json!({"where": {"and": [{"tag":"a"}], "or": [{"tag":"b"}]}}),
            json!({"where": {"and": [{"tag":"a"}]}, "extra": 1}),
            json!({"and": [{"tag":"a"}]}),
            json!({"where": {"and": [{"tag":"a","channel":"b"}]}}),
            json!({"where": {"and": [{"tag":1}]}}),
            json!({"where": {"and": [{"tag":""}]}}),
            json!({"where": {"and": [{"colour":"red"}]}}),
            json!({"where": {"and": [{"not":[{"tag":"a"}]}]}}),
            json!({"where": {"and": [{"or":{"tag":"a"}}]}}),
            json!({"where": {"and": [{}]}}),
            json!({"where": {"and": ["tag"]}}),
        ] {
            assert_eq!(
                code(validate_filter(&bad)),
                Some("2031".to_owned()),
                "{bad}"
            );
        }
    }

    #[test]
    fn filter_size_limit_is_3000_bytes() {
        // {"where":{"and":[{"tag":"…"}]}} is 30 bytes around the value.
        let at = json!({"where": {"and": [{"tag": "x".repeat(FILTER_MAX_BYTES - 30)}]}});
        assert_eq!(
            serde_json::to_vec(&at).map(|v| v.len()).ok(),
            Some(FILTER_MAX_BYTES)
        );
        assert_eq!(code(validate_filter(&at)), None);
        let over = json!({"where": {"and": [{"tag": "x".repeat(FILTER_MAX_BYTES - 29)}]}});
        assert_eq!(code(validate_filter(&over)), Some("2031".to_owned()));
    }

    #[test]
    fn deep_filters_are_refused_not_overflowed() {
        let mut cond = json!({"tag": "a"});
        for _ in 0..40 {
            cond = json!({ "not": cond });
        }
        let f = json!({"where": {"and": [cond]}});
        assert_eq!(code(validate_filter(&f)), Some("2031".to_owned()));
    }
}
