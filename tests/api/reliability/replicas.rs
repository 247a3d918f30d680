//! Two gateway instances on one database (PostgreSQL, and one SQLite file), hundreds of
//! concurrent mixed requests: every quota exact, no out_biz_no sent upstream twice, every
//! accepted push in history exactly once, nothing left pending.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use rand::seq::SliceRandom;
use serde_json::{json, Value};
use umeng_push_gateway::config::QuotaSettings;
use umeng_push_gateway::quota::{QuotaLimit, WindowUnit};

use super::Answer;
use crate::app::*;

on_both_backends!(two_replicas_under_mixed_concurrent_load);

/// Distinct requests (each with its own out_biz_no, except the keyless ones).
const SPECS: usize = 144;
/// How often each keyed request is sent (repeats race with the first).
const REPEATS: usize = 3;
const CONCURRENCY: usize = 48;

/// Low limits, so that every quota-limited bucket fills up during the run.
fn quotas() -> QuotaSettings {
    let day = |limit| {
        Some(QuotaLimit {
            limit,
            window: WindowUnit::Day,
        })
    };
    QuotaSettings {
        broadcast: day(3),
        groupcast: Some(QuotaLimit {
            limit: 5,
            window: WindowUnit::Minute,
        }),
        filecast: day(4),
        customizedcast_file: day(2),
    }
}

const CASTS: [&str; 7] = [
    "unicast",
    "listcast",
    "broadcast",
    "groupcast",
    "filecast",
    "customizedcast",
    "customizedcast_file",
];

fn spec_body(i: usize) -> Value {
    let app = if i % 2 == 0 { ANDROID_APP } else { IOS_APP };
    let cast = CASTS[(i / 2) % CASTS.len()];
    let production = (i / 14) % 3 != 0; // two thirds in production mode
    let mut body = if cast == "customizedcast_file" {
        let mut b = push_body(app, "customizedcast");
        b.as_object_mut().unwrap().remove("aliases");
        b["file_lines"] = json!(["u1", "u2", format!("u{}", i % 5)]);
        b
    } else {
        push_body(app, cast)
    };
    body["production_mode"] = json!(production);
    body["notification"]["text"] = json!(format!("spec {i}"));
    if i % 12 != 11 {
        body["out_biz_no"] = json!(format!("rep-{i}"));
    }
    body
}

