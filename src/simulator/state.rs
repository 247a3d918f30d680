//! The simulator's memory: apps, recorded requests, faults, uploaded files, tasks, quota
//! counters and `out_biz_no` keys, and the Umeng operations on them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use super::faults;
use super::validate::{self, ApiError, Bucket};
use super::{Fault, FaultKind, RecordedRequest, SimPlatform, SimulatorConfig};

/// Recorded requests kept; older ones are forgotten first.
const MAX_RECORDS: usize = 10_000;
/// Recorded bodies longer than this are cut (uploads may be 10 MB).
const MAX_RECORDED_BODY: usize = 1024 * 1024;

pub(crate) struct AppEntry {
    pub secret: String,
    pub platform: SimPlatform,
}

pub(crate) struct State {
    pub base_url: String,
    pub apps: HashMap<String, AppEntry>,
    pub task_step: Duration,
    pub timestamp_window: Duration,
    pub quotas: bool,
    pub upload_limit_bytes: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_seq: u64,
    next_id: u64,
    records: VecDeque<RecordedRequest>,
    faults: Vec<Fault>,
    /// file_id → (appkey, number of entries).
    files: HashMap<String, (String, u64)>,
    tasks: HashMap<String, Task>,
    /// (appkey, bucket) → (window start, accepted sends in it).
    quota: HashMap<(String, Bucket), (i64, u32)>,
    /// (appkey, out_biz_no) → task_id.
    biz: HashMap<(String, String), String>,
}

struct Task {
    appkey: String,
    platform: SimPlatform,
    created: OffsetDateTime,
    start_at: Option<OffsetDateTime>,
    expire_at: Option<OffsetDateTime>,
    audience: u64,
    nobody: bool,
    cancelled_at: Option<OffsetDateTime>,
}

/// Where a task is at some instant (§6).
struct Snapshot {
    status: u8,
    /// Devices reached so far.
    reached: u64,
}

impl Task {
    fn snapshot_at(&self, at: OffsetDateTime, step: Duration) -> Snapshot {
        let snap = self.progress_at(at, step);
        match self.expire_at {
            // §6 status 5: the message expired before it was fully sent.
            Some(expire) if at >= expire && matches!(snap.status, 0 | 1 | 7) => Snapshot {
                status: 5,
                reached: self.progress_at(expire, step).reached,
            },
            _ => snap,
        }
    }

    fn progress_at(&self, at: OffsetDateTime, step: Duration) -> Snapshot {
        let begin = self.start_at.unwrap_or(self.created);
        if at < begin {
            return Snapshot {
                status: 7,
                reached: 0,
            };
        }
        let elapsed = (at - begin).as_seconds_f64();
        let step = step.as_secs_f64();
        if elapsed < step {
            Snapshot {
                status: 0,
                reached: 0,
            }
        } else if elapsed < 2.0 * step {
            let progress = ((elapsed - step) / step).clamp(0.0, 1.0);
            Snapshot {
                status: 1,
                reached: ((self.audience as f64) * progress) as u64,
            }
        } else if self.nobody {
            Snapshot {
                status: 6,
                reached: 0,
            }
        } else {
            Snapshot {
                status: 2,
                reached: self.audience,
            }
        }
    }

    fn snapshot(&self, now: OffsetDateTime, step: Duration) -> Snapshot {
        match self.cancelled_at {
            Some(at) => Snapshot {
                status: 4,
                reached: self.snapshot_at(at, step).reached,
            },
            None => self.snapshot_at(now, step),
        }
    }
}

/// Start (epoch seconds) of the Beijing-time calendar window of `unit` seconds holding `t`.
fn window_start(t: i64, unit: i64) -> i64 {
    let offset = i64::from(validate::BEIJING.whole_seconds());
    (t + offset).div_euclid(unit) * unit - offset
}

fn obj_str(obj: &Map<String, Value>, key: &str) -> Option<String> {
    obj.get(key).and_then(Value::as_str).map(str::to_owned)
}

