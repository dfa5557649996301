//! Telling a host KVM limitation from a kernel bug after QEMU's
//! "KVM internal error".
//!
//! Some nested, paravirtualized KVM hosts cannot deliver #BP: any guest
//! `int3` ends in "KVM internal error. Suberror: 1" and QEMU dumps the
//! registers. A real kernel bug (e.g. RDSSP on a CPU without CET) gives the
//! same message, so the error alone proves nothing. The dump's `RIP=` is
//! checked against the kernel image: the guest stopped at an int3 if the
//! image byte there is 0xCC or the RIP is a registered patch site (the
//! kernel writes an int3 there at run time). Anything else stays a failure.

use std::fmt;

use crate::elfcheck;
use crate::ktap::{Report, Status};

/// The stderr text QEMU prints on the error.
pub const INTERNAL_ERROR: &str = "KVM internal error";

/// Why the RIP counts as an int3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int3Evidence {
    /// The kernel image holds 0xCC at RIP.
    ImageByte,
    /// RIP is a registered patch site (int3 written at run time).
    PatchSite,
}

/// What the error was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmVerdict {
    /// The guest stopped at an int3: this host's KVM cannot deliver #BP.
    Int3NotDelivered { rip: u64, evidence: Int3Evidence },
    /// Anything else: treated as a kernel bug.
    Other { rip: Option<u64>, why: String },
}

/// A classified KVM internal error and the report up to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmInternalError {
    pub verdict: KvmVerdict,
    /// The stderr line with the error.
    pub line: String,
    /// KTAP results printed before the crash.
    pub results_before: usize,
    /// Of those, the ones that are `not ok`.
    pub not_ok_before: Vec<String>,
    /// KTAP protocol errors or a panic before the crash.
    pub report_problems: Vec<String>,
}

/// The first `RIP=<hex>` after the internal-error line (the first one
/// anywhere if that line is missing).
pub fn parse_rip(stderr: &str) -> Option<u64> {
    let from = stderr.find(INTERNAL_ERROR).unwrap_or(0);
    stderr[from..].lines().find_map(|line| {
        let at = line.find("RIP=")?;
        let hex: String = line[at + 4..].chars().take_while(char::is_ascii_hexdigit).collect();
        u64::from_str_radix(&hex, 16).ok()
    })
}

/// Classifies the error from QEMU's stderr and the kernel ELF.
pub fn classify(stderr: &str, elf: &[u8]) -> KvmVerdict {
    let Some(rip) = parse_rip(stderr) else {
        return KvmVerdict::Other { rip: None, why: "no RIP= in QEMU's register dump".into() };
    };
    if elfcheck::bytes_at_vaddr(elf, rip, 1) == Some(&[0xcc]) {
        return KvmVerdict::Int3NotDelivered { rip, evidence: Int3Evidence::ImageByte };
    }
    match elfcheck::patch_sites(elf) {
        Ok(sites) if sites.contains(&rip) => KvmVerdict::Int3NotDelivered { rip, evidence: Int3Evidence::PatchSite },
        Ok(sites) => {
            let byte = elfcheck::bytes_at_vaddr(elf, rip, 1)
                .map_or("not in the image".to_string(), |b| format!("{:#04x}", b[0]));
            KvmVerdict::Other {
                rip: Some(rip),
                why: format!(
                    "the image byte at RIP is {byte} and RIP is none of the {} registered patch sites",
                    sites.len()
                ),
            }
        }
        Err(e) => KvmVerdict::Other {
            rip: Some(rip),
            why: format!("not an int3 in the image, and the patch sites cannot be read: {e}"),
        },
    }
}

impl KvmInternalError {
    /// Classifies the error and records the report up to it.
    pub fn new(line: &str, stderr: &str, elf: &[u8], report: &Report) -> Self {
        let mut report_problems: Vec<String> = report.errors.iter().map(|e| format!("bad KTAP: {e}")).collect();
        if !report.header_seen {
            report_problems.push("no KTAP report before the crash".into());
        }
        if let Some(p) = &report.panic {
            report_problems.push(format!("kernel panic: {p}"));
        }
        KvmInternalError {
            verdict: classify(stderr, elf),
            line: line.trim().to_string(),
            results_before: report.results.len(),
            not_ok_before: report
                .results
                .iter()
                .filter(|r| r.status == Status::NotOk)
                .map(|r| r.name.clone())
                .collect(),
            report_problems,
        }
    }

    /// The host cannot deliver #BP (not a kernel bug).
    pub fn is_host_int3_limit(&self) -> bool {
        matches!(self.verdict, KvmVerdict::Int3NotDelivered { .. })
    }

    /// A host limitation, and every result before it ok or skip: the most
    /// that this host can show.
    pub fn clean_up_to_host_limit(&self) -> bool {
        self.is_host_int3_limit() && self.not_ok_before.is_empty() && self.report_problems.is_empty()
    }

    /// The loud stderr banner (a host limitation) or the failure (anything else).
    pub fn banner(&self) -> String {
        let bar = "!".repeat(78);
        format!("\n{bar}\n!!! {self}\n{bar}\n")
    }
}

