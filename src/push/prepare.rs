//! `prepare`: validate a [`PushRequest`] for one app, translate it into Umeng's
//! [`SendBody`], and compute its idempotency fingerprint.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::request::{Badge, DeviceTokens, Notification, OnQuotaExhausted, Open, PushRequest};
use crate::quota::QuotaKind;
use crate::umeng::model::{
    AfterOpen, AndroidBody, AndroidPayload, Aps, DisplayType, IosAlert, IosAlertFields, IosBadge,
    IosPayload, Payload, Policy, SendBody,
};
use crate::umeng::{self, format_policy_time, CastType, FieldError, Platform};

/// Largest upload (`file_lines` joined with `\n`), as Umeng documents: 10 MiB.
pub const MAX_UPLOAD_BYTES: usize = 10 * 1024 * 1024;
/// Longest `out_biz_no`.
pub const MAX_OUT_BIZ_NO_LEN: usize = 64;
/// Longest `description`, in bytes. Umeng states no limit; the gateway bounds what it
/// sends and stores.
pub const MAX_DESCRIPTION_BYTES: usize = 1024;
/// Largest `callback_params`, in bytes of compact JSON.
pub const MAX_CALLBACK_PARAMS_BYTES: usize = 2048;
/// Largest `android.channel_properties` and `android.local_properties`, each in bytes of
/// compact JSON.
pub const MAX_PROPERTIES_BYTES: usize = 2048;
/// Largest `umeng` object, in bytes of compact JSON.
pub const MAX_RAW_UMENG_BYTES: usize = 4096;
/// Longest `alias_type`, alias (in `aliases` or customizedcast `file_lines`), `group_id`
/// and `file_id`, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest `android.mi_activity`, in bytes.
pub const MAX_MI_ACTIVITY_BYTES: usize = 256;
/// At most this many per-item errors are listed for one list (the rest are summarised).
const MAX_ITEM_ERRORS: usize = 20;
/// Root keys of `umeng` that would change what the gateway classified (type, mode,
/// audience, file) or what the client sets, with the request field to use instead.
const RAW_RESERVED_ROOT: [(&str, &str); 11] = [
    ("type", "type"),
    ("production_mode", "production_mode"),
    ("device_tokens", "device_tokens"),
    ("alias", "aliases"),
    ("alias_type", "alias_type"),
    ("file_id", "file_id or file_lines"),
    ("filter", "filter"),
    ("group_id", "group_id"),
    ("appkey", ""),
    ("timestamp", ""),
    ("sign", ""),
];
/// `umeng.policy` keys that the gateway relies on (idempotency, scheduling, polling).
const RAW_RESERVED_POLICY: [(&str, &str); 3] = [
    ("out_biz_no", "out_biz_no"),
    ("start_time", "policy.start_time"),
    ("expire_time", "policy.expire_time"),
];
/// Stands in for the `file_id` of a `file_lines` request until the upload is done.
const PENDING_FILE_ID: &str = "PF-pending-upload";

/// What `prepare` needs to know about a configured app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppProfile {
    /// The configured name callers use in `app`.
    pub name: String,
    /// The app's platform.
    pub platform: Platform,
    /// Payload byte limit (compact JSON of `payload`).
    pub payload_limit: usize,
}

/// A validated request, ready to be admitted and sent.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedPush {
    /// Umeng's `type`.
    pub cast_type: CastType,
    /// Whether Umeng treats this as a task (answers `task_id`).
    pub task_class: bool,
    /// The quota bucket by type: broadcast, groupcast, filecast, customizedcast with a
    /// file. `None` for unicast-class sends. Test-mode sends are not counted by Umeng; see
    /// [`PreparedPush::counted_quota`].
    pub quota_kind: Option<QuotaKind>,
    /// Production (`true`) or test mode.
    pub production_mode: bool,
    /// The caller's idempotency key.
    pub out_biz_no: Option<String>,
    /// The caller's description.
    pub description: Option<String>,
    /// Hex SHA-256 of the canonical request (sorted keys, no whitespace, defaults filled).
    pub fingerprint: String,
    /// For `file_lines` requests: the `/upload` content (`"a\nb\n"`) to upload before
    /// sending, then pass the `file_id` to [`PreparedPush::set_file_id`].
    pub upload_content: Option<String>,
    /// The Umeng body (for `file_lines`, with a placeholder `file_id` until set).
    pub body: SendBody,
    /// `body` in its JSON form (what was validated and fingerprinted, and is sent), built
    /// once.
    pub json: Map<String, Value>,
    /// The request's `send_at`: the gateway holds the push until then.
    pub send_at: Option<OffsetDateTime>,
    /// Umeng's `policy.start_time` (Umeng holds the task until then).
    pub start_time: Option<OffsetDateTime>,
    /// `on_quota_exhausted: "wait"`.
    pub quota_wait: bool,
}

