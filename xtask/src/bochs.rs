//! Booting the kernel in Bochs from a GRUB rescue ISO.

use std::path::Path;

use crate::emulator::Launch;
use crate::error::{Context, Error, Result};
use crate::iso::{self, Loader};
use crate::machines::Machine;
use crate::rundir::{check_plain_path, RunDir};

pub const ISO: &str = "run.iso";
pub const BOCHSRC: &str = "bochsrc";
pub const RC_FILE: &str = "cont.rc";
pub const SERIAL_LOG: &str = "serial.log";
pub const LOG: &str = "bochs.log";
pub const STDERR_LOG: &str = "bochs-stderr.log";

/// The Bochs configuration for one run (see shared/bochs/bochsrc.example).
pub fn bochsrc(model: &str, smp: u32, iso: &Path, serial: &Path, log: &Path) -> String {
    format!(
        "megs: 128
romimage: file=/usr/share/bochs/BIOS-bochs-latest
vgaromimage: file=/usr/share/vgabios/vgabios.bin
ata0-master: type=cdrom, path={iso}, status=inserted
boot: cdrom
display_library: sdl2
cpu: model={model}, count={smp}, ips=10000000, reset_on_triple_fault=0
clock: sync=none, time0=946684800
log: {log}
panic: action=fatal
error: action=report
info: action=report
debug: action=ignore
com1: enabled=1, mode=file, dev={serial}
port_e9_hack: enabled=1
magic_break: enabled=1
speaker: enabled=0
sound: driver=dummy
",
        iso = iso.display(),
        serial = serial.display(),
        log = log.display(),
    )
}

/// Builds the ISO (GRUB loading `kernel` with `loader`), bochsrc and debugger rc file in `dir`.
pub fn prepare(
    dir: &RunDir,
    machine: Machine,
    smp: u32,
    words: &[String],
    kernel: &Path,
    loader: Loader,
) -> Result<Launch> {
    let model =
        machine.bochs_cpu_model().ok_or_else(|| Error::new(format!("`{}` is not a Bochs machine", machine.name())))?;
    check_plain_path(dir.path())?;
    let iso_path = dir.join(ISO);
    iso::build_iso(kernel, loader, words, &dir.join("iso-root"), &iso_path)?;
    let rc = bochsrc(model, smp, &iso_path, &dir.join(SERIAL_LOG), &dir.join(LOG));
    std::fs::write(dir.join(BOCHSRC), rc).context(|| "cannot write bochsrc")?;
    // The debugger built into Debian's Bochs stops at its prompt: continue,
    // and after the kernel's magic breakpoint, quit (exit status 0).
    std::fs::write(dir.join(RC_FILE), "c\nq\n").context(|| "cannot write the Bochs rc file")?;
    Ok(Launch {
        program: "bochs".into(),
        args: ["-q", "-f", BOCHSRC, "-rc", RC_FILE].map(String::from).to_vec(),
        env: vec![("SDL_VIDEODRIVER".into(), "dummy".into())],
        cwd: dir.path().to_path_buf(),
        stderr_log: dir.join(STDERR_LOG),
        fatal_stderr: vec![],
    })
}

/// Bochs log lines that mean the guest crashed or reset: a panic-level
/// message (`p[`), a triple fault ("3rd (N) exception"), or a software reset.
pub fn log_problems(log: &str) -> Vec<String> {
    log.lines()
        .filter(|line| {
            let digits = line.bytes().take_while(u8::is_ascii_digit).count();
            let panic_level = digits > 0 && line[digits..].starts_with("p[");
            panic_level
                || line.contains("3rd (")
                || line.to_ascii_lowercase().contains("triple fault")
                || line.contains("Reset(SOFTWARE)")
        })
        .map(|line| format!("bochs log: {}", line.trim()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bochsrc_has_the_settings() {
        let rc =
            bochsrc("tigerlake", 2, Path::new("/r/run.iso"), Path::new("/r/serial.log"), Path::new("/r/bochs.log"));
        for want in [
            "cpu: model=tigerlake, count=2, ips=10000000, reset_on_triple_fault=0\n",
            "ata0-master: type=cdrom, path=/r/run.iso, status=inserted\n",
            "com1: enabled=1, mode=file, dev=/r/serial.log\n",
            "log: /r/bochs.log\n",
            "magic_break: enabled=1\n",
            "port_e9_hack: enabled=1\n",
            "clock: sync=none, time0=946684800\n",
            "display_library: sdl2\n",
            "sound: driver=dummy\n",
        ] {
            assert!(rc.contains(want), "missing {want:?}");
        }
    }

    #[test]
    fn log_problems_found() {
        let log = "\
00000000000i[SYS   ] bx_pc_system_c::Reset(HARDWARE) called
00000000000i[CPU0  ] cpu hardware reset
00000326188i[BIOS  ] Shutdown flag 0
00093506540i[SYS   ] bx_pc_system_c::Reset(SOFTWARE) called
00093506957p[CPU0  ] >>PANIC<< exception(): 3rd (13) exception with no resolution
";
        let p = log_problems(log);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("Reset(SOFTWARE)"));
        assert!(p[1].contains("3rd (13)"));
        assert!(log_problems(&log.lines().take(3).collect::<Vec<_>>().join("\n")).is_empty());
    }
}
