//! Refreshing one task-class push from Umeng's `/api/status`: ask, map the status code
//! (`umeng-api.md` section 6), store it. The refresh endpoint and the poller both use this.

use crate::gateway::Gateway;
use crate::store::{PushStatus, StoreError, TaskUpdate};
use crate::umeng::UmengError;

/// Why a refresh did not store a new status.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The push's app is no longer configured, so its status call cannot be signed.
    #[error("app {0:?} is no longer configured")]
    AppGone(String),
    #[error("umeng status call failed: {0}")]
    Umeng(UmengError),
    #[error("Umeng returned unknown task status {0}")]
    UnknownStatus(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Ask Umeng about `task_id` (of push `push_id`, sent with app `app`) and store the answer.
/// Returns the status Umeng reported (a push already in a final state keeps it).
pub async fn refresh_task(
    gateway: &Gateway,
    push_id: &str,
    app: &str,
    task_id: &str,
) -> Result<PushStatus, RefreshError> {
    let runtime = gateway
        .app(app)
        .ok_or_else(|| RefreshError::AppGone(app.to_owned()))?;
    let answer = gateway
        .umeng
        .status(&runtime.credentials, task_id)
        .await
        .map_err(RefreshError::Umeng)?;
    let status = PushStatus::from_task_code(answer.status)
        .ok_or(RefreshError::UnknownStatus(answer.status))?;
    gateway
        .store
        .update_task(
            push_id,
            TaskUpdate {
                status,
                task_status: answer.data,
            },
        )
        .await?;
    Ok(status)
}
