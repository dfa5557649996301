//! KTAP version 1 output (the Linux kernel's test format).
//!
//! The kernel prints through any `core::fmt::Write`; keeping the format here
//! lets host tests pin it down exactly.

use core::fmt::{self, Write};

/// The result of one test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome<'a> {
    Pass,
    Fail,
    Skip(&'a str),
}

/// Numbers results and counts them.
#[derive(Default, Debug)]
pub struct Ktap {
    next: u32,
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
}

impl Ktap {
    /// `KTAP version 1` (on a line of its own, even after foreign output) and the plan.
    pub fn header(&mut self, w: &mut impl Write, plan: u32) -> fmt::Result {
        self.next = 1;
        write!(w, "\nKTAP version 1\n1..{plan}\n")
    }

    /// One result line.
    pub fn result(&mut self, w: &mut impl Write, name: &str, outcome: Outcome<'_>) -> fmt::Result {
        let n = self.next;
        self.next += 1;
        match outcome {
            Outcome::Pass => {
                self.passed += 1;
                writeln!(w, "ok {n} {name}")
            }
            Outcome::Fail => {
                self.failed += 1;
                writeln!(w, "not ok {n} {name}")
            }
            Outcome::Skip(reason) => {
                self.skipped += 1;
                writeln!(w, "ok {n} {name} # SKIP {reason}")
            }
        }
    }

    /// A diagnostic line (`# ...`).
    pub fn diag(w: &mut impl Write, args: fmt::Arguments<'_>) -> fmt::Result {
        writeln!(w, "# {args}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::String;

    #[test]
    fn format_is_ktap_v1() {
        let mut s = String::new();
        let mut k = Ktap::default();
        k.header(&mut s, 3).unwrap();
        k.result(&mut s, "a", Outcome::Pass).unwrap();
        Ktap::diag(&mut s, format_args!("x={}", 1)).unwrap();
        k.result(&mut s, "b", Outcome::Fail).unwrap();
        k.result(&mut s, "c", Outcome::Skip("no CET")).unwrap();
        assert_eq!(s, "\nKTAP version 1\n1..3\nok 1 a\n# x=1\nnot ok 2 b\nok 3 c # SKIP no CET\n");
        assert_eq!((k.passed, k.failed, k.skipped), (1, 1, 1));
    }
}
