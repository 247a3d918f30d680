//! Every push example in docs/push-request.md (fenced blocks tagged `json push`) is accepted
//! by a gateway, so the reference cannot drift from the code.

use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::app::{Backend, TestEnv, ANDROID_APP, GROUP, IOS_APP};

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/push-request.md");

/// The bodies of the fenced blocks whose info string is exactly `tag`, with their titles
/// (the nearest heading above).
fn fenced_blocks(markdown: &str, tag: &str) -> Vec<(String, String)> {
    enum State {
        Text,
        Wanted(String),
        Other,
    }
    let mut blocks = Vec::new();
    let mut heading = String::new();
    let mut state = State::Text;
    for line in markdown.lines() {
        let fence = line.trim_start().strip_prefix("```");
        state = match (state, fence) {
            (State::Text, Some(info)) if info.trim() == tag => State::Wanted(String::new()),
            (State::Text, Some(_)) => State::Other,
            (State::Text, None) => {
                if let Some(h) = line.strip_prefix('#') {
                    heading = h.trim_start_matches('#').trim().to_owned();
                }
                State::Text
            }
            (State::Wanted(text), Some(_)) => {
                blocks.push((heading.clone(), text));
                State::Text
            }
            (State::Wanted(mut text), None) => {
                text.push_str(line);
                text.push('\n');
                State::Wanted(text)
            }
            (State::Other, Some(_)) => State::Text,
            (State::Other, None) => State::Other,
        };
    }
    blocks
}

/// Renames the documentation's apps to the test apps.
fn to_test_apps(body: &mut Value) {
    let app = match body["app"].as_str() {
        Some("shop-android") => ANDROID_APP,
        Some("shop-ios") => IOS_APP,
        other => panic!("examples use shop-android or shop-ios, not {other:?}"),
    };
    body["app"] = Value::from(app);
}

/// Moves the example's policy times so that the earliest is an hour from now, keeping the
/// gaps between them and their offsets.
fn to_near_future(body: &mut Value) {
    let Some(policy) = body.get_mut("policy").and_then(Value::as_object_mut) else {
        return;
    };
    let keys = ["start_time", "expire_time"];
    let times: Vec<(&str, OffsetDateTime)> = keys
        .iter()
        .filter_map(|k| {
            let s = policy.get(*k)?.as_str()?;
            let t = OffsetDateTime::parse(s, &Rfc3339)
                .unwrap_or_else(|e| panic!("policy.{k} {s:?} is not RFC 3339: {e}"));
            Some((*k, t))
        })
        .collect();
    let Some(earliest) = times.iter().map(|(_, t)| *t).min() else {
        return;
    };
    let shift = OffsetDateTime::now_utc() + time::Duration::hours(1) - earliest;
    for (k, t) in times {
        let moved = (t + shift).to_offset(t.offset());
        policy.insert(
            k.to_owned(),
            Value::from(moved.format(&Rfc3339).expect("formats")),
        );
    }
}

#[test]
fn every_json_block_in_the_reference_is_valid_json() {
    let doc = std::fs::read_to_string(DOC).expect("docs/push-request.md");
    let blocks: Vec<(String, String)> = ["json", "json push", "json push-group"]
        .iter()
        .flat_map(|tag| fenced_blocks(&doc, tag))
        .collect();
    assert!(blocks.len() > 12, "{}", blocks.len());
    for (title, text) in blocks {
        if let Err(e) = serde_json::from_str::<Value>(&text) {
            panic!("the block under {title:?} is not JSON: {e}\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_push_example_in_the_reference_is_accepted() {
    let doc = std::fs::read_to_string(DOC).expect("docs/push-request.md");
    let examples = fenced_blocks(&doc, "json push");
    assert!(examples.len() >= 12, "{} examples", examples.len());
    let env = TestEnv::new(Backend::Sqlite).await;
    let app = env.spawn_app().await;
    let mut types_seen = std::collections::BTreeSet::new();

    for (title, text) in &examples {
        let mut body: Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("example {title:?} is not JSON: {e}"));
        to_test_apps(&mut body);
        to_near_future(&mut body);

        let response = app.post_push(&body).await;

        let status = response.status();
        let answer: Value = response.json().await.expect("JSON answer");
        assert_eq!(status, 201, "example {title:?}: {answer:#}");
        assert_eq!(answer["status"], "accepted", "example {title:?}");
        assert!(
            answer["msg_id"].is_string() || answer["task_id"].is_string(),
            "example {title:?}: {answer}"
        );
        if body.get("file_lines").is_some() {
            assert!(answer["file_id"].is_string(), "example {title:?}: {answer}");
        }
        types_seen.insert(body["type"].as_str().unwrap_or_default().to_owned());
    }

    assert_eq!(
        types_seen.into_iter().collect::<Vec<_>>(),
        [
            "broadcast",
            "customizedcast",
            "filecast",
            "groupcast",
            "listcast",
            "unicast"
        ],
        "one example per cast type at least"
    );
    assert_eq!(env.sends().len(), examples.len());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_group_example_is_accepted_on_both_platforms() {
    let doc = std::fs::read_to_string(DOC).expect("docs/push-request.md");
    let examples = fenced_blocks(&doc, "json push-group");
    assert_eq!(examples.len(), 1);
    let env = TestEnv::new(Backend::Sqlite).await;
    let app = env.spawn_app_with(env.settings_with_group()).await;
    let mut body: Value = serde_json::from_str(&examples[0].1).expect("JSON");
    assert_eq!(body["app"], "shop");
    body["app"] = Value::from(GROUP);
    let response = app.post_push(&body).await;
    assert_eq!(response.status(), 201);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["status"], "accepted", "{answer}");
    assert_eq!(answer["parts"].as_array().unwrap().len(), 2, "{answer}");
    app.stop().await;
}