impl State {
    pub(crate) fn new(config: &SimulatorConfig, base_url: String) -> Self {
        let apps = config
            .apps
            .iter()
            .map(|a| {
                (
                    a.appkey.clone(),
                    AppEntry {
                        secret: a.secret.clone(),
                        platform: a.platform,
                    },
                )
            })
            .collect();
        State {
            base_url,
            apps,
            task_step: config.task_step,
            timestamp_window: config.timestamp_window,
            quotas: config.quotas,
            upload_limit_bytes: config.upload_limit_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters to a simulator, so a poisoned lock is used as is.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a request on arrival; returns its seq. Fields are read best-effort.
    pub(crate) fn record_arrival(&self, path: &str, sign: Option<String>, raw: &[u8]) -> u64 {
        let parsed: Option<Map<String, Value>> = serde_json::from_slice(raw).ok();
        let body = if raw.len() > MAX_RECORDED_BODY {
            format!(
                "{}…[cut, {} bytes in all]",
                String::from_utf8_lossy(&raw[..MAX_RECORDED_BODY]),
                raw.len()
            )
        } else {
            String::from_utf8_lossy(raw).into_owned()
        };
        let (appkey, cast_type, out_biz_no, production_mode) = match &parsed {
            Some(o) => (
                obj_str(o, "appkey"),
                obj_str(o, "type"),
                o.get("policy")
                    .and_then(Value::as_object)
                    .and_then(|p| obj_str(p, "out_biz_no")),
                o.get("production_mode").map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => format!("json:{other}"),
                }),
            ),
            None => (None, None, None, None),
        };
        let mut inner = self.lock();
        inner.next_seq += 1;
        let seq = inner.next_seq;
        inner.records.push_back(RecordedRequest {
            seq,
            path: path.to_owned(),
            sign,
            body,
            appkey,
            cast_type,
            out_biz_no,
            production_mode,
            http_status: 0,
            ret: None,
            error_code: None,
            result_id: None,
            fault: None,
        });
        if inner.records.len() > MAX_RECORDS {
            let excess = inner.records.len() - MAX_RECORDS;
            inner.records.drain(..excess);
        }
        seq
    }

    /// Fills in what was answered to request `seq`.
    pub(crate) fn record_outcome(&self, seq: u64, update: impl FnOnce(&mut RecordedRequest)) {
        let mut inner = self.lock();
        if let Some(r) = inner.records.iter_mut().rev().find(|r| r.seq == seq) {
            update(r);
        }
    }

    pub(crate) fn requests(&self, appkey: Option<&str>) -> Vec<RecordedRequest> {
        self.lock()
            .records
            .iter()
            .filter(|r| appkey.is_none_or(|a| r.appkey.as_deref() == Some(a)))
            .cloned()
            .collect()
    }

    pub(crate) fn clear_requests(&self) {
        self.lock().records.clear();
    }

