//! The API integration tests: one binary, one module per area.

mod app;
mod cli;
mod gateway;
mod helpers;
mod proxy;
mod push_examples;
mod reliability;
mod simulator;
mod store_contract;
mod umeng_client;
