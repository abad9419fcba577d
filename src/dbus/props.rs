//! The one table of D-Bus properties. Each property is declared once here: its D-Bus name,
//! whether it announces changes, and how its value comes from the state (text
//! cleaned for the bus). The zbus getters in
//! `server.rs` call these functions, and the Publisher diffs these tables to build
//! PropertiesChanged, so what a getter returns and what a signal announces cannot drift.
//! A unit test checks the tables against the interfaces' introspection, both ways.

use std::collections::HashMap;

use zbus::Variant;

use super::text::clean;

use crate::state::{Health, ModuleStatus, Snapshot};

/// Whether a property's changes go out in PropertiesChanged (`Changes`) or it never changes
/// (`Const`, annotated `EmitsChangedSignal=const`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Emits {
    Changes,
    Const,
}

/// One property: its D-Bus name and its value in a state `S`.
pub struct Prop<S: 'static> {
    pub name: &'static str,
    pub emits: Emits,
    pub value: fn(&S) -> Variant<'static>,
}

/// Declares, for each property, a typed function (what the zbus getter returns) and an entry
/// of the table (the same function, as a variant).
macro_rules! table {
    ($(#[$doc:meta])* $table:ident: $s:ty {
        $($emits:ident $name:literal $f:ident -> $t:ty = $get:expr;)*
    }) => {
        $(
            pub fn $f(s: &$s) -> $t {
                let get: fn(&$s) -> $t = $get;
                get(s)
            }
        )*
        $(#[$doc])*
        pub const $table: &[Prop<$s>] = &[$(Prop {
            name: $name,
            emits: Emits::$emits,
            value: |s| Variant::from($f(s)),
        },)*];
    };
}

/// `org.modvisor1.Module`, from the module's status.
pub mod module {
    use super::*;

    table! {
        /// Every property of `org.modvisor1.Module`.
        TABLE: ModuleStatus {
            Const "Name" name -> String = |m| clean(&m.name);
            Changes "Description" description -> String = |m| clean(&m.description);
            Changes "Mode" mode -> String = |m| clean(&m.mode);
            Changes "ModeReason" mode_reason -> String = |m| clean(&m.mode_reason);
            Changes "Backend" backend -> String = |m| clean(&m.backend);
            Changes "State" state -> String = |m| m.state.as_str().to_string();
            Changes "Health" health -> String = |m| m.health.as_str().to_string();
            Changes "HealthReason" health_reason -> String = |m| clean(&m.health_reason);
            Changes "Unit" unit -> String = |m| clean(&m.unit);
            Changes "ContainerId" container_id -> String = |m| clean(&m.container_id);
            Changes "MainPID" main_pid -> u32 = |m| m.main_pid;
            Changes "MemoryBytes" memory_bytes -> u64 = |m| m.memory_bytes;
            Changes "MemoryMaxBytes" memory_max_bytes -> u64 = |m| m.memory_max_bytes;
            Changes "VramBytes" vram_bytes -> u64 = |m| m.vram_bytes;
            Changes "Restarts" restarts -> u32 = |m| m.restarts;
            Changes "ActiveModel" active_model -> String = |m| clean(&m.active_model);
            Changes "Since" since -> u64 = |m| m.since_us;
            Changes "ManifestPath" manifest_path -> String = |m| clean(&m.manifest_path);
            Changes "Connections" connections -> u32 = |m| m.connections;
            Changes "LastActivity" last_activity -> u64 = |m| m.last_activity_us;
            Changes "IdleStopAt" idle_stop_at -> u64 = |m| m.idle_stop_at_us;
            Changes "OnDemand" on_demand -> bool = |m| m.on_demand;
            Changes "RamPeakBytes" ram_peak_bytes -> u64 = |m| m.ram_peak_bytes;
            Changes "VramPeakBytes" vram_peak_bytes -> u64 = |m| m.vram_peak_bytes;
            Changes "FootprintSource" footprint_source -> String = |m| clean(&m.footprint_source);
            Changes "Pinned" pinned -> bool = |m| m.pinned;
            Changes "Priority" priority -> i32 = |m| m.priority;
            Changes "Evictable" evictable -> bool = |m| m.evictable;
        }
    }
}

/// `org.modvisor1.Manager`, from the whole snapshot.
pub mod manager {
    use super::*;

    table! {
        /// Every property of `org.modvisor1.Manager`.
        TABLE: Snapshot {
            Const "Version" version -> String = |_| env!("CARGO_PKG_VERSION").to_string();
            Changes "Health" health -> String = |s| s.health().to_string();
            Changes "ModulesOnline" modules_online -> u32 = |s| s.count(Health::Online);
            Changes "ModulesDegraded" modules_degraded -> u32 = |s| s.count(Health::Degraded);
            Changes "ModulesOffline" modules_offline -> u32 = |s| s.count(Health::Offline);
            Changes "ManifestErrors" manifest_errors -> Vec<(String, String)> =
                |s| s.manifest_errors.iter().map(|(f, e)| (clean(f), clean(&crate::bounded::cap_for_dbus(e)))).collect();
            Changes "ContainerEngine" container_engine -> String = |s| clean(&s.container_engine);
            Changes "NativeBackend" native_backend -> String = |s| clean(&s.native_backend);
            Changes "Gpus" gpus -> Vec<(u32, String, String, u64, u64)> = |s| {
                s.gpus.iter().map(|(i, n, u, t, used)| (*i, clean(n), clean(u), *t, *used)).collect()
            };
            Changes "ForeignGpuProcesses" foreign_gpu_processes -> Vec<(u32, String, u64)> =
                |s| s.foreign_gpu_processes.iter().map(|(p, c, b)| (*p, clean(c), *b)).collect();
        }
    }
}

/// Every property's value in `s` (what GetAll returns, and what InterfacesAdded carries).
pub fn values<S>(table: &[Prop<S>], s: &S) -> HashMap<&'static str, Variant<'static>> {
    table.iter().map(|p| (p.name, (p.value)(s))).collect()
}

/// The properties that announce changes and differ between what was announced (`old`; None:
/// nothing yet) and `new`: the body of a PropertiesChanged.
pub fn changed<S>(
    table: &[Prop<S>],
    old: Option<&S>,
    new: &S,
) -> HashMap<&'static str, Variant<'static>> {
    table
        .iter()
        .filter(|p| p.emits == Emits::Changes)
        .filter_map(|p| {
            let v = (p.value)(new);
            match old {
                Some(o) if (p.value)(o) == v => None,
                _ => Some((p.name, v)),
            }
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::State;

    pub(crate) fn status(name: &str) -> ModuleStatus {
        crate::state::ModuleStatus::example(name)
    }

    fn keys(m: &HashMap<&'static str, Variant<'static>>) -> Vec<&'static str> {
        let mut k: Vec<_> = m.keys().copied().collect();
        k.sort_unstable();
        k
    }

    #[test]
    fn a_first_announcement_carries_every_changing_property_and_no_const_one() {
        let s = Snapshot {
            native_backend: "direct".into(),
            ..Snapshot::default()
        };
        let first = changed(manager::TABLE, None, &s);
        assert!(first.contains_key("NativeBackend"));
        assert!(!first.contains_key("Backend"), "not a Manager property");
        assert!(!first.contains_key("Version"), "const");
        assert_eq!(first.len(), manager::TABLE.len() - 1);
        assert!(!changed(module::TABLE, None, &status("a")).contains_key("Name"));
    }

    #[test]
    fn only_what_differs_is_announced() {
        let old = Snapshot {
            native_backend: "direct".into(),
            ..Snapshot::default()
        };
        let mut new = old.clone();
        assert!(changed(manager::TABLE, Some(&old), &new).is_empty());
        new.gpus = vec![(0, "GPU".into(), "GPU-1".into(), 8 << 30, 1 << 30)];
        new.foreign_gpu_processes = vec![(7, "llama".into(), 1 << 30)];
        new.modules.insert("a".into(), status("a").into());
        assert_eq!(
            keys(&changed(manager::TABLE, Some(&old), &new)),
            ["ForeignGpuProcesses", "Gpus", "ModulesOnline"],
            "no modules and one online module are both \"online\""
        );
        let a = status("a");
        let mut b = a.clone();
        b.state = State::Failed;
        b.main_pid = 0;
        assert_eq!(
            keys(&changed(module::TABLE, Some(&a), &b)),
            ["MainPID", "State"]
        );
    }

    #[test]
    fn typed_functions_and_table_values_agree() {
        let m = status("a");
        let v = values(module::TABLE, &m);
        assert_eq!(v.len(), module::TABLE.len(), "names are unique");
        assert_eq!(v["MainPID"], Variant::from(module::main_pid(&m)));
        assert_eq!(v["State"], Variant::from("running".to_string()));
        let s = Snapshot::default();
        assert_eq!(values(manager::TABLE, &s).len(), manager::TABLE.len());
    }
}
