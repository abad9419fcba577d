//! The admission rules as tables: each row a machine, the other modules, a need, and the
//! exact verdict.

use super::*;

const GIB: u64 = 1 << 30;

fn machine(mem_available: u64, gpus: &[(u32, u64, u64)]) -> Machine {
    Machine {
        mem_available,
        ram_budget: None,
        gpus: gpus
            .iter()
            .map(|&(index, total, used)| GpuFree { index, total, used })
            .collect(),
        ram_margin: 0,
        vram_margin: 0,
    }
}

fn holder(name: &str, ram: u64, vram: &[(u32, u64)], last_used: u64) -> Holder {
    Holder {
        name: name.into(),
        ram,
        vram: vram.iter().copied().collect(),
        ram_footprint: 0,
        reserved_ram: 0,
        reserved_vram: BTreeMap::new(),
        keep: None,
        priority: 0,
        last_used,
    }
}

fn need(ram: u64, gpu: GpuNeed) -> Need {
    Need {
        ram,
        gpu,
        source: Source::Declared,
    }
}

fn on(g: u32, b: u64) -> GpuNeed {
    GpuNeed::On(BTreeMap::from([(g, b)]))
}

fn verdict(m: &Machine, holders: &[Holder], foreign: &[Foreign], n: &Need) -> Verdict {
    decide(&Request {
        name: "new",
        need: n,
        holders,
        foreign,
        machine: m,
    })
    .verdict
}

fn admit(gpus: &[u32]) -> Verdict {
    Verdict::Admit {
        gpus: gpus.to_vec(),
    }
}

fn evict(gpus: &[u32], victims: &[&str]) -> Verdict {
    Verdict::Evict {
        gpus: gpus.to_vec(),
        victims: victims.iter().map(|v| v.to_string()).collect(),
    }
}

#[test]
fn ram_rows() {
    let a = holder("a", 8 * GIB, &[], 10);
    let b = holder("b", 8 * GIB, &[], 5);
    let mut pinned = holder("p", 8 * GIB, &[], 1);
    pinned.keep = Some("pinned".into());
    let rows: Vec<(&str, Machine, Vec<Holder>, Need, Verdict)> = vec![
        (
            "fits",
            machine(16 * GIB, &[]),
            vec![a.clone()],
            need(4 * GIB, GpuNeed::None),
            admit(&[]),
        ),
        (
            "nothing known: admitted",
            machine(0, &[]),
            vec![a.clone()],
            need(0, GpuNeed::None),
            admit(&[]),
        ),
        (
            "least recently used first, only as many as needed",
            machine(2 * GIB, &[]),
            vec![a.clone(), b.clone()],
            need(8 * GIB, GpuNeed::None),
            evict(&[], &["b"]),
        ),
        (
            "both when one is not enough",
            machine(2 * GIB, &[]),
            vec![a.clone(), b.clone()],
            need(12 * GIB, GpuNeed::None),
            evict(&[], &["b", "a"]),
        ),
        (
            "a pinned module is never a victim",
            machine(2 * GIB, &[]),
            vec![pinned.clone(), a.clone()],
            need(8 * GIB, GpuNeed::None),
            evict(&[], &["a"]),
        ),
    ];
    for (what, m, holders, n, want) in rows {
        assert_eq!(verdict(&m, &holders, &[], &n), want, "{what}");
    }
}

#[test]
fn the_budget_counts_footprints_of_modules_using_less_now() {
    let mut m = machine(64 * GIB, &[]);
    m.ram_budget = Some(10 * GIB);
    let mut a = holder("a", GIB, &[], 1);
    a.ram_footprint = 6 * GIB;
    assert_eq!(
        verdict(&m, &[a], &[], &need(5 * GIB, GpuNeed::None)),
        evict(&[], &["a"])
    );
}

#[test]
fn priority_before_recency() {
    let mut old_important = holder("old", 8 * GIB, &[], 1);
    old_important.priority = 10;
    let recent = holder("recent", 8 * GIB, &[], 99);
    let m = machine(0, &[]);
    let v = verdict(
        &m,
        &[old_important, recent],
        &[],
        &need(4 * GIB, GpuNeed::None),
    );
    assert_eq!(v, evict(&[], &["recent"]));
}

