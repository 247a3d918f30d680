//! Typed Umeng `/api/send` bodies for all six cast types on Android and iOS.
//!
//! `appkey` and `timestamp` are not part of these types: the client adds them first in the
//! object at send time. Booleans that Umeng documents as strings (`production_mode`,
//! `mipush`, `play_*`) are held as `bool` and serialised as `"true"`/`"false"`.

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use super::CastType;

/// Serialises `Some(bool)` as the string `"true"` or `"false"`.
fn str_bool<S: Serializer>(v: &Option<bool>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(true) => s.serialize_str("true"),
        Some(false) => s.serialize_str("false"),
        None => s.serialize_none(),
    }
}

/// The body of one `/api/send` request, minus `appkey` and `timestamp`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SendBody {
    /// Umeng's `type`.
    #[serde(rename = "type")]
    pub cast_type: CastType,
    /// unicast: one token; listcast: comma-separated tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_tokens: Option<String>,
    /// customizedcast: the alias type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias_type: Option<String>,
    /// customizedcast: comma-separated aliases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// filecast, or customizedcast by file: an id returned by `/upload`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_id: Option<String>,
    /// groupcast: `{"where":{"and":[...]}}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<Value>,
    /// groupcast: a console-defined audience (wins over `filter`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// The message itself.
    pub payload: Payload,
    /// Timing and throttling.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// `"true"` (default) or `"false"` (test mode).
    #[serde(serialize_with = "str_bool", skip_serializing_if = "Option::is_none")]
    pub production_mode: Option<bool>,
    /// Free text shown in Umeng's console.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Android, legacy: use vendor channels for offline devices (`"true"`/`"false"`).
    #[serde(serialize_with = "str_bool", skip_serializing_if = "Option::is_none")]
    pub mipush: Option<bool>,
    /// Android, legacy: the activity opened from a vendor channel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mi_activity: Option<String>,
    /// Android: `0` marketing/news, `1` service/communication.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<i64>,
    /// Android: vendor channel properties (`channel_activity`, `xiaomi_channel_id`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_properties: Option<Map<String, Value>>,
    /// Android: local notification properties (`channel_id`, `importance`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_properties: Option<Map<String, Value>>,
    /// Free JSON object echoed into receipts (DOC-NEW).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback_params: Option<Map<String, Value>>,
    /// Receipt URL (Pro, older docs), ≤ 256 bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipt_url: Option<String>,
    /// Receipt type: 1 delivery, 2 click, 3 both.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receipt_type: Option<i64>,
    /// Raw fields merged into the serialised body last (objects merge recursively, other
    /// values replace, `null` removes). For what the types do not model.
    #[serde(skip)]
    pub extra_fields: Map<String, Value>,
}

impl SendBody {
    /// A body with only `type` and `payload` set.
    pub fn new(cast_type: CastType, payload: Payload) -> Self {
        Self {
            cast_type,
            device_tokens: None,
            alias_type: None,
            alias: None,
            file_id: None,
            filter: None,
            group_id: None,
            payload,
            policy: None,
            production_mode: None,
            description: None,
            mipush: None,
            mi_activity: None,
            category: None,
            channel_properties: None,
            local_properties: None,
            callback_params: None,
            receipt_url: None,
            receipt_type: None,
            extra_fields: Map::new(),
        }
    }

    /// Whether this send is task-class (see [`CastType::is_task_class`]).
    pub fn is_task_class(&self) -> bool {
        self.cast_type.is_task_class(self.file_id.is_some())
    }

    /// The JSON object that is sent (without `appkey`/`timestamp`): the typed fields in
    /// declaration order, then `extra_fields` merged in.
    pub fn to_value(&self) -> Map<String, Value> {
        let mut map = match serde_json::to_value(self) {
            Ok(Value::Object(m)) => m,
            // Serialising plain data into a `Value` cannot fail, and a struct always
            // becomes an object; keep an empty object rather than panicking.
            _ => Map::new(),
        };
        merge_into(&mut map, &self.extra_fields);
        map
    }
}

/// Merges `patch` into `target`: objects merge recursively, `null` removes the key, any
/// other value replaces (keeping the key's position when it already exists).
pub fn merge_into(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.shift_remove(k);
            }
            Value::Object(p) => match target.get_mut(k) {
                Some(Value::Object(t)) => merge_into(t, p),
                _ => {
                    let mut fresh = Map::new();
                    merge_into(&mut fresh, p);
                    target.insert(k.clone(), Value::Object(fresh));
                }
            },
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

/// The payload: its shape depends on the platform.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Payload {
    Android(AndroidPayload),
    Ios(IosPayload),
}

/// Android `display_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DisplayType {
    /// Shown by the system; body needs `title` and `text`.
    Notification,
    /// Pass-through to the app; body needs only `custom`.
    Message,
}

/// Android `after_open`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterOpen {
    GoApp,
    GoUrl,
    GoActivity,
    GoCustom,
}

impl AfterOpen {
    /// The wire name, e.g. `go_url`.
    pub fn as_str(self) -> &'static str {
        match self {
            AfterOpen::GoApp => "go_app",
            AfterOpen::GoUrl => "go_url",
            AfterOpen::GoActivity => "go_activity",
            AfterOpen::GoCustom => "go_custom",
        }
    }
}

/// Android payload: `{display_type, body, extra}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AndroidPayload {
    pub display_type: DisplayType,
    pub body: AndroidBody,
    /// Key/value pairs handed to the app (notifications).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extra: Option<Map<String, Value>>,
}

