//! Kernel output: every byte goes to COM1 and to the emulators' debug port 0xE9.

use core::fmt::{self, Write};

use spin::Mutex;
use x86_64::instructions::port::Port;

const COM1: u16 = 0x3f8;
/// Bochs' `port_e9_hack` and QEMU's `-debugcon` print bytes written here.
const DEBUG_PORT: u16 = 0xe9;
/// Line status register: transmit holding register empty.
const LSR_THRE: u8 = 1 << 5;

pub struct Console {
    initialized: bool,
}

pub static CONSOLE: Mutex<Console> = Mutex::new(Console { initialized: false });

impl Console {
    fn init(&mut self) {
        // 115200 8N1, FIFO on, interrupts off.
        let regs: [(u16, u8); 7] = [(1, 0x00), (3, 0x80), (0, 0x01), (1, 0x00), (3, 0x03), (2, 0xc7), (4, 0x03)];
        for (off, val) in regs {
            // SAFETY: programming the standard COM1 UART registers has no memory effects.
            unsafe { Port::<u8>::new(COM1 + off).write(val) };
        }
        self.initialized = true;
    }

    fn put(&mut self, b: u8) {
        if !self.initialized {
            self.init();
        }
        // SAFETY: port I/O to the UART and the debug port has no memory effects.
        unsafe {
            let mut lsr = Port::<u8>::new(COM1 + 5);
            for _ in 0..100_000 {
                if lsr.read() & LSR_THRE != 0 {
                    break;
                }
            }
            Port::<u8>::new(COM1).write(b);
            Port::<u8>::new(DEBUG_PORT).write(b);
        }
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

/// Print, even from an exception handler that interrupted a print: the lock
/// is taken only when free; otherwise the output goes out unlocked (it may
/// interleave, but it is never lost and never deadlocks).
pub fn print(args: fmt::Arguments<'_>) {
    x86_64::instructions::interrupts::without_interrupts(|| match CONSOLE.try_lock() {
        Some(mut c) => {
            let _ = c.write_fmt(args);
        }
        None => {
            let mut c = Console { initialized: true };
            let _ = c.write_fmt(args);
        }
    });
}

#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::print(format_args!($($arg)*)) };
}

#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::console::print(format_args!("{}\n", format_args!($($arg)*))) };
}

/// A KTAP diagnostic line.
#[macro_export]
macro_rules! diag {
    ($($arg:tt)*) => { $crate::console::print(format_args!("# {}\n", format_args!($($arg)*))) };
}
