#!/usr/bin/env python3
"""Boot benchmark: husk-vmm against QEMU -M microvm, same kernel and initramfs.

Per run: wall time from exec to the guest's marker on the serial console (both monitors write
the console to a pipe read here, so both are measured the same way), and the monitor's own
memory: peak RSS (VmHWM) minus the resident part of the guest-RAM mapping, sampled when the
marker arrives. Prints per-run figures, medians and the husk/QEMU ratios. Needs a real KVM
(run it through tests/testhost/run on machines without one).
"""
import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import time

CMDLINE = "console=ttyS0 reboot=k panic=-1 pci=off nomodule"


def smaps_guest_rss_kb(pid, mem_mib):
    """Rss (kB) of the mappings exactly as large as guest RAM."""
    want = mem_mib << 20
    total = 0
    in_guest = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(x, 16) for x in head.split("-"))
                in_guest = (end - start) == want
            elif in_guest and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def run_once(cmd, marker, mem_mib, timeout):
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    buf = b""
    boot = None
    overhead = None
    try:
        while time.monotonic() - t0 < timeout:
            ready, _, _ = select.select([p.stdout], [], [], 0.2)
            if not ready:
                if p.poll() is not None:
                    break
                continue
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            if marker in buf:
                boot = time.monotonic() - t0
                overhead = status_kb(p.pid, "VmHWM") - smaps_guest_rss_kb(p.pid, mem_mib)
                break
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if boot is None:
        tail = buf[-2000:].decode(errors="replace")
        raise SystemExit(f"no marker from {cmd[0]} within {timeout}s; console tail:\n{tail}")
    return boot, overhead


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--vmm", required=True)
    ap.add_argument("--qemu", default="qemu-system-x86_64")
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True)
    ap.add_argument("--memory-mib", type=int, default=256)
    ap.add_argument("--marker", default="husk-agent: started")
    ap.add_argument("--timeout", type=int, default=120)
    ap.add_argument("--cmdline", default="", help="appended to the kernel command line of both")
    args = ap.parse_args()
    marker = args.marker.encode()
    mem = args.memory_mib

    husk = [args.vmm, "--kernel", args.kernel, "--initrd", args.initrd, "--memory-mib", str(mem),
            "--vcpus", "1", "--console", "-", "--cmdline", args.cmdline]
    qemu = [args.qemu, "-M", "microvm,x-option-roms=off,rtc=off,isa-serial=on",
            "-enable-kvm", "-cpu", "host", "-m", str(mem), "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", args.kernel, "-initrd", args.initrd,
            "-append", f"{CMDLINE} {args.cmdline}".strip()]

    results = {"husk-vmm": [], "qemu-microvm": []}
    for i in range(args.runs):
        for name, cmd in (("husk-vmm", husk), ("qemu-microvm", qemu)):
            boot, over = run_once(cmd, marker, mem, args.timeout)
            results[name].append((boot, over))
            print(f"run {i + 1:2d} {name:13s} boot {boot * 1000:8.1f} ms  overhead {over / 1024:7.2f} MiB",
                  flush=True)

    med = {n: (statistics.median(b for b, _ in r), statistics.median(o for _, o in r))
           for n, r in results.items()}
    print()
    print(f"{'monitor':13s} {'median boot':>12s} {'median overhead':>16s}")
    for n, (b, o) in med.items():
        print(f"{n:13s} {b * 1000:9.1f} ms {o / 1024:12.2f} MiB")
    hb, ho = med["husk-vmm"]
    qb, qo = med["qemu-microvm"]
    print(f"ratio husk/qemu: boot {hb / qb:.2f} (goal <= 0.5), overhead {ho / qo:.2f}; "
          f"husk-vmm overhead {ho / 1024:.2f} MiB (goal <= 5 MiB)")


if __name__ == "__main__":
    sys.exit(main())
