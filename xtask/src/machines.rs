//! The machines the kernel can be booted on, the names every subcommand
//! accepts for them, and the kernel command line a run passes.
//!
//! The command-line words themselves (`cet=`, `emul=`, ...) and their values
//! come from the `shadowcall-cmdline` crate, which the kernel parses them with.

use std::time::Duration;

use shadowcall_cmdline::{self as cmdline, CetMode, EmulStrategy, Key};

/// An emulator configuration.
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

    /// Bochs is slow; QEMU TCG fast; nested KVM on a loaded host can take
    /// a minute for the first dozen tests (each #BP exits to the host), so
    /// it gets the Bochs budget.
    pub fn default_timeout(self) -> Duration {
        match self {
            Machine::Bochs | Machine::BochsNocet | Machine::QemuKvm => Duration::from_secs(180),
            Machine::Qemu => Duration::from_secs(60),
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

/// A machine name as every subcommand (`run`, `iso`, `bench`, `test`)
/// accepts it: the four machines, and `bochs-cetoff`, which is `bochs`
/// booted with `cet=off` (the same CPU, shadow stacks left off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MachineName {
    /// Bochs `tigerlake`: CET supervisor shadow stacks (the default).
    Bochs,
    /// `bochs --cet off`: the same CPU with shadow stacks left off.
    #[value(name = "bochs-cetoff")]
    BochsCetoff,
    /// Bochs `corei7_icelake_u`: a CPU without CET.
    #[value(name = "bochs-nocet")]
    BochsNocet,
    /// QEMU TCG `-cpu max` (no CET).
    Qemu,
    /// QEMU KVM `-cpu host` (CET as the host passes it through).
    #[value(name = "qemu-kvm")]
    QemuKvm,
}

impl MachineName {
    pub const ALL: [MachineName; 5] = [
        MachineName::Bochs,
        MachineName::BochsCetoff,
        MachineName::BochsNocet,
        MachineName::Qemu,
        MachineName::QemuKvm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MachineName::BochsCetoff => "bochs-cetoff",
            other => other.machine().name(),
        }
    }

    pub fn from_name(name: &str) -> Option<MachineName> {
        MachineName::ALL.into_iter().find(|m| m.name() == name)
    }

    pub fn machine(self) -> Machine {
        match self {
            MachineName::Bochs | MachineName::BochsCetoff => Machine::Bochs,
            MachineName::BochsNocet => Machine::BochsNocet,
            MachineName::Qemu => Machine::Qemu,
            MachineName::QemuKvm => Machine::QemuKvm,
        }
    }

    /// The `cet=` this name implies (only `bochs-cetoff` implies one).
    pub fn implied_cet(self) -> Option<CetMode> {
        (self == MachineName::BochsCetoff).then_some(CetMode::Off)
    }

    /// The machine and `--cet` of this name combined with an explicit
    /// `--cet`; `bochs-cetoff --cet on` is a contradiction.
    pub fn resolve(self, cet: Option<CetMode>) -> Result<(Machine, Option<CetMode>), String> {
        match (self.implied_cet(), cet) {
            (Some(implied), Some(given)) if implied != given => Err(format!(
                "machine `{}` means `{} --cet {}`; it cannot be combined with `--cet {}`",
                self.name(),
                self.machine().name(),
                implied.name(),
                given.name()
            )),
            (implied, given) => Ok((self.machine(), given.or(implied))),
        }
    }

    /// The name of `machine` booted with `cet` (the inverse of
    /// [`MachineName::resolve`] where a name exists): `bochs` + `off` is
    /// `bochs-cetoff`.
    pub fn label(machine: Machine, cet: Option<CetMode>) -> String {
        match (machine, cet) {
            (Machine::Bochs, Some(CetMode::Off)) => MachineName::BochsCetoff.name().to_string(),
            (m, None | Some(CetMode::Auto)) => m.name().to_string(),
            (m, Some(c)) => format!("{}-cet{}", m.name(), c.name()),
        }
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

/// What the runner itself puts on the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunnerWords {
    /// The machine (for `expect_cet=`); None: no `expect_cet=` (an ISO).
    pub machine: Option<Machine>,
    /// `--cet` (None: not given; the runner then says `cet=auto`).
    pub cet: Option<CetMode>,
    /// `--emul`.
    pub emul: Option<EmulStrategy>,
    /// `--stress`: `stress=1`.
    pub stress: bool,
    /// `bench=1` (the benchmark subcommand).
    pub bench: bool,
}

fn word(key: Key, value: &str) -> String {
    format!("{}={value}", key.name())
}

/// The kernel command line words for one run: the runner's own words
/// (`cet=`, `expect_cet=`, `emul=`, then `extra`, then `stress=`/`bench=`).
///
/// An `extra` word for a key the kernel knows is checked here with the
/// kernel's own vocabulary, so a bad value is named before booting
/// (`--append cet=ON`: "bad value 'ON' for cet="). It replaces the runner's
/// default word for that key; given together with the option that sets the
/// same key (`--cet off --append cet=on`) it is a conflict. Words the kernel
/// does not know pass through: the kernel's `cmdline` test names them.
pub fn kernel_words(r: &RunnerWords, extra: &[String]) -> Result<Vec<String>, String> {
    let mut given: Vec<Key> = Vec::new();
    for w in extra {
        check_cmdline_word(w)?;
        let Some((key, value)) = Key::of_word(w) else { continue };
        key.check_value(value).map_err(|e| format!("--append {w}: {e}"))?;
        if given.contains(&key) {
            return Err(format!("--append: {}= given more than once", key.name()));
        }
        given.push(key);
        // What the runner's own option says for this key, if it says anything.
        let option: Option<(String, &str)> = match key {
            Key::Cet => r.cet.map(|c| (format!("--cet {}", c.name()), c.name())),
            Key::Emul => r.emul.map(|e| (format!("--emul {}", e.name()), e.name())),
            Key::Stress => r.stress.then(|| ("--stress".to_string(), cmdline::flag_value(true))),
            Key::Bench => r.bench.then(|| ("bench".to_string(), cmdline::flag_value(true))),
            Key::ExpectCet => None,
        };
        if let Some((option, said)) = option.filter(|(_, said)| *said != value) {
            return Err(format!(
                "`{option}` and `--append {w}` set {}= differently ({said} and {value}); give only one",
                key.name()
            ));
        }
    }
    let has = |k: Key| given.contains(&k);
    let mut words = Vec::new();
    if !has(Key::Cet) {
        words.push(word(Key::Cet, r.cet.unwrap_or_default().name()));
    }
    if let (false, Some(expect)) = (has(Key::ExpectCet), r.machine.and_then(Machine::expect_cet)) {
        words.push(word(Key::ExpectCet, cmdline::flag_value(expect)));
    }
    if let (false, Some(e)) = (has(Key::Emul), r.emul) {
        words.push(word(Key::Emul, e.name()));
    }
    words.extend(extra.iter().cloned());
    if r.stress && !has(Key::Stress) {
        words.push(word(Key::Stress, cmdline::flag_value(true)));
    }
    if r.bench && !has(Key::Bench) {
        words.push(word(Key::Bench, cmdline::flag_value(true)));
    }
    Ok(words)
}

/// A warning when the words make a line longer than the kernel keeps (the
/// kernel's `cmdline` test then fails naming the length; the runner lets
/// it, so that check stays testable).
pub fn length_warning(words: &[String]) -> Option<String> {
    let len = words.join(" ").len();
    cmdline::check_len(len).err().map(|e| format!("warning: {e}: the kernel's `cmdline` test will fail"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(words: &[&str]) -> Vec<String> {
        words.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_round_trip() {
        for m in MachineName::ALL {
            assert_eq!(MachineName::from_name(m.name()), Some(m));
            let value = <MachineName as clap::ValueEnum>::to_possible_value(&m).unwrap();
            assert_eq!(value.get_name(), m.name(), "clap and the runner spell {m:?} the same");
            let (machine, cet) = m.resolve(None).unwrap();
            assert_eq!(MachineName::label(machine, cet), m.name());
        }
        for m in Machine::ALL {
            assert_eq!(MachineName::from_name(m.name()).map(MachineName::machine), Some(m));
        }
        assert_eq!(MachineName::from_name("bochs-cet"), None);
    }

    #[test]
    fn bochs_cetoff_is_bochs_with_cet_off() {
        assert_eq!(MachineName::BochsCetoff.resolve(None), Ok((Machine::Bochs, Some(CetMode::Off))));
        assert_eq!(MachineName::BochsCetoff.resolve(Some(CetMode::Off)), Ok((Machine::Bochs, Some(CetMode::Off))));
        let e = MachineName::BochsCetoff.resolve(Some(CetMode::On)).unwrap_err();
        assert!(e.contains("`bochs --cet off`") && e.contains("`--cet on`"), "{e}");
        assert_eq!(MachineName::Qemu.resolve(Some(CetMode::On)), Ok((Machine::Qemu, Some(CetMode::On))));
        assert_eq!(MachineName::label(Machine::Qemu, Some(CetMode::On)), "qemu-ceton");
        assert_eq!(MachineName::label(Machine::Bochs, Some(CetMode::Auto)), "bochs");
    }

    #[test]
    fn words_per_machine() {
        let r = |machine, cet, emul| RunnerWords { machine, cet, emul, ..Default::default() };
        let words = kernel_words(&r(Some(Machine::Bochs), None, None), &w(&["foo=1"])).unwrap();
        assert_eq!(words, ["cet=auto", "expect_cet=1", "foo=1"]);
        let words =
            kernel_words(&r(Some(Machine::Qemu), Some(CetMode::Off), Some(EmulStrategy::ShadowGap)), &[]).unwrap();
        assert_eq!(words, ["cet=off", "expect_cet=0", "emul=shadowgap"]);
        assert_eq!(kernel_words(&r(Some(Machine::QemuKvm), Some(CetMode::On), None), &[]).unwrap(), ["cet=on"]);
        assert_eq!(kernel_words(&r(None, None, None), &[]).unwrap(), ["cet=auto"]);
        let bench = RunnerWords { bench: true, stress: true, ..r(None, None, None) };
        assert_eq!(kernel_words(&bench, &[]).unwrap(), ["cet=auto", "stress=1", "bench=1"]);
    }

    #[test]
    fn appended_words_of_known_keys() {
        let bochs = RunnerWords { machine: Some(Machine::Bochs), ..Default::default() };
        // The appended word replaces the runner's default.
        assert_eq!(kernel_words(&bochs, &w(&["cet=on"])).unwrap(), ["expect_cet=1", "cet=on"]);
        assert_eq!(kernel_words(&bochs, &w(&["expect_cet=0"])).unwrap(), ["cet=auto", "expect_cet=0"]);
        // A bad value is named, with the kernel's own message.
        let e = kernel_words(&bochs, &w(&["cet=ON"])).unwrap_err();
        assert_eq!(e, "--append cet=ON: bad value 'ON' for cet= (allowed: auto|on|off)");
        let e = kernel_words(&bochs, &w(&["emul=fast"])).unwrap_err();
        assert!(e.contains("'fast'") && e.contains("trampoline|shadowgap|classic"), "{e}");
        // The option and the word disagree: a conflict naming both.
        let cet_off = RunnerWords { cet: Some(CetMode::Off), ..bochs };
        let e = kernel_words(&cet_off, &w(&["cet=on"])).unwrap_err();
        assert_eq!(e, "`--cet off` and `--append cet=on` set cet= differently (off and on); give only one");
        // ... or agree: said once.
        assert_eq!(kernel_words(&cet_off, &w(&["cet=off"])).unwrap(), ["expect_cet=1", "cet=off"]);
        let stress = RunnerWords { stress: true, ..bochs };
        let words = kernel_words(&stress, &w(&["stress=1"])).unwrap();
        assert_eq!(words.iter().filter(|w| *w == "stress=1").count(), 1);
        assert!(kernel_words(&stress, &w(&["stress=0"])).unwrap_err().contains("`--stress`"));
        let e = kernel_words(&bochs, &w(&["emul=classic", "emul=trampoline"])).unwrap_err();
        assert!(e.contains("emul= given more than once"), "{e}");
        // Unknown words are the kernel's to reject.
        assert_eq!(kernel_words(&bochs, &w(&["bogus_word"])).unwrap(), ["cet=auto", "expect_cet=1", "bogus_word"]);
        assert!(kernel_words(&bochs, &w(&["a b"])).unwrap_err().contains("`a b`"));
    }

    #[test]
    fn long_lines_are_warned_about() {
        assert_eq!(length_warning(&w(&["cet=auto"])), None);
        let long = format!("x={}", "a".repeat(600));
        let warning = length_warning(&w(&["cet=auto", &long])).unwrap();
        assert!(warning.contains("611 bytes"), "{warning}");
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