impl PreparedPush {
    /// Whether an upload must happen before the send.
    pub fn needs_upload(&self) -> bool {
        self.upload_content.is_some()
    }

    /// Sets the `file_id` returned by `/upload` and drops the upload content.
    pub fn set_file_id(&mut self, file_id: impl Into<String>) {
        let file_id = file_id.into();
        self.json
            .insert("file_id".into(), Value::String(file_id.clone()));
        self.body.file_id = Some(file_id);
        self.upload_content = None;
    }

    /// The bucket this send is counted against: `quota_kind` in production mode, else none.
    pub fn counted_quota(&self) -> Option<QuotaKind> {
        self.quota_kind.filter(|_| self.production_mode)
    }
}

/// Validates `req` for `app` at time `now` and translates it. Every error found is
/// returned, named by the caller's field path (e.g. `notification.title`,
/// `device_tokens[3]`, `policy.start_time`).
pub fn prepare(
    req: &PushRequest,
    app: &AppProfile,
    now: OffsetDateTime,
) -> Result<PreparedPush, Vec<FieldError>> {
    let mut out_errors = Vec::new();
    // U+0000 cannot be stored (PostgreSQL text and jsonb reject it): refuse it up front.
    if let Ok(v) = serde_json::to_value(req) {
        nul_characters(&v, &mut String::new(), &mut out_errors);
    }
    check_sizes(req, &mut out_errors);
    let send_at = req
        .send_at
        .as_deref()
        .and_then(|s| match OffsetDateTime::parse(s, &Rfc3339) {
            Ok(t) => Some(t),
            Err(_) => {
                out_errors.push(FieldError::new(
                    "send_at",
                    "must be an RFC 3339 time, e.g. 2026-12-01T09:00:00+08:00",
                ));
                None
            }
        });
    let start_time = req.policy.as_ref().and_then(|p| p.start_time.as_deref());
    if req.send_at.is_some() && start_time.is_some() {
        out_errors.push(FieldError::new(
            "send_at",
            "give either send_at (the gateway holds the push) or policy.start_time (Umeng holds the task), not both",
        ));
    }
    let start_time = start_time.and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok());
    let quota_wait = req.on_quota_exhausted == Some(OnQuotaExhausted::Wait);
    if let Some(raw) = &req.umeng {
        check_raw_fields(raw, &mut out_errors);
    }
    let body = translate(req, app, &mut out_errors);

    let Some(body) = body else {
        return Err(out_errors);
    };
    let mut json = body.to_value();
    let umeng_errors = umeng::validate::validate_value(&json, app.platform, app.payload_limit, now);
    if !umeng_errors.is_empty() {
        let ctx = PathContext::of(req);
        for e in umeng_errors {
            let field = ctx.caller_path(&e.field);
            if !already_reported(&out_errors, &field) {
                out_errors.push(FieldError::new(field, e.message));
            }
        }
    }
    if !out_errors.is_empty() {
        return Err(out_errors);
    }

    let has_file = req.file_id.is_some() || req.file_lines.is_some();
    let task_class = req.cast_type.is_task_class(has_file);
    let quota_kind = match req.cast_type {
        CastType::Broadcast => Some(QuotaKind::Broadcast),
        CastType::Groupcast => Some(QuotaKind::Groupcast),
        CastType::Filecast => Some(QuotaKind::Filecast),
        CastType::Customizedcast if has_file => Some(QuotaKind::CustomizedcastFile),
        _ => None,
    };
    let upload_content = req.file_lines.as_ref().map(|lines| upload_content(lines));
    let upload_sha256 = upload_content
        .as_ref()
        .map(|c| hex::encode(Sha256::digest(c.as_bytes())));
    let fingerprint = fingerprint(
        &req.app,
        req.out_biz_no.as_deref(),
        upload_sha256.as_deref(),
        GatewayFields {
            callback_url: req.callback_url.as_deref(),
            send_at,
            quota_wait,
        },
        &mut json,
    );
    Ok(PreparedPush {
        cast_type: req.cast_type,
        task_class,
        quota_kind,
        production_mode: req.production_mode.unwrap_or(true),
        out_biz_no: req.out_biz_no.clone(),
        description: req.description.clone(),
        fingerprint,
        upload_content,
        body,
        json,
        send_at,
        start_time,
        quota_wait,
    })
}

/// The request's fields that the gateway acts on and Umeng never sees. Each is left out of
/// the fingerprint when absent (or the default), so fingerprints of pushes without them
/// are what they were before the field existed.
#[derive(Debug, Clone, Copy, Default)]
pub struct GatewayFields<'a> {
    pub callback_url: Option<&'a str>,
    pub send_at: Option<OffsetDateTime>,
    pub quota_wait: bool,
}

