//! Resource sampling: RAM per module from /proc (one pass for all modules), the machine's
//! memory (/proc/meminfo), VRAM through NVML (nvml-wrapper). Everything here blocks: the supervisor
//! calls [`sample_with`] from its sampling thread, once per `monitor.interval`, and not at all
//! when no module runs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

mod kept;
pub use kept::CgroupFiles;

/// What to measure for one running module.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub main_pid: u32,
    /// Process group to include (direct children lead their own group); 0: none.
    pub pgid: i32,
    /// Use the main process's own cgroup (units, containers: it holds the module alone).
    pub own_cgroup: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleSample {
    pub rss: u64,
    pub vram: u64,
    /// Total memory of the GPUs the module's processes use.
    pub vram_total: u64,
    /// VRAM per GPU index.
    pub vram_by_gpu: BTreeMap<u32, u64>,
    pub pids: usize,
}

/// A compute process on a GPU: (pid, bytes, GPU index).
pub type GpuProc = (u32, u64, u32);

/// One GPU as NVML reports it (index, name, uuid, total, used).
pub type GpuRow = (u32, String, String, u64, u64);

#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub modules: HashMap<String, ModuleSample>,
    pub machine_total: u64,
    pub machine_available: u64,
    pub gpus: Vec<GpuRow>,
    /// GPU processes that belong to no module: (pid, command, bytes).
    pub foreign: Vec<(u32, String, u64)>,
    /// The GPU index of each foreign process.
    pub foreign_gpu: HashMap<u32, u32>,
    /// Why there is no GPU information ("" when NVML answered).
    pub gpu_error: String,
}

struct Proc {
    ppid: u32,
    pgrp: i32,
    rss: u64,
}

fn scan_proc() -> HashMap<u32, Proc> {
    let page = crate::procfs::page_size();
    crate::procfs::all()
        .into_iter()
        .map(|s| {
            (
                s.pid,
                Proc {
                    ppid: s.ppid,
                    pgrp: s.pgrp,
                    rss: s.rss_pages * page,
                },
            )
        })
        .collect()
}

/// The cgroup directory (v2, or the named systemd hierarchy on hybrid systems) of a process.
fn cgroup_procs_file(pid: u32) -> Option<PathBuf> {
    let text = crate::procfs::read_small(format!("/proc/{pid}/cgroup"), false)?;
    let mut candidates = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
        if path == "/" {
            continue;
        }
        match ctrl {
            "" => {
                candidates
                    .push(Path::new("/sys/fs/cgroup/unified").join(path.trim_start_matches('/')));
                candidates.push(Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/')));
            }
            "name=systemd" => candidates
                .push(Path::new("/sys/fs/cgroup/systemd").join(path.trim_start_matches('/'))),
            _ => {}
        }
    }
    candidates
        .into_iter()
        .map(|d| d.join("cgroup.procs"))
        .find(|f| f.exists())
}

/// Every process of the machine, and each one's children.
struct AllProcs {
    procs: HashMap<u32, Proc>,
    children: HashMap<u32, Vec<u32>>,
}

impl AllProcs {
    fn scan() -> AllProcs {
        let procs = scan_proc();
        let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
        for (pid, p) in &procs {
            children.entry(p.ppid).or_default().push(*pid);
        }
        AllProcs { procs, children }
    }

    /// A target's processes and their RSS.
    fn measure(&self, t: &Target, cgroups: &mut CgroupFiles) -> (HashSet<u32>, u64) {
        let pids = module_pids(t, &self.procs, &self.children, cgroups);
        let rss = pids
            .iter()
            .filter_map(|p| self.procs.get(p))
            .map(|p| p.rss)
            .sum();
        (pids, rss)
    }
}

/// The processes of a unit or a container and their RSS, from its cgroup alone (what it
/// forks stays in it): no pass over every process of the machine, which was most of an idle
/// daemon's CPU time. None when there is no such cgroup or it cannot be read.
fn cgroup_members(t: &Target, cgroups: &mut CgroupFiles) -> Option<Vec<(u32, u64)>> {
    if !t.own_cgroup || t.pgid > 1 {
        return None;
    }
    let pids = cgroups.members(t.main_pid)?;
    let page = crate::procfs::page_size();
    Some(
        pids.into_iter()
            .filter_map(|pid| Some((pid, cgroups.rss_pages(pid)? * page)))
            .collect(),
    )
}

