//! modvisor: a supervisor for local AI inference engines.
#![deny(unsafe_code)]

pub mod admission;
pub mod bounded;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dbus;
pub mod dirwatch;
pub mod export;
pub mod fdstore;
pub mod health;
pub mod host;
pub mod journal;
pub mod limits;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod objpath;
pub mod policy;
pub mod privileges;
pub mod procfs;
pub mod proxy;
pub mod reaper;
pub mod runtime;
pub mod secrets;
pub mod state;
pub mod store;
pub mod supervisor;
