//! Local validation of an Umeng send body against every documented rule (umeng-api.md
//! §3-4), so a request Umeng would refuse is never sent and never spends quota.
//!
//! Validation runs on the JSON object that would be sent (typed fields plus the raw
//! `extra_fields`), so raw fields cannot slip past the rules.

use serde_json::{Map, Value};
use time::{Duration, OffsetDateTime};

use super::model::SendBody;
use super::{parse_policy_time, CastType, FieldError, Platform};

/// listcast: at most this many device tokens.
pub const MAX_LISTCAST_TOKENS: usize = 500;
/// customizedcast: at most this many aliases.
pub const MAX_ALIASES: usize = 500;
/// groupcast: the compact JSON of `filter` is at most this many bytes.
pub const MAX_FILTER_BYTES: usize = 3000;
/// `policy.max_send_num` is at least this.
pub const MIN_MAX_SEND_NUM: i64 = 1000;
/// `policy.apns_collapse_id` is at most this many bytes.
pub const MAX_APNS_COLLAPSE_ID_BYTES: usize = 64;
/// `start_time` and `expire_time` are at most this far ahead (of now, or of the start).
pub const MAX_SCHEDULE_AHEAD: Duration = Duration::days(7);
/// Android `body.big_body` is at most this many characters.
pub const MAX_BIG_BODY_CHARS: usize = 120;
/// At most this many per-item errors are listed for one list; the rest are summarised.
pub const MAX_ITEM_ERRORS: usize = 20;
/// `receipt_url` is at most this many bytes.
pub const MAX_RECEIPT_URL_BYTES: usize = 256;
/// Deepest filter nesting accepted: a condition inside `where.and` is level 1, each `and`,
/// `or` or `not` adds one. Umeng states no limit (umeng-api.md §10 q7, §11): this is the
/// gateway's own bound on recursion, far above any real audience rule.
pub const MAX_FILTER_DEPTH: usize = 16;
/// `start_time` must be at least this far ahead of now: the upload and the send may take
/// up to 2 x (connect + call timeout) before Umeng sees it, and Umeng refuses a start time
/// that has passed by then (2002). `check-config` keeps the Umeng timeouts below it.
pub const MIN_START_AHEAD: Duration = Duration::minutes(5);
/// The fields a filter condition may test.
pub const FILTER_FIELDS: [&str; 9] = [
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
/// Values of `aps.interruption-level`.
pub const INTERRUPTION_LEVELS: [&str; 4] = ["passive", "active", "time-sensitive", "critical"];

/// Validates a send body before it is sent. `payload_limit` is the byte limit for the
/// compact JSON of `payload`; `now` is the send time. Returns every error found.
pub fn validate(
    body: &SendBody,
    platform: Platform,
    payload_limit: usize,
    now: OffsetDateTime,
) -> Result<(), Vec<FieldError>> {
    let errors = validate_value(&body.to_value(), platform, payload_limit, now);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Validates a send body given as the JSON object that would be sent (without
/// `appkey`/`timestamp`).
pub fn validate_value(
    body: &Map<String, Value>,
    platform: Platform,
    payload_limit: usize,
    now: OffsetDateTime,
) -> Vec<FieldError> {
    let mut v = Validator {
        errors: Vec::new(),
        platform,
    };
    v.root(body, payload_limit, now);
    v.errors
}

struct Validator {
    errors: Vec<FieldError>,
    platform: Platform,
}

fn is_http_url(s: &str) -> bool {
    match url::Url::parse(s) {
        Ok(u) => {
            matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty())
        }
        Err(_) => false,
    }
}

fn json_len(v: &Value) -> usize {
    serde_json::to_vec(v).map(|b| b.len()).unwrap_or(usize::MAX)
}

impl Validator {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError::new(field, message));
    }

    /// A field that must be a string when present.
    fn opt_str<'a>(&mut self, m: &'a Map<String, Value>, key: &str, path: &str) -> Option<&'a str> {
        match m.get(key) {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                self.err(path, "must be a string");
                None
            }
        }
    }

    /// A field that must be a non-empty string.
    fn required_str<'a>(
        &mut self,
        m: &'a Map<String, Value>,
        key: &str,
        path: &str,
        why: &str,
    ) -> Option<&'a str> {
        match m.get(key) {
            None | Some(Value::Null) => {
                self.err(path, format!("is required {why}"));
                None
            }
            Some(Value::String(s)) if s.trim().is_empty() => {
                self.err(path, format!("must not be empty ({why})"));
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                self.err(path, "must be a string");
                None
            }
        }
    }

    fn opt_int(&mut self, m: &Map<String, Value>, key: &str, path: &str) -> Option<i64> {
        match m.get(key) {
            None => None,
            Some(v) => match v.as_i64() {
                Some(n) => Some(n),
                None => {
                    self.err(path, "must be an integer");
                    None
                }
            },
        }
    }

    fn str_bool(&mut self, m: &Map<String, Value>, key: &str, path: &str) {
        match m.get(key) {
            None => {}
            Some(Value::String(s)) if s == "true" || s == "false" => {}
            Some(_) => self.err(path, "must be the string \"true\" or \"false\""),
        }
    }

    fn object<'a>(
        &mut self,
        m: &'a Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Option<&'a Map<String, Value>> {
        match m.get(key) {
            None => None,
            Some(Value::Object(o)) => Some(o),
            Some(_) => {
                self.err(path, "must be a JSON object");
                None
            }
        }
    }

    fn android_only(&mut self, m: &Map<String, Value>, key: &str) {
        if self.platform == Platform::Ios && m.contains_key(key) {
            self.err(key, "is Android only");
        }
    }

    fn root(&mut self, m: &Map<String, Value>, payload_limit: usize, now: OffsetDateTime) {
        for key in ["appkey", "timestamp", "sign"] {
            if m.contains_key(key) {
                self.err(
                    key,
                    "is set by the client at send time and must not be in the body",
                );
            }
        }
        let cast = match m.get("type") {
            Some(Value::String(s)) => match CastType::parse(s) {
                Some(c) => Some(c),
                None => {
                    self.err("type", "must be one of unicast, listcast, broadcast, groupcast, filecast, customizedcast");
                    None
                }
            },
            _ => {
                self.err("type", "is required");
                None
            }
        };
        let has_file_id = m.get("file_id").is_some_and(|v| !v.is_null());
        if let Some(cast) = cast {
            self.audience(m, cast);
        }
        let task_class = cast.is_some_and(|c| c.is_task_class(has_file_id));

        match m.get("payload") {
            Some(Value::Object(p)) => {
                let size = json_len(&Value::Object(p.clone()));
                if size > payload_limit {
                    self.err(
                        "payload",
                        format!(
                            "is {size} bytes as compact JSON; the {} limit is {payload_limit}",
                            self.platform
                        ),
                    );
                }
                match self.platform {
                    Platform::Android => self.android_payload(p),
                    Platform::Ios => self.ios_payload(p),
                }
            }
            Some(_) => self.err("payload", "must be a JSON object"),
            None => self.err("payload", "is required"),
        }

        match m.get("policy") {
            None => {}
            Some(Value::Object(p)) => self.policy(p, cast, task_class, now),
            Some(_) => self.err("policy", "must be a JSON object"),
        }

        self.str_bool(m, "production_mode", "production_mode");
        self.opt_str(m, "description", "description");
        for key in [
            "mipush",
            "mi_activity",
            "category",
            "channel_properties",
            "local_properties",
        ] {
            self.android_only(m, key);
        }
        self.str_bool(m, "mipush", "mipush");
        self.opt_str(m, "mi_activity", "mi_activity");
        if let Some(c) = self.opt_int(m, "category", "category") {
            if !(0..=1).contains(&c) {
                self.err("category", "must be 0 (marketing) or 1 (service)");
            }
        }
        self.object(m, "channel_properties", "channel_properties");
        self.object(m, "local_properties", "local_properties");
        self.object(m, "callback_params", "callback_params");
        if let Some(u) = self.opt_str(m, "receipt_url", "receipt_url") {
            if u.len() > MAX_RECEIPT_URL_BYTES {
                self.err(
                    "receipt_url",
                    format!("must be at most {MAX_RECEIPT_URL_BYTES} bytes"),
                );
            } else if !is_http_url(u) {
                self.err("receipt_url", "must be an http or https URL");
            }
        }
        if let Some(t) = self.opt_int(m, "receipt_type", "receipt_type") {
            if !(1..=3).contains(&t) {
                self.err(
                    "receipt_type",
                    "must be 1 (delivery), 2 (click) or 3 (both)",
                );
            }
        }
    }

    fn audience(&mut self, m: &Map<String, Value>, cast: CastType) {
        let uses = |k: &str| m.get(k).is_some_and(|v| !v.is_null());
        let allowed: &[&str] = match cast {
            CastType::Unicast | CastType::Listcast => &["device_tokens"],
            CastType::Broadcast => &[],
            // Umeng documents `group_id` for Android only; an iOS groupcast needs `filter`.
            CastType::Groupcast if self.platform == Platform::Ios => &["filter"],
            CastType::Groupcast => &["filter", "group_id"],
            CastType::Filecast => &["file_id"],
            CastType::Customizedcast => &["alias_type", "alias", "file_id"],
        };
        for key in [
            "device_tokens",
            "alias_type",
            "alias",
            "file_id",
            "filter",
            "group_id",
        ] {
            if uses(key) && !allowed.contains(&key) {
                if key == "group_id" && cast == CastType::Groupcast {
                    self.err(
                        key,
                        "is Android only: an iOS groupcast needs filter (Umeng answers 2016)",
                    );
                } else {
                    self.err(key, format!("is not used by {cast}"));
                }
            }
        }
        match cast {
            CastType::Unicast | CastType::Listcast => {
                let Some(tokens) =
                    self.required_str(m, "device_tokens", "device_tokens", &format!("for {cast}"))
                else {
                    return;
                };
                let list: Vec<&str> = tokens.split(',').collect();
                if cast == CastType::Unicast && list.len() != 1 {
                    self.err(
                        "device_tokens",
                        format!("unicast takes exactly 1 device token, got {}", list.len()),
                    );
                }
                if list.len() > MAX_LISTCAST_TOKENS {
                    self.err(
                        "device_tokens",
                        format!(
                            "listcast takes at most {MAX_LISTCAST_TOKENS} device tokens, got {}",
                            list.len()
                        ),
                    );
                }
                let mut bad = 0usize;
                for (i, t) in list.iter().enumerate() {
                    if let Some(problem) = self.token_problem(t) {
                        bad += 1;
                        if bad <= MAX_ITEM_ERRORS {
                            self.err(format!("device_tokens[{i}]"), problem);
                        }
                    }
                }
                if bad > MAX_ITEM_ERRORS {
                    self.err(
                        "device_tokens",
                        format!("{} more invalid tokens not listed", bad - MAX_ITEM_ERRORS),
                    );
                }
            }
            CastType::Customizedcast => {
                self.required_str(m, "alias_type", "alias_type", "for customizedcast");
                match (uses("alias"), uses("file_id")) {
                    (true, true) => self.err("alias", "give alias or file_id, not both"),
                    (false, false) => self.err("alias", "customizedcast needs alias or file_id"),
                    _ => {}
                }
                if let Some(aliases) = self.opt_str(m, "alias", "alias") {
                    let list: Vec<&str> = aliases.split(',').collect();
                    if list.len() > MAX_ALIASES {
                        self.err(
                            "alias",
                            format!(
                                "at most {MAX_ALIASES} aliases, got {} (use file_id above that)",
                                list.len()
                            ),
                        );
                    }
                    let empty: Vec<usize> = (0..list.len())
                        .filter(|i| list[*i].trim().is_empty())
                        .collect();
                    for i in empty.iter().take(MAX_ITEM_ERRORS) {
                        self.err(format!("alias[{i}]"), "must not be empty");
                    }
                    if empty.len() > MAX_ITEM_ERRORS {
                        self.err(
                            "alias",
                            format!(
                                "{} more empty aliases not listed",
                                empty.len() - MAX_ITEM_ERRORS
                            ),
                        );
                    }
                }
                if uses("file_id") {
                    self.required_str(m, "file_id", "file_id", "");
                }
            }
            CastType::Filecast => {
                self.required_str(m, "file_id", "file_id", "for filecast");
            }
            CastType::Groupcast => {
                if self.platform == Platform::Ios {
                    if !uses("filter") && !uses("group_id") {
                        self.err("filter", "an iOS groupcast needs filter");
                    }
                } else if !uses("filter") && !uses("group_id") {
                    self.err("filter", "groupcast needs filter or group_id");
                }
                if uses("group_id") {
                    self.required_str(m, "group_id", "group_id", "");
                }
                if let Some(f) = m.get("filter").filter(|v| !v.is_null()) {
                    self.filter(f);
                }
            }
            CastType::Broadcast => {}
        }
    }

    fn token_problem(&self, t: &str) -> Option<String> {
        let want = self.platform.token_len();
        if t.is_empty() {
            Some("must not be empty".into())
        } else if !t.bytes().all(|b| b.is_ascii_graphic()) {
            Some("must be printable ASCII without spaces or commas".into())
        } else if t.len() != want {
            Some(format!(
                "must be {want} characters ({} device token), got {}",
                self.platform,
                t.len()
            ))
        } else {
            None
        }
    }

    fn filter(&mut self, f: &Value) {
        let size = json_len(f);
        if size > MAX_FILTER_BYTES {
            self.err(
                "filter",
                format!("is {size} bytes as compact JSON; the limit is {MAX_FILTER_BYTES}"),
            );
        }
        let Some(obj) = f.as_object() else {
            self.err(
                "filter",
                "must be a JSON object {\"where\":{\"and\":[...]}}",
            );
            return;
        };
        if obj.len() != 1 || !obj.contains_key("where") {
            self.err("filter", "must have exactly one key, \"where\"");
        }
        let Some(w) = obj.get("where") else { return };
        let Some(w) = w.as_object() else {
            self.err("filter.where", "must be a JSON object {\"and\":[...]}");
            return;
        };
        if w.len() != 1 || !w.contains_key("and") {
            self.err("filter.where", "the top level must be a single \"and\"");
        }
        if let Some(and) = w.get("and") {
            self.filter_list(and, "filter.where.and", 1);
        }
    }

    fn filter_list(&mut self, v: &Value, path: &str, depth: usize) {
        match v.as_array() {
            Some(items) if items.is_empty() => self.err(path, "must not be empty"),
            Some(items) => {
                for (i, c) in items.iter().enumerate() {
                    self.condition(c, &format!("{path}[{i}]"), depth);
                }
            }
            None => self.err(path, "must be an array of conditions"),
        }
    }

    fn condition(&mut self, c: &Value, path: &str, depth: usize) {
        if depth > MAX_FILTER_DEPTH {
            self.err(
                path,
                format!("filter nesting deeper than {MAX_FILTER_DEPTH}"),
            );
            return;
        }
        let Some(obj) = c.as_object() else {
            self.err(path, "a condition must be a JSON object with one key");
            return;
        };
        let mut entries = obj.iter();
        let (Some((key, value)), None) = (entries.next(), entries.next()) else {
            self.err(path, "a condition must have exactly one key");
            return;
        };
        let sub = format!("{path}.{key}");
        match key.as_str() {
            "and" | "or" => self.filter_list(value, &sub, depth + 1),
            "not" => match value {
                Value::Object(_) => self.condition(value, &sub, depth + 1),
                _ => self.err(
                    &sub,
                    "\"not\" takes a single condition object, not an array",
                ),
            },
            field if FILTER_FIELDS.contains(&field) => match value {
                Value::String(s) if !s.is_empty() => {}
                Value::String(_) => self.err(&sub, "must not be empty"),
                _ => self.err(&sub, "must be a string"),
            },
            other => self.err(
                &sub,
                format!(
                    "unknown filter field {other:?}; use and, or, not or one of {}",
                    FILTER_FIELDS.join(", ")
                ),
            ),
        }
    }

    fn android_payload(&mut self, p: &Map<String, Value>) {
        let display = match p.get("display_type") {
            Some(Value::String(s)) if s == "notification" || s == "message" => Some(s.as_str()),
            Some(_) => {
                self.err(
                    "payload.display_type",
                    "must be \"notification\" or \"message\"",
                );
                None
            }
            None => {
                self.err("payload.display_type", "is required (Android payload)");
                None
            }
        };
        if let Some(extra) = self.object(p, "extra", "payload.extra") {
            // Umeng documents `extra` as string key/value pairs (the official Java SDK's
            // `setExtraField(String, String)`); other values are refused, not converted, so
            // the app receives exactly what the caller wrote.
            let mut bad = 0usize;
            for (k, v) in extra {
                if !v.is_string() {
                    bad += 1;
                    if bad <= MAX_ITEM_ERRORS {
                        self.err(
                            format!("payload.extra.{k}"),
                            "must be a string on Android (Umeng's extra holds string values); \
                             write numbers, booleans and objects as strings",
                        );
                    }
                }
            }
            if bad > MAX_ITEM_ERRORS {
                self.err(
                    "payload.extra",
                    format!(
                        "{} more non-string values not listed",
                        bad - MAX_ITEM_ERRORS
                    ),
                );
            }
        }
        let body = match p.get("body") {
            Some(Value::Object(b)) => b,
            Some(_) => {
                self.err("payload.body", "must be a JSON object");
                return;
            }
            None => {
                self.err("payload.body", "is required");
                return;
            }
        };
        if let Some(c) = body.get("custom") {
            if !matches!(c, Value::String(_) | Value::Object(_)) {
                self.err("payload.body.custom", "must be a string or a JSON object");
            }
        }
        for key in ["ticker", "icon", "largeIcon", "sound", "url", "activity"] {
            self.opt_str(body, key, &format!("payload.body.{key}"));
        }
        if display == Some("message") {
            self.custom_required(body, "for display_type message");
            return;
        }
        self.required_str(body, "title", "payload.body.title", "for a notification");
        self.required_str(body, "text", "payload.body.text", "for a notification");
        for key in ["img", "expand_image"] {
            if let Some(u) = self.opt_str(body, key, &format!("payload.body.{key}")) {
                if !is_http_url(u) {
                    self.err(
                        format!("payload.body.{key}"),
                        "must be an http or https URL",
                    );
                }
            }
        }
        for key in ["play_vibrate", "play_lights", "play_sound"] {
            self.str_bool(body, key, &format!("payload.body.{key}"));
        }
        if let Some(b) = self.opt_int(body, "builder_id", "payload.body.builder_id") {
            if b < 0 {
                self.err("payload.body.builder_id", "must not be negative");
            }
        }
        if let Some(bb) = self.opt_str(body, "big_body", "payload.body.big_body") {
            if bb.chars().count() > MAX_BIG_BODY_CHARS {
                self.err(
                    "payload.body.big_body",
                    format!("must be at most {MAX_BIG_BODY_CHARS} characters"),
                );
            }
        }
        if let Some(r) = self.opt_int(body, "re_pop", "payload.body.re_pop") {
            if !(0..=1).contains(&r) {
                self.err("payload.body.re_pop", "must be 0 or 1");
            }
        }
        for key in ["set_badge", "add_badge"] {
            self.opt_int(body, key, &format!("payload.body.{key}"));
        }
        let after_open = match body.get("after_open") {
            None => "go_app",
            Some(Value::String(s))
                if ["go_app", "go_url", "go_activity", "go_custom"].contains(&s.as_str()) =>
            {
                s
            }
            Some(_) => {
                self.err(
                    "payload.body.after_open",
                    "must be go_app, go_url, go_activity or go_custom",
                );
                return;
            }
        };
        match after_open {
            "go_url" => {
                if let Some(u) =
                    self.required_str(body, "url", "payload.body.url", "for after_open go_url")
                {
                    if !is_http_url(u) {
                        self.err("payload.body.url", "must be an http or https URL");
                    }
                }
            }
            "go_activity" => {
                self.required_str(
                    body,
                    "activity",
                    "payload.body.activity",
                    "for after_open go_activity",
                );
            }
            "go_custom" => self.custom_required(body, "for after_open go_custom"),
            _ => {}
        }
    }

    /// `body.custom` must be present and non-empty (its type is checked elsewhere).
    fn custom_required(&mut self, body: &Map<String, Value>, why: &str) {
        match body.get("custom") {
            None | Some(Value::Null) => {
                self.err("payload.body.custom", format!("is required {why}"))
            }
            Some(Value::String(s)) if s.trim().is_empty() => {
                self.err("payload.body.custom", format!("must not be empty ({why})"))
            }
            _ => {}
        }
    }

    fn ios_payload(&mut self, p: &Map<String, Value>) {
        for key in ["d", "p"] {
            if p.contains_key(key) {
                self.err(
                    format!("payload.{key}"),
                    "is reserved by Umeng (error 5002)",
                );
            }
        }
        if p.contains_key("display_type") || p.contains_key("body") {
            self.err(
                "payload",
                "is an Android payload (display_type/body); iOS needs aps",
            );
        }
        let aps = match p.get("aps") {
            Some(Value::Object(a)) => a,
            Some(_) => {
                self.err("payload.aps", "must be a JSON object");
                return;
            }
            None => {
                self.err("payload.aps", "is required (iOS payload)");
                return;
            }
        };
        let flag = |v: &mut Self, key: &str| -> Option<i64> {
            let path = format!("payload.aps.{key}");
            let n = v.opt_int(aps, key, &path)?;
            if !(0..=1).contains(&n) {
                v.err(path, "must be 0 or 1");
            }
            Some(n)
        };
        let silent = flag(self, "content-available") == Some(1);
        flag(self, "mutable-content");
        match aps.get("alert") {
            None | Some(Value::Null) => {
                if !silent {
                    self.err(
                        "payload.aps.alert",
                        "is required unless content-available is 1",
                    );
                }
            }
            Some(Value::String(s)) => {
                if s.trim().is_empty() {
                    self.err("payload.aps.alert", "must not be empty");
                }
            }
            Some(Value::Object(a)) => {
                for key in ["title", "subtitle", "body"] {
                    self.opt_str(a, key, &format!("payload.aps.alert.{key}"));
                }
                let has = |k: &str| {
                    a.get(k)
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.trim().is_empty())
                };
                if !has("title") && !has("body") {
                    self.err("payload.aps.alert", "needs a title or a body");
                }
            }
            Some(_) => self.err(
                "payload.aps.alert",
                "must be a string or {title, subtitle, body}",
            ),
        }
        match aps.get("badge") {
            None => {}
            Some(Value::Number(n)) if n.as_i64().is_some_and(|n| n >= 0) => {}
            Some(Value::String(s)) => {
                let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
                if !(s.is_empty()
                    || (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())))
                {
                    self.err("payload.aps.badge", "must be \"N\", \"+N\", \"-N\" or \"\"");
                }
            }
            Some(_) => self.err(
                "payload.aps.badge",
                "must be a non-negative integer or a string \"N\", \"+N\", \"-N\", \"\"",
            ),
        }
        for key in ["sound", "category", "thread-id"] {
            self.opt_str(aps, key, &format!("payload.aps.{key}"));
        }
        if let Some(level) =
            self.opt_str(aps, "interruption-level", "payload.aps.interruption-level")
        {
            if !INTERRUPTION_LEVELS.contains(&level) {
                self.err(
                    "payload.aps.interruption-level",
                    "must be passive, active, time-sensitive or critical",
                );
            }
        }
    }

    fn policy(
        &mut self,
        p: &Map<String, Value>,
        cast: Option<CastType>,
        task_class: bool,
        now: OffsetDateTime,
    ) {
        let limit = now + MAX_SCHEDULE_AHEAD;
        let time_of = |v: &mut Self, key: &str| -> Option<OffsetDateTime> {
            let path = format!("policy.{key}");
            let s = v.opt_str(p, key, &path)?;
            let t = parse_policy_time(s);
            if t.is_none() {
                v.err(path, "must be yyyy-MM-dd HH:mm:ss (Beijing time)");
            }
            t
        };
        let start = time_of(self, "start_time");
        let expire = time_of(self, "expire_time");
        if p.contains_key("start_time") && !task_class {
            let what = cast.map_or("this type", CastType::as_str);
            self.err("policy.start_time", format!("is only for task-class sends (broadcast, groupcast, filecast, customizedcast with file_id), not {what}"));
        }
        if let Some(s) = start {
            if s < now + MIN_START_AHEAD {
                self.err(
                    "policy.start_time",
                    format!(
                        "must be at least {} minutes from now (time for the upload and the \
                         send); leave it out to send now",
                        MIN_START_AHEAD.whole_minutes()
                    ),
                );
            } else if s > limit {
                self.err("policy.start_time", "must be at most 7 days from now");
            }
        }
        if let Some(e) = expire {
            let send_at = start.filter(|s| *s > now).unwrap_or(now);
            if e <= now {
                self.err("policy.expire_time", "must be later than now");
            } else if start.is_some_and(|s| e <= s) {
                self.err("policy.expire_time", "must be later than start_time");
            } else if e > send_at + MAX_SCHEDULE_AHEAD {
                self.err(
                    "policy.expire_time",
                    "must be at most 7 days after the send time (start_time, or now)",
                );
            }
        }
        if let Some(n) = self.opt_int(p, "max_send_num", "policy.max_send_num") {
            if n < MIN_MAX_SEND_NUM {
                self.err(
                    "policy.max_send_num",
                    format!("must be at least {MIN_MAX_SEND_NUM} (messages per second)"),
                );
            }
        }
        if let Some(id) = self.opt_str(p, "apns_collapse_id", "policy.apns_collapse_id") {
            if self.platform != Platform::Ios {
                self.err("policy.apns_collapse_id", "is iOS only");
            }
            if id.len() > MAX_APNS_COLLAPSE_ID_BYTES {
                self.err(
                    "policy.apns_collapse_id",
                    format!(
                        "must be at most {MAX_APNS_COLLAPSE_ID_BYTES} bytes, got {}",
                        id.len()
                    ),
                );
            }
        }
        if let Some(id) = self.opt_str(p, "out_biz_no", "policy.out_biz_no") {
            if !task_class {
                self.err(
                    "policy.out_biz_no",
                    "Umeng honours out_biz_no only for task-class sends",
                );
            }
            if id.is_empty() {
                self.err("policy.out_biz_no", "must not be empty");
            }
        }
        if p.contains_key("in_app") && self.platform != Platform::Android {
            self.err("policy.in_app", "is Android only");
        }
        if let Some(v) = p.get("notification_closed_filter") {
            if !v.is_boolean() {
                self.err("policy.notification_closed_filter", "must be a boolean");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::umeng::model::*;
    use serde_json::json;

    fn now() -> OffsetDateTime {
        time::macros::datetime!(2026-12-01 00:00:00 UTC)
    }

    fn check(body: Value, platform: Platform) -> Vec<FieldError> {
        let map = body.as_object().cloned().expect("object");
        validate_value(&map, platform, platform.default_payload_limit(), now())
    }

    fn fields(errs: &[FieldError]) -> Vec<&str> {
        errs.iter().map(|e| e.field.as_str()).collect()
    }

    fn android(extra: Value) -> Value {
        let mut base = json!({
            "type": "unicast",
            "device_tokens": "A".repeat(44),
            "payload": {"display_type": "notification", "body": {"title": "t", "text": "x"}},
        });
        merge_into(
            base.as_object_mut().expect("object"),
            extra.as_object().expect("object"),
        );
        base
    }

    fn ios(extra: Value) -> Value {
        let mut base = json!({
            "type": "unicast",
            "device_tokens": "a".repeat(64),
            "payload": {"aps": {"alert": "hi"}},
        });
        merge_into(
            base.as_object_mut().expect("object"),
            extra.as_object().expect("object"),
        );
        base
    }

    #[test]
    fn minimal_bodies_pass() {
        assert_eq!(check(android(json!({})), Platform::Android), vec![]);
        assert_eq!(check(ios(json!({})), Platform::Ios), vec![]);
    }

    #[test]
    fn typed_body_is_validated_with_its_extra_fields() {
        let mut b = SendBody::new(
            CastType::Broadcast,
            Payload::Android(AndroidPayload {
                display_type: DisplayType::Message,
                body: AndroidBody {
                    custom: Some(json!({"k": 1})),
                    ..Default::default()
                },
                extra: None,
            }),
        );
        assert_eq!(validate(&b, Platform::Android, 2048, now()), Ok(()));
        b.extra_fields
            .insert("policy".into(), json!({"max_send_num": 5}));
        let errs = validate(&b, Platform::Android, 2048, now()).expect_err("raw field checked");
        assert_eq!(fields(&errs), ["policy.max_send_num"]);
    }

    #[test]
    fn token_counts_and_lengths() {
        let tok = "A".repeat(44);
        let list = |n: usize| vec![tok.as_str(); n].join(",");
        let ok = check(
            android(json!({"type": "listcast", "device_tokens": list(500)})),
            Platform::Android,
        );
        assert_eq!(ok, vec![]);
        let bad = check(
            android(json!({"type": "listcast", "device_tokens": list(501)})),
            Platform::Android,
        );
        assert_eq!(fields(&bad), ["device_tokens"]);
        let two = check(
            android(json!({"device_tokens": list(2)})),
            Platform::Android,
        );
        assert_eq!(fields(&two), ["device_tokens"]);
        let short = check(
            android(json!({"device_tokens": "A".repeat(43)})),
            Platform::Android,
        );
        assert_eq!(fields(&short), ["device_tokens[0]"]);
        let ios_android_len = check(ios(json!({"device_tokens": "a".repeat(44)})), Platform::Ios);
        assert_eq!(fields(&ios_android_len), ["device_tokens[0]"]);
    }

    #[test]
    fn audience_rules() {
        let c = |extra: Value| {
            check(
                android(json!({"device_tokens": null})).merge(extra),
                Platform::Android,
            )
        };
        assert_eq!(
            fields(&c(json!({"type": "customizedcast", "alias": "u1"}))),
            ["alias_type"]
        );
        assert_eq!(
            fields(&c(json!({"type": "customizedcast", "alias_type": "uid"}))),
            ["alias"]
        );
        assert_eq!(
            fields(&c(
                json!({"type": "customizedcast", "alias_type": "uid", "alias": "u1", "file_id": "PF1"})
            )),
            ["alias"]
        );
        let aliases = |n: usize| vec!["u"; n].join(",");
        assert_eq!(
            c(json!({"type": "customizedcast", "alias_type": "uid", "alias": aliases(500)})),
            vec![]
        );
        assert_eq!(
            fields(&c(
                json!({"type": "customizedcast", "alias_type": "uid", "alias": aliases(501)})
            )),
            ["alias"]
        );
        assert_eq!(fields(&c(json!({"type": "filecast"}))), ["file_id"]);
        assert_eq!(c(json!({"type": "filecast", "file_id": "PF1"})), vec![]);
        assert_eq!(fields(&c(json!({"type": "groupcast"}))), ["filter"]);
        assert_eq!(c(json!({"type": "groupcast", "group_id": "g1"})), vec![]);
        assert_eq!(
            fields(&c(json!({"type": "broadcast", "file_id": "PF1"}))),
            ["file_id"]
        );
        assert_eq!(fields(&c(json!({"type": "unicast"}))), ["device_tokens"]);
    }

    trait Merge {
        fn merge(self, extra: Value) -> Value;
    }
    impl Merge for Value {
        fn merge(mut self, extra: Value) -> Value {
            merge_into(
                self.as_object_mut().expect("object"),
                extra.as_object().expect("object"),
            );
            self
        }
    }

    fn groupcast(filter: Value) -> Vec<FieldError> {
        check(
            android(json!({"type": "groupcast", "device_tokens": null}))
                .merge(json!({"filter": filter})),
            Platform::Android,
        )
    }

    #[test]
    fn filter_shape() {
        assert_eq!(
            groupcast(
                json!({"where": {"and": [{"or": [{"not": {"channel": "360"}}, {"app_version": "1.2"}]}, {"not_launch_from": "2014-11-15"}]}})
            ),
            vec![]
        );
        assert_eq!(
            fields(&groupcast(json!({"where": {"or": [{"tag": "a"}]}}))),
            ["filter.where"]
        );
        assert_eq!(
            fields(&groupcast(
                json!({"where": {"and": [{"not": [{"tag": "a"}]}]}})
            )),
            ["filter.where.and[0].not"]
        );
        assert_eq!(
            fields(&groupcast(json!({"where": {"and": [{"city": "x"}]}}))),
            ["filter.where.and[0].city"]
        );
        assert_eq!(
            fields(&groupcast(json!({"where": {"and": [{"tag": 1}]}}))),
            ["filter.where.and[0].tag"]
        );
        assert_eq!(
            fields(&groupcast(
                json!({"where": {"and": [{"tag": "a", "channel": "b"}]}})
            )),
            ["filter.where.and[0]"]
        );
        assert_eq!(
            fields(&groupcast(json!({"where": {"and": []}}))),
            ["filter.where.and"]
        );
        assert_eq!(
            fields(&groupcast(json!({"and": [{"tag": "a"}]}))),
            ["filter"]
        );
    }

    #[test]
    fn filter_size_limit() {
        // {"where":{"and":[{"tag":"..."}]}} is 30 bytes around the tag value.
        let f = |n: usize| json!({"where": {"and": [{"tag": "x".repeat(n)}]}});
        assert_eq!(json_len(&f(2970)), 3000);
        assert_eq!(groupcast(f(2970)), vec![]);
        assert_eq!(fields(&groupcast(f(2971))), ["filter"]);
    }

    #[test]
    fn android_payload_rules() {
        let c = |body: Value| {
            check(
                android(json!({"payload": {"body": body}})),
                Platform::Android,
            )
        };
        assert_eq!(fields(&c(json!({"title": null}))), ["payload.body.title"]);
        assert_eq!(
            fields(&c(json!({"after_open": "go_url"}))),
            ["payload.body.url"]
        );
        assert_eq!(
            fields(&c(json!({"after_open": "go_url", "url": "ftp://x.y"}))),
            ["payload.body.url"]
        );
        assert_eq!(
            c(json!({"after_open": "go_url", "url": "https://x.y/z"})),
            vec![]
        );
        assert_eq!(
            fields(&c(json!({"after_open": "go_activity"}))),
            ["payload.body.activity"]
        );
        assert_eq!(
            fields(&c(json!({"after_open": "go_custom"}))),
            ["payload.body.custom"]
        );
        assert_eq!(
            fields(&c(json!({"after_open": "Go_app"}))),
            ["payload.body.after_open"]
        );
        assert_eq!(
            fields(&c(json!({"img": "ftp://x.y/a.png"}))),
            ["payload.body.img"]
        );
        assert_eq!(
            fields(&c(json!({"play_sound": true}))),
            ["payload.body.play_sound"]
        );
        assert_eq!(c(json!({"play_sound": "false"})), vec![]);
        let msg = check(
            android(
                json!({"payload": {"display_type": "message", "body": {"title": null, "text": null}}}),
            ),
            Platform::Android,
        );
        assert_eq!(fields(&msg), ["payload.body.custom"]);
        let extra = check(
            android(json!({"payload": {"extra": "x"}})),
            Platform::Android,
        );
        assert_eq!(fields(&extra), ["payload.extra"]);
        assert_eq!(
            fields(&check(
                android(json!({"production_mode": true})),
                Platform::Android
            )),
            ["production_mode"]
        );
    }

    #[test]
    fn payload_limit_is_a_parameter() {
        let body = android(json!({}));
        let size = json_len(&body["payload"]);
        let map = body.as_object().cloned().expect("object");
        assert_eq!(validate_value(&map, Platform::Android, size, now()), vec![]);
        assert_eq!(
            fields(&validate_value(&map, Platform::Android, size - 1, now())),
            ["payload"]
        );
    }

    #[test]
    fn ios_payload_rules() {
        let c = |extra: Value| check(ios(extra), Platform::Ios);
        assert_eq!(
            fields(&c(json!({"payload": {"aps": {"alert": null}}}))),
            ["payload.aps.alert"]
        );
        assert_eq!(
            c(json!({"payload": {"aps": {"alert": null, "content-available": 1}}})),
            vec![]
        );
        assert_eq!(
            fields(&c(json!({"payload": {"d": 1, "p": 2}}))),
            ["payload.d", "payload.p"]
        );
        assert_eq!(
            fields(&c(
                json!({"payload": {"aps": {"interruption-level": "loud"}}})
            )),
            ["payload.aps.interruption-level"]
        );
        assert_eq!(c(json!({"payload": {"aps": {"badge": "+1"}}})), vec![]);
        assert_eq!(c(json!({"payload": {"aps": {"badge": 3}}})), vec![]);
        assert_eq!(
            fields(&c(json!({"payload": {"aps": {"badge": "x1"}}}))),
            ["payload.aps.badge"]
        );
        assert_eq!(fields(&c(json!({"mipush": "true"}))), ["mipush"]);
        assert_eq!(
            fields(&c(json!({"policy": {"apns_collapse_id": "c".repeat(65)}}))),
            ["policy.apns_collapse_id"]
        );
        assert_eq!(
            c(json!({"policy": {"apns_collapse_id": "c".repeat(64)}})),
            vec![]
        );
        assert_eq!(
            fields(&check(
                android(json!({"policy": {"apns_collapse_id": "c"}})),
                Platform::Android
            )),
            ["policy.apns_collapse_id"]
        );
    }

    #[test]
    fn policy_times() {
        let b = |policy: Value| {
            check(
                android(json!({"type": "broadcast", "device_tokens": null, "policy": policy})),
                Platform::Android,
            )
        };
        assert_eq!(b(json!({"start_time": "2026-12-08 08:00:00"})), vec![]); // now + 7 days exactly
        assert_eq!(
            fields(&b(json!({"start_time": "2026-12-08 08:00:01"}))),
            ["policy.start_time"]
        );
        assert_eq!(
            fields(&b(json!({"start_time": "2026-12-01 08:00:00"}))),
            ["policy.start_time"]
        ); // == now
        assert_eq!(
            fields(&b(json!({"start_time": "2026-12-01T09:00:00"}))),
            ["policy.start_time"]
        );
        assert_eq!(
            fields(&b(
                json!({"start_time": "2026-12-02 09:00:00", "expire_time": "2026-12-02 09:00:00"})
            )),
            ["policy.expire_time"]
        );
        assert_eq!(
            b(json!({"start_time": "2026-12-02 09:00:00", "expire_time": "2026-12-09 09:00:00"})),
            vec![]
        );
        assert_eq!(
            fields(&b(
                json!({"start_time": "2026-12-02 09:00:00", "expire_time": "2026-12-09 09:00:01"})
            )),
            ["policy.expire_time"]
        );
        assert_eq!(
            fields(&b(json!({"expire_time": "2026-12-08 08:00:01"}))),
            ["policy.expire_time"]
        );
        assert_eq!(b(json!({"max_send_num": 1000})), vec![]);
        assert_eq!(
            fields(&b(json!({"max_send_num": 999}))),
            ["policy.max_send_num"]
        );
        assert_eq!(b(json!({"out_biz_no": "o-1"})), vec![]);
        let unicast = check(
            android(json!({"policy": {"start_time": "2026-12-02 09:00:00", "out_biz_no": "o-1"}})),
            Platform::Android,
        );
        assert_eq!(fields(&unicast), ["policy.start_time", "policy.out_biz_no"]);
    }

    #[test]
    fn client_owned_fields_are_rejected() {
        let errs = check(
            android(json!({"appkey": "x", "timestamp": "1"})),
            Platform::Android,
        );
        assert_eq!(fields(&errs), ["appkey", "timestamp"]);
    }
}

#[cfg(test)]
mod item_error_cap_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn many_bad_tokens_are_summarised() {
        let list = vec!["short"; 30].join(",");
        let body = json!({"type": "listcast", "device_tokens": list,
                          "payload": {"display_type": "message", "body": {"custom": "c"}}});
        let errs = validate_value(
            body.as_object().expect("object"),
            Platform::Android,
            2048,
            OffsetDateTime::UNIX_EPOCH,
        );
        assert_eq!(errs.len(), MAX_ITEM_ERRORS + 1);
        assert_eq!(errs[MAX_ITEM_ERRORS].field, "device_tokens");
    }
}
