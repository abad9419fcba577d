//! Prometheus metrics: `GET /metrics` on `[metrics] listen`, rendered from the published
//! [`Snapshot`](crate::state::Snapshot) only. Reads `state`; knows nothing of the supervisor.
//!
//! | file       | one job                                                  |
//! |------------|----------------------------------------------------------|
//! | render.rs  | the snapshot as OpenMetrics / Prometheus text            |
//! | process.rs | modvisord's own RSS and CPU time, from /proc/self        |
//! | server.rs  | the HTTP endpoint: bounded, GET /metrics only            |

mod process;
mod render;
mod server;

pub use process::SelfStats;
pub use render::{Format, render};
pub use server::{Limits, MetricsServer};
