//! The API integration tests: one binary, one module per area.

mod app;
mod background;
mod callbacks;
mod cli;
mod cli_ops;
mod console;
mod delivery;
mod gateway;
mod helpers;
mod input;
mod observability;
mod openapi;
mod outcomes;
mod parts;
mod process;
mod proxy;
mod push_examples;
mod quota_memory;
mod reliability;
mod simulator;
mod store_background;
mod store_callbacks;
mod store_contract;
mod store_delivery;
mod store_parts;
mod umeng_client;
