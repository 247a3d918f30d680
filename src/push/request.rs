//! The simplified push request that calling services POST: one shape for both platforms,
//! RFC 3339 times, JSON booleans. Unknown fields are rejected so typos are caught.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::Digest;

use crate::umeng::CastType;

/// A push as a calling service describes it (docs/push-request.md has the rules and the
/// translation to Umeng's body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    /// A configured app name; it fixes the platform, appkey and secret.
    pub app: String,
    /// unicast, listcast, broadcast, groupcast, filecast or customizedcast.
    #[serde(rename = "type")]
    pub cast_type: CastType,
    /// unicast: exactly one; listcast: 1 or more (more than 500 are split into Umeng calls
    /// of at most 500, up to `delivery.max_audience`). For an app group, an object of such
    /// lists keyed by platform: `{"android": [...], "ios": [...]}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_tokens: Option<DeviceTokens>,
    /// customizedcast: the alias type the app registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias_type: Option<String>,
    /// customizedcast by alias: 1 or more (more than 500 are split into Umeng calls of at
    /// most 500, up to `delivery.max_audience`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aliases: Option<Vec<String>>,
    /// groupcast: Umeng's filter, `{"where":{"and":[...]}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Value>,
    /// groupcast: a console-defined audience instead of a filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// filecast / customizedcast by file: a `file_id` from an earlier upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_id: Option<String>,
    /// filecast / customizedcast by file: the tokens or aliases; the gateway uploads them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_lines: Option<Vec<String>>,
    /// A visible notification (exclusive with `message`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification: Option<Notification>,
    /// Android pass-through message, or iOS silent push (exclusive with `notification`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Message>,
    /// Timing and throttling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PushPolicy>,
    /// The caller's idempotency key: 1-64 characters of `[A-Za-z0-9_.:-]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_biz_no: Option<String>,
    /// `false` for Umeng's test mode. Default `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_mode: Option<bool>,
    /// Free text shown in Umeng's console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A JSON object echoed into Umeng's receipts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_params: Option<Map<String, Value>>,
    /// Android-only settings (an error for an iOS app).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub android: Option<AndroidOptions>,
    /// iOS-only settings (an error for an Android app).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ios: Option<IosOptions>,
    /// Raw Umeng fields merged into the body last (objects merge, `null` removes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub umeng: Option<Map<String, Value>>,
    /// Where to POST signed events when the push reaches a final state (at most 2048
    /// characters). It must start with one of the calling client's
    /// `callback_url_prefixes`. Not sent to Umeng.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
    /// RFC 3339: the gateway holds the push and sends it then (it makes the push
    /// asynchronous; at most `delivery.max_send_at_days` ahead). Before then,
    /// `POST /v1/pushes/{id}/cancel` withdraws it without calling Umeng. Not sent to Umeng;
    /// exclusive with `policy.start_time` (Umeng's own scheduling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_at: Option<String>,
    /// What an asynchronous push does when its quota window is full: `reject` (default: a
    /// 429 at admission, or `quota_exhausted` when a held push falls due) or `wait` for a
    /// free slot, first come first served per app and bucket, until `policy.expire_time` or
    /// `delivery.quota_wait_max_hours`. Only with `Prefer: respond-async` or `send_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_quota_exhausted: Option<OnQuotaExhausted>,
}

/// `device_tokens`: a list for one app, or lists keyed by platform for an app group.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum DeviceTokens {
    List(Vec<String>),
    ByPlatform(TokensByPlatform),
}

/// Device tokens per platform (an app group's `unicast` or `listcast`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokensByPlatform {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub android: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ios: Option<Vec<String>>,
}

impl DeviceTokens {
    /// The list, when given as one.
    pub fn as_list(&self) -> Option<&Vec<String>> {
        match self {
            DeviceTokens::List(list) => Some(list),
            DeviceTokens::ByPlatform(_) => None,
        }
    }
}

impl TokensByPlatform {
    pub fn get(&self, platform: crate::umeng::Platform) -> Option<&Vec<String>> {
        match platform {
            crate::umeng::Platform::Android => self.android.as_ref(),
            crate::umeng::Platform::Ios => self.ios.as_ref(),
        }
    }
}

impl<'de> Deserialize<'de> for DeviceTokens {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Tokens;
        impl<'de> serde::de::Visitor<'de> for Tokens {
            type Value = DeviceTokens;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of device tokens, or (for an app group) an object of arrays keyed by platform")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<DeviceTokens, A::Error> {
                Vec::<String>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(DeviceTokens::List)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<DeviceTokens, A::Error> {
                TokensByPlatform::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(DeviceTokens::ByPlatform)
            }
        }
        d.deserialize_any(Tokens)
    }
}

/// See [`PushRequest::on_quota_exhausted`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnQuotaExhausted {
    Reject,
    Wait,
}

impl PushRequest {
    /// The request as history stores it: as received, except that `file_lines` (up to
    /// 10 MiB of tokens) is replaced by what identifies it, `{"sha256", "lines", "bytes"}`
    /// of the uploaded content (each line followed by `\n`; the same digest the upload
    /// reuse keys on). The upload's `file_id` is in the push record.
    pub fn stored_form(&self) -> Value {
        let without_lines = StoredView(self);
        let mut stored = serde_json::to_value(without_lines).unwrap_or(Value::Null);
        if let (Some(lines), Some(obj)) = (&self.file_lines, stored.as_object_mut()) {
            obj.insert("file_lines".into(), file_lines_digest(lines));
        }
        stored
    }
}

