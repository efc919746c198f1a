#!/usr/bin/env python3
"""virtio-fs read benchmark: the same files read on the host and in a husk-vmm guest.

The share: one large file (`big`) and a tree of small files (`small/dNN/fNNNN`), on an ext4 image
loop-mounted from a file in the test host's /tmp (so `drop_caches` really empties the page cache;
the image itself sits in RAM, so "cold" means a page-cache miss served from memory, not a disk),
or in --dir when given.

Per run: the host reads both sets with the page cache dropped (cold) then again (warm); then the
caches are dropped and a guest boots with the share over virtio-fs; its /init (the same reader
program, fs-guest/) reads both sets twice (pass 1: first read after the mount; pass 2: again, from
the guest's cache where FUSE kept it), then from a copy in its own memory. Guest figures are timed
inside the guest. Prints per-run figures and the medians, and guest/host ratios. Needs a real KVM
and root (run it through tests/testhost/run on machines without one). Measures, never asserts.
"""
import argparse
import os
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

TAG = "fsbench"
# husk-vmm holds one O_PATH fd per inode the guest has looked up (host/vmm/README.md, virtio-fs
# "Known limits"): with the usual soft limit of 1024 the small-file tree runs out of fds (EMFILE),
# so the monitor gets this many.
NOFILE = 65536
LINE = re.compile(
    rb"fsbench: set=(big|small) where=(\w+) pass=(\d) files=(\d+) bytes=(\d+) ns=(\d+)")


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def populate(share, big_mib, small_files, small_kib, per_dir):
    chunk = os.urandom(1 << 20)
    with open(os.path.join(share, "big"), "wb") as f:
        for i in range(big_mib):
            # Different content per MiB, cheaply.
            f.write(chunk[i:] + chunk[:i])
    data = os.urandom(small_kib * 1024)
    for i in range(small_files):
        d = os.path.join(share, "small", f"d{i // per_dir:02d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i:04d}"), "wb") as f:
            f.write(data[i % 64:] + data[:i % 64])
    os.sync()


def parse(out):
    """[(set, where, pass, files, bytes, ns)] from the reader's output lines."""
    return [(m[1].decode(), m[2].decode(), int(m[3]), int(m[4]), int(m[5]), int(m[6]))
            for m in LINE.finditer(out)]


def host_read(reader, set_name, path):
    out = subprocess.run([reader, set_name, path], check=True, stdout=subprocess.PIPE).stdout
    got = parse(out)
    if len(got) != 1:
        raise SystemExit(f"unexpected output from {reader}: {out!r}")
    return got[0]


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(NOFILE, soft)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))