impl fmt::Display for KvmInternalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.verdict {
            KvmVerdict::Int3NotDelivered { rip, evidence } => {
                let what = match evidence {
                    Int3Evidence::ImageByte => "0xCC in the kernel image",
                    Int3Evidence::PatchSite => "a registered patch site",
                };
                write!(
                    f,
                    "qemu-kvm NOT COVERED: this host's KVM cannot deliver #BP (KVM internal error at int3 at RIP {rip:#x}, {what}); tests before it passed: {}",
                    self.results_before - self.not_ok_before.len()
                )?;
                if !self.not_ok_before.is_empty() {
                    write!(f, "; NOT OK before it: {}", self.not_ok_before.join(", "))?;
                }
            }
            KvmVerdict::Other { rip, why } => {
                let rip = rip.map_or("unknown".to_string(), |r| format!("{r:#x}"));
                write!(
                    f,
                    "qemu-kvm FAILED: KVM internal error at RIP {rip}, not at an int3 ({why}): a kernel bug until shown otherwise; results before it: {}",
                    self.results_before
                )?;
            }
        }
        for p in &self.report_problems {
            write!(f, "; {p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elfcheck::synth;

    /// QEMU's dump after the error, with `rip`.
    fn dump(rip: u64) -> String {
        format!(
            "KVM internal error. Suberror: 1\n\
             extra data[0]: 0x0000000000000000\n\
             emulation failure\n\
             RAX=0000000000000000 RBX=000000000026c388 RCX=0000000000100181 RDX=0000000000000000\n\
             R12=0000000000100181 R13=0000000000100181 R14=0000000000000000 R15=000000000026c388\n\
             RIP={rip:016x} RFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\n\
             CR0=80010011 CR2=0000000000000000 CR3=0000000000462000 CR4=00000020\n\
             Code=05 b6 fe 16 00 9c 8f 05 c3 <cc> 4a ff ff ff 48\n"
        )
    }

    /// Text at 0x100000: nop, int3, a 5-byte call (a patch site at 0x100002), ret, rdssp.
    fn kernel(as_section: bool) -> Vec<u8> {
        let text = [0x90, 0xcc, 0xe8, 1, 0, 0, 0, 0xc3, 0xf3, 0x48, 0x0f, 0x1e, 0xc8];
        synth::elf(0x100000, &text, &[0x100002], as_section)
    }

    fn report(text: &str) -> Report {
        let mut r = Report::new();
        for l in text.lines() {
            r.feed_line(l);
        }
        r
    }

    #[test]
    fn rip_is_parsed_after_the_error() {
        assert_eq!(parse_rip(&dump(0x100181)), Some(0x100181));
        let earlier = format!("RIP=0000000000000001 old\n{}", dump(0x42));
        assert_eq!(parse_rip(&earlier), Some(0x42));
        assert_eq!(parse_rip("KVM internal error. Suberror: 1\nno dump\n"), None);
    }

    #[test]
    fn int3_in_the_image_or_at_a_site_is_the_host() {
        for as_section in [true, false] {
            let elf = kernel(as_section);
            assert_eq!(
                classify(&dump(0x100001), &elf),
                KvmVerdict::Int3NotDelivered { rip: 0x100001, evidence: Int3Evidence::ImageByte }
            );
            assert_eq!(
                classify(&dump(0x100002), &elf),
                KvmVerdict::Int3NotDelivered { rip: 0x100002, evidence: Int3Evidence::PatchSite }
            );
        }
    }

    #[test]
    fn anything_else_is_a_failure() {
        let elf = kernel(false);
        // RDSSP on a CPU without CET: not an int3, not a site.
        match classify(&dump(0x100008), &elf) {
            KvmVerdict::Other { rip, why } => {
                assert_eq!(rip, Some(0x100008));
                assert!(why.contains("0xf3") && why.contains("1 registered"), "{why}");
            }
            v => panic!("{v:?}"),
        }
        // One past a site (inside the call) is no int3 either.
        assert!(matches!(classify(&dump(0x100003), &elf), KvmVerdict::Other { .. }));
        // Outside the image.
        match classify(&dump(0x900000), &elf) {
            KvmVerdict::Other { why, .. } => assert!(why.contains("not in the image"), "{why}"),
            v => panic!("{v:?}"),
        }
        assert!(matches!(classify("KVM internal error. Suberror: 1\n", &elf), KvmVerdict::Other { rip: None, .. }));
    }

    #[test]
    fn verdict_with_the_report_before_the_crash() {
        let elf = kernel(true);
        let clean = report("KTAP version 1\n1..26\nok 1 a\nok 2 b # SKIP no CET\n");
        let e = KvmInternalError::new(INTERNAL_ERROR, &dump(0x100002), &elf, &clean);
        assert!(e.clean_up_to_host_limit());
        let text = e.to_string();
        assert!(
            text.starts_with(
                "qemu-kvm NOT COVERED: this host's KVM cannot deliver #BP (KVM internal error at int3 at RIP 0x100002"
            ),
            "{text}"
        );
        assert!(text.ends_with("tests before it passed: 2"), "{text}");
        assert!(e.banner().contains("!!! qemu-kvm NOT COVERED"));

        let failing = report("KTAP version 1\n1..26\nok 1 a\nnot ok 2 b\n");
        let e = KvmInternalError::new(INTERNAL_ERROR, &dump(0x100002), &elf, &failing);
        assert!(e.is_host_int3_limit() && !e.clean_up_to_host_limit());
        assert!(e.to_string().contains("NOT OK before it: b"), "{e}");

        let panicked = report("KTAP version 1\n1..26\nok 1 a\n# PANIC at x\n");
        let e = KvmInternalError::new(INTERNAL_ERROR, &dump(0x100001), &elf, &panicked);
        assert!(!e.clean_up_to_host_limit());

        let e = KvmInternalError::new(INTERNAL_ERROR, &dump(0x100008), &elf, &clean);
        assert!(!e.is_host_int3_limit() && !e.clean_up_to_host_limit());
        assert!(
            e.to_string().starts_with("qemu-kvm FAILED: KVM internal error at RIP 0x100008, not at an int3"),
            "{e}"
        );
    }
}
