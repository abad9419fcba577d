//! `modvisorctl pull`, `models`, `rm` and `activate --pull`: the model store over
//! `org.modvisor1.Models`, with a progress bar (bytes, rate, ETA) on a terminal and plain
//! lines otherwise.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use modvisor::dbus::models::proxy::{JobProxy, ModelsProxy};
use modvisor::manifest::units::format_bytes;
use serde_json::json;
use zbus::Variant;

use super::{Fail, from_zbus};

fn zb(e: zbus::Error) -> Fail {
    from_zbus(e)
}

/// Pulls and waits for the job to finish.
pub async fn pull(
    conn: &zbus::Connection,
    source: &str,
    sha256: Option<&str>,
    include: &[String],
    yes: bool,
) -> Result<(), Fail> {
    let m = ModelsProxy::new(conn).await.map_err(zb)?;
    let mut opts: HashMap<&str, Variant<'_>> = HashMap::new();
    if yes {
        opts.insert("yes", Variant::from(true));
    }
    if let Some(h) = sha256 {
        opts.insert("sha256", Variant::from(h));
    }
    if !include.is_empty() {
        opts.insert("include", Variant::from(include.to_vec()));
    }
    let path = m.pull(source, opts).await.map_err(zb)?;
    let job = JobProxy::builder(conn)
        .path(path)
        .build()
        .await
        .map_err(zb)?;
    let mut finished = job.receive_finished().await.map_err(zb)?;
    let tty = std::io::stderr().is_terminal();
    let mut bar = Bar::new(tty, &job.model().await.map_err(zb)?);
    let mut tick = tokio::time::interval(Duration::from_millis(if tty { 200 } else { 1000 }));
    loop {
        tokio::select! {
            _ = finished.next() => {}
            _ = tick.tick() => {}
        }
        let state = job.state().await.map_err(zb)?;
        let (done, total) = (
            job.bytes_done().await.map_err(zb)?,
            job.bytes_total().await.map_err(zb)?,
        );
        match state.as_str() {
            "completed" => {
                bar.draw(total.max(done), total.max(done), "done");
                bar.end();
                return Ok(());
            }
            "failed" | "cancelled" => {
                bar.end();
                let e = job.error().await.map_err(zb)?;
                return Err(Fail::Code(1, format!("pull {state}: {e}")));
            }
            s => bar.draw(done, total, s),
        }
    }
}

struct Bar {
    tty: bool,
    model: String,
    t0: Instant,
    drawn: bool,
}

impl Bar {
    fn new(tty: bool, model: &str) -> Bar {
        Bar {
            tty,
            model: model.to_string(),
            t0: Instant::now(),
            drawn: false,
        }
    }

    fn draw(&mut self, done: u64, total: u64, state: &str) {
        let secs = self.t0.elapsed().as_secs_f64().max(0.001);
        let rate = done as f64 / secs;
        let pct = if total > 0 {
            (done as f64 * 100.0 / total as f64).min(100.0)
        } else {
            0.0
        };
        let eta = if rate > 0.0 && total > done {
            format!("{:.0}s", (total - done) as f64 / rate)
        } else {
            "-".into()
        };
        let sizes = format!("{} / {}", format_bytes(done), format_bytes(total));
        let rate = format!("{}/s", format_bytes(rate as u64));
        let mut err = std::io::stderr().lock();
        if self.tty {
            let filled = (pct / 5.0) as usize;
            let bar = format!("{}{}", "#".repeat(filled), ".".repeat(20 - filled.min(20)));
            let _ = write!(
                err,
                "\r\x1b[K{} [{bar}] {pct:3.0}% {sizes} {rate} ETA {eta} {state}",
                self.model
            );
        } else {
            let _ = writeln!(err, "{}: {state} {pct:.0}% ({sizes}, {rate})", self.model);
        }
        let _ = err.flush();
        self.drawn = true;
    }

    fn end(&self) {
        if self.tty && self.drawn {
            eprintln!();
        }
    }
}

pub async fn list(conn: &zbus::Connection, json_out: bool) -> Result<(), Fail> {
    let m = ModelsProxy::new(conn).await.map_err(zb)?;
    let rows = m.list().await.map_err(zb)?;
    if json_out {
        let v: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({"id": r.0, "source": r.1, "revision": r.2, "path": r.3, "size": r.4,
                    "date": r.5, "architecture": r.6, "file_type": r.7, "parameters": r.8,
                    "context_length": r.9, "used_by": r.10})
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(());
    }
    println!(
        "{:<40} {:>10} {:<10} {:<8} {:>8} {:>6}  USED BY",
        "MODEL", "SIZE", "ARCH", "QUANT", "PARAMS", "CTX"
    );
    for r in rows {
        let used = if r.10.is_empty() {
            "-".into()
        } else {
            r.10.join(",")
        };
        println!(
            "{:<40} {:>10} {:<10} {:<8} {:>8} {:>6}  {used}",
            r.0,
            format_bytes(r.4),
            dash(r.6),
            dash(r.7),
            r.8,
            r.9
        );
    }
    Ok(())
}

fn dash(s: String) -> String {
    if s.is_empty() { "-".into() } else { s }
}

pub async fn remove(conn: &zbus::Connection, model: &str, force: bool) -> Result<(), Fail> {
    let m = ModelsProxy::new(conn).await.map_err(zb)?;
    m.remove(model, force).await.map_err(zb)
}