fn module_pids(
    t: &Target,
    procs: &HashMap<u32, Proc>,
    children: &HashMap<u32, Vec<u32>>,
    cgroups: &mut CgroupFiles,
) -> HashSet<u32> {
    let mut set = HashSet::new();
    if t.own_cgroup
        && let Some(pids) = cgroups.members(t.main_pid)
    {
        set.extend(pids);
    }
    if t.pgid > 1 {
        set.extend(
            procs
                .iter()
                .filter(|(_, p)| p.pgrp == t.pgid)
                .map(|(pid, _)| *pid),
        );
    }
    // The process tree under the main process.
    let mut stack = vec![t.main_pid];
    let mut seen = HashSet::new();
    while let Some(p) = stack.pop() {
        if !seen.insert(p) {
            continue;
        }
        set.insert(p);
        if let Some(c) = children.get(&p) {
            stack.extend(c.iter().copied());
        }
    }
    set.retain(|p| procs.contains_key(p));
    set
}

/// NVML, opened once; None (with the reason) when the machine has none.
pub struct Gpu {
    nvml: nvml_wrapper::Nvml,
}

impl Gpu {
    /// Loads the library (`""`: libnvidia-ml.so.1 from the loader's path).
    pub fn open(library: &str) -> Result<Gpu, String> {
        let mut b = nvml_wrapper::Nvml::builder();
        let lib = std::ffi::OsString::from(library);
        if !library.is_empty() {
            b.lib_path(&lib);
        }
        let nvml = b.init().map_err(|e| {
            format!(
                "NVML unavailable ({}): {e}",
                if library.is_empty() {
                    "libnvidia-ml.so.1"
                } else {
                    library
                }
            )
        })?;
        Ok(Gpu { nvml })
    }

    /// (index, total, used) of every GPU: no process lists.
    pub fn memory(&self) -> Result<Vec<(u32, u64, u64)>, String> {
        let n = self
            .nvml
            .device_count()
            .map_err(|e| format!("NVML device count: {e}"))?;
        let mut out = Vec::new();
        for i in 0..n {
            let d = self
                .nvml
                .device_by_index(i)
                .map_err(|e| format!("NVML device {i}: {e}"))?;
            let m = d
                .memory_info()
                .map_err(|e| format!("NVML memory {i}: {e}"))?;
            out.push((i, m.total, m.used));
        }
        Ok(out)
    }

