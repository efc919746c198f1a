//! `husk-agent`: PID 1 inside the microVM.
//!
//! Placeholder until the agent issue lands: as PID 1 it announces the boot on the console and
//! reboots, which is enough for the foundation's smoke test (kernel + image + test host).

use std::io::Write;

fn main() {
    if std::process::id() != 1 {
        eprintln!("husk-agent: not implemented yet (only the PID 1 boot marker exists)");
        std::process::exit(2);
    }
    let mut console = std::io::stdout();
    // Ignoring a write error: PID 1 has nowhere else to report it and must still reboot.
    let _ = writeln!(console, "{}", husk_agent_protocol::BOOT_MARKER);
    let _ = console.flush();
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot(2) with a valid command; as PID 1 we own the machine. With `reboot=k` the
    // kernel resets through the keyboard controller, which the monitor sees as the guest's end.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    // reboot(2) returns only on failure; PID 1 must not exit (that panics the kernel).
    loop {
        std::thread::park();
    }
}
