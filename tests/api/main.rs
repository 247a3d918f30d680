//! The integration test binary: one crate, one module per area.

mod helpers;
mod store_contract;
