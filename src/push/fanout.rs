//! Planning a push that becomes several Umeng calls: one request to an app group (a part
//! per member app, each rendered for its platform), and lists longer than Umeng's 500 per
//! call (`listcast` tokens, `customizedcast` aliases) split into parts of at most 500.
//!
//! The plan is pure: each part is an ordinary one-app [`PushRequest`] that
//! [`super::prepare`] validates and translates; errors it finds are renamed to the
//! caller's paths (`device_tokens.ios[512]`).

use std::collections::HashSet;

use super::request::{DeviceTokens, PushRequest};
use super::AppProfile;
use crate::umeng::{CastType, FieldError, Platform};

/// Most tokens or aliases in one Umeng call.
pub const PART_LIST_MAX: usize = 500;

/// One part of the plan.
#[derive(Debug, Clone)]
pub struct PartPlan {
    /// Index of the member app (in the members given to [`plan`]).
    pub member: usize,
    /// 1, 2, ... in plan order (members in order, then list chunks in order).
    pub part_no: u32,
    /// The one-app request for this part.
    pub request: PushRequest,
    /// Tokens or aliases it addresses (`None`: a filter, or the whole app).
    pub audience: Option<u32>,
    /// Where the part's list starts in the caller's request: `(path, offset)`, e.g.
    /// `("device_tokens.ios", 500)`.
    pub list: Option<(String, usize)>,
}

/// Whether a one-app request needs splitting (its list is longer than one call takes).
pub fn needs_split(req: &PushRequest) -> bool {
    let tokens = req
        .device_tokens
        .as_ref()
        .and_then(DeviceTokens::as_list)
        .map_or(0, Vec::len);
    let aliases = req.aliases.as_ref().map_or(0, Vec::len);
    (req.cast_type == CastType::Listcast && tokens > PART_LIST_MAX)
        || (req.cast_type == CastType::Customizedcast && aliases > PART_LIST_MAX)
}

/// Plans the parts of `req` for `members` (an app group's member apps, or the one app of
/// a request that needs splitting). `group` says whether `req.app` named a group.
pub fn plan(
    req: &PushRequest,
    group: bool,
    members: &[&AppProfile],
    max_audience: u32,
) -> Result<Vec<PartPlan>, Vec<FieldError>> {
    let mut errors = Vec::new();
    if group {
        check_group_request(req, members, &mut errors);
    }
    let audience: usize = match &req.device_tokens {
        Some(DeviceTokens::List(list)) => list.len(),
        Some(DeviceTokens::ByPlatform(by)) => {
            by.android.as_ref().map_or(0, Vec::len) + by.ios.as_ref().map_or(0, Vec::len)
        }
        None => 0,
    } + req.aliases.as_ref().map_or(0, Vec::len) * members.len().max(1);
    if audience > max_audience as usize {
        let field = if req.aliases.is_some() {
            "aliases"
        } else {
            "device_tokens"
        };
        errors.push(FieldError::new(
            field,
            format!(
                "addresses {audience} recipients; one request takes at most {max_audience} \
                 (delivery.max_audience); for more, use file_lines"
            ),
        ));
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let mut parts = Vec::new();
    for (member, app) in members.iter().enumerate() {
        let mut base = req.clone();
        base.app = app.name.clone();
        // A platform's own block goes to its platform's part only.
        match app.platform {
            Platform::Android => base.ios = None,
            Platform::Ios => base.android = None,
        }
        // Callbacks and idempotency are the parent's; each part's Umeng key is derived.
        base.callback_url = None;
        base.out_biz_no = None;
        let (path, list) = match (&req.device_tokens, &req.aliases) {
            (Some(DeviceTokens::ByPlatform(by)), _) => match by.get(app.platform) {
                Some(list) => (
                    format!("device_tokens.{}", app.platform.as_str()),
                    Some(list),
                ),
                // No tokens for this platform: no part for it.
                None => continue,
            },
            (Some(DeviceTokens::List(list)), _) => ("device_tokens".to_owned(), Some(list)),
            (None, Some(aliases)) => ("aliases".to_owned(), Some(aliases)),
            (None, None) => (String::new(), None),
        };
        let Some(list) = list else {
            parts.push(PartPlan {
                member,
                part_no: 0,
                request: base,
                audience: None,
                list: None,
            });
            continue;
        };
        let chunks: Vec<&[String]> = if list.is_empty() {
            // Left to prepare, which names the empty list.
            vec![&list[..]]
        } else {
            list.chunks(PART_LIST_MAX).collect()
        };
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut request = base.clone();
            if req.aliases.is_some() && req.device_tokens.is_none() {
                request.aliases = Some(chunk.to_vec());
            } else {
                request.device_tokens = Some(DeviceTokens::List(chunk.to_vec()));
            }
            parts.push(PartPlan {
                member,
                part_no: 0,
                request,
                audience: Some(u32::try_from(chunk.len()).unwrap_or(u32::MAX)),
                list: Some((path.clone(), i * PART_LIST_MAX)),
            });
        }
    }
    if parts.is_empty() {
        return Err(vec![FieldError::new(
            "device_tokens",
            "gives no tokens for any platform of the group",
        )]);
    }
    for (i, part) in parts.iter_mut().enumerate() {
        part.part_no = u32::try_from(i + 1).unwrap_or(u32::MAX);
    }
    Ok(parts)
}

