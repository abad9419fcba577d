//! What a unit's `PropertiesChanged` signals say, applied to its [`UnitStatus`]: the start of
//! an engine is reported in the same wake-up as systemd's signal, without asking systemd again.
//!
//! Only a picture the signals complete is used as it is: a Unit change (systemd sends the
//! Service one, with `Result`, `ExecMainCode`, `ExecMainStatus`, `MainPID` and `NRestarts`,
//! just before it) to a running, starting or stopping unit with its main PID, and the end of a
//! unit that systemd will not restart (`Restart=no`). The end of a unit systemd may restart is
//! read anew (one round trip): systemd 252 reports such a unit `failed` first and
//! `activating/auto-restart` a moment later, so a `failed` in the signals is not yet final.
//! An automatic restart, a property systemd only invalidated, or anything unreadable is read
//! anew as well.

use std::collections::HashMap;

use zbus::{OwnedObjectPath, OwnedVariant};

use super::UnitStatus;
use super::signals::Change;

const UNIT_IFACE: &str = "org.freedesktop.systemd1.Unit";
const SERVICE_IFACE: &str = "org.freedesktop.systemd1.Service";

/// What a batch of changes did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// A Unit-interface change came: the picture is complete up to it.
    pub unit_changed: bool,
    /// The unit must be read anew.
    pub reread: bool,
}

fn take<T: TryFrom<OwnedVariant>>(m: &HashMap<String, OwnedVariant>, k: &str, into: &mut T) {
    if let Some(v) = m
        .get(k)
        .and_then(|v| v.try_clone().ok())
        .and_then(|v| T::try_from(v).ok())
    {
        *into = v;
    }
}

/// Applies one change to `st`.
pub fn apply(st: &mut UnitStatus, change: &Change) -> Applied {
    let Change::Props {
        interface,
        values,
        invalidated,
        ..
    } = change
    else {
        return Applied {
            unit_changed: false,
            reread: true,
        };
    };
    let reread = invalidated.iter().any(|p| super::changed_body::wanted(p));
    match interface.as_str() {
        UNIT_IFACE => {
            take(values, "LoadState", &mut st.load_state);
            take(values, "ActiveState", &mut st.active_state);
            take(values, "SubState", &mut st.sub_state);
            let mut job: (u32, OwnedObjectPath) = (0, OwnedObjectPath::default());
            if values.contains_key("Job") {
                take(values, "Job", &mut job);
                st.job_pending = job.0 != 0;
            }
            Applied {
                unit_changed: true,
                reread,
            }
        }
        SERVICE_IFACE => {
            take(values, "MainPID", &mut st.main_pid);
            take(values, "NRestarts", &mut st.n_restarts);
            take(values, "Result", &mut st.result);
            take(values, "ExecMainCode", &mut st.exec_main_code);
            take(values, "ExecMainStatus", &mut st.exec_main_status);
            Applied {
                unit_changed: false,
                reread,
            }
        }
        _ => Applied::default(),
    }
}

/// Applies a batch; the result says whether `st` can be reported as it is.
pub fn apply_all<'a>(st: &mut UnitStatus, batch: impl IntoIterator<Item = &'a Change>) -> Applied {
    batch.into_iter().fold(Applied::default(), |acc, c| {
        let a = apply(st, c);
        Applied {
            unit_changed: acc.unit_changed || a.unit_changed,
            reread: acc.reread || a.reread,
        }
    })
}