def guest_run(args, share, timeout):
    cmd = [args.vmm, "--kernel", args.kernel, "--initrd", args.initrd,
           "--memory-mib", str(args.memory_mib), "--vcpus", "1", "--console", "-",
           "--fs", f"{share},tag={TAG}", "--cmdline", f"fsbench.tag={TAG}"]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         preexec_fn=raise_nofile)
    buf = b""
    try:
        while time.monotonic() - t0 < timeout:
            ready, _, _ = select.select([p.stdout], [], [], 0.5)
            if not ready:
                if p.poll() is not None:
                    break
                continue
            chunk = os.read(p.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
        # The guest reboots after its last line: the monitor exits.
        p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        pass
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    err = p.stderr.read().decode(errors="replace")
    if b"fsbench: done" not in buf:
        tail = buf[-3000:].decode(errors="replace")
        raise SystemExit(f"the guest did not finish (exit {p.returncode}); stderr:\n{err}\nconsole tail:\n{tail}")
    return parse(buf)


def mib_s(nbytes, ns):
    return nbytes / (1 << 20) / (ns / 1e9) if ns else float("inf")


def files_s(files, ns):
    return files / (ns / 1e9) if ns else float("inf")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--vmm", required=True)
    ap.add_argument("--kernel", required=True)
    ap.add_argument("--initrd", required=True, help="image whose /init is husk-fsbench")
    ap.add_argument("--reader", required=True, help="husk-fsbench binary for the host reads")
    ap.add_argument("--memory-mib", type=int, default=512)
    ap.add_argument("--big-mib", type=int, default=64)
    ap.add_argument("--small-files", type=int, default=1000)
    ap.add_argument("--small-kib", type=int, default=4)
    ap.add_argument("--dir", help="existing empty directory for the share (default: ext4 on a loop image)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per guest run")
    args = ap.parse_args()
    if args.runs < 1 or not 1 <= args.big_mib <= 1024 or not 1 <= args.small_files <= 100000 \
            or not 1 <= args.small_kib <= 1024:
        raise SystemExit("--runs >= 1, --big-mib 1..1024, --small-files 1..100000, --small-kib 1..1024")

    scratch = tempfile.mkdtemp(prefix="husk-bench-fs-")
    mounted = False
    try:
        if args.dir:
            share = args.dir
            backing = f"directory {share}"
        else:
            share = os.path.join(scratch, "share")
            os.mkdir(share)
            image = os.path.join(scratch, "share.ext4")
            size_mib = args.big_mib + args.small_files * (args.small_kib + 4) // 1024 + 64
            with open(image, "wb") as f:
                f.truncate(size_mib << 20)
            subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0",
                            image], check=True)
            subprocess.run(["mount", "-o", "loop", image, share], check=True)
            mounted = True
            backing = f"ext4 on a loop image in {os.path.dirname(image)} (RAM-backed in the test host)"
        populate(share, args.big_mib, args.small_files, args.small_kib, 100)
        print(f"share: {backing}; big {args.big_mib} MiB; small {args.small_files} x {args.small_kib} KiB "
              f"in {(args.small_files + 99) // 100} directories; guest {args.memory_mib} MiB, 1 vCPU; "
              f"husk-vmm RLIMIT_NOFILE {NOFILE}; "
              f"{args.runs} runs", flush=True)

        # results[(set, label)] = [(files, bytes, ns)]
        results = {}

        def add(set_name, label, files, nbytes, ns):
            results.setdefault((set_name, label), []).append((files, nbytes, ns))
            fps = f"{files_s(files, ns):9.0f} files/s" if set_name == "small" else ""
            print(f"  {set_name:5s} {label:16s} {mib_s(nbytes, ns):9.1f} MiB/s {fps}", flush=True)

        for i in range(args.runs):
            print(f"run {i + 1}", flush=True)
            drop_caches()
            for set_name in ("big", "small"):
                s, _, _, files, nbytes, ns = host_read(args.reader, set_name, os.path.join(share, set_name))
                add(s, "host cold", files, nbytes, ns)
            for set_name in ("big", "small"):
                s, _, _, files, nbytes, ns = host_read(args.reader, set_name, os.path.join(share, set_name))
                add(s, "host warm", files, nbytes, ns)
            drop_caches()
            for s, where, p, files, nbytes, ns in guest_run(args, share, args.timeout):
                label = f"guest {where} {p}" if where == "virtiofs" else f"guest {where}"
                add(s, label, files, nbytes, ns)

        labels = ["host cold", "host warm", "guest virtiofs 1", "guest virtiofs 2", "guest memory"]
        print()
        print(f"medians of {args.runs} runs ('guest virtiofs 1': first read after the mount, host cache "
              f"dropped; '2': second read; 'guest memory': a copy in the guest's initramfs root)")
        med = {}
        for set_name in ("big", "small"):
            for label in labels:
                r = results.get((set_name, label))
                if not r:
                    continue
                med[(set_name, label)] = (statistics.median(mib_s(b, n) for _, b, n in r),
                                          statistics.median(files_s(f, n) for f, _, n in r))
        print(f"{'set':5s} {'where':16s} {'MiB/s':>9s} {'files/s':>9s}")
        for (set_name, label), (m, fps) in med.items():
            fcol = f"{fps:9.0f}" if set_name == "small" else f"{'-':>9s}"
            print(f"{set_name:5s} {label:16s} {m:9.1f} {fcol}")
        print()
        for set_name, unit, idx in (("big", "MiB/s", 0), ("small", "files/s", 1)):
            def ratio(a, b):
                x, y = med.get((set_name, a)), med.get((set_name, b))
                return f"{x[idx] / y[idx]:.3f}" if x and y and y[idx] else "n/a"
            print(f"ratio guest/host {set_name} ({unit}): first read / host cold "
                  f"{ratio('guest virtiofs 1', 'host cold')}, second read / host warm "
                  f"{ratio('guest virtiofs 2', 'host warm')}; guest memory / host warm "
                  f"{ratio('guest memory', 'host warm')}")
        with open("/proc/loadavg") as f:
            print(f"test host load average at the end (1/5/15 min): {' '.join(f.read().split()[:3])}")
    finally:
        if mounted:
            subprocess.run(["umount", share], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