/// What a request to an app group may not contain: sends bound to one app's audience
/// (`filecast`, `file_id`/`file_lines`, `group_id`), one token list for two platforms,
/// and raw Umeng fields (platform-specific) when the group spans platforms.
fn check_group_request(req: &PushRequest, members: &[&AppProfile], errors: &mut Vec<FieldError>) {
    let why =
        "cannot fan out to an app group: it names one app's own audience; send it to each app";
    match req.cast_type {
        CastType::Filecast => errors.push(FieldError::new(
            "type",
            "filecast cannot fan out to an app group: a file of device tokens belongs to one app; send it to each app",
        )),
        CastType::Unicast | CastType::Listcast => {
            if let Some(DeviceTokens::List(_)) = &req.device_tokens {
                errors.push(FieldError::new(
                    "device_tokens",
                    "for an app group, give the tokens keyed by platform: {\"android\": [...], \"ios\": [...]}",
                ));
            }
            if let Some(DeviceTokens::ByPlatform(by)) = &req.device_tokens {
                for platform in [Platform::Android, Platform::Ios] {
                    if by.get(platform).is_some() && !members.iter().any(|m| m.platform == platform) {
                        errors.push(FieldError::new(
                            format!("device_tokens.{}", platform.as_str()),
                            format!("the group has no {} app", platform.as_str()),
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    for (field, set) in [
        ("file_id", req.file_id.is_some()),
        ("file_lines", req.file_lines.is_some()),
        ("group_id", req.group_id.is_some()),
    ] {
        if set {
            errors.push(FieldError::new(field, why));
        }
    }
    let platforms: HashSet<Platform> = members.iter().map(|m| m.platform).collect();
    if req.umeng.is_some() && platforms.len() > 1 {
        errors.push(FieldError::new(
            "umeng",
            "raw Umeng fields are platform-specific and cannot fan out to both platforms; use the android and ios blocks, or send to each app",
        ));
    }
}

/// Renames an error `prepare` found in a part to the caller's path: a list index gains the
/// part's offset (`device_tokens[3]` of the second part of `device_tokens.ios` becomes
/// `device_tokens.ios[503]`); an error in a shared field of a group's part names the app.
pub fn caller_error(e: FieldError, part: &PartPlan, app: &str, group: bool) -> FieldError {
    if let Some((path, offset)) = &part.list {
        let root = if path.starts_with("device_tokens") {
            "device_tokens"
        } else {
            "aliases"
        };
        if let Some(rest) = e.field.strip_prefix(root) {
            if let Some(index) = rest
                .strip_prefix('[')
                .and_then(|r| r.split_once(']'))
                .and_then(|(n, tail)| n.parse::<usize>().ok().map(|n| (n, tail)))
            {
                return FieldError::new(
                    format!("{path}[{}]{}", index.0 + offset, index.1),
                    e.message,
                );
            }
            if rest.is_empty() {
                return FieldError::new(path.clone(), e.message);
            }
        }
    }
    if group {
        FieldError::new(e.field, format!("{} (app {app})", e.message))
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn profile(name: &str, platform: Platform) -> AppProfile {
        AppProfile {
            name: name.into(),
            platform,
            payload_limit: 4096,
        }
    }

    fn req(v: serde_json::Value) -> PushRequest {
        serde_json::from_value(v).expect("valid request")
    }

    #[test]
    fn a_long_list_splits_into_parts_of_500() {
        let tokens: Vec<String> = (0..1200).map(|i| format!("t{i}")).collect();
        let r = req(json!({"app": "a", "type": "listcast", "device_tokens": tokens}));
        assert!(needs_split(&r));
        let a = profile("a", Platform::Android);
        let parts = plan(&r, false, &[&a], 10_000).unwrap();
        let sizes: Vec<_> = parts.iter().map(|p| p.audience).collect();
        assert_eq!(sizes, [Some(500), Some(500), Some(200)]);
        assert_eq!(parts[2].list, Some(("device_tokens".into(), 1000)));
        assert_eq!(
            parts[2]
                .request
                .device_tokens
                .as_ref()
                .and_then(DeviceTokens::as_list)
                .unwrap()[0],
            "t1000"
        );
        assert_eq!(
            parts.iter().map(|p| p.part_no).collect::<Vec<_>>(),
            [1, 2, 3]
        );
    }

    #[test]
    fn a_group_gets_a_part_per_platform_with_its_own_block() {
        let r = req(json!({"app": "g", "type": "broadcast",
            "notification": {"title": "t", "text": "x"},
            "android": {"icon": "i"}, "ios": {"category": "c"}, "out_biz_no": "k1",
            "callback_url": "https://cb/x"}));
        let (a, i) = (profile("a", Platform::Android), profile("i", Platform::Ios));
        let parts = plan(&r, true, &[&a, &i], 10_000).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].request.app, "a");
        assert!(parts[0].request.ios.is_none() && parts[0].request.android.is_some());
        assert!(parts[1].request.android.is_none() && parts[1].request.ios.is_some());
        assert!(parts
            .iter()
            .all(|p| p.request.out_biz_no.is_none() && p.request.callback_url.is_none()));
    }

    #[test]
    fn group_tokens_are_keyed_by_platform() {
        let (a, i) = (profile("a", Platform::Android), profile("i", Platform::Ios));
        let r = req(json!({"app": "g", "type": "unicast", "device_tokens": ["x"]}));
        let e = plan(&r, true, &[&a, &i], 10_000).unwrap_err();
        assert_eq!(e[0].field, "device_tokens");
        let r = req(json!({"app": "g", "type": "unicast", "device_tokens": {"ios": ["y"]}}));
        let parts = plan(&r, true, &[&a, &i], 10_000).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].request.app, "i");
        let e = plan(&r, true, &[&a], 10_000).unwrap_err();
        assert_eq!(e[0].field, "device_tokens.ios");
    }

    #[test]
    fn what_cannot_fan_out_is_refused_by_name() {
        let (a, i) = (profile("a", Platform::Android), profile("i", Platform::Ios));
        for (body, field) in [
            (
                json!({"app": "g", "type": "filecast", "file_id": "f"}),
                "type",
            ),
            (
                json!({"app": "g", "type": "groupcast", "group_id": "x"}),
                "group_id",
            ),
            (
                json!({"app": "g", "type": "customizedcast", "alias_type": "t", "file_lines": ["a"]}),
                "file_lines",
            ),
            (
                json!({"app": "g", "type": "broadcast", "umeng": {"x": 1}}),
                "umeng",
            ),
        ] {
            let e = plan(&req(body), true, &[&a, &i], 10_000).unwrap_err();
            assert!(e.iter().any(|e| e.field == field), "{field}: {e:?}");
        }
    }

    #[test]
    fn the_audience_is_bounded() {
        let tokens: Vec<String> = (0..1001).map(|i| format!("t{i}")).collect();
        let r = req(json!({"app": "a", "type": "listcast", "device_tokens": tokens}));
        let a = profile("a", Platform::Android);
        let e = plan(&r, false, &[&a], 1000).unwrap_err();
        assert_eq!(e[0].field, "device_tokens");
        assert!(e[0].message.contains("at most 1000"), "{}", e[0].message);
    }

    #[test]
    fn part_errors_get_the_callers_path() {
        let tokens: Vec<String> = (0..600).map(|i| format!("t{i}")).collect();
        let r = req(json!({"app": "g", "type": "listcast", "device_tokens": {"ios": tokens}}));
        let i = profile("i", Platform::Ios);
        let parts = plan(&r, true, &[&i], 10_000).unwrap();
        let e = caller_error(
            FieldError::new("device_tokens[3]", "bad"),
            &parts[1],
            "i",
            true,
        );
        assert_eq!(e.field, "device_tokens.ios[503]");
        let e = caller_error(
            FieldError::new("notification.text", "missing"),
            &parts[0],
            "i",
            true,
        );
        assert_eq!(
            (e.field.as_str(), e.message.as_str()),
            ("notification.text", "missing (app i)")
        );
    }
}