/// Bytes of the compact JSON of `v`.
fn json_len<T: serde::Serialize + ?Sized>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |b| b.len())
}

/// The size limits of free-text and free-JSON fields that Umeng's payload limit does not
/// cover (every notification and message field is inside the payload, which is bounded).
fn check_sizes(req: &PushRequest, errors: &mut Vec<FieldError>) {
    let mut limit = |field: &str, len: usize, max: usize, what: &str| {
        if len > max {
            errors.push(FieldError::new(
                field,
                format!("is {len} bytes{what}; the limit is {max}"),
            ));
        }
    };
    if let Some(d) = &req.description {
        limit("description", d.len(), MAX_DESCRIPTION_BYTES, "");
    }
    if let Some(c) = &req.callback_params {
        let len = json_len(c);
        limit(
            "callback_params",
            len,
            MAX_CALLBACK_PARAMS_BYTES,
            " as compact JSON",
        );
    }
    if let Some(raw) = &req.umeng {
        limit(
            "umeng",
            json_len(raw),
            MAX_RAW_UMENG_BYTES,
            " as compact JSON",
        );
    }
    for (field, value) in [
        ("alias_type", &req.alias_type),
        ("group_id", &req.group_id),
        ("file_id", &req.file_id),
    ] {
        if let Some(v) = value {
            limit(field, v.len(), MAX_NAME_BYTES, "");
        }
    }
    if let Some(a) = &req.android {
        if let Some(m) = &a.mi_activity {
            limit("android.mi_activity", m.len(), MAX_MI_ACTIVITY_BYTES, "");
        }
        for (field, value) in [
            ("android.channel_properties", &a.channel_properties),
            ("android.local_properties", &a.local_properties),
        ] {
            if let Some(v) = value {
                limit(field, json_len(v), MAX_PROPERTIES_BYTES, " as compact JSON");
            }
        }
    }
}

/// Refuses raw keys that would override the gateway's classification (type, mode,
/// audience, file), its idempotency key and schedule, or what the client sets: quotas,
/// history and polling are all decided from the request's own fields.
fn check_raw_fields(raw: &Map<String, Value>, errors: &mut Vec<FieldError>) {
    let refuse = |errors: &mut Vec<FieldError>, field: String, instead: &str| {
        let message = if instead.is_empty() {
            "is set by the client at send time and must not be in the body".to_owned()
        } else {
            format!(
                "cannot be set in umeng: the gateway counts quotas, dedupes and polls by what \
                 the request says; use the request's {instead}"
            )
        };
        errors.push(FieldError::new(field, message));
    };
    for (key, instead) in RAW_RESERVED_ROOT {
        if raw.contains_key(key) {
            refuse(errors, format!("umeng.{key}"), instead);
        }
    }
    match raw.get("policy") {
        None => {}
        Some(Value::Object(p)) => {
            for (key, instead) in RAW_RESERVED_POLICY {
                if p.contains_key(key) {
                    refuse(errors, format!("umeng.policy.{key}"), instead);
                }
            }
        }
        Some(_) => errors.push(FieldError::new(
            "umeng.policy",
            "must be an object (its keys are merged into policy)",
        )),
    }
}

/// `raw` without the keys [`check_raw_fields`] refuses, so that the rest of the merged body
/// is still validated (and reported) as the caller's other fields would make it.
fn without_reserved(raw: &Map<String, Value>) -> Map<String, Value> {
    let mut out = raw.clone();
    for (key, _) in RAW_RESERVED_ROOT {
        out.shift_remove(key);
    }
    match out.get_mut("policy") {
        Some(Value::Object(p)) => {
            for (key, _) in RAW_RESERVED_POLICY {
                p.shift_remove(key);
            }
        }
        Some(_) => {
            out.shift_remove("policy");
        }
        None => {}
    }
    out
}