    pub(crate) fn add_fault(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    pub(crate) fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    pub(crate) fn faults(&self) -> Vec<Fault> {
        self.lock().faults.clone()
    }

    pub(crate) fn take_fault(&self, appkey: Option<&str>, path: &str) -> Option<FaultKind> {
        faults::take_fault(&mut self.lock().faults, appkey, path)
    }

    /// A fresh id: prefix + 13 digits of epoch milliseconds + `counter_digits` digits of a
    /// counter, e.g. `uu` + 20 digits (§1.3).
    fn new_id(inner: &mut Inner, prefix: &str, counter_digits: u32, now: OffsetDateTime) -> String {
        inner.next_id += 1;
        let millis = (now.unix_timestamp_nanos() / 1_000_000).rem_euclid(10_000_000_000_000);
        let counter = inner.next_id % 10u64.pow(counter_digits);
        format!(
            "{prefix}{millis:013}{counter:0width$}",
            width = counter_digits as usize
        )
    }

    /// `/api/send` after the common checks (§3, §4, §7).
    pub(crate) fn send(
        &self,
        appkey: &str,
        platform: SimPlatform,
        body: &Map<String, Value>,
        now: OffsetDateTime,
    ) -> Result<(Value, String), ApiError> {
        let mut inner = self.lock();
        let plan = {
            let files = &inner.files;
            let lookup = |file_id: &str| match files.get(file_id) {
                Some((owner, entries)) if owner == appkey => Some(*entries),
                _ => None,
            };
            validate::validate_send(body, platform, now, &lookup)?
        };
        if !plan.task {
            let id = Self::new_id(&mut inner, plan.prefix, 7, now);
            return Ok((json!({ "msg_id": id }), id));
        }
        // §3.4 / §10 q8 (our assumption; the real behaviour is undocumented): a task-class
        // send repeating an out_biz_no already accepted for this appkey creates no new task,
        // takes no quota and answers SUCCESS with the original task_id.
        if let Some(biz) = &plan.out_biz_no {
            if let Some(task_id) = inner.biz.get(&(appkey.to_owned(), biz.clone())) {
                let task_id = task_id.clone();
                return Ok((json!({ "task_id": task_id }), task_id));
            }
        }
        // §7: production only, per appkey, calendar windows in Beijing time; only accepted
        // sends count.
        if let (true, true, Some(bucket)) = (self.quotas, plan.production, plan.bucket) {
            let (limit, unit) = bucket.limit();
            let start = window_start(now.unix_timestamp(), unit);
            let slot = inner
                .quota
                .entry((appkey.to_owned(), bucket))
                .or_insert((start, 0));
            if slot.0 != start {
                *slot = (start, 0);
            }
            if slot.1 >= limit {
                return Err(ApiError::new("2050", "send frequency limit exceeded"));
            }
            slot.1 += 1;
        }
        let id = Self::new_id(&mut inner, plan.prefix, 7, now);
        inner.tasks.insert(
            id.clone(),
            Task {
                appkey: appkey.to_owned(),
                platform,
                created: now,
                start_at: plan.start_at,
                expire_at: plan.expire_at,
                audience: plan.audience,
                nobody: plan.nobody,
                cancelled_at: None,
            },
        );
        if let Some(biz) = plan.out_biz_no {
            inner.biz.insert((appkey.to_owned(), biz), id.clone());
        }
        Ok((json!({ "task_id": id }), id))
    }

    fn task_id(body: &Map<String, Value>) -> Result<&str, ApiError> {
        match body.get("task_id") {
            Some(Value::String(s)) if !s.is_empty() => Ok(s),
            _ => Err(ApiError::new("2053", "task_id is missing")),
        }
    }

    /// `/api/status` (§1.4, §6).
    pub(crate) fn status(
        &self,
        appkey: &str,
        body: &Map<String, Value>,
        now: OffsetDateTime,
    ) -> Result<(Value, String), ApiError> {
        let task_id = Self::task_id(body)?;
        let inner = self.lock();
        let task = inner
            .tasks
            .get(task_id)
            .filter(|t| t.appkey == appkey)
            .ok_or_else(|| ApiError::new("1014", "task_id not found"))?;
        let snap = task.snapshot(now, self.task_step);
        let n = snap.reached;
        let data = match task.platform {
            SimPlatform::Android => json!({
                "task_id": task_id,
                "status": snap.status,
                "sent_count": n,
                "open_count": n * 3 / 10,
                "dismiss_count": n / 10,
            }),
            SimPlatform::Ios => json!({
                "task_id": task_id,
                "status": snap.status,
                "total_count": n,
                "sent_count": n * 98 / 100,
                "open_count": n / 5,
            }),
        };
        Ok((data, task_id.to_owned()))
    }

    /// `/api/cancel` (§1.4): Android while 0/1/7, iOS while 0/7; else 1028.
    pub(crate) fn cancel(
        &self,
        appkey: &str,
        body: &Map<String, Value>,
        now: OffsetDateTime,
    ) -> Result<(Value, String), ApiError> {
        let task_id = Self::task_id(body)?;
        let step = self.task_step;
        let mut inner = self.lock();
        let task = inner
            .tasks
            .get_mut(task_id)
            .filter(|t| t.appkey == appkey)
            .ok_or_else(|| ApiError::new("1014", "task_id not found"))?;
        let status = task.snapshot(now, step).status;
        let cancellable = match task.platform {
            SimPlatform::Android => matches!(status, 0 | 1 | 7),
            SimPlatform::Ios => matches!(status, 0 | 7),
        };
        if !cancellable {
            return Err(ApiError::new(
                "1028",
                format!("task cannot be cancelled in status {status}"),
            ));
        }
        task.cancelled_at = Some(now);
        Ok((json!({ "task_id": task_id }), task_id.to_owned()))
    }

    /// `/upload` (§1.4): `content` required (2029), at most `upload_limit_bytes` (2038).
    pub(crate) fn upload(
        &self,
        appkey: &str,
        body: &Map<String, Value>,
        now: OffsetDateTime,
    ) -> Result<(Value, String), ApiError> {
        let content = match body.get("content") {
            Some(Value::String(s)) if !s.trim().is_empty() => s,
            _ => return Err(ApiError::new("2029", "content is missing")),
        };
        if content.len() > self.upload_limit_bytes {
            return Err(ApiError::new(
                "2038",
                format!(
                    "upload failed: content is larger than {} bytes",
                    self.upload_limit_bytes
                ),
            ));
        }
        let entries = content.lines().filter(|l| !l.trim().is_empty()).count() as u64;
        let mut inner = self.lock();
        let id = Self::new_id(&mut inner, "PF", 5, now);
        inner.files.insert(id.clone(), (appkey.to_owned(), entries));
        Ok((json!({ "file_id": id }), id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beijing_windows() {
        // 2023-11-14T15:59:59Z is 23:59:59 in Beijing.
        let t = 1_699_977_599;
        assert_eq!(window_start(t, 86_400), 1_699_891_200);
        assert_eq!(window_start(t + 1, 86_400), t + 1);
        assert_eq!(window_start(t, 60), t - 59);
    }

    #[test]
    fn task_moves_through_statuses() {
        let created = OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1_000);
        let step = Duration::from_secs(10);
        let task = Task {
            appkey: "k".into(),
            platform: SimPlatform::Android,
            created,
            start_at: Some(created + time::Duration::seconds(5)),
            expire_at: Some(created + time::Duration::seconds(100)),
            audience: 100,
            nobody: false,
            cancelled_at: None,
        };
        let at = |s: i64| task.snapshot(created + time::Duration::seconds(s), step);
        assert_eq!(at(1).status, 7);
        assert_eq!(at(6).status, 0);
        let mid = at(20);
        assert_eq!((mid.status, mid.reached), (1, 50));
        let done = at(26);
        assert_eq!((done.status, done.reached), (2, 100));
        assert_eq!(at(200).status, 2);
        let late = Task {
            start_at: None,
            expire_at: Some(created + time::Duration::seconds(15)),
            ..task
        };
        let expired = late.snapshot(created + time::Duration::seconds(19), step);
        assert_eq!((expired.status, expired.reached), (5, 50));
    }
}
