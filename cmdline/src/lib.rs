//! The kernel command line: its words, their values, and the strict parser.
//!
//! This crate is the one definition of the vocabulary. The kernel parses its
//! Multiboot command line with it; the host runner (`xtask`) builds command
//! lines and checks `--append` words with the same names, so the two cannot
//! drift apart. Every word must be known: a word the kernel does not
//! understand is an error it reports in its test output, never something it
//! silently ignores.
#![cfg_attr(not(test), no_std)]

use core::fmt;

/// The longest command line the kernel keeps (bytes, without the NUL). A
/// longer one is an error (the `cmdline` self-test names its length), never
/// silently cut.
pub const MAX_LEN: usize = 512;

/// The values of the boolean words (`expect_cet=`, `bench=`, `stress=`).
pub const FLAG_VALUES: &str = "0|1";

/// A key the kernel understands (`key=value`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// `cet=auto|on|off` ([`CetMode`]).
    Cet,
    /// `expect_cet=0|1`: what the runner knows about the machine's CPUID.
    ExpectCet,
    /// `emul=trampoline|shadowgap|classic` ([`EmulStrategy`]).
    Emul,
    /// `bench=0|1`: run the benchmarks after the self-tests.
    Bench,
    /// `stress=0|1`: the long (soak) version of the SMP stress test.
    Stress,
}

impl Key {
    pub const ALL: [Key; 5] = [Key::Cet, Key::ExpectCet, Key::Emul, Key::Bench, Key::Stress];

    pub const fn name(self) -> &'static str {
        match self {
            Key::Cet => "cet",
            Key::ExpectCet => "expect_cet",
            Key::Emul => "emul",
            Key::Bench => "bench",
            Key::Stress => "stress",
        }
    }

    pub fn from_name(name: &str) -> Option<Key> {
        Key::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The allowed values, as the error messages print them.
    pub const fn allowed(self) -> &'static str {
        match self {
            Key::Cet => CetMode::ALLOWED,
            Key::Emul => EmulStrategy::ALLOWED,
            Key::ExpectCet | Key::Bench | Key::Stress => FLAG_VALUES,
        }
    }

    /// Splits `key=value` into a known key and its value (not checked).
    pub fn of_word(word: &str) -> Option<(Key, &str)> {
        let (key, value) = word.split_once('=')?;
        Some((Key::from_name(key)?, value))
    }

    /// Checks `value` for this key; the error names the value.
    pub fn check_value(self, value: &str) -> Result<(), CmdlineError<'_>> {
        let known = match self {
            Key::Cet => CetMode::from_name(value).is_some(),
            Key::Emul => EmulStrategy::from_name(value).is_some(),
            Key::ExpectCet | Key::Bench | Key::Stress => parse_flag(value).is_some(),
        };
        if known {
            Ok(())
        } else {
            Err(CmdlineError::BadValue { key: self.name(), value, allowed: self.allowed() })
        }
    }
}

/// `cet=`: whether to turn on supervisor shadow stacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CetMode {
    /// Use shadow stacks when CPUID reports CET_SS.
    #[default]
    Auto,
    /// Require shadow stacks: a CPU without CET_SS is an error.
    On,
    /// Never turn shadow stacks on (the fallback path on a CET CPU).
    Off,
}

impl CetMode {
    pub const ALL: [CetMode; 3] = [CetMode::Auto, CetMode::On, CetMode::Off];
    pub const NAMES: [&'static str; 3] = ["auto", "on", "off"];
    pub const ALLOWED: &'static str = "auto|on|off";

    pub const fn name(self) -> &'static str {
        match self {
            CetMode::Auto => "auto",
            CetMode::On => "on",
            CetMode::Off => "off",
        }
    }

    pub fn from_name(name: &str) -> Option<CetMode> {
        CetMode::ALL.into_iter().find(|c| c.name() == name)
    }
}

/// `emul=`: which int3 call-emulation strategy the #BP handler uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulStrategy {
    /// The two-call trampoline (two traps; works with shadow stacks on).
    Trampoline,
    /// The one-trap shadow gap (works with shadow stacks on).
    ShadowGap,
    /// Push the return address on the normal stack only (no shadow stacks).
    Classic,
}

