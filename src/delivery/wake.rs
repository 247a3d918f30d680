//! Wakes a replica's delivery worker when pushes were admitted here, remembering for which
//! apps. A worker whose free slots all belong to other apps stays asleep: with one app at
//! its concurrency limit and another idle, every admission of the busy app used to wake the
//! worker into a claim that could find nothing (a write transaction per admission, which cut
//! the asynchronous intake to a third on SQLite). The busy app's pushes are claimed when one
//! of its deliveries ends and gives a slot back.

use std::collections::HashSet;
use std::sync::Mutex;

use tokio::sync::Notify;

/// See the module documentation. A wake is never lost: one that arrives while the worker
/// is claiming is kept until it next waits.
#[derive(Debug, Default)]
pub struct DeliveryWake {
    notify: Notify,
    woken: Mutex<Woken>,
}

/// The apps woken since the worker last looked.
#[derive(Debug, Default, PartialEq)]
pub struct Woken {
    /// Pushes of any app, or of several (a parent's parts, released parents).
    pub any: bool,
    /// Apps with new pushes, by configured name.
    pub apps: HashSet<String>,
}

impl Woken {
    /// Whether a claim for the apps with a free slot (`has_free`) could find one of the
    /// woken pushes.
    pub fn concerns(&self, has_free: impl Fn(&str) -> bool) -> bool {
        self.any || self.apps.iter().any(|app| has_free(app))
    }
}

impl DeliveryWake {
    /// A push of `app` was admitted.
    pub fn app(&self, app: &str) {
        {
            let mut woken = self.lock();
            if !woken.any && !woken.apps.contains(app) {
                woken.apps.insert(app.to_owned());
            }
        }
        self.notify.notify_one();
    }

    /// Pushes of any app, or of several, were admitted or released.
    pub fn any(&self) {
        self.lock().any = true;
        self.notify.notify_one();
    }

    /// Waits for the next wake (at once if one came since the last wait).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// The apps woken since the last call, forgotten here.
    pub fn take(&self) -> Woken {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Woken> {
        // The set is plain data, valid whatever a panicking holder was doing.
        self.woken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wake_names_its_app_and_is_kept_until_taken() {
        let wake = DeliveryWake::default();
        wake.app("busy");
        wake.app("busy");
        // The permit is stored: the wait returns at once.
        wake.notified().await;
        let woken = wake.take();
        assert!(!woken.concerns(|app| app == "idle"));
        assert!(woken.concerns(|app| app == "idle" || app == "busy"));
        assert_eq!(wake.take(), Woken::default(), "taken once");
    }

    #[tokio::test]
    async fn any_concerns_every_app() {
        let wake = DeliveryWake::default();
        wake.app("busy");
        wake.any();
        wake.notified().await;
        let woken = wake.take();
        assert!(woken.concerns(|app| app == "idle"));
        assert!(!Woken::default().concerns(|app| app == "idle"));
    }
}