async fn two_replicas_under_mixed_concurrent_load(backend: Backend) {
    let env = TestEnv::without_sim_quotas(backend).await;
    let mut settings = env.settings();
    for app in &mut settings.apps {
        app.quotas = quotas();
    }
    let a = env.spawn_app_with(settings.clone()).await;
    let b = env.spawn_app_with(settings).await;

    let mut jobs: Vec<(usize, Value)> = Vec::new();
    for i in 0..SPECS {
        let body = spec_body(i);
        let n = if body.get("out_biz_no").is_some() {
            REPEATS
        } else {
            1
        };
        for _ in 0..n {
            jobs.push((i, body.clone()));
        }
    }
    jobs.shuffle(&mut rand::thread_rng());
    let total = jobs.len();

    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut set = tokio::task::JoinSet::new();
    for (n, (i, body)) in jobs.into_iter().enumerate() {
        let (http, base) = if n % 2 == 0 {
            (a.http.clone(), a.base.clone())
        } else {
            (b.http.clone(), b.base.clone())
        };
        let gate = Arc::clone(&gate);
        set.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            (i, super::send(&http, &base, &body).await)
        });
    }
    let answers: Vec<(usize, Answer)> = set.join_all().await;

    // Only the documented answers.
    let mut by_status: BTreeMap<(u16, bool), usize> = BTreeMap::new();
    for (i, a) in &answers {
        assert!(
            matches!(a.status, 201 | 409 | 429),
            "spec {i}: unexpected {a:?}"
        );
        *by_status.entry((a.status, a.replayed)).or_default() += 1;
    }

    // Fresh 201s: one push each; replays point at one of them for the same request.
    let mut fresh: HashMap<String, usize> = HashMap::new();
    let mut fresh_per_spec: HashMap<usize, usize> = HashMap::new();
    for (i, a) in answers
        .iter()
        .filter(|(_, a)| a.status == 201 && !a.replayed)
    {
        let id = a.body["id"].as_str().unwrap().to_string();
        assert!(fresh.insert(id, *i).is_none(), "one id answered twice");
        *fresh_per_spec.entry(*i).or_default() += 1;
    }
    for (i, a) in answers.iter().filter(|(_, a)| a.replayed) {
        let id = a.body["id"].as_str().unwrap();
        assert_eq!(
            fresh.get(id),
            Some(i),
            "replay of spec {i} names another push"
        );
    }
    for (i, n) in &fresh_per_spec {
        if spec_body(*i).get("out_biz_no").is_some() {
            assert_eq!(*n, 1, "spec {i} admitted {n} times");
        }
    }

    // Quotas: per (appkey, kind, window), the counter equals the pushes holding a slot,
    // which is at most the limit; and per (app, kind) it equals the fresh 201s.
    let holders = env
        .db
        .query_i64(
            "select count(*) from (
               select p.appkey, p.quota_kind, p.quota_window, count(*) as n
                 from pushes p
                where p.quota_kind is not null and not p.quota_refunded
                group by 1, 2, 3) h
             full join quota_counters q
               on q.appkey = h.appkey and q.kind = h.quota_kind and q.window_start = h.quota_window
            where coalesce(q.used, 0) <> coalesce(h.n, 0)",
        )
        .await;
    assert_eq!(holders, 0, "a quota counter differs from its pushes");
    let over = env
        .db
        .query_i64(
            "select count(*) from quota_counters
              where used > case kind when 'broadcast' then 3 when 'groupcast' then 5
                                     when 'filecast' then 4 else 2 end",
        )
        .await;
    assert_eq!(over, 0, "a window over its limit");
    let mut admitted_per_bucket: HashMap<(String, String), i64> = HashMap::new();
    for i in fresh.values() {
        let body = spec_body(*i);
        if body["production_mode"] != true {
            continue;
        }
        let cast = CASTS[(i / 2) % CASTS.len()];
        let kind = match cast {
            "broadcast" | "groupcast" | "filecast" | "customizedcast_file" => cast,
            _ => continue,
        };
        *admitted_per_bucket
            .entry((body["app"].as_str().unwrap().to_string(), kind.to_string()))
            .or_default() += 1;
    }
    for ((app, kind), n) in &admitted_per_bucket {
        let appkey = if app == ANDROID_APP {
            ANDROID_KEY
        } else {
            IOS_KEY
        };
        let used = env
            .db
            .query_i64(&format!(
                "select coalesce(sum(used), 0) from quota_counters
                  where appkey = '{appkey}' and kind = '{kind}'"
            ))
            .await;
        assert_eq!(used, *n, "{app} {kind}: used {used}, admitted {n}");
    }
    let rate_limited = by_status.get(&(429, false)).copied().unwrap_or(0);
    assert!(rate_limited > 0, "the quotas were exercised");

    // Upstream: every send accepted, one per fresh 201, no out_biz_no twice.
    let sends = env.sends();
    assert!(sends.iter().all(|r| r.ret.as_deref() == Some("SUCCESS")));
    assert_eq!(
        sends.len(),
        fresh.len(),
        "one upstream send per admitted push"
    );
    let mut biz = HashSet::new();
    for r in &sends {
        if let Some(k) = &r.out_biz_no {
            assert!(biz.insert((r.appkey.clone(), k.clone())), "{k} sent twice");
        }
    }

    // History: every accepted push exactly once, with the id Umeng gave; nothing pending.
    let mut history: HashMap<String, String> = HashMap::new();
    let mut cursor: Option<String> = None;
    for _ in 0..100 {
        let path = match &cursor {
            Some(c) => format!("/v1/pushes?limit=200&cursor={c}"),
            None => "/v1/pushes?limit=200".to_string(),
        };
        let page = a.get_json(&path).await;
        for item in page["items"].as_array().unwrap() {
            let umeng_id = item["msg_id"]
                .as_str()
                .or(item["task_id"].as_str())
                .unwrap_or_default()
                .to_string();
            assert_eq!(item["status"], "accepted", "{item}");
            let id = item["id"].as_str().unwrap().to_string();
            assert!(history.insert(id, umeng_id).is_none(), "listed twice");
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(history.len(), fresh.len());
    let upstream_ids: HashSet<String> = sends.iter().filter_map(|r| r.result_id.clone()).collect();
    let history_ids: HashSet<String> = history.values().cloned().collect();
    assert_eq!(
        history_ids.len(),
        history.len(),
        "an Umeng id recorded twice"
    );
    assert_eq!(upstream_ids, history_ids);
    for id in fresh.keys() {
        assert!(history.contains_key(id), "{id} missing from history");
    }
    assert_eq!(
        env.db
            .query_i64("select count(*) from pushes where status = 'pending'")
            .await,
        0
    );
    assert_eq!(env.db.idle_in_transaction().await, 0);
    eprintln!(
        "replicas {backend:?}: {total} requests ({SPECS} distinct), answers {by_status:?}, \
         {} accepted upstream",
        sends.len()
    );
}