impl EmulStrategy {
    pub const ALL: [EmulStrategy; 3] = [EmulStrategy::Trampoline, EmulStrategy::ShadowGap, EmulStrategy::Classic];
    pub const NAMES: [&'static str; 3] = ["trampoline", "shadowgap", "classic"];
    pub const ALLOWED: &'static str = "trampoline|shadowgap|classic";

    pub const fn name(self) -> &'static str {
        match self {
            EmulStrategy::Trampoline => "trampoline",
            EmulStrategy::ShadowGap => "shadowgap",
            EmulStrategy::Classic => "classic",
        }
    }

    pub fn from_name(name: &str) -> Option<EmulStrategy> {
        EmulStrategy::ALL.into_iter().find(|e| e.name() == name)
    }
}

/// The parsed command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cmdline {
    pub cet: CetMode,
    /// `expect_cet=0|1`: what the runner knows about the machine's CPUID.
    pub expect_cet: Option<bool>,
    pub emul: Option<EmulStrategy>,
    /// `bench=0|1`: run the benchmarks after the self-tests.
    pub bench: bool,
    /// `stress=0|1`: run the long (soak) version of the SMP stress test.
    pub stress: bool,
}

impl Default for Cmdline {
    fn default() -> Self {
        Cmdline { cet: CetMode::Auto, expect_cet: None, emul: None, bench: false, stress: false }
    }
}

/// Why a command line was rejected. Borrowed words point into the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    UnknownWord(&'a str),
    BadValue {
        key: &'static str,
        value: &'a str,
        allowed: &'static str,
    },
    Repeated(&'static str),
    /// The loader passed `len` bytes; the kernel keeps at most `max`.
    TooLong {
        len: usize,
        max: usize,
    },
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdlineError::UnknownWord(w) => write!(f, "unknown command-line word '{w}'"),
            CmdlineError::BadValue { key, value, allowed } => {
                write!(f, "bad value '{value}' for {key}= (allowed: {allowed})")
            }
            CmdlineError::Repeated(key) => write!(f, "{key}= given more than once"),
            CmdlineError::TooLong { len, max } => {
                write!(f, "the command line is {len} bytes long; the kernel keeps at most {max} bytes")
            }
        }
    }
}

/// `Err(TooLong)` when a command line of `len` bytes does not fit in [`MAX_LEN`].
pub fn check_len(len: usize) -> Result<(), CmdlineError<'static>> {
    if len > MAX_LEN {
        Err(CmdlineError::TooLong { len, max: MAX_LEN })
    } else {
        Ok(())
    }
}

/// Parse a Multiboot command line. Some boot loaders put the kernel image's
/// name first (QEMU `-kernel`: its path; GRUB's `multiboot` passes only the
/// words after the path); a first word without `=` that looks like a path
/// or an `.elf` file is taken as that name and skipped.
pub fn parse_multiboot(line: &str) -> Result<Cmdline, CmdlineError<'_>> {
    let mut words = line.split_ascii_whitespace().peekable();
    if let Some(first) = words.peek() {
        if !first.contains('=') && (first.contains('/') || first.ends_with(".elf")) {
            words.next();
        }
    }
    parse_words(words)
}

/// Parse command-line words (no image name).
pub fn parse_words<'a>(words: impl Iterator<Item = &'a str>) -> Result<Cmdline, CmdlineError<'a>> {
    let mut c = Cmdline::default();
    let mut seen = [false; Key::ALL.len()];
    for w in words {
        let Some((key, value)) = Key::of_word(w) else {
            return Err(CmdlineError::UnknownWord(w));
        };
        if core::mem::replace(&mut seen[key as usize], true) {
            return Err(CmdlineError::Repeated(key.name()));
        }
        key.check_value(value)?;
        match key {
            Key::Cet => c.cet = CetMode::from_name(value).unwrap_or_default(),
            Key::ExpectCet => c.expect_cet = parse_flag(value),
            Key::Emul => c.emul = EmulStrategy::from_name(value),
            Key::Bench => c.bench = parse_flag(value).unwrap_or(false),
            Key::Stress => c.stress = parse_flag(value).unwrap_or(false),
        }
    }
    Ok(c)
}

/// `0` / `1` of a boolean word.
pub fn parse_flag(value: &str) -> Option<bool> {
    match value {
        "0" => Some(false),
        "1" => Some(true),
        _ => None,
    }
}

