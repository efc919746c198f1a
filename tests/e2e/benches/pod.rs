//! `make bench-pod`: pods through containerd's CRI plugin, husk (runtime handler `husk`) against
//! runc (`runc`, Debian's runc through io.containerd.runc.v2), same containerd, same images.
//!
//! 1. Start latency, N runs per runtime: wall time from `RunPodSandbox` to the first line of
//!    the pod's container (`echo first-output`) in its CRI log file (polled every 5 ms), with
//!    the time spent in RunPodSandbox, CreateContainer and StartContainer.
//! 2. Memory per pod, M pods running at once per runtime (each a sandbox and one `sleep`
//!    container): RSS and PSS (`/proc/PID/smaps_rollup`) of every host process a pod costs:
//!    husk: its shim and its husk-vmm (whose RSS includes the guest RAM the guest touched; that
//!    part is shown separately); runc: its shim and the pod's processes (pause, container).
//!
//! Prints per-run figures, medians and the husk/runc ratio. Needs a real KVM (run through
//! `host/shim/bench/pod`, which uses the test host on machines without one). A benchmark, not a
//! test: it asserts nothing about speed.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use husk_e2e::containerd::{
    processes_named, Containerd, Options, HUSK_HANDLER, IMAGE, RUNC_HANDLER, SHIM,
};
use husk_e2e::cri::{self, api, Cri};

const RUNC_SHIM: &str = "containerd-shim-runc-v2";
const MARKER: &str = "first-output";
/// How long a pod may take to print (the nested, emulated test host is slow).
const OUTPUT_TIMEOUT: Duration = Duration::from_secs(300);

struct Args {
    runs: usize,
    pods: usize,
    latency: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        runs: 10,
        pods: 10,
        latency: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = |name: &str| -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|n| *n > 0)
                .unwrap_or_else(|| panic!("{name} needs a positive number"))
        };
        match arg.as_str() {
            "--runs" => args.runs = number("--runs"),
            "--pods" => args.pods = number("--pods"),
            "--memory-only" => args.latency = false,
            // `cargo bench` passes --bench.
            "--bench" => {}
            other => panic!(
                "usage: pod [--runs N] [--pods M] [--memory-only] (unknown argument {other})"
            ),
        }
    }
    args
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A pod config whose containers log under `log_dir`.
fn pod_config(name: &str, log_dir: &Path) -> api::PodSandboxConfig {
    let mut pod = cri::pod_config(name, &format!("uid-{name}"));
    pod.log_directory = log_dir.to_string_lossy().into_owned();
    pod
}

fn fail(containerd: &Containerd, what: &str, err: &cri::CriError) -> ! {
    panic!(
        "{what}: {} ({:?})\ncontainerd log:\n{}",
        err.message(),
        err.code(),
        containerd.log()
    )
}

/// Stops and removes every pod sandbox (and so their containers).
fn remove_all_pods(containerd: &Containerd, cri: &Cri) {
    let pods = cri
        .list_pod_sandboxes()
        .unwrap_or_else(|e| fail(containerd, "ListPodSandbox", &e));
    for pod in pods {
        cri.stop_pod_sandbox(&pod.id)
            .unwrap_or_else(|e| fail(containerd, "StopPodSandbox", &e));
        cri.remove_pod_sandbox(&pod.id)
            .unwrap_or_else(|e| fail(containerd, "RemovePodSandbox", &e));
    }
}