#[test]
fn budget_and_margin() {
    let mut m = machine(20 * GIB, &[]);
    m.ram_budget = Some(10 * GIB);
    m.ram_margin = GIB;
    let a = holder("a", 6 * GIB, &[], 1);
    assert_eq!(
        verdict(
            &m,
            std::slice::from_ref(&a),
            &[],
            &need(3 * GIB, GpuNeed::None)
        ),
        admit(&[])
    );
    assert_eq!(
        verdict(
            &m,
            std::slice::from_ref(&a),
            &[],
            &need(5 * GIB, GpuNeed::None)
        ),
        evict(&[], &["a"])
    );
    // The margin comes off MemAvailable.
    let m2 = Machine {
        mem_available: 5 * GIB,
        ram_budget: None,
        ..m
    };
    assert_eq!(
        verdict(&m2, &[], &[], &need(5 * GIB, GpuNeed::None)),
        Verdict::Refuse(
            "not enough memory to start new: needs 5.0 GiB of RAM, 4.0 GiB free: nothing modvisor can stop holds it (1.0 GiB more on RAM than evicting every idle module would free)".into()
        )
    );
}

#[test]
fn starting_modules_take_their_share() {
    let m = machine(10 * GIB, &[(0, 24 * GIB, 0)]);
    let mut starting = holder("starting", GIB, &[], 1);
    starting.reserved_ram = 6 * GIB;
    starting.reserved_vram = BTreeMap::from([(0, 20 * GIB)]);
    starting.keep = Some("starting".into());
    assert!(matches!(
        verdict(
            &m,
            std::slice::from_ref(&starting),
            &[],
            &need(5 * GIB, GpuNeed::None)
        ),
        Verdict::Refuse(_)
    ));
    assert!(matches!(
        verdict(&m, &[starting], &[], &need(0, on(0, 8 * GIB))),
        Verdict::Refuse(_)
    ));
}

#[test]
fn gpu_rows() {
    let gpus = [(0, 24 * GIB, 20 * GIB), (1, 24 * GIB, 4 * GIB)];
    let big = holder("big", 0, &[(0, 12 * GIB)], 1);
    let mut pinned_big = big.clone();
    pinned_big.keep = Some("pinned".into());
    let other = holder("other", 0, &[(1, 20 * GIB)], 1);
    let rows: Vec<(&str, Vec<Holder>, Need, Verdict)> = vec![
        (
            "any: the freer GPU",
            vec![],
            need(0, GpuNeed::Any(8 * GIB)),
            admit(&[1]),
        ),
        (
            "pinned list fits",
            vec![],
            need(0, on(1, 8 * GIB)),
            admit(&[1]),
        ),
        (
            "pinned list: evict what holds that GPU",
            vec![big.clone(), other.clone()],
            need(0, on(0, 9 * GIB)),
            evict(&[0], &["big"]),
        ),
        (
            "any: a GPU that fits beats evicting",
            vec![big.clone()],
            need(0, GpuNeed::Any(16 * GIB)),
            admit(&[1]),
        ),
    ];
    for (what, holders, n, want) in rows {
        let m = machine(64 * GIB, &gpus);
        assert_eq!(verdict(&m, &holders, &[], &n), want, "{what}");
    }
    // Neither GPU fits without evicting: the one with an evictable holder.
    let m = machine(
        64 * GIB,
        &[(0, 24 * GIB, 20 * GIB), (1, 24 * GIB, 20 * GIB)],
    );
    let mut keep_other = other.clone();
    keep_other.keep = Some("3 open connections".into());
    assert_eq!(
        verdict(&m, &[big, keep_other], &[], &need(0, GpuNeed::Any(9 * GIB))),
        evict(&[0], &["big"])
    );
}

