//! End-to-end tests: the real `tollgate` binary over stdio, driven by rmcp's
//! client, on a real SQLite file per test and, when `TOLLGATE_TEST_POSTGRES`
//! is set, again on a PostgreSQL database per test (see `backend`).

#[macro_use]
extern crate tollgate;

mod browser;
mod harness;
mod http_service;
mod inproc;
mod library;

mod allowances;
mod cli_and_config;
mod concurrency;
mod crash;
mod fast_path;
mod fuzz_gate;
mod listing;
mod modes;
mod money_model;
mod scale_out;
mod shutdown;
mod slow_path;
mod soak;
mod upstreams;
mod wire;
