//! Strict parsing of the kernel command line.
//!
//! Every word must be known; a word we do not understand is an error that the
//! kernel reports in its test output, never something it silently ignores.

use core::fmt;

/// `cet=`: whether to turn on supervisor shadow stacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CetMode {
    /// Use shadow stacks when CPUID reports CET_SS.
    Auto,
    /// Require shadow stacks: a CPU without CET_SS is an error.
    On,
    /// Never turn shadow stacks on (the fallback path on a CET CPU).
    Off,
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
    pub fn name(self) -> &'static str {
        match self {
            EmulStrategy::Trampoline => "trampoline",
            EmulStrategy::ShadowGap => "shadowgap",
            EmulStrategy::Classic => "classic",
        }
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
    BadValue { key: &'static str, value: &'a str, allowed: &'static str },
    Repeated(&'static str),
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdlineError::UnknownWord(w) => write!(f, "unknown command-line word '{w}'"),
            CmdlineError::BadValue { key, value, allowed } => {
                write!(f, "bad value '{value}' for {key}= (allowed: {allowed})")
            }
            CmdlineError::Repeated(key) => write!(f, "{key}= given more than once"),
        }
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
    let (mut seen_cet, mut seen_expect, mut seen_emul) = (false, false, false);
    let (mut seen_bench, mut seen_stress) = (false, false);
    for w in words {
        let Some((key, value)) = w.split_once('=') else {
            return Err(CmdlineError::UnknownWord(w));
        };
        match key {
            "cet" => {
                once(&mut seen_cet, "cet")?;
                c.cet = match value {
                    "auto" => CetMode::Auto,
                    "on" => CetMode::On,
                    "off" => CetMode::Off,
                    _ => return Err(CmdlineError::BadValue { key: "cet", value, allowed: "auto|on|off" }),
                };
            }
            "expect_cet" => {
                once(&mut seen_expect, "expect_cet")?;
                c.expect_cet = Some(match value {
                    "0" => false,
                    "1" => true,
                    _ => return Err(CmdlineError::BadValue { key: "expect_cet", value, allowed: "0|1" }),
                });
            }
            "emul" => {
                once(&mut seen_emul, "emul")?;
                c.emul = Some(match value {
                    "trampoline" => EmulStrategy::Trampoline,
                    "shadowgap" => EmulStrategy::ShadowGap,
                    "classic" => EmulStrategy::Classic,
                    _ => {
                        return Err(CmdlineError::BadValue {
                            key: "emul",
                            value,
                            allowed: "trampoline|shadowgap|classic",
                        })
                    }
                });
            }
            "bench" => {
                once(&mut seen_bench, "bench")?;
                c.bench = flag("bench", value)?;
            }
            "stress" => {
                once(&mut seen_stress, "stress")?;
                c.stress = flag("stress", value)?;
            }
            _ => return Err(CmdlineError::UnknownWord(w)),
        }
    }
    Ok(c)
}

fn flag<'a>(key: &'static str, value: &'a str) -> Result<bool, CmdlineError<'a>> {
    match value {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(CmdlineError::BadValue { key, value, allowed: "0|1" }),
    }
}

fn once(seen: &mut bool, key: &'static str) -> Result<(), CmdlineError<'static>> {
    if core::mem::replace(seen, true) {
        Err(CmdlineError::Repeated(key))
    } else {
        Ok(())
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
    }

    #[test]
    fn unknown_words_are_errors() {
        assert_eq!(parse_multiboot("cet=auto bogus_word"), Err(CmdlineError::UnknownWord("bogus_word")));
        assert_eq!(parse_multiboot("/k.elf quiet=1"), Err(CmdlineError::UnknownWord("quiet=1")));
        // A bare first word that does not look like an image name is not skipped.
        assert_eq!(parse_multiboot("bogus cet=on"), Err(CmdlineError::UnknownWord("bogus")));
        let msg = alloc::format!("{}", parse_multiboot("x.elf bogus_word").unwrap_err());
        assert!(msg.contains("bogus_word"), "{msg}");
    }

    #[test]
    fn bad_and_repeated_values() {
        assert!(matches!(parse_multiboot("cet=maybe"), Err(CmdlineError::BadValue { key: "cet", .. })));
        assert!(matches!(parse_multiboot("expect_cet=2"), Err(CmdlineError::BadValue { key: "expect_cet", .. })));
        assert!(matches!(parse_multiboot("emul=fast"), Err(CmdlineError::BadValue { key: "emul", .. })));
        assert!(matches!(parse_multiboot("bench=yes"), Err(CmdlineError::BadValue { key: "bench", .. })));
        assert_eq!(parse_multiboot("cet=on cet=off"), Err(CmdlineError::Repeated("cet")));
    }
}
