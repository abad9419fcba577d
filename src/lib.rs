//! modvisor: a supervisor for local AI inference engines.
#![deny(unsafe_code)]

pub mod manifest;
pub mod config;
pub mod policy;
pub mod journal;
pub mod reaper;
pub mod runtime;
pub mod health;