    /// Per-GPU figures and every compute process with its memory.
    pub fn sample(&self) -> Result<(Vec<GpuRow>, Vec<GpuProc>), String> {
        let n = self
            .nvml
            .device_count()
            .map_err(|e| format!("NVML device count: {e}"))?;
        let mut gpus = Vec::new();
        let mut procs = Vec::new();
        for i in 0..n {
            let d = self
                .nvml
                .device_by_index(i)
                .map_err(|e| format!("NVML device {i}: {e}"))?;
            let name = d.name().unwrap_or_default();
            let uuid = d.uuid().unwrap_or_default();
            let (total, used) = d.memory_info().map(|m| (m.total, m.used)).unwrap_or((0, 0));
            gpus.push((i, name, uuid, total, used));
            // Drivers older than R510 lack the v3 query: fall back to the legacy one.
            let list = match d.running_compute_processes() {
                Ok(l) => l,
                Err(nvml_wrapper::error::NvmlError::FailedToLoadSymbol(_)) => {
                    d.running_compute_processes_v2().unwrap_or_default()
                }
                Err(e) => {
                    tracing::debug!("NVML processes of GPU {i}: {e}");
                    Vec::new()
                }
            };
            for p in list {
                let bytes = match p.used_gpu_memory {
                    nvml_wrapper::enums::device::UsedGpuMemory::Used(b) => b,
                    nvml_wrapper::enums::device::UsedGpuMemory::Unavailable => 0,
                };
                procs.push((p.pid, bytes, i));
            }
        }
        Ok((gpus, procs))
    }
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// (MemTotal, MemAvailable) of /proc/meminfo, in bytes (0 when unreadable). Read directly:
/// one small file, no crate that reads /proc/stat as well at every pass.
fn meminfo() -> (u64, u64) {
    let Some(t) = crate::procfs::read_small("/proc/meminfo", false) else {
        return (0, 0);
    };
    let field = |name: &str| {
        t.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// What admission reads right before a start: `MemAvailable` and each GPU (index, total,
/// used), live. Blocking (a read of /proc/meminfo, one NVML query per GPU).
pub fn free_memory(gpu: Option<&Gpu>) -> (u64, Vec<(u32, u64, u64)>) {
    let avail = meminfo().1;
    let gpus = gpu.and_then(|g| g.memory().ok()).unwrap_or_default();
    (avail, gpus)
}

/// One sampling pass over everything. Blocking.
pub fn sample(targets: &[Target], gpu: Option<&Gpu>) -> Sample {
    sample_with(targets, gpu, &mut CgroupFiles::default())
}

/// [`sample`], with what earlier passes found out about the targets' cgroups.
pub fn sample_with(targets: &[Target], gpu: Option<&Gpu>, cgroups: &mut CgroupFiles) -> Sample {
    let mut out = Sample::default();
    (out.machine_total, out.machine_available) = meminfo();
    let (gpu_rows, gpu_procs) = match gpu.map(|g| g.sample()) {
        Some(Ok(x)) => x,
        Some(Err(e)) => {
            out.gpu_error = e;
            (Vec::new(), Vec::new())
        }
        None => (Vec::new(), Vec::new()),
    };
    out.gpus = gpu_rows;
    if targets.is_empty() && gpu_procs.is_empty() {
        cgroups.keep_only(targets);
        return out;
    }
    // The pass over every process of the machine is made only for the targets whose cgroup
    // does not tell their processes (direct children, which share the daemon's).
    let members: Vec<Option<Vec<(u32, u64)>>> =
        targets.iter().map(|t| cgroup_members(t, cgroups)).collect();
    let all = members.iter().any(Option::is_none).then(AllProcs::scan);
    let mut owned: HashSet<u32> = HashSet::new();
    for (t, m) in targets.iter().zip(members) {
        let (pids, rss) = match (m, &all) {
            (Some(list), _) => (
                list.iter().map(|(p, _)| *p).collect::<HashSet<u32>>(),
                list.iter().map(|(_, r)| *r).sum(),
            ),
            (None, Some(all)) => all.measure(t, cgroups),
            (None, None) => (HashSet::new(), 0),
        };
        let mine: Vec<&(u32, u64, u32)> = gpu_procs
            .iter()
            .filter(|(pid, _, _)| pids.contains(pid))
            .collect();
        let vram = mine.iter().map(|(_, b, _)| *b).sum();
        let mut vram_by_gpu = BTreeMap::new();
        for (_, b, g) in &mine {
            *vram_by_gpu.entry(*g).or_insert(0) += *b;
        }
        let used_gpus: HashSet<u32> = mine.iter().map(|(_, _, g)| *g).collect();
        let vram_total = out
            .gpus
            .iter()
            .filter(|g| used_gpus.contains(&g.0))
            .map(|g| g.3)
            .sum();
        out.modules.insert(
            t.name.clone(),
            ModuleSample {
                rss,
                vram,
                vram_total,
                vram_by_gpu,
                pids: pids.len(),
            },
        );
        owned.extend(pids);
    }
    for (pid, bytes, g) in gpu_procs {
        if !owned.contains(&pid) {
            out.foreign.push((pid, comm(pid), bytes));
            out.foreign_gpu.insert(pid, g);
        }
    }
    out.foreign.sort();
    cgroups.keep_only(targets);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_tells_its_processes() {
        let me = std::process::id();
        let t = Target {
            name: "me".into(),
            main_pid: me,
            pgid: 0,
            own_cgroup: true,
        };
        let mut cg = CgroupFiles::default();
        // None where this test runs in the root cgroup (a container): the full pass then.
        if let Some(list) = cgroup_members(&t, &mut cg) {
            assert!(list.iter().any(|(p, rss)| *p == me && *rss > 0), "{list:?}");
            assert!(
                cg.procs.get(&me).is_some_and(|k| k.file.is_some()),
                "the file is kept open for the next pass"
            );
            assert!(cg.kept_stats() >= 1, "and the stat of each member");
            let (counted, kept) = cg.kept_open();
            assert_eq!(counted, kept, "counted as kept");
            assert!(cgroup_members(&t, &mut cg).is_some());
            let (counted, kept) = cg.kept_open();
            assert_eq!(counted, kept, "read again: still counted as kept");
        }
        let direct = Target {
            own_cgroup: false,
            ..t
        };
        assert!(cgroup_members(&direct, &mut cg).is_none());
    }

    #[test]
    fn a_kept_cgroup_file_that_no_longer_lists_the_process_is_not_trusted() {
        let me = std::process::id();
        let dir = tempfile::tempdir().expect("tempdir");
        let stale = dir.path().join("cgroup.procs");
        std::fs::write(&stale, "1\n2\n").expect("write");
        let mut cg = CgroupFiles::default();
        let by_path = |path: &std::path::Path| kept::Kept {
            path: path.to_path_buf(),
            file: None,
        };
        cg.procs.insert(me, by_path(&stale));
        let found = cg.members(me);
        assert_ne!(
            found,
            Some(vec![1, 2]),
            "the stale file's processes were taken"
        );
        assert_ne!(cg.procs.get(&me).map(|k| &k.path), Some(&stale));
        if let Some(pids) = found {
            assert!(pids.contains(&me), "{pids:?}");
        }
        let kept = dir.path().join("kept.procs");
        std::fs::write(&kept, format!("{me}\n")).expect("write");
        cg.procs.insert(me, by_path(&kept));
        assert_eq!(
            cg.members(me),
            Some(vec![me]),
            "a file that lists it is kept"
        );
        assert_eq!(cg.procs.get(&me).map(|k| &k.path), Some(&kept));
        cg.keep_only(&[]);
        assert!(
            cg.procs.is_empty(),
            "processes not sampled any more are forgotten"
        );
    }

    #[test]
    fn a_kept_stat_answers_for_its_process_only_and_the_budget_holds() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id();
        let mut cg = CgroupFiles::with_budget(1);
        assert!(cg.rss_pages(pid).is_some());
        assert_eq!(cg.kept_stats(), 1, "its stat is kept open");
        let me = std::process::id();
        assert!(cg.rss_pages(me).is_some(), "read by path beyond the budget");
        assert_eq!(cg.kept_stats(), 1);
        assert_eq!(cg.kept_open(), (1, 1), "the open files are counted as kept");
        child.kill().expect("kill");
        child.wait().expect("reaped");
        // The kept file reads nothing once its process is gone (a process that reused the
        // PID at once would be read by path, anew).
        let again = cg.rss_pages(pid);
        if !Path::new(&format!("/proc/{pid}")).exists() {
            assert_eq!(again, None, "the reaped process was still read");
            assert_eq!(cg.kept_stats(), 0);
            assert_eq!(cg.kept_open(), (0, 0), "a closed file is not counted");
        }
        cg.keep_only(&[]);
        cg.keep_only(&[]);
        assert_eq!(cg.kept_stats(), 0, "a process not seen in a pass is let go");
    }

    #[test]
    fn own_process_tree_is_measured() {
        let me = std::process::id();
        let s = sample(
            &[Target {
                name: "me".into(),
                main_pid: me,
                pgid: 0,
                own_cgroup: false,
            }],
            None,
        );
        let m = &s.modules["me"];
        assert!(m.rss > 1 << 20, "{m:?}");
        assert!(m.pids >= 1);
        assert!(
            s.machine_total > 0
                && s.machine_available > 0
                && s.machine_available <= s.machine_total
        );
    }
}
