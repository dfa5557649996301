//! The Multiboot (v1) information the boot loader hands over.

use shadowcall_cmdline::Cmdline;

pub const MULTIBOOT_BOOTLOADER_MAGIC: u64 = 0x2bad_b002;
const MBI_FLAG_MEM: u32 = 1 << 0;
const MBI_FLAG_CMDLINE: u32 = 1 << 2;
/// The longest command line kept (the shared vocabulary's limit).
const CMDLINE_MAX: usize = shadowcall_cmdline::MAX_LEN;
/// How far past [`CMDLINE_MAX`] the length of a too-long line is counted
/// (so that a missing NUL cannot make us walk memory forever).
const CMDLINE_SCAN_LIMIT: usize = 64 * 1024;
/// BIOS data area word holding the EBDA's real-mode segment.
const EBDA_SEGMENT_PTR: u64 = 0x40e;
/// Assumed when the loader gives no memory size.
const DEFAULT_RAM: u64 = 128 << 20;

#[derive(Clone, Copy)]
pub struct BootInfo {
    pub multiboot_ok: bool,
    /// End of the RAM block at 1 MiB.
    pub ram_end: u64,
    /// Physical address of the Extended BIOS Data Area (where an ACPI RSDP may
    /// live), read from the BIOS data area before page 0 is unmapped.
    pub ebda: u64,
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    /// The length of the loader's line when it did not fit in `cmdline`
    /// (at most [`CMDLINE_SCAN_LIMIT`]); None when it fit.
    cmdline_overflow: Option<usize>,
    pub parsed: Cmdline,
}

impl BootInfo {
    /// Copy what we need out of the Multiboot info before anything can
    /// overwrite it (the loader may have put it where the heap will be).
    pub fn read(magic: u64, mbi: u64) -> Self {
        let mut b = BootInfo {
            multiboot_ok: magic == MULTIBOOT_BOOTLOADER_MAGIC,
            ram_end: DEFAULT_RAM,
            // SAFETY: the BIOS data area word at 0x40e; page 0 is still mapped by the boot tables.
            ebda: unsafe { ((EBDA_SEGMENT_PTR as *const u16).read_volatile() as u64) << 4 },
            cmdline: [0; CMDLINE_MAX],
            cmdline_len: 0,
            cmdline_overflow: None,
            parsed: Cmdline::default(),
        };
        if !b.multiboot_ok || mbi == 0 {
            return b;
        }
        // SAFETY: a Multiboot loader passed `mbi`, identity-mapped by the boot page tables.
        unsafe {
            let flags = (mbi as *const u32).read_volatile();
            if flags & MBI_FLAG_MEM != 0 {
                let upper_kib = ((mbi + 8) as *const u32).read_volatile() as u64;
                b.ram_end = (1 << 20) + upper_kib * 1024;
            }
            if flags & MBI_FLAG_CMDLINE != 0 {
                let mut p = ((mbi + 16) as *const u32).read_volatile() as u64 as *const u8;
                while b.cmdline_len < CMDLINE_MAX && *p != 0 {
                    b.cmdline[b.cmdline_len] = *p;
                    b.cmdline_len += 1;
                    p = p.add(1);
                }
                // Too long: count the rest (up to a bound) so the `cmdline`
                // test can name the length instead of cutting it silently.
                let mut len = b.cmdline_len;
                while len < CMDLINE_SCAN_LIMIT && *p != 0 {
                    len += 1;
                    p = p.add(1);
                }
                if len > CMDLINE_MAX {
                    b.cmdline_overflow = Some(len);
                }
            }
        }
        b
    }

    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("<not UTF-8>")
    }

    /// `Err` naming the length when the loader's line was longer than the
    /// kernel keeps ([`shadowcall_cmdline::MAX_LEN`]).
    pub fn cmdline_len_check(&self) -> Result<(), shadowcall_cmdline::CmdlineError<'static>> {
        shadowcall_cmdline::check_len(self.cmdline_overflow.unwrap_or(self.cmdline_len))
    }

    pub fn with_cmdline(mut self, c: Cmdline) -> Self {
        self.parsed = c;
        self
    }
}