#[test]
fn refusal_names_the_holders_and_foreign_processes() {
    let m = machine(64 * GIB, &[(0, 24 * GIB, 21 * GIB - 512 * (1 << 20))]);
    let mut big = holder("llama-big", 0, &[(0, 12 * GIB)], 1);
    big.keep = Some("pinned".into());
    let foreign = [Foreign {
        gpu: 0,
        pid: 4242,
        command: "python3".into(),
        bytes: 6 * GIB + GIB / 2,
    }];
    let n = need(0, on(0, 9 * GIB + GIB / 5));
    let d = decide(&Request {
        name: "llama-small",
        need: &n,
        holders: &[big],
        foreign: &foreign,
        machine: &m,
    });
    let Verdict::Refuse(why) = d.verdict else {
        panic!("{d:?}")
    };
    assert!(
        why.starts_with(
            "not enough memory to start llama-small: needs 9.2 GiB on GPU 0, 3.5 GiB free: llama-big holds 12.0 GiB (pinned), pid 4242 python3 (not a module) holds 6.5 GiB"
        ),
        "{why}"
    );
    assert!(
        d.arithmetic
            .contains("GPU 0: needs 9.2 GiB (declared); total 24.0 GiB - used 20.5 GiB"),
        "{}",
        d.arithmetic
    );
}

#[test]
fn arithmetic_shows_every_term() {
    let mut m = machine(10 * GIB, &[]);
    m.ram_margin = GIB;
    m.ram_budget = Some(8 * GIB);
    let d = decide(&Request {
        name: "x",
        need: &Need {
            ram: 2 * GIB,
            gpu: GpuNeed::None,
            source: Source::Measured,
        },
        holders: &[holder("a", 3 * GIB, &[], 1)],
        foreign: &[],
        machine: &m,
    });
    assert_eq!(
        d.arithmetic,
        "RAM: needs 2.0 GiB (measured peak); MemAvailable 10.0 GiB - margin 1.0 GiB - 0 B for starting modules = 9.0 GiB; ram_budget 8.0 GiB - 3.0 GiB held by modules = 5.0 GiB: fits"
    );
}

/// 100 modules on 8 GPUs: what the benchmark measures, checked for its answer here.
#[test]
fn many_modules() {
    let gpus: Vec<(u32, u64, u64)> = (0..8).map(|g| (g, 80 * GIB, 79 * GIB)).collect();
    let m = machine(512 * GIB, &gpus);
    let holders: Vec<Holder> = (0..100)
        .map(|i| {
            holder(
                &format!("m{i}"),
                GIB,
                &[((i % 8) as u32, 7 * GIB)],
                i as u64,
            )
        })
        .collect();
    let v = verdict(&m, &holders, &[], &need(GIB, GpuNeed::Any(20 * GIB)));
    // GPU 0 holds m0, m8, m16 ... (the least recently used): three of them free 21 GiB.
    assert_eq!(v, evict(&[0], &["m0", "m8", "m16"]));
}

#[test]
fn memavailable_is_freed_by_use_not_by_footprint_and_no_victim_is_taken_in_vain() {
    // "a" (least recently used) uses 1 GiB but peaked at 8: stopping it frees 1 GiB of
    // MemAvailable. "b" uses 4 GiB: it alone covers the shortfall, and "a" is spared.
    let mut a = holder("a", GIB, &[], 1);
    a.ram_footprint = 8 * GIB;
    let b = holder("b", 4 * GIB, &[], 2);
    let m = machine(0, &[]);
    assert_eq!(
        verdict(
            &m,
            &[a.clone(), b.clone()],
            &[],
            &need(4 * GIB, GpuNeed::None)
        ),
        evict(&[], &["b"])
    );
    // Against a budget, "a" counts (and frees) its footprint.
    let mut m = machine(64 * GIB, &[]);
    m.ram_budget = Some(12 * GIB);
    assert_eq!(
        verdict(&m, &[a, b], &[], &need(4 * GIB, GpuNeed::None)),
        evict(&[], &["a"])
    );
}

#[test]
fn a_refusal_names_what_starting_modules_will_take() {
    let m = machine(64 * GIB, &[(0, 24 * GIB, 0)]);
    let mut starting = holder("loading", 0, &[], 1);
    starting.reserved_vram = BTreeMap::from([(0, 16 * GIB)]);
    starting.keep = Some("starting".into());
    let Verdict::Refuse(why) = verdict(&m, &[starting], &[], &need(0, on(0, 16 * GIB))) else {
        panic!("refused")
    };
    assert!(
        why.contains("loading will take 16.0 GiB (starting)"),
        "{why}"
    );
}
