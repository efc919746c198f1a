//! The part of the i8042 keyboard controller a guest uses to reboot: command 0xfe (pulse the
//! reset line) on port 0x64 ends the VM. Everything else reads as zero and is ignored.

use crate::devices::BusDevice;
use crate::exit::{ExitHandle, VmExit};

/// Offset of the command/status port (0x64) from the data port (0x60).
pub const COMMAND_OFFSET: u64 = 4;
/// Size of the port range 0x60..=0x64.
pub const PORT_RANGE: u64 = 5;
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 reset line.
pub struct I8042 {
    exit: ExitHandle,
}

impl I8042 {
    /// A controller whose reset ends the VM through `exit`.
    pub fn new(exit: ExitHandle) -> Self {
        I8042 { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: input and output buffers empty, so a guest waiting to send a command proceeds.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            tracing::info!("guest reset through the i8042 controller");
            self.exit.request(VmExit::I8042Reset);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_requests_exit() {
        let exit = ExitHandle::new().unwrap();
        let mut dev = I8042::new(exit.try_clone().unwrap());
        dev.write(COMMAND_OFFSET, &[0xfe]);
        assert_eq!(exit.reason(), Some(VmExit::I8042Reset));
    }

    #[test]
    fn other_commands_are_ignored() {
        let exit = ExitHandle::new().unwrap();
        let mut dev = I8042::new(exit.try_clone().unwrap());
        dev.write(COMMAND_OFFSET, &[0xad]);
        dev.write(0, &[0xfe]);
        assert_eq!(exit.reason(), None);
    }
}