/// Whether the signals' picture is enough to report: running (with its main PID), starting
/// or stopping; an end (failed, or inactive with no job) only when `ends_final` (the unit has
/// `Restart=no`). Automatic restarts are read anew.
pub fn enough(st: &UnitStatus, ends_final: bool) -> bool {
    match st.active_state.as_str() {
        "active" | "reloading" => st.main_pid != 0,
        "activating" => st.sub_state != "auto-restart",
        "deactivating" => true,
        "failed" => ends_final,
        "inactive" => ends_final && !st.job_pending,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zbus::Variant;

    fn props(interface: &str, kv: &[(&str, Variant<'static>)], invalidated: &[&str]) -> Change {
        Change::Props {
            interface: interface.into(),
            values: kv
                .iter()
                .map(|(k, v)| {
                    let v = OwnedVariant::try_from(v.clone()).expect("owned");
                    (k.to_string(), v)
                })
                .collect(),
            invalidated: invalidated.iter().map(|s| s.to_string()).collect(),
            at: Default::default(),
        }
    }

    fn unit(active: &str, sub: &str) -> Change {
        props(
            UNIT_IFACE,
            &[
                ("ActiveState", Variant::from(active.to_string())),
                ("SubState", Variant::from(sub.to_string())),
            ],
            &[],
        )
    }

    fn service(pid: u32) -> Change {
        props(SERVICE_IFACE, &[("MainPID", Variant::from(pid))], &[])
    }

    #[test]
    fn a_start_is_complete_with_the_unit_change_after_the_service_one() {
        let mut st = UnitStatus::default();
        let a = apply_all(&mut st, [&service(42)]);
        assert!(
            !a.unit_changed,
            "the Service change alone waits for the Unit one"
        );
        let a = apply_all(&mut st, [&unit("active", "running")]);
        assert_eq!(
            a,
            Applied {
                unit_changed: true,
                reread: false
            }
        );
        assert_eq!((st.active_state.as_str(), st.main_pid), ("active", 42));
        assert!(enough(&st, false));
    }

    /// The Service change systemd 252 sends before the Unit one when `kill -9` ends the engine
    /// (seen with `busctl monitor` on the testbed).
    fn killed() -> Change {
        props(
            SERVICE_IFACE,
            &[
                ("MainPID", Variant::from(0u32)),
                ("Result", Variant::from("signal".to_string())),
                ("NRestarts", Variant::from(0u32)),
                ("ExecMainCode", Variant::from(2i32)),
                ("ExecMainStatus", Variant::from(9i32)),
            ],
            &[],
        )
    }

    #[test]
    fn the_end_of_a_unit_without_restart_comes_from_the_signals() {
        let mut st = UnitStatus::default();
        apply_all(&mut st, [&service(42), &unit("active", "running")]);
        let a = apply_all(&mut st, [&killed(), &unit("failed", "failed")]);
        assert!(a.unit_changed && !a.reread);
        assert!(enough(&st, true), "Restart=no: failed is final");
        assert_eq!(st.exit_info(), crate::runtime::ExitInfo::Signal(9));
        let mut clean = UnitStatus::default();
        apply_all(&mut clean, [&service(0), &unit("inactive", "dead")]);
        assert!(enough(&clean, true), "a clean exit without a job is final");
        clean.job_pending = true;
        assert!(
            !enough(&clean, true),
            "inactive with a job pending starts again"
        );
    }

    #[test]
    fn ends_restarts_and_unknowns_are_read_anew() {
        let mut st = UnitStatus::default();
        apply_all(&mut st, [&killed(), &unit("failed", "failed")]);
        assert!(
            !enough(&st, false),
            "systemd 252 says failed before auto-restart: read a unit that may restart"
        );
        apply_all(&mut st, [&unit("activating", "auto-restart")]);
        assert!(
            !enough(&st, true),
            "an automatic restart is read for the exit"
        );
        apply_all(&mut st, [&unit("active", "running")]);
        assert!(!enough(&st, true), "running without a main PID is read");
        let a = apply_all(&mut st, [&props(SERVICE_IFACE, &[], &["MainPID"])]);
        assert!(a.reread, "an invalidated property of ours is read");
        assert!(apply_all(&mut st, [&Change::Reread]).reread);
    }

    #[test]
    fn a_job_that_ends_clears_pending() {
        let mut st = UnitStatus {
            job_pending: true,
            ..UnitStatus::default()
        };
        let root = OwnedObjectPath::try_from("/").expect("path");
        let job = props(UNIT_IFACE, &[("Job", Variant::from((0u32, root)))], &[]);
        apply_all(&mut st, [&job]);
        assert!(!st.job_pending);
    }
}