/// One start: returns (to first output, RunPodSandbox, CreateContainer, StartContainer) in s.
fn start_once(
    containerd: &Containerd,
    cri: &Cri,
    handler: &str,
    name: &str,
) -> (f64, f64, f64, f64) {
    let log_dir = containerd.dir().join("pod-logs").join(name);
    fs::create_dir_all(&log_dir).unwrap();
    let pod = pod_config(name, &log_dir);
    let mut config = cri::container_config(
        "app",
        IMAGE,
        &["sh", "-c", &format!("echo {MARKER}; exec sleep 100000")],
    );
    config.log_path = "app.log".to_owned();
    let log = log_dir.join("app.log");

    let t0 = Instant::now();
    let pod_id = cri
        .run_pod_sandbox(&pod, handler)
        .unwrap_or_else(|e| fail(containerd, "RunPodSandbox", &e));
    let sandbox = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let id = cri
        .create_container(&pod_id, &config, &pod)
        .unwrap_or_else(|e| fail(containerd, "CreateContainer", &e));
    let create = t1.elapsed().as_secs_f64();
    let t2 = Instant::now();
    cri.start_container(&id)
        .unwrap_or_else(|e| fail(containerd, "StartContainer", &e));
    let start = t2.elapsed().as_secs_f64();
    loop {
        if fs::read_to_string(&log).is_ok_and(|text| text.contains(MARKER)) {
            break;
        }
        assert!(
            t0.elapsed() < OUTPUT_TIMEOUT,
            "{handler} pod {name}: no output in {} within {OUTPUT_TIMEOUT:?}\ncontainerd log:\n{}",
            log.display(),
            containerd.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let total = t0.elapsed().as_secs_f64();
    cri.stop_pod_sandbox(&pod_id)
        .unwrap_or_else(|e| fail(containerd, "StopPodSandbox", &e));
    cri.remove_pod_sandbox(&pod_id)
        .unwrap_or_else(|e| fail(containerd, "RemovePodSandbox", &e));
    (total, sandbox, create, start)
}

/// `Rss` and `Pss` of a process in KiB (smaps_rollup); zeros when it is gone.
fn rss_pss_kib(pid: u32) -> (u64, u64) {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

/// Resident KiB of the largest mapping of `pid` (husk-vmm's guest RAM).
fn largest_mapping_rss_kib(pid: u32) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut best = (0u64, 0u64);
    let mut size = 0u64;
    for line in text.lines() {
        let head = line.split_whitespace().next().unwrap_or_default();
        if let Some((start, end)) = head.split_once('-').filter(|_| !head.ends_with(':')) {
            let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            else {
                continue;
            };
            size = end.saturating_sub(start);
        } else if let Some(rss) = line.strip_prefix("Rss:") {
            let rss = rss
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if size > best.0 {
                best = (size, rss);
            }
        }
    }
    best.1
}

fn parent_of(pid: u32) -> Option<u32> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Every process descending from one of `roots` (not the roots).
fn descendants(roots: &[u32]) -> Vec<u32> {
    let all: Vec<u32> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .collect();
    let mut found: Vec<u32> = Vec::new();
    loop {
        let before = found.len();
        for pid in &all {
            if found.contains(pid) || roots.contains(pid) {
                continue;
            }
            if parent_of(*pid).is_some_and(|p| roots.contains(&p) || found.contains(&p)) {
                found.push(*pid);
            }
        }
        if found.len() == before {
            return found;
        }
    }
}

/// Memory of `pods` pods running at once, summed per kind of process, in KiB.
struct PodMemory {
    /// (what, rss, pss) per kind of process.
    parts: Vec<(&'static str, u64, u64)>,
    /// husk-vmm: the resident part of guest RAM (in its RSS and PSS).
    guest_ram: u64,
}

/// The memory of the pods of `handler` running now (summed per kind of process, in KiB).
fn snapshot(handler: &str) -> PodMemory {
    let sum = |pids: &[u32]| {
        pids.iter()
            .map(|p| rss_pss_kib(*p))
            .fold((0, 0), |(r, p), (r2, p2)| (r + r2, p + p2))
    };
    if handler == HUSK_HANDLER {
        let vmms = processes_named("husk-vmm");
        let (shim_rss, shim_pss) = sum(&processes_named(SHIM));
        let (vmm_rss, vmm_pss) = sum(&vmms);
        PodMemory {
            parts: vec![("shim", shim_rss, shim_pss), ("husk-vmm", vmm_rss, vmm_pss)],
            guest_ram: vmms.iter().map(|p| largest_mapping_rss_kib(*p)).sum(),
        }
    } else {
        let shims = processes_named(RUNC_SHIM);
        let (shim_rss, shim_pss) = sum(&shims);
        let (proc_rss, proc_pss) = sum(&descendants(&shims));
        PodMemory {
            parts: vec![
                ("shim", shim_rss, shim_pss),
                ("pod processes", proc_rss, proc_pss),
            ],
            guest_ram: 0,
        }
    }
}

/// Starts `pods` pods of `handler` one after the other, printing the memory per pod after each
/// (so a run that stalls still shows the figures so far); returns the last.
fn measure_memory(containerd: &Containerd, cri: &Cri, handler: &str, pods: usize) -> PodMemory {
    let t0 = Instant::now();
    let mut last = None;
    for i in 0..pods {
        let name = format!("{handler}-mem-{i}");
        let log_dir = containerd.dir().join("pod-logs").join(&name);
        fs::create_dir_all(&log_dir).unwrap();
        let pod = pod_config(&name, &log_dir);
        let pod_id = cri
            .run_pod_sandbox(&pod, handler)
            .unwrap_or_else(|e| fail(containerd, "RunPodSandbox", &e));
        let config = cri::container_config("app", IMAGE, &["sleep", "100000"]);
        let id = cri
            .create_container(&pod_id, &config, &pod)
            .unwrap_or_else(|e| fail(containerd, "CreateContainer", &e));
        cri.start_container(&id)
            .unwrap_or_else(|e| fail(containerd, "StartContainer", &e));
        // Let the guest's and the shim's start-up work settle.
        std::thread::sleep(Duration::from_secs(5));
        let memory = snapshot(handler);
        println!(
            "  {handler} {} pod(s) running after {:.1} s: {}",
            i + 1,
            t0.elapsed().as_secs_f64(),
            memory.describe(i + 1)
        );
        last = Some(memory);
    }
    remove_all_pods(containerd, cri);
    last.unwrap_or(PodMemory {
        parts: Vec::new(),
        guest_ram: 0,
    })
}

impl PodMemory {
    fn total_pss(&self) -> u64 {
        self.parts.iter().map(|(_, _, pss)| pss).sum()
    }

    /// Per pod with `pods` pods: each part's RSS / PSS, the total PSS, and for husk the guest
    /// RAM resident in husk-vmm (in MiB).
    fn describe(&self, pods: usize) -> String {
        let mut line = String::new();
        for (what, rss, pss) in &self.parts {
            line.push_str(&format!(
                "{what} {:.2} / {:.2}  ",
                mib(*rss, pods),
                mib(*pss, pods)
            ));
        }
        line.push_str(&format!("total PSS {:.2}", mib(self.total_pss(), pods)));
        if self.guest_ram > 0 {
            line.push_str(&format!(
                " (guest RAM resident {:.2}, without it {:.2})",
                mib(self.guest_ram, pods),
                mib(self.total_pss().saturating_sub(self.guest_ram), pods)
            ));
        }
        line
    }
}

fn mib(kib: u64, pods: usize) -> f64 {
    kib as f64 / 1024.0 / pods as f64
}

/// Start latency, `runs` times per handler after one untimed pod (image unpacked, caches
/// warm); prints each run, then the medians and the husk/runc ratio.
fn latency(containerd: &Containerd, cri: &Cri, handlers: &[&str; 2], runs: usize) {
    let mut totals: Vec<Vec<f64>> = Vec::new();
    for handler in handlers {
        start_once(containerd, cri, handler, &format!("{handler}-warmup"));
        let mut times = Vec::new();
        for i in 0..runs {
            let (total, sandbox, create, start) =
                start_once(containerd, cri, handler, &format!("{handler}-{i}"));
            println!(
                "run {:2} {handler:5} first output {:8.3} s  (RunPodSandbox {:7.3} s, CreateContainer {:6.3} s, StartContainer {:6.3} s)",
                i + 1,
                total,
                sandbox,
                create,
                start
            );
            times.push(total);
        }
        totals.push(times);
    }
    println!();
    println!("RunPodSandbox to first output (median of {runs}):");
    for (handler, times) in handlers.iter().zip(&totals) {
        println!("  {handler:5} {:8.3} s", median(times));
    }
    println!(
        "  ratio husk/runc: {:.1}",
        median(&totals[1]) / median(&totals[0])
    );
    println!();
}

fn main() {
    let args = parse_args();
    let containerd = Containerd::start_with(Options {
        cri: true,
        ..Options::default()
    });
    let cri = Cri::connect(containerd.socket());
    let deadline = Instant::now() + Duration::from_secs(60);
    while cri
        .image_status(IMAGE)
        .unwrap_or_else(|e| fail(&containerd, "ImageStatus", &e))
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the CRI plugin does not see {IMAGE}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let version = cri
        .version()
        .unwrap_or_else(|e| fail(&containerd, "Version", &e));
    println!(
        "bench-pod: {} {}, {} runs per runtime, {} concurrent pods for memory",
        version.runtime_name, version.runtime_version, args.runs, args.pods
    );

    let handlers = [RUNC_HANDLER, HUSK_HANDLER];
    if args.latency {
        latency(&containerd, &cri, &handlers, args.runs);
    }

    // Memory with M pods at once.
    let mut memory = Vec::new();
    for handler in handlers {
        memory.push((
            handler,
            measure_memory(&containerd, &cri, handler, args.pods),
        ));
    }

    println!();
    println!(
        "memory per pod ({} pods at once; MiB, RSS / PSS):",
        args.pods
    );
    let mut pss_totals = Vec::new();
    for (handler, m) in &memory {
        println!("  {handler:5} {}", m.describe(args.pods));
        pss_totals.push(m.total_pss());
    }
    println!(
        "  ratio husk/runc (total PSS): {:.1}",
        pss_totals[1] as f64 / pss_totals[0] as f64
    );
    drop(cri);
    drop(containerd);
}
