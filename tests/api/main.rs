//! The API integration tests: one binary, one module per area.

mod app;
mod gateway;
mod helpers;
mod proxy;
mod reliability;
mod simulator;
mod store_contract;
