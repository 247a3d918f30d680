//! The property the fuzz target checks, shared with the seed-corpus test in `tests/api`
//! (`#[path]`-included there, so it also runs under plain `cargo test` on stable).
//!
//! The request decoder exactly as `POST /v1/pushes` runs it: bytes → JSON value →
//! object check → `PushRequest` with the failing field's path → exact numbers → `prepare`.
//! It must never panic; every rejection names a field; the fingerprint is stable through a
//! round trip; whatever `prepare` accepts passes Umeng's own validation.

use serde_json::Value;
use time::OffsetDateTime;
use umeng_push_gateway::push::{inexact_numbers, prepare, AppProfile, PushRequest};
use umeng_push_gateway::umeng::{self, Platform};

pub fn check(data: &[u8]) {
    let Ok(raw) = serde_json::from_slice::<Value>(data) else {
        return; // 400: not JSON
    };
    if !raw.is_object() {
        return; // 400: not an object
    }
    let req: PushRequest = match serde_path_to_error::deserialize(&raw) {
        Ok(r) => r,
        Err(e) => {
            // 422 naming the path, as `POST /v1/pushes` names it ("." and "" are the body).
            let path = e.path().to_string();
            let field = if path == "." || path.is_empty() {
                "(body)".to_string()
            } else {
                path
            };
            assert!(!field.is_empty());
            return;
        }
    };
    for e in inexact_numbers(data) {
        assert!(!e.field.is_empty(), "an error without a field: {e}");
    }
    let again: PushRequest =
        serde_json::from_value(serde_json::to_value(&req).expect("a request serialises"))
            .expect("a serialised request decodes");
    let now = OffsetDateTime::now_utc();
    for (platform, limit) in [(Platform::Android, 2048), (Platform::Ios, 2012)] {
        let app = AppProfile {
            name: req.app.clone(),
            platform,
            payload_limit: limit,
        };
        match prepare(&req, &app, now) {
            Ok(p) => {
                assert!(
                    umeng::validate(&p.body, platform, limit, now).is_ok(),
                    "prepare accepted what Umeng's rules refuse"
                );
                let fp = prepare(&again, &app, now).map(|a| a.fingerprint);
                assert_eq!(
                    fp.as_deref(),
                    Ok(p.fingerprint.as_str()),
                    "fingerprint unstable through a round trip"
                );
            }
            Err(errors) => {
                assert!(!errors.is_empty());
                for e in errors {
                    assert!(!e.field.is_empty(), "an error without a field: {e}");
                }
            }
        }
    }
}
