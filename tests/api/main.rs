//! The API integration tests: one binary, one module per area.

mod app;
mod gateway;
mod helpers;
mod observability;
mod openapi;
mod process;
mod simulator;
mod store_contract;
