//! The machines the kernel can be booted on, and the kernel options they map to.

use std::time::Duration;

/// An emulator configuration `cargo xtask run --machine NAME` can boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// Bochs, `cpu: model=tigerlake`: the only Bochs model with CET.
    Bochs,
    /// Bochs, `cpu: model=corei7_icelake_u`: no CET.
    BochsNocet,
    /// QEMU TCG, `-cpu max` (TCG has no CET).
    Qemu,
    /// QEMU with KVM, `-cpu host` (CET depends on the host).
    QemuKvm,
}

impl Machine {
    pub const ALL: [Machine; 4] = [Machine::Bochs, Machine::BochsNocet, Machine::Qemu, Machine::QemuKvm];

    pub fn name(self) -> &'static str {
        match self {
            Machine::Bochs => "bochs",
            Machine::BochsNocet => "bochs-nocet",
            Machine::Qemu => "qemu",
            Machine::QemuKvm => "qemu-kvm",
        }
    }

    pub fn from_name(name: &str) -> Option<Machine> {
        Machine::ALL.into_iter().find(|m| m.name() == name)
    }

    pub fn is_bochs(self) -> bool {
        matches!(self, Machine::Bochs | Machine::BochsNocet)
    }

    /// The `expect_cet=` word the runner passes, if any: whether this machine
    /// is known to offer CET supervisor shadow stacks.
    pub fn expect_cet(self) -> Option<bool> {
        match self {
            Machine::Bochs => Some(true),
            Machine::BochsNocet | Machine::Qemu => Some(false),
            Machine::QemuKvm => None,
        }
    }

    pub fn default_timeout(self) -> Duration {
        if self.is_bochs() {
            Duration::from_secs(180)
        } else {
            Duration::from_secs(60)
        }
    }

    /// The default timeout with `smp` CPUs: QEMU TCG runs the multi-CPU
    /// tests (the patch stress above all) far slower, so 300 s from 2 CPUs.
    pub fn default_timeout_for(self, smp: u32) -> Duration {
        if !self.is_bochs() && smp > 1 {
            Duration::from_secs(300)
        } else {
            self.default_timeout()
        }
    }

    /// The Bochs `cpu: model=` value.
    pub fn bochs_cpu_model(self) -> Option<&'static str> {
        match self {
            Machine::Bochs => Some("tigerlake"),
            Machine::BochsNocet => Some("corei7_icelake_u"),
            _ => None,
        }
    }
}

/// `cet=` on the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cet {
    #[default]
    Auto,
    On,
    Off,
}

impl Cet {
    pub fn name(self) -> &'static str {
        match self {
            Cet::Auto => "auto",
            Cet::On => "on",
            Cet::Off => "off",
        }
    }

    pub fn from_name(name: &str) -> Option<Cet> {
        [Cet::Auto, Cet::On, Cet::Off].into_iter().find(|c| c.name() == name)
    }
}

/// `emul=` on the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emul {
    Trampoline,
    Shadowgap,
    Classic,
}

impl Emul {
    pub fn name(self) -> &'static str {
        match self {
            Emul::Trampoline => "trampoline",
            Emul::Shadowgap => "shadowgap",
            Emul::Classic => "classic",
        }
    }

    pub fn from_name(name: &str) -> Option<Emul> {
        [Emul::Trampoline, Emul::Shadowgap, Emul::Classic].into_iter().find(|e| e.name() == name)
    }
}

/// A word the user may append to the kernel command line. It goes into
/// grub.cfg and into QEMU's `-append`, so it is kept to a safe alphabet.
pub fn check_cmdline_word(word: &str) -> Result<(), String> {
    if word.is_empty() {
        return Err("an empty kernel command line word".to_string());
    }
    let bad = word.chars().find(|c| !(c.is_ascii_alphanumeric() || "_=.,:/+-".contains(*c)));
    match bad {
        Some(c) => {
            Err(format!("kernel command line word `{word}` contains {c:?}; allowed are letters, digits and _=.,:/+-"))
        }
        None => Ok(()),
    }
}

/// The kernel command line words for one run, in a fixed order:
/// `cet=`, `expect_cet=` (if the machine has one), `emul=` (if given), then `extra`.
pub fn kernel_words(machine: Option<Machine>, cet: Cet, emul: Option<Emul>, extra: &[String]) -> Vec<String> {
    let mut words = vec![format!("cet={}", cet.name())];
    if let Some(expect) = machine.and_then(Machine::expect_cet) {
        words.push(format!("expect_cet={}", u8::from(expect)));
    }
    if let Some(e) = emul {
        words.push(format!("emul={}", e.name()));
    }
    words.extend(extra.iter().cloned());
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in Machine::ALL {
            assert_eq!(Machine::from_name(m.name()), Some(m));
        }
        assert_eq!(Machine::from_name("bochs-cet"), None);
        assert_eq!(Cet::from_name("on"), Some(Cet::On));
        assert_eq!(Emul::from_name("classic"), Some(Emul::Classic));
        assert_eq!(Emul::from_name("Classic"), None);
    }

    #[test]
    fn words_per_machine() {
        let extra = vec!["foo=1".to_string()];
        assert_eq!(kernel_words(Some(Machine::Bochs), Cet::Auto, None, &extra), ["cet=auto", "expect_cet=1", "foo=1"]);
        assert_eq!(
            kernel_words(Some(Machine::Qemu), Cet::Off, Some(Emul::Shadowgap), &[]),
            ["cet=off", "expect_cet=0", "emul=shadowgap"]
        );
        assert_eq!(kernel_words(Some(Machine::QemuKvm), Cet::On, None, &[]), ["cet=on"]);
        assert_eq!(kernel_words(None, Cet::Auto, None, &[]), ["cet=auto"]);
    }

    #[test]
    fn cmdline_word_alphabet() {
        assert!(check_cmdline_word("bogus_word").is_ok());
        assert!(check_cmdline_word("a=b,c:d/e.f+g-h").is_ok());
        assert!(check_cmdline_word("").is_err());
        assert!(check_cmdline_word("two words").is_err());
        assert!(check_cmdline_word("x;y").is_err());
        assert!(check_cmdline_word("\"q\"").is_err());
        assert!(check_cmdline_word("$var").is_err());
    }
}
