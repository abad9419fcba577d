//! modvisor: a supervisor for local AI inference engines.
#![deny(unsafe_code)]

pub mod manifest;
pub mod config;
pub mod policy;