/// `{"sha256", "lines", "bytes"}` of the upload content made of `lines`.
pub fn file_lines_digest(lines: &[String]) -> Value {
    let mut hash = sha2::Sha256::new();
    let mut bytes = 0usize;
    for line in lines {
        hash.update(line.as_bytes());
        hash.update(b"\n");
        bytes += line.len() + 1;
    }
    serde_json::json!({
        "sha256": hex::encode(hash.finalize()),
        "lines": lines.len(),
        "bytes": bytes,
    })
}

/// Serialises a request without its `file_lines`, without copying them.
struct StoredView<'a>(&'a PushRequest);

impl Serialize for StoredView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        // Exhaustive: a new field must be placed here, or it would be dropped from history.
        let PushRequest {
            app,
            cast_type,
            device_tokens,
            alias_type,
            aliases,
            filter,
            group_id,
            file_id,
            file_lines: _,
            notification,
            message,
            policy,
            out_biz_no,
            production_mode,
            description,
            callback_params,
            android,
            ios,
            umeng,
            callback_url,
            send_at,
            on_quota_exhausted,
        } = self.0;
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("app", app)?;
        map.serialize_entry("type", cast_type)?;
        macro_rules! opt {
            ($($name:literal => $field:ident),* $(,)?) => {$(
                if let Some(v) = $field {
                    map.serialize_entry($name, v)?;
                }
            )*};
        }
        opt!(
            "device_tokens" => device_tokens,
            "alias_type" => alias_type,
            "aliases" => aliases,
            "filter" => filter,
            "group_id" => group_id,
            "file_id" => file_id,
            "notification" => notification,
            "message" => message,
            "policy" => policy,
            "out_biz_no" => out_biz_no,
            "production_mode" => production_mode,
            "description" => description,
            "callback_params" => callback_params,
            "android" => android,
            "ios" => ios,
            "umeng" => umeng,
            "callback_url" => callback_url,
            "send_at" => send_at,
            "on_quota_exhausted" => on_quota_exhausted,
        );
        map.end()
    }
}

/// A visible notification.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Notification {
    /// Android: required; iOS: alert title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Android: required; iOS: alert body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Android only: status-bar text (defaults to the title).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticker: Option<String>,
    /// iOS only: alert subtitle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subtitle: Option<String>,
    /// Android: raw resource name; iOS: sound file name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sound: Option<String>,
    /// iOS: `aps.badge` (number or "N"/"+N"/"-N"/""). Android: a number or "N" sets the
    /// badge, "+N" adds to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub badge: Option<Badge>,
    /// Android only: image URL (http or https).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// What a tap does (Android). Default: open the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open: Option<Open>,
    /// Android: `payload.extra`; iOS: custom keys beside `aps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra: Option<Map<String, Value>>,
}

/// A badge: a number, or a string.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Badge {
    Number(i64),
    Text(String),
}

/// What a tap on a notification does; set exactly one field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Open {
    /// Open a web page (http or https). Android `go_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Open an activity. Android `go_activity`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity: Option<String>,
    /// Hand a string or object to the app. Android `go_custom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<Value>,
    /// `true`: open the app (the default). Android `go_app`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<bool>,
}

/// A message that is not shown by the system.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// Android: `body.custom` (string or object). iOS: an object whose keys go beside `aps`
    /// of a silent push (`content-available: 1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom: Option<Value>,
}

/// Timing and throttling.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PushPolicy {
    /// RFC 3339; task-class sends only; later than now, at most 7 days ahead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// RFC 3339; later than now and the start, at most 7 days after the send time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expire_time: Option<String>,
    /// Messages per second, at least 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_send_num: Option<i64>,
    /// iOS only, at most 64 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apns_collapse_id: Option<String>,
}

/// Android-only settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AndroidOptions {
    /// Custom notification style (notifications only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder_id: Option<i64>,
    /// Drawable name (notifications only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icon: Option<String>,
    /// Drawable name, Umeng `largeIcon` (notifications only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub large_icon: Option<String>,
    /// Big picture URL (notifications only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expand_image: Option<String>,
    /// Expanded text, at most 120 characters (notifications only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub big_body: Option<String>,
    /// Notifications only; sent as `"true"`/`"false"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub play_vibrate: Option<bool>,
    /// Notifications only; sent as `"true"`/`"false"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub play_lights: Option<bool>,
    /// Notifications only; sent as `"true"`/`"false"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub play_sound: Option<bool>,
    /// Legacy vendor channel switch; sent as `"true"`/`"false"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mipush: Option<bool>,
    /// Legacy vendor channel activity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mi_activity: Option<String>,
    /// 0 marketing/news, 1 service/communication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<i64>,
    /// Vendor channel properties, passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel_properties: Option<Map<String, Value>>,
    /// Local notification properties, passed through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_properties: Option<Map<String, Value>>,
    /// Skip devices whose notifications are turned off (`policy.notification_closed_filter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notification_closed_filter: Option<bool>,
}

/// iOS-only settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IosOptions {
    /// `aps.category` (notifications only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// `aps.thread-id` (notifications only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    /// `aps.interruption-level`: passive, active, time-sensitive, critical (notifications only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interruption_level: Option<String>,
    /// `aps.mutable-content: 1` (notifications only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutable_content: Option<bool>,
    /// `aps.content-available: 1` on a notification (a message always sets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_available: Option<bool>,
}