/// An error for every string (or object key) under `v` that holds U+0000, named by its
/// caller path (`notification.title`, `device_tokens[2]`, `notification.extra`).
fn nul_characters(v: &Value, path: &mut String, errors: &mut Vec<FieldError>) {
    const MESSAGE: &str = "must not contain the NUL character (U+0000)";
    match v {
        Value::String(s) if s.contains('\0') => errors.push(FieldError::new(path.clone(), MESSAGE)),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                nul_characters(item, path, errors);
                path.truncate(len);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                if k.contains('\0') {
                    errors.push(FieldError::new(
                        if path.is_empty() {
                            "(body)".into()
                        } else {
                            path.clone()
                        },
                        format!("keys {MESSAGE}"),
                    ));
                    continue;
                }
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                nul_characters(item, path, errors);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn upload_content(lines: &[String]) -> String {
    let mut s = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for l in lines {
        s.push_str(l);
        s.push('\n');
    }
    s
}

/// Whether `field` (or, for lists, the list it belongs to) already has an error.
fn already_reported(errors: &[FieldError], field: &str) -> bool {
    let root = |f: &str| -> String { f.split(['.', '[']).next().unwrap_or(f).to_owned() };
    errors.iter().any(|e| {
        e.field == field
            || field.starts_with(&format!("{}.", e.field))
            || (["device_tokens", "aliases", "file_lines"].contains(&root(field).as_str())
                && root(&e.field) == root(field))
    })
}

/// The fingerprint of a prepared push: hex SHA-256 of the canonical JSON (keys sorted, no
/// whitespace) of the app name, `out_biz_no`, the SHA-256 of the `file_lines` upload and
/// the Umeng body as it will be sent (without `appkey` and `timestamp`; the JSON form of a
/// [`SendBody`], lent to the canonical form and given back unchanged).
///
/// Two requests are "the same" when they produce the same Umeng body for the same app and
/// key: defaults written out or left out (`production_mode`, `ticker`, `open: {"app":
/// true}`, an empty `policy`), key order, whitespace and equivalent RFC 3339 times (the same
/// second in any offset) do not matter.
pub fn fingerprint(
    app: &str,
    out_biz_no: Option<&str>,
    upload_sha256: Option<&str>,
    gateway: GatewayFields<'_>,
    body: &mut Map<String, Value>,
) -> String {
    let mut m = Map::new();
    if let Some(url) = gateway.callback_url {
        m.insert("callback_url".into(), Value::from(url));
    }
    // The same instant in any offset is the same request.
    if let Some(at) = gateway.send_at {
        m.insert("send_at".into(), Value::from(at.unix_timestamp()));
    }
    if gateway.quota_wait {
        m.insert("on_quota_exhausted".into(), Value::from("wait"));
    }
    m.insert("app".into(), Value::from(app));
    m.insert(
        "out_biz_no".into(),
        out_biz_no.map_or(Value::Null, Value::from),
    );
    m.insert(
        "upload_sha256".into(),
        upload_sha256.map_or(Value::Null, Value::from),
    );
    m.insert("umeng".into(), Value::Object(std::mem::take(body)));
    let mut m = Value::Object(m);
    let mut canonical = Vec::with_capacity(1024);
    write_canonical(&m, &mut canonical);
    if let Some(Value::Object(lent)) = m.get_mut("umeng") {
        std::mem::swap(body, lent);
    }
    hex::encode(Sha256::digest(&canonical))
}

/// Writes `v` as compact JSON with object keys sorted (keys and leaves as serde_json writes
/// them).
fn write_canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(m) => {
            let mut entries: Vec<(&String, &Value)> = m.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, child)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_leaf(k.as_str(), out);
                out.push(b':');
                write_canonical(child, out);
            }
            out.push(b'}');
        }
        Value::Array(a) => {
            out.push(b'[');
            for (i, child) in a.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(child, out);
            }
            out.push(b']');
        }
        other => write_leaf(other, out),
    }
}

/// A string or scalar as serde_json writes it (writing into a `Vec` cannot fail).
fn write_leaf<T: serde::Serialize + ?Sized>(v: &T, out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(out, v);
}

fn rfc3339_to_umeng(s: &str, field: &str, errors: &mut Vec<FieldError>) -> Option<String> {
    match OffsetDateTime::parse(s, &Rfc3339) {
        Ok(t) => Some(format_policy_time(t)),
        Err(_) => {
            errors.push(FieldError::new(
                field,
                "must be an RFC 3339 time, e.g. 2026-12-01T09:00:00+08:00",
            ));
            None
        }
    }
}

