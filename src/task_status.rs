//! Refreshing one task-class push from Umeng's `/api/status`: ask, map the status code
//! (`umeng-api.md` section 6), store it. The refresh endpoint and the poller both use this.

use time::OffsetDateTime;

use crate::gateway::Gateway;
use crate::store::{PushStatus, StoreError, TaskUpdate};
use crate::umeng::UmengError;

/// Umeng error codes of `/api/status` that say the task itself does not exist, whoever
/// asks: 1014 "task_id not found" and the old 2005 "message does not exist". They end
/// polling with `task_lost`. Every other error (auth, signature, IP allow-list, internal
/// errors, codes this table does not know) may be local or passing and is retried.
pub const TASK_LOST_CODES: [&str; 2] = ["1014", "2005"];

/// Why a refresh did not store a new status.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The push's app is not configured here (or with another appkey than the push was
    /// sent with), so its status call cannot be signed. Another replica may have it.
    #[error("app {0:?} is not configured here with the appkey the push was sent with")]
    AppGone(String),
    #[error("umeng status call failed: {0}")]
    Umeng(UmengError),
    #[error("Umeng returned unknown task status {0}")]
    UnknownStatus(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The task to refresh, as the caller read it.
#[derive(Debug, Clone, Copy)]
pub struct TaskRef<'a> {
    pub push_id: &'a str,
    /// The configured app name the push was sent with.
    pub app: &'a str,
    /// The appkey the push was sent with: the status call must be signed for the same one.
    pub appkey: &'a str,
    pub task_id: &'a str,
    /// The push's `task_checked_at` as read (orders the write: [`TaskUpdate`]).
    pub seen_checked_at: Option<OffsetDateTime>,
    /// The poller's claim number (fences the write), `None` outside the poller.
    pub claim: Option<u32>,
}

/// What a refresh learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refreshed {
    /// The status Umeng reported (`task_lost` when Umeng does not know the task).
    pub status: PushStatus,
    /// Whether it was stored: false when the stored state is newer (a later answer, a final
    /// state) or, for the poller, when its claim was superseded.
    pub stored: bool,
}

/// Ask Umeng about `task.task_id` and store the answer if it is newer than the stored one.
pub async fn refresh_task(gateway: &Gateway, task: TaskRef<'_>) -> Result<Refreshed, RefreshError> {
    let runtime = gateway
        .app(task.app)
        .filter(|a| a.credentials.appkey == task.appkey)
        .ok_or_else(|| RefreshError::AppGone(task.app.to_owned()))?;
    let (status, task_status) = match gateway
        .umeng
        .status(&runtime.credentials, task.task_id)
        .await
    {
        Ok(answer) => (
            PushStatus::from_task_code(answer.status)
                .ok_or(RefreshError::UnknownStatus(answer.status))?,
            answer.data,
        ),
        Err(UmengError::Fail { code, message, .. }) if TASK_LOST_CODES.contains(&code.as_str()) => {
            (
                PushStatus::TaskLost,
                serde_json::json!({"error_code": code, "error_msg": message}),
            )
        }
        Err(e) => return Err(RefreshError::Umeng(e)),
    };
    let stored = gateway
        .store
        .update_task(
            task.push_id,
            TaskUpdate {
                status,
                task_status,
                seen_checked_at: task.seen_checked_at,
                claim: task.claim,
            },
        )
        .await?;
    Ok(Refreshed { status, stored })
}
