//! Booting the kernel directly with `qemu-system-x86_64 -kernel` (an
//! example kernel, which needs Multiboot2, from a GRUB ISO with `-cdrom`).

use crate::emulator::Launch;
use crate::error::{Error, Result};
use crate::machines::Machine;
use crate::rundir::RunDir;

pub const KERNEL: &str = "kernel.elf";
pub const SERIAL_LOG: &str = "serial.log";
pub const STDERR_LOG: &str = "qemu-stderr.log";

/// What QEMU boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot<'a> {
    /// `dir/kernel.elf` with `-kernel` (Multiboot v1) and the words as its command line.
    Kernel,
    /// This ISO file in the run directory, from the CD-ROM.
    Iso(&'a str),
}

/// Whether /dev/kvm can be opened read-write; the error says why not.
pub fn kvm_usable() -> std::result::Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("cannot open /dev/kvm read-write: {e}"))
}

/// The QEMU command for one run.
pub fn prepare(dir: &RunDir, machine: Machine, smp: u32, words: &[String], gdb: bool, boot: Boot) -> Result<Launch> {
    let cpu: &[&str] = match machine {
        Machine::Qemu => &["-cpu", "max"],
        // `-cpu host` alone aborts QEMU 7.2 on this kind of (nested, paravirtualized)
        // KVM host: "failed to set MSR 0x10a" (IA32_ARCH_CAPABILITIES). The kernel
        // does not use that MSR, so leave it out of the guest CPU model.
        Machine::QemuKvm => &["-enable-kvm", "-cpu", "host,-arch-capabilities"],
        _ => return Err(Error::new(format!("`{}` is not a QEMU machine", machine.name()))),
    };
    let serial = format!("file:{}", dir.join(SERIAL_LOG).display());
    let smp = smp.to_string();
    let words = words.join(" ");
    let image: Vec<&str> = match boot {
        Boot::Kernel => vec!["-kernel", KERNEL, "-append", &words],
        Boot::Iso(iso) => vec!["-cdrom", iso, "-boot", "d"],
    };
    let mut args: Vec<String> = image.into_iter().map(String::from).collect();
    args.extend(
        [
            "-m",
            "128",
            "-smp",
            &smp,
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-debugcon",
            "stdio",
            "-serial",
            &serial,
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        .map(String::from),
    );
    args.extend(cpu.iter().map(|s| s.to_string()));
    if gdb {
        args.extend(["-s", "-S"].map(String::from));
    }
    Ok(Launch {
        program: "qemu-system-x86_64".into(),
        args,
        env: vec![],
        cwd: dir.path().to_path_buf(),
        stderr_log: dir.join(STDERR_LOG),
        // On an internal error QEMU pauses the guest instead of exiting.
        fatal_stderr: vec!["KVM internal error"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_arguments() {
        let dir = RunDir::create("xtask-unit-qemu").unwrap();
        let words = vec!["cet=auto".to_string(), "expect_cet=0".to_string()];
        let l = prepare(&dir, Machine::Qemu, 2, &words, false, Boot::Kernel).unwrap();
        let cmd = l.args.join(" ");
        assert!(cmd.starts_with("-kernel kernel.elf -append cet=auto expect_cet=0 -m 128 -smp 2 "), "{cmd}");
        assert!(cmd.contains("-device isa-debug-exit,iobase=0xf4,iosize=0x04"));
        assert!(cmd.ends_with("-cpu max"));
        let l = prepare(&dir, Machine::QemuKvm, 1, &words, true, Boot::Kernel).unwrap();
        assert!(l.args.join(" ").ends_with("-enable-kvm -cpu host,-arch-capabilities -s -S"));
        assert!(prepare(&dir, Machine::Bochs, 1, &words, false, Boot::Kernel).is_err());
        let l = prepare(&dir, Machine::Qemu, 1, &[], false, Boot::Iso("run.iso")).unwrap();
        let cmd = l.args.join(" ");
        assert!(cmd.starts_with("-cdrom run.iso -boot d -m 128 -smp 1 ") && !cmd.contains("-kernel"), "{cmd}");
        dir.remove().unwrap();
    }
}
