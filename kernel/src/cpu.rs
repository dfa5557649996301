//! CPU feature detection (the CET registers are the engine's:
//! `shadowcall::cet`).

use raw_cpuid::CpuId;
use shadowcall::cet::Support;

/// What CPUID says about CET and the related features.
#[derive(Clone, Copy, Debug, Default)]
pub struct Features {
    /// Shadow-stack support: CET_SS, CET_SSS, XSAVES, XSS.CET_S (the engine's
    /// detection).
    pub cet: Support,
    /// CPUID.(7,0):EDX[20]
    pub cet_ibt: bool,
    /// CPUID.(7,0):EDX[14]
    pub serialize: bool,
    /// CPUID.1:ECX[21]
    pub x2apic: bool,
    pub vendor: [u8; 12],
    /// CPUID.0x40000000 hypervisor signature (zeros on bare metal).
    pub hypervisor: [u8; 12],
}

const ECX1_X2APIC: u32 = 1 << 21;
const ECX1_HYPERVISOR: u32 = 1 << 31;
const EDX7_CET_IBT: u32 = 1 << 20;
const EDX7_SERIALIZE: u32 = 1 << 14;

impl Features {
    pub fn detect() -> Self {
        let id = CpuId::new();
        let mut f = Features::default();
        if let Some(v) = id.get_vendor_info() {
            f.vendor.copy_from_slice(v.as_str().as_bytes());
        }
        f.cet = Support::detect();
        f.x2apic = raw(1, 0).ecx & ECX1_X2APIC != 0;
        let leaf7 = raw(7, 0);
        f.cet_ibt = leaf7.edx & EDX7_CET_IBT != 0;
        f.serialize = leaf7.edx & EDX7_SERIALIZE != 0;
        if raw(1, 0).ecx & ECX1_HYPERVISOR != 0 {
            let h = raw(0x4000_0000, 0);
            for (i, r) in [h.ebx, h.ecx, h.edx].iter().enumerate() {
                f.hypervisor[i * 4..i * 4 + 4].copy_from_slice(&r.to_le_bytes());
            }
        }
        f
    }

    pub fn vendor(&self) -> &str {
        core::str::from_utf8(&self.vendor).unwrap_or("?")
    }

    /// Running under QEMU's TCG (software) emulation?
    pub fn is_tcg(&self) -> bool {
        &self.hypervisor == b"TCGTCGTCGTCG"
    }
}

fn raw(leaf: u32, sub: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid_count(leaf, sub)
}

/// Execute a serializing instruction on this CPU: SERIALIZE where CPUID has
/// it, else CPUID.
pub fn serialize(has_serialize: bool) {
    if has_serialize {
        // SAFETY: SERIALIZE (0f 01 e8) only serializes; enumerated by CPUID.(7,0):EDX[14].
        unsafe { core::arch::asm!(".byte 0x0f, 0x01, 0xe8", options(nostack)) };
    } else {
        let _ = raw(0, 0);
    }
}