/// Android `payload.body`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AndroidBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ticker: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Drawable name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icon: Option<String>,
    /// Drawable name (camelCase on the wire).
    #[serde(rename = "largeIcon", skip_serializing_if = "Option::is_none")]
    pub large_icon: Option<String>,
    /// Image URL (http or https).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub img: Option<String>,
    /// Big picture URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expand_image: Option<String>,
    /// Raw resource name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sound: Option<String>,
    /// Custom notification style.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub builder_id: Option<i64>,
    #[serde(serialize_with = "str_bool", skip_serializing_if = "Option::is_none")]
    pub play_vibrate: Option<bool>,
    #[serde(serialize_with = "str_bool", skip_serializing_if = "Option::is_none")]
    pub play_lights: Option<bool>,
    #[serde(serialize_with = "str_bool", skip_serializing_if = "Option::is_none")]
    pub play_sound: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_open: Option<AfterOpen>,
    /// Required for `go_url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Required for `go_activity`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activity: Option<String>,
    /// String or object; required for `message` and for `go_custom`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub custom: Option<Value>,
    /// Expanded text, ≤ 120 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub big_body: Option<String>,
    /// Pro: 0 or 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub re_pop: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_badge: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub add_badge: Option<i64>,
}

/// iOS payload: `aps` plus custom keys at the payload root.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IosPayload {
    pub aps: Aps,
    /// Custom keys next to `aps` (`d` and `p` are reserved by Umeng).
    #[serde(flatten)]
    pub custom: Map<String, Value>,
}

/// The APNs `aps` dictionary.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Aps {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alert: Option<IosAlert>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub badge: Option<IosBadge>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sound: Option<String>,
    /// 1 for a silent (background) push.
    #[serde(rename = "content-available", skip_serializing_if = "Option::is_none")]
    pub content_available: Option<i64>,
    #[serde(rename = "mutable-content", skip_serializing_if = "Option::is_none")]
    pub mutable_content: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(rename = "thread-id", skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    /// `passive`, `active`, `time-sensitive` or `critical`.
    #[serde(rename = "interruption-level", skip_serializing_if = "Option::is_none")]
    pub interruption_level: Option<String>,
}

/// `aps.alert`: a string or `{title, subtitle, body}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum IosAlert {
    Text(String),
    Fields(IosAlertFields),
}

/// The dictionary form of `aps.alert`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IosAlertFields {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subtitle: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

/// `aps.badge`: a number, or a string `"N"`, `"+N"`, `"-N"`, `""`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum IosBadge {
    Number(i64),
    Text(String),
}

/// `policy`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Policy {
    /// `yyyy-MM-dd HH:mm:ss`, Beijing time; task-class only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// `yyyy-MM-dd HH:mm:ss`, Beijing time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expire_time: Option<String>,
    /// Messages per second, ≥ 1000.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_send_num: Option<i64>,
    /// Umeng's de-duplication key; task-class only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_biz_no: Option<String>,
    /// iOS only, ≤ 64 bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apns_collapse_id: Option<String>,
    /// Android: skip devices with notifications turned off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notification_closed_filter: Option<bool>,
}

impl Policy {
    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn android_unicast() -> SendBody {
        let mut b = SendBody::new(
            CastType::Unicast,
            Payload::Android(AndroidPayload {
                display_type: DisplayType::Notification,
                body: AndroidBody {
                    ticker: Some("hi".into()),
                    title: Some("hi".into()),
                    text: Some("hello".into()),
                    after_open: Some(AfterOpen::GoApp),
                    play_sound: Some(false),
                    ..Default::default()
                },
                extra: None,
            }),
        );
        b.device_tokens = Some("A".repeat(44));
        b.production_mode = Some(false);
        b
    }

    #[test]
    fn android_body_serialises_in_order_with_string_booleans() {
        let v = Value::Object(android_unicast().to_value());
        let s = serde_json::to_string(&v).unwrap();
        let expected = format!(
            r#"{{"type":"unicast","device_tokens":"{}","payload":{{"display_type":"notification","body":{{"ticker":"hi","title":"hi","text":"hello","play_sound":"false","after_open":"go_app"}}}},"production_mode":"false"}}"#,
            "A".repeat(44)
        );
        assert_eq!(s, expected);
    }

    #[test]
    fn ios_payload_puts_custom_keys_at_the_root() {
        let mut custom = Map::new();
        custom.insert("k1".into(), json!("v1"));
        let p = Payload::Ios(IosPayload {
            aps: Aps {
                alert: Some(IosAlert::Fields(IosAlertFields {
                    title: Some("t".into()),
                    subtitle: None,
                    body: Some("b".into()),
                })),
                badge: Some(IosBadge::Text("+1".into())),
                content_available: Some(1),
                interruption_level: Some("passive".into()),
                ..Default::default()
            },
            custom,
        });
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!({"aps":{"alert":{"title":"t","body":"b"},"badge":"+1","content-available":1,"interruption-level":"passive"},"k1":"v1"})
        );
    }

    #[test]
    fn extra_fields_merge_last_recursively() {
        let mut b = android_unicast();
        b.policy = Some(Policy {
            expire_time: Some("2026-12-01 09:00:00".into()),
            ..Default::default()
        });
        b.extra_fields = json!({
            "policy": {"in_app": true},
            "production_mode": "true",
            "description": null,
            "thirdparty_id": "x"
        })
        .as_object()
        .cloned()
        .unwrap();
        let v = b.to_value();
        assert_eq!(
            v["policy"],
            json!({"expire_time":"2026-12-01 09:00:00","in_app":true})
        );
        assert_eq!(v["production_mode"], json!("true"));
        assert_eq!(v["thirdparty_id"], json!("x"));
        let keys: Vec<&str> = v.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "type",
                "device_tokens",
                "payload",
                "policy",
                "production_mode",
                "thirdparty_id"
            ]
        );
    }
}
