//! umeng-push-gateway: an HTTP gateway in front of Umeng U-Push.
#![forbid(unsafe_code)]

pub mod config;
pub mod push;
pub mod quota;
pub mod secret;
pub mod simulator;
pub mod store;
pub mod umeng;