fn valid_out_biz_no(s: &str) -> bool {
    (1..=MAX_OUT_BIZ_NO_LEN).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Checks list items that get joined with commas (each at most `max_bytes`); returns
/// nothing, pushes errors.
fn check_items(name: &str, items: &[String], max_bytes: usize, errors: &mut Vec<FieldError>) {
    let mut bad = 0usize;
    for (i, item) in items.iter().enumerate() {
        let problem = if item.trim().is_empty() {
            Some(String::from("must not be empty"))
        } else if item.contains(',') {
            Some(String::from("must not contain a comma"))
        } else if item.len() > max_bytes {
            Some(format!("is {} bytes; the limit is {max_bytes}", item.len()))
        } else {
            None
        };
        if let Some(p) = problem {
            bad += 1;
            if bad <= MAX_ITEM_ERRORS {
                errors.push(FieldError::new(format!("{name}[{i}]"), p));
            }
        }
    }
    if bad > MAX_ITEM_ERRORS {
        errors.push(FieldError::new(
            name,
            format!("{} more invalid entries not listed", bad - MAX_ITEM_ERRORS),
        ));
    }
}

fn check_file_lines(
    req: &PushRequest,
    platform: Platform,
    lines: &[String],
    errors: &mut Vec<FieldError>,
) {
    if !matches!(req.cast_type, CastType::Filecast | CastType::Customizedcast) {
        errors.push(FieldError::new(
            "file_lines",
            "is only for filecast and customizedcast",
        ));
        return;
    }
    if req.file_id.is_some() {
        errors.push(FieldError::new(
            "file_lines",
            "give file_lines or file_id, not both",
        ));
    }
    if req.aliases.is_some() {
        errors.push(FieldError::new(
            "file_lines",
            "give file_lines or aliases, not both",
        ));
    }
    if lines.is_empty() {
        errors.push(FieldError::new("file_lines", "must not be empty"));
        return;
    }
    let total: usize = lines.iter().map(|l| l.len() + 1).sum();
    if total > MAX_UPLOAD_BYTES {
        errors.push(FieldError::new(
            "file_lines",
            format!("the upload would be {total} bytes; the limit is {MAX_UPLOAD_BYTES} (10 MiB)"),
        ));
    }
    let want = platform.token_len();
    let mut bad = 0usize;
    for (i, line) in lines.iter().enumerate() {
        let problem = if line.is_empty() {
            Some(String::from("must not be empty"))
        } else if line.contains(['\n', '\r']) {
            Some(String::from("must not contain a line break"))
        } else if req.cast_type == CastType::Filecast && line.len() != want {
            Some(format!(
                "must be a {want}-character {platform} device token, got {} characters",
                line.len()
            ))
        } else if line.len() > MAX_NAME_BYTES {
            Some(format!(
                "is {} bytes; an alias is at most {MAX_NAME_BYTES}",
                line.len()
            ))
        } else {
            None
        };
        if let Some(p) = problem {
            bad += 1;
            if bad <= MAX_ITEM_ERRORS {
                errors.push(FieldError::new(format!("file_lines[{i}]"), p));
            }
        }
    }
    if bad > MAX_ITEM_ERRORS {
        errors.push(FieldError::new(
            "file_lines",
            format!("{} more invalid lines not listed", bad - MAX_ITEM_ERRORS),
        ));
    }
}

/// Translates the request, pushing caller-level errors. Returns `None` when no body can
/// be built at all (then only the caller-level errors are reported).
fn translate(
    req: &PushRequest,
    app: &AppProfile,
    errors: &mut Vec<FieldError>,
) -> Option<SendBody> {
    let platform = app.platform;
    if req.app != app.name {
        errors.push(FieldError::new(
            "app",
            format!("does not match the app {:?}", app.name),
        ));
    }
    if let Some(o) = &req.out_biz_no {
        if !valid_out_biz_no(o) {
            errors.push(FieldError::new(
                "out_biz_no",
                format!("must be 1-{MAX_OUT_BIZ_NO_LEN} characters of A-Z a-z 0-9 _ . : -"),
            ));
        }
    }
    match &req.device_tokens {
        // The exact token length is checked with the Umeng body.
        Some(DeviceTokens::List(t)) => check_items("device_tokens", t, usize::MAX, errors),
        Some(DeviceTokens::ByPlatform(_)) => errors.push(FieldError::new(
            "device_tokens",
            "tokens keyed by platform are for an app group; give one array for one app",
        )),
        None => {}
    }
    if let Some(a) = &req.aliases {
        check_items("aliases", a, MAX_NAME_BYTES, errors);
    }
    if let Some(lines) = &req.file_lines {
        check_file_lines(req, platform, lines, errors);
    }
    match platform {
        Platform::Android if req.ios.is_some() => {
            errors.push(FieldError::new("ios", "this app is Android"))
        }
        Platform::Ios if req.android.is_some() => {
            errors.push(FieldError::new("android", "this app is iOS"))
        }
        _ => {}
    }

    let payload = match (&req.notification, &req.message) {
        (Some(_), Some(_)) => {
            errors.push(FieldError::new(
                "message",
                "give notification or message, not both",
            ));
            None
        }
        (None, None) => {
            errors.push(FieldError::new(
                "notification",
                "give notification or message",
            ));
            None
        }
        (Some(n), None) => match platform {
            Platform::Android => android_notification(req, n, errors),
            Platform::Ios => ios_notification(req, n, errors),
        },
        (None, Some(m)) => match platform {
            Platform::Android => {
                if let Some(a) = &req.android {
                    for (set, name) in [
                        (a.builder_id.is_some(), "builder_id"),
                        (a.icon.is_some(), "icon"),
                        (a.large_icon.is_some(), "large_icon"),
                        (a.expand_image.is_some(), "expand_image"),
                        (a.big_body.is_some(), "big_body"),
                        (a.play_vibrate.is_some(), "play_vibrate"),
                        (a.play_lights.is_some(), "play_lights"),
                        (a.play_sound.is_some(), "play_sound"),
                    ] {
                        if set {
                            errors.push(FieldError::new(
                                format!("android.{name}"),
                                "is only for notifications",
                            ));
                        }
                    }
                }
                Some(Payload::Android(AndroidPayload {
                    display_type: DisplayType::Message,
                    body: AndroidBody {
                        custom: m.custom.clone(),
                        ..Default::default()
                    },
                    extra: None,
                }))
            }
            Platform::Ios => {
                if let Some(i) = &req.ios {
                    for (set, name) in [
                        (i.category.is_some(), "category"),
                        (i.thread_id.is_some(), "thread_id"),
                        (i.interruption_level.is_some(), "interruption_level"),
                        (i.mutable_content.is_some(), "mutable_content"),
                    ] {
                        if set {
                            errors.push(FieldError::new(
                                format!("ios.{name}"),
                                "is only for notifications",
                            ));
                        }
                    }
                }
                let custom = match &m.custom {
                    None => Map::new(),
                    Some(Value::Object(o)) => o.clone(),
                    Some(_) => {
                        errors.push(FieldError::new(
                            "message.custom",
                            "must be a JSON object on iOS (its keys go beside aps)",
                        ));
                        Map::new()
                    }
                };
                if custom.contains_key("aps") {
                    errors.push(FieldError::new(
                        "message.custom.aps",
                        "is reserved for APNs",
                    ));
                }
                Some(Payload::Ios(IosPayload {
                    aps: Aps {
                        content_available: Some(1),
                        ..Default::default()
                    },
                    custom,
                }))
            }
        },
    };
    let payload = payload?;

    let mut body = SendBody::new(req.cast_type, payload);
    body.device_tokens = req
        .device_tokens
        .as_ref()
        .and_then(DeviceTokens::as_list)
        .map(|t| t.join(","));
    body.alias_type = req.alias_type.clone();
    body.alias = req.aliases.as_ref().map(|a| a.join(","));
    body.file_id = match (&req.file_id, &req.file_lines) {
        (Some(id), _) => Some(id.clone()),
        (None, Some(_)) => Some(PENDING_FILE_ID.to_owned()),
        (None, None) => None,
    };
    body.filter = req.filter.clone();
    body.group_id = req.group_id.clone();
    body.production_mode = Some(req.production_mode.unwrap_or(true));
    body.description = req.description.clone();
    body.callback_params = req.callback_params.clone();
    if let Some(a) = &req.android {
        body.mipush = a.mipush;
        body.mi_activity = a.mi_activity.clone();
        body.category = a.category;
        body.channel_properties = a.channel_properties.clone();
        body.local_properties = a.local_properties.clone();
    }

    let mut policy = Policy::default();
    if let Some(p) = &req.policy {
        policy.start_time = p
            .start_time
            .as_deref()
            .and_then(|s| rfc3339_to_umeng(s, "policy.start_time", errors));
        policy.expire_time = p
            .expire_time
            .as_deref()
            .and_then(|s| rfc3339_to_umeng(s, "policy.expire_time", errors));
        policy.max_send_num = p.max_send_num;
        policy.apns_collapse_id = p.apns_collapse_id.clone();
    }
    if let Some(a) = &req.android {
        policy.notification_closed_filter = a.notification_closed_filter;
    }
    let has_file = req.file_id.is_some() || req.file_lines.is_some();
    if req.cast_type.is_task_class(has_file) {
        policy.out_biz_no = req.out_biz_no.clone();
    }
    if !policy.is_empty() {
        body.policy = Some(policy);
    }
    if let Some(raw) = &req.umeng {
        body.extra_fields = without_reserved(raw);
    }
    Some(body)
}

fn after_open(open: Option<&Open>, body: &mut AndroidBody, errors: &mut Vec<FieldError>) {
    let Some(o) = open else {
        body.after_open = Some(AfterOpen::GoApp);
        return;
    };
    let set = [
        o.url.is_some(),
        o.activity.is_some(),
        o.custom.is_some(),
        o.app.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        errors.push(FieldError::new(
            "notification.open",
            "set exactly one of url, activity, custom, app",
        ));
    }
    if o.app == Some(false) {
        errors.push(FieldError::new(
            "notification.open.app",
            "must be true (or leave open out)",
        ));
    }
    body.after_open = Some(if o.url.is_some() {
        AfterOpen::GoUrl
    } else if o.activity.is_some() {
        AfterOpen::GoActivity
    } else if o.custom.is_some() {
        AfterOpen::GoCustom
    } else {
        AfterOpen::GoApp
    });
    body.url = o.url.clone();
    body.activity = o.activity.clone();
    body.custom = o.custom.clone();
}

fn android_notification(
    req: &PushRequest,
    n: &Notification,
    errors: &mut Vec<FieldError>,
) -> Option<Payload> {
    if n.subtitle.is_some() {
        errors.push(FieldError::new("notification.subtitle", "is iOS only"));
    }
    let mut body = AndroidBody {
        ticker: n.ticker.clone().or_else(|| n.title.clone()),
        title: n.title.clone(),
        text: n.text.clone(),
        img: n.image.clone(),
        sound: n.sound.clone(),
        ..Default::default()
    };
    match &n.badge {
        None => {}
        Some(Badge::Number(v)) if *v >= 0 => body.set_badge = Some(*v),
        Some(Badge::Text(s)) => {
            if let Some(add) = s.strip_prefix('+').and_then(|d| d.parse::<i64>().ok()) {
                body.add_badge = Some(add);
            } else if let Ok(set) = s.parse::<i64>() {
                if set >= 0 && !s.starts_with(['-', '+']) {
                    body.set_badge = Some(set);
                } else {
                    errors.push(FieldError::new(
                        "notification.badge",
                        "on Android use N to set or \"+N\" to add",
                    ));
                }
            } else {
                errors.push(FieldError::new(
                    "notification.badge",
                    "on Android use N to set or \"+N\" to add",
                ));
            }
        }
        Some(Badge::Number(_)) => errors.push(FieldError::new(
            "notification.badge",
            "must not be negative",
        )),
    }
    after_open(n.open.as_ref(), &mut body, errors);
    if let Some(a) = &req.android {
        body.builder_id = a.builder_id;
        body.icon = a.icon.clone();
        body.large_icon = a.large_icon.clone();
        body.expand_image = a.expand_image.clone();
        body.big_body = a.big_body.clone();
        body.play_vibrate = a.play_vibrate;
        body.play_lights = a.play_lights;
        body.play_sound = a.play_sound;
    }
    Some(Payload::Android(AndroidPayload {
        display_type: DisplayType::Notification,
        body,
        extra: n.extra.clone(),
    }))
}

fn ios_notification(
    req: &PushRequest,
    n: &Notification,
    errors: &mut Vec<FieldError>,
) -> Option<Payload> {
    for (set, name) in [(n.ticker.is_some(), "ticker"), (n.image.is_some(), "image")] {
        if set {
            errors.push(FieldError::new(
                format!("notification.{name}"),
                "is Android only",
            ));
        }
    }
    if let Some(o) = &n.open {
        for (set, name) in [
            (o.url.is_some(), "url"),
            (o.activity.is_some(), "activity"),
            (o.custom.is_some(), "custom"),
        ] {
            if set {
                errors.push(FieldError::new(
                    format!("notification.open.{name}"),
                    "is Android only; on iOS pass data to the app in notification.extra",
                ));
            }
        }
        if o.app == Some(false) {
            errors.push(FieldError::new(
                "notification.open.app",
                "must be true (or leave open out)",
            ));
        }
    }
    let alert = if n.title.is_none() && n.subtitle.is_none() && n.text.is_none() {
        None
    } else {
        Some(IosAlert::Fields(IosAlertFields {
            title: n.title.clone(),
            subtitle: n.subtitle.clone(),
            body: n.text.clone(),
        }))
    };
    let mut aps = Aps {
        alert,
        badge: n.badge.as_ref().map(|b| match b {
            Badge::Number(v) => IosBadge::Number(*v),
            Badge::Text(s) => IosBadge::Text(s.clone()),
        }),
        sound: n.sound.clone(),
        ..Default::default()
    };
    if let Some(i) = &req.ios {
        aps.category = i.category.clone();
        aps.thread_id = i.thread_id.clone();
        aps.interruption_level = i.interruption_level.clone();
        aps.mutable_content = i.mutable_content.map(i64::from);
        aps.content_available = i.content_available.map(i64::from);
    }
    let custom = n.extra.clone().unwrap_or_default();
    if custom.contains_key("aps") {
        errors.push(FieldError::new(
            "notification.extra.aps",
            "is reserved for APNs",
        ));
    }
    Some(Payload::Ios(IosPayload { aps, custom }))
}

/// Maps Umeng body paths back to the caller's request paths.
struct PathContext {
    platform_message: bool,
    raw_fields: bool,
    file_lines: bool,
}

impl PathContext {
    fn of(req: &PushRequest) -> Self {
        Self {
            platform_message: req.message.is_some(),
            raw_fields: req.umeng.is_some(),
            file_lines: req.file_lines.is_some(),
        }
    }

    fn caller_path(&self, path: &str) -> String {
        let content = if self.platform_message {
            "message"
        } else {
            "notification"
        };
        let custom_root = if self.platform_message {
            "message.custom"
        } else {
            "notification.extra"
        };
        let body_custom = if self.platform_message {
            "message.custom"
        } else {
            "notification.open.custom"
        };
        let table: [(&str, &str); 45] = [
            ("alias", "aliases"),
            ("device_tokens", "device_tokens"),
            ("alias_type", "alias_type"),
            (
                "file_id",
                if self.file_lines {
                    "file_lines"
                } else {
                    "file_id"
                },
            ),
            ("filter", "filter"),
            ("group_id", "group_id"),
            ("description", "description"),
            ("production_mode", "production_mode"),
            ("callback_params", "callback_params"),
            ("type", "type"),
            ("policy.start_time", "policy.start_time"),
            ("policy.expire_time", "policy.expire_time"),
            ("policy.max_send_num", "policy.max_send_num"),
            ("policy.apns_collapse_id", "policy.apns_collapse_id"),
            ("policy.out_biz_no", "out_biz_no"),
            (
                "policy.notification_closed_filter",
                "android.notification_closed_filter",
            ),
            ("mipush", "android.mipush"),
            ("mi_activity", "android.mi_activity"),
            ("category", "android.category"),
            ("channel_properties", "android.channel_properties"),
            ("local_properties", "android.local_properties"),
            ("payload", content),
            ("payload.display_type", content),
            ("payload.body", content),
            ("payload.extra", "notification.extra"),
            ("payload.body.title", "notification.title"),
            ("payload.body.text", "notification.text"),
            ("payload.body.ticker", "notification.ticker"),
            ("payload.body.img", "notification.image"),
            ("payload.body.sound", "notification.sound"),
            ("payload.body.url", "notification.open.url"),
            ("payload.body.activity", "notification.open.activity"),
            ("payload.body.custom", body_custom),
            ("payload.body.after_open", "notification.open"),
            ("payload.body.set_badge", "notification.badge"),
            ("payload.body.add_badge", "notification.badge"),
            ("payload.body.largeIcon", "android.large_icon"),
            ("payload.aps", content),
            ("payload.aps.alert", "notification"),
            ("payload.aps.alert.title", "notification.title"),
            ("payload.aps.alert.subtitle", "notification.subtitle"),
            ("payload.aps.alert.body", "notification.text"),
            ("payload.aps.badge", "notification.badge"),
            ("payload.aps.sound", "notification.sound"),
            ("payload.aps.thread-id", "ios.thread_id"),
        ];
        let extra_table: [(&str, &str); 5] = [
            ("payload.aps.category", "ios.category"),
            ("payload.aps.interruption-level", "ios.interruption_level"),
            ("payload.aps.mutable-content", "ios.mutable_content"),
            ("payload.aps.content-available", "ios.content_available"),
            ("payload.body.builder_id", "android.builder_id"),
        ];
        let matches = |from: &str| {
            path == from
                || path
                    .strip_prefix(from)
                    .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
        };
        let best = table
            .iter()
            .chain(extra_table.iter())
            .filter(|(from, _)| matches(from))
            .max_by_key(|(from, _)| from.len());
        if let Some((from, to)) = best {
            // Android body fields named like the option (icon, big_body, play_*, ...).
            if *from == "payload.body" || *from == "payload" || *from == "payload.aps" {
                if let Some(rest) = path.strip_prefix("payload.body.") {
                    let key = rest.split(['.', '[']).next().unwrap_or(rest);
                    if [
                        "icon",
                        "expand_image",
                        "big_body",
                        "play_vibrate",
                        "play_lights",
                        "play_sound",
                    ]
                    .contains(&key)
                    {
                        return format!("android.{rest}");
                    }
                }
                if let Some(rest) = path.strip_prefix("payload.") {
                    if !rest.starts_with("aps")
                        && !rest.starts_with("body")
                        && !rest.starts_with("display_type")
                        && !rest.starts_with("extra")
                    {
                        return format!("{custom_root}.{rest}");
                    }
                }
            }
            return format!("{to}{}", &path[from.len()..]);
        }
        if self.raw_fields {
            format!("umeng.{path}")
        } else {
            path.to_owned()
        }
    }
}

#[cfg(test)]
mod tests;
