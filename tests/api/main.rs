//! The API integration tests: one binary, one module per area.

mod app;
mod background;
mod cli;
mod gateway;
mod helpers;
mod simulator;
mod store_background;
mod store_contract;
