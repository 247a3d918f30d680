//! The reliability suite's fast parts (issue 5): upstream faults through a TCP proxy,
//! replicas sharing one database, database outages, hostile input. The slow and
//! destructive parts (crash of a child process, fuzzing, schemathesis, the log grep) are
//! `#[ignore]`d here or live in `reliability/run.sh`; `RELIABILITY.md` has the figures.

mod async_delivery;
mod bad_input;
mod bounds;
mod crash;
mod faults;
mod figures;
#[path = "../../../fuzz/src/check.rs"]
mod fuzz_check;
mod fuzz_seeds;
mod outage;
mod replicas;

use serde_json::Value;

use crate::app::{TestApp, TOKEN_SENDER};

/// One answer: status, whether it was a replay, and the JSON body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub replayed: bool,
    pub content_type: String,
    pub body: Value,
}

pub async fn send(http: &reqwest::Client, base: &str, body: &Value) -> Answer {
    let r = http
        .post(format!("{base}/v1/pushes"))
        .bearer_auth(TOKEN_SENDER)
        .json(body)
        .send()
        .await
        .expect("gateway answers");
    answer(r).await
}

pub async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status().as_u16();
    let replayed = r.headers().get("idempotent-replayed").is_some();
    let content_type = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = r.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        replayed,
        content_type,
        body,
    }
}

impl TestApp {
    pub async fn send(&self, body: &Value) -> Answer {
        send(&self.http, &self.base, body).await
    }
}
