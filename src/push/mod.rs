//! The simplified push request callers POST, its validation, its fingerprint, and its
//! translation to an Umeng send body.

pub mod fanout;
pub mod numbers;
pub mod prepare;
pub mod request;

pub use numbers::inexact_numbers;
pub use prepare::{
    fingerprint, prepare, AppProfile, GatewayFields, PreparedPush, MAX_OUT_BIZ_NO_LEN,
    MAX_UPLOAD_BYTES,
};
pub use request::{
    AndroidOptions, Badge, DeviceTokens, IosOptions, Message, Notification, OnQuotaExhausted, Open,
    PushPolicy, PushRequest, TokensByPlatform,
};