/// The value of a boolean word.
pub const fn flag_value(on: bool) -> &'static str {
    if on {
        "1"
    } else {
        "0"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_image_name() {
        assert_eq!(parse_multiboot("").unwrap(), Cmdline::default());
        assert_eq!(parse_multiboot("/boot/shadowcall.elf").unwrap(), Cmdline::default());
        let c = parse_multiboot("/tmp/run/kernel.elf cet=off expect_cet=1 emul=classic").unwrap();
        assert_eq!(c.cet, CetMode::Off);
        assert_eq!(c.expect_cet, Some(true));
        assert_eq!(c.emul, Some(EmulStrategy::Classic));
        assert_eq!(parse_multiboot("kernel.elf cet=on").unwrap().cet, CetMode::On);
        assert!(parse_multiboot("bench=1").unwrap().bench);
        assert!(!parse_multiboot("bench=0").unwrap().bench);
        assert!(parse_multiboot("stress=1").unwrap().stress);
        assert_eq!(parse_multiboot("emul=shadowgap").unwrap().emul, Some(EmulStrategy::ShadowGap));
    }

    #[test]
    fn unknown_words_are_errors() {
        assert_eq!(parse_multiboot("cet=auto bogus_word"), Err(CmdlineError::UnknownWord("bogus_word")));
        assert_eq!(parse_multiboot("/k.elf quiet=1"), Err(CmdlineError::UnknownWord("quiet=1")));
        // A bare first word that does not look like an image name is not skipped.
        assert_eq!(parse_multiboot("bogus cet=on"), Err(CmdlineError::UnknownWord("bogus")));
        let msg = format!("{}", parse_multiboot("x.elf bogus_word").unwrap_err());
        assert!(msg.contains("bogus_word"), "{msg}");
    }

    #[test]
    fn bad_and_repeated_values() {
        assert!(matches!(parse_multiboot("cet=maybe"), Err(CmdlineError::BadValue { key: "cet", .. })));
        assert!(matches!(parse_multiboot("expect_cet=2"), Err(CmdlineError::BadValue { key: "expect_cet", .. })));
        assert!(matches!(parse_multiboot("emul=fast"), Err(CmdlineError::BadValue { key: "emul", .. })));
        assert!(matches!(parse_multiboot("bench=yes"), Err(CmdlineError::BadValue { key: "bench", .. })));
        assert_eq!(parse_multiboot("cet=on cet=off"), Err(CmdlineError::Repeated("cet")));
        let msg = format!("{}", parse_multiboot("cet=ON").unwrap_err());
        assert_eq!(msg, "bad value 'ON' for cet= (allowed: auto|on|off)");
    }

    #[test]
    fn vocabulary_round_trips() {
        for k in Key::ALL {
            assert_eq!(Key::from_name(k.name()), Some(k));
        }
        for (c, n) in CetMode::ALL.into_iter().zip(CetMode::NAMES) {
            assert_eq!((c.name(), CetMode::from_name(n)), (n, Some(c)));
        }
        for (e, n) in EmulStrategy::ALL.into_iter().zip(EmulStrategy::NAMES) {
            assert_eq!((e.name(), EmulStrategy::from_name(n)), (n, Some(e)));
        }
        assert_eq!(CetMode::ALLOWED, CetMode::NAMES.join("|"));
        assert_eq!(EmulStrategy::ALLOWED, EmulStrategy::NAMES.join("|"));
        assert_eq!(EmulStrategy::from_name("Classic"), None);
        assert_eq!(Key::of_word("cet=on"), Some((Key::Cet, "on")));
        assert_eq!(Key::of_word("cet"), None);
        assert_eq!(Key::of_word("quiet=1"), None);
        assert!(Key::Emul.check_value("shadowgap").is_ok());
        assert_eq!(
            Key::Cet.check_value("ON"),
            Err(CmdlineError::BadValue { key: "cet", value: "ON", allowed: "auto|on|off" })
        );
        assert!(Key::Stress.check_value("2").is_err());
        assert_eq!((flag_value(true), flag_value(false)), ("1", "0"));
    }

    #[test]
    fn length_limit() {
        assert!(check_len(MAX_LEN).is_ok());
        let e = check_len(MAX_LEN + 88).unwrap_err();
        assert_eq!(e, CmdlineError::TooLong { len: 600, max: 512 });
        assert!(format!("{e}").contains("600 bytes"), "{e}");
    }
}
