# husk's build and test entry points. Every target installs what it needs (apt-get, rustup).
SHELL := /bin/bash
CARGO ?= cargo
MUSL := x86_64-unknown-linux-musl
AGENT := target/$(MUSL)/release/husk-agent

.PHONY: all build deps-rust fmt-check clippy unit guest-kernel agent guest vmm-echo-image test-e2e test demo clean bench bench-boot bench-fs bench-pod

all: build

deps-rust:
	@source scripts/lib.sh && need_pkgs build-essential pkg-config protobuf-compiler && need_rust_target $(MUSL)

build: deps-rust
	$(CARGO) build --workspace

fmt-check:
	$(CARGO) fmt --all --check

clippy: deps-rust
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Unit and per-crate integration tests (root-only tests run too: CI is root).
unit: deps-rust
	$(CARGO) test --workspace --exclude husk-e2e

# The guest kernel, built from Debian's linux-source with kernel-config/'s fragment; cached.
guest-kernel:
	kernel-config/build

# husk-agent as a static binary: it is /init of the guest.
agent: deps-rust
	$(CARGO) build --release --target $(MUSL) -p husk-agent

# Kernel + initramfs: target/guest/vmlinux and target/guest/initramfs.cpio.gz.
guest: guest-kernel agent
	guest-agent/initramfs/build $(AGENT)

# The vsock echo guest image used by husk-vmm's end-to-end tests (target/guest/vmm-echo.cpio.gz).
vmm-echo-image: deps-rust
	host/vmm/tests/fixtures/build-echo-image

# End-to-end tests: they need a real KVM and run inside the test host.
test-e2e: guest build vmm-echo-image
	tests/e2e/run

test: fmt-check clippy unit test-e2e

demo: guest build
	tests/demo

clean:
	$(CARGO) clean

# Boot benchmark: husk-vmm against QEMU -M microvm in the test host; prints medians and ratios.
bench-boot: guest
	host/vmm/bench/boot

# virtio-fs benchmark: large- and small-file reads on the host and in a husk-vmm guest (test host).
bench-fs: guest-kernel deps-rust
	host/vmm/bench/fs

# Pod benchmark: RunPodSandbox to first output and memory per pod, husk against runc, through
# containerd's CRI plugin in the test host; prints medians and ratios.
bench-pod: guest deps-rust
	host/shim/bench/pod

# Every benchmark, one after the other.
bench: bench-boot bench-fs bench-pod
