//! Publication decided in asm (DESIGN §8.2, §11): `sc_poke_publish`
//! (asm/poke.S) makes a sealed batch live only after it excluded every
//! other writer of the sealed area (its claim of the magic word, then every
//! CPU's writer word 0) and validated the area itself (sealed.S
//! `SEALED_VALID`), so "magic word live ⇒ validated, unchanged since" holds
//! whatever Rust concluded. The pokes are driven directly, as the patcher
//! does them, with the area changed through the test alias between Rust's
//! verification and the publication.
#![cfg_attr(not(feature = "test-hooks"), allow(dead_code))]

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::mem::{offset_of, size_of};

use shadowcall::patch::{
    build_batch, NewInsn, SealedBatch, SealedEntry, SealedHeader, SEALED_MAGIC, SEALED_PENDING, SITE_LEN,
};
use shadowcall_support::ktap::Outcome;

use super::{tlog, tlog_reset};
use crate::patching;
use crate::percpu::this_cpu;
use crate::recover::{try_run, VEC_UD};
use crate::{cet, mm, BootState};

#[cfg(feature = "test-hooks")]
use crate::patching::test_poke;
#[cfg(feature = "test-hooks")]
use crate::records::test_set_writer;

/// Without the hooks these are never reached (the tests skip first).
#[cfg(not(feature = "test-hooks"))]
mod no_hooks {
    pub fn test_poke(_: u64, _: &[u8]) {
        unreachable!("test-hooks build only")
    }
    pub fn test_set_writer(_: usize, _: u64) {
        unreachable!("test-hooks build only")
    }
}
#[cfg(not(feature = "test-hooks"))]
use no_hooks::{test_poke, test_set_writer};

const HOOKS: bool = cfg!(feature = "test-hooks");
const NO_HOOKS: Outcome<'static> = Outcome::Skip("needs the test-hooks build");

extern "C" {
    fn sc_t_fn_call(_: u64) -> u64;
    static sc_t_site_call: u8;
    fn sc_t_target_a();
    fn sc_t_target_b();
    fn sc_t_unregistered();
}

fn site() -> u64 {
    core::ptr::addr_of!(sc_t_site_call) as u64
}
fn target(i: usize) -> u64 {
    [sc_t_target_a as *const () as u64, sc_t_target_b as *const () as u64][i]
}

/// Bytes of the magic word (the sealed area's first word).
const MAGIC_LEN: u64 = size_of::<u64>() as u64;

/// The sealed area's magic word now.
fn magic() -> u64 {
    // SAFETY: the first word of the sealed area: mapped, readable.
    unsafe { (mm::sealed_area().0 as *const u64).read_volatile() }
}

/// Set the magic word through the test alias (what no writer of the
/// kernel can do: a state a racing publisher or an aborted one leaves).
fn force_magic(v: u64) {
    test_poke(mm::sealed_area().0, &v.to_ne_bytes());
}

/// One of the patcher's alias writes, driven directly; a refusal (#UD)
/// comes back as its vector, with the writers' lock released.
fn poke(p: mm::Poke<'_>) -> Result<(), u64> {
    let r = try_run(|| {
        mm::poke_all(core::iter::once(p));
        0
    });
    match r {
        Ok(_) => Ok(()),
        Err(f) => {
            mm::poke_reset_after_abort();
            Err(f.vector)
        }
    }
}

/// The sealed image of the batch `sites`, as `seal` writes it.
fn sealed_image(sites: &[(u64, NewInsn)]) -> Vec<u8> {
    let batch = build_batch(&mm::text(), &patching::patch_registry(), sites).expect("a valid test batch");
    let mut buf = vec![0u8; batch.sealed_len()];
    batch.write_sealed(&mut buf).expect("room for the image");
    buf
}

/// Write `image` past its magic word with the patcher's sealed writer, and
/// verify the read-only copy as `seal` does (Rust's verdict).
fn seal_and_verify(image: &[u8]) -> Result<(), String> {
    if magic() != 0 {
        return Err(format!("the magic word is {:#x} before the write", magic()));
    }
    poke(mm::Poke::Sealed { offset: MAGIC_LEN, bytes: &image[MAGIC_LEN as usize..] })
        .map_err(|v| format!("the sealed writer refused (vector {v})"))?;
    let (start, end) = mm::sealed_area();
    // SAFETY: the sealed area, mapped read-only for the kernel's life; only
    // this test writes it now.
    let b = unsafe { SealedBatch::from_raw_unpublished(start as *const u8, (end - start) as usize) };
    b.and_then(|b| b.verify()).map_err(|e| format!("Rust's verification: {e}"))
}

fn word(image: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(image[off..off + 8].try_into().unwrap())
}

/// `insn` at `site`, as `SealedEntry::bytes` holds it.
fn packed(insn: NewInsn, site: u64) -> u64 {
    let mut w = [0u8; 8];
    w[..SITE_LEN].copy_from_slice(&insn.encode(site).unwrap_or_default());
    u64::from_le_bytes(w)
}

/// After the refusals: a batch still patches and runs, and is retired.
fn normal_patch_works(errors: &mut Vec<String>) {
    let r = patching::patch(&[(site(), NewInsn::Call(target(1)))], |_| {});
    tlog_reset();
    // SAFETY: the site function of the batch just patched.
    let v = try_run(|| unsafe { sc_t_fn_call(0) });
    let ran = tlog().count[1];
    if r.is_err() || v.is_err() || ran != 1 {
        errors.push(format!("a normal patch after the test: {r:?}, call {v:?}, target b ran {ran} times"));
    }
    if patching::patch(&[(site(), NewInsn::Call(target(0)))], |_| {}).is_err() {
        errors.push(String::from("the restoring patch failed"));
    }
    if magic() != 0 {
        errors.push(format!("the magic word is {:#x} after the patches", magic()));
    }
}

/// A store through the test alias: (offset into the sealed area, bytes).
type Write = (u64, Vec<u8>);

/// A batch that Rust verified, then changed in the sealed area (through the
/// test alias) before its publication, once for each thing the fast path
/// will trust: a header bound, a tree slot ≥ len, a tree key that is not
/// its entry's site, an unregistered site (key and entry both), an
/// undeclared target, bytes that are not the call. `sc_poke_publish` must
/// refuse each (#UD) with the magic word still 0 and text unchanged.
pub fn sec_publish_unverified(_st: &BootState) -> Outcome<'static> {
    if !HOOKS {
        return NO_HOOKS;
    }
    if patching::batch_live() || magic() != 0 {
        return super::outcome_of(&[String::from("a batch is live or claimed before the test")]);
    }
    let mut errors: Vec<String> = Vec::new();
    let (site, b) = (site(), target(1));
    let unreg = sc_t_unregistered as *const () as u64;
    let image = sealed_image(&[(site, NewInsn::Call(b))]);
    let keys = word(&image, offset_of!(SealedHeader, keys_off)) as usize;
    let slots = word(&image, offset_of!(SealedHeader, slots_off)) as usize;
    let entries = word(&image, offset_of!(SealedHeader, entries_off)) as usize;
    let field = |f: usize| (entries + f) as u64;
    // A header whose layout is the exact one for its len, but larger than
    // the area: only the bound refuses it.
    let (start, end) = mm::sealed_area();
    let big = (end - start) / size_of::<SealedEntry>() as u64 + 1;
    let depth = u64::from(u64::BITS - big.leading_zeros());
    let nodes = 1u64 << depth;
    let hdr = size_of::<SealedHeader>() as u64;
    let big_header: Vec<(u64, u64)> = vec![
        (offset_of!(SealedHeader, len) as u64, big),
        (offset_of!(SealedHeader, depth) as u64, depth),
        (offset_of!(SealedHeader, keys_off) as u64, hdr),
        (offset_of!(SealedHeader, slots_off) as u64, hdr + 8 * nodes),
        (offset_of!(SealedHeader, entries_off) as u64, hdr + 12 * nodes),
        (offset_of!(SealedHeader, total_len) as u64, hdr + 12 * nodes + big * size_of::<SealedEntry>() as u64),
    ];
    let site_off = offset_of!(SealedEntry, site);
    let forgeries: Vec<(&str, Vec<Write>)> = vec![
        ("a header bound", big_header.iter().map(|&(o, v)| (o, v.to_ne_bytes().to_vec())).collect()),
        ("a slot >= len", vec![((slots + 4) as u64, 1u32.to_ne_bytes().to_vec())]),
        ("a key that is not its entry's site", vec![((keys + 8) as u64, (site + 1).to_ne_bytes().to_vec())]),
        (
            "an unregistered site",
            vec![
                ((keys + 8) as u64, unreg.to_ne_bytes().to_vec()),
                (field(site_off), unreg.to_ne_bytes().to_vec()),
                (field(offset_of!(SealedEntry, bytes)), packed(NewInsn::Call(b), unreg).to_ne_bytes().to_vec()),
            ],
        ),
        (
            "an undeclared target",
            vec![
                (field(offset_of!(SealedEntry, target)), unreg.to_ne_bytes().to_vec()),
                (field(offset_of!(SealedEntry, bytes)), packed(NewInsn::Call(unreg), site).to_ne_bytes().to_vec()),
            ],
        ),
        (
            "wrong bytes",
            vec![(field(offset_of!(SealedEntry, bytes)), packed(NewInsn::Call(b + 1), site).to_ne_bytes().to_vec())],
        ),
    ];
    let mut refused = 0;
    for (what, writes) in &forgeries {
        if let Err(e) = seal_and_verify(&image) {
            errors.push(format!("{what}: {e}"));
            continue;
        }
        for (off, bytes) in writes {
            test_poke(start + off, bytes);
        }
        let sum0 = super::text_checksum_except(None);
        match poke(mm::Poke::Publish) {
            Err(VEC_UD) => refused += 1,
            other => errors.push(format!("{what}: expected the publication refused (#UD), got {other:?}")),
        }
        if magic() != 0 {
            errors.push(format!("{what}: the magic word is {:#x}, not 0", magic()));
            force_magic(0);
        }
        if patching::batch_live() {
            errors.push(format!("{what}: a batch is live"));
        }
        if super::text_checksum_except(None) != sum0 {
            errors.push(format!("{what}: text changed"));
        }
    }
    diag!("publications refused: {refused} of {}", forgeries.len());
    // The unforged image is published (the check passes what Rust wrote).
    match seal_and_verify(&image).map(|_| poke(mm::Poke::Publish)) {
        Ok(Ok(())) if magic() == SEALED_MAGIC => {}
        other => errors.push(format!("the unforged image: expected it live, got {other:?}, magic {:#x}", magic())),
    }
    if poke(mm::Poke::Unseal).is_err() || magic() != 0 {
        errors.push(String::from("the unforged image was not retired"));
    }
    normal_patch_works(&mut errors);
    super::outcome_of(&errors)
}

/// The publisher excludes the sealed-area writers, and they it: with a
/// writer word raised (this CPU's; another CPU's) the publication waits,
/// then refuses with the magic word back to 0; with another CPU's writer
/// ending while it waits, it publishes only after. With the magic word
/// claimed by another CPU's publisher (set through the test alias), the
/// sealed writer, the unsealer and the publisher refuse, nothing written;
/// this CPU's own claim (an attempt cut short) is taken over.
pub fn sec_publish_exclusive(_st: &BootState) -> Outcome<'static> {
    if !HOOKS {
        return NO_HOOKS;
    }
    if patching::batch_live() || magic() != 0 {
        return super::outcome_of(&[String::from("a batch is live or claimed before the test")]);
    }
    let mut errors: Vec<String> = Vec::new();
    let me = this_cpu().index;
    let other = crate::percpu::online().map(|c| c.index).find(|&i| i != me);
    let image = sealed_image(&[(site(), NewInsn::Call(target(1)))]);
    let publish_refused = |what: &str, errors: &mut Vec<String>| {
        match poke(mm::Poke::Publish) {
            Err(VEC_UD) => {}
            other => errors.push(format!("{what}: expected the publication refused (#UD), got {other:?}")),
        }
        if magic() != 0 {
            errors.push(format!("{what}: the magic word is {:#x}, not 0", magic()));
            force_magic(0);
        }
    };
    if let Err(e) = seal_and_verify(&image) {
        errors.push(e);
    }
    // 1. Writer words (WRSS-only: shadow stacks on).
    if cet::active() {
        test_set_writer(me, 1);
        publish_refused("this CPU's writer word set", &mut errors);
        test_set_writer(me, 0);
        if let Some(w) = other {
            test_set_writer(w, 1);
            publish_refused(&format!("CPU {w}'s writer word set"), &mut errors);
            // CPU w's writer ends (word 0, on its CPU) while the publisher waits.
            let (r, ended) = super::lowered_during(w, |cpu| test_set_writer(cpu, 0), || poke(mm::Poke::Publish));
            match r {
                Ok(()) if ended && magic() == SEALED_MAGIC => {}
                Ok(()) if !ended => errors.push(format!("CPU {w}'s writer in flight: published without waiting")),
                other => errors.push(format!("CPU {w}'s writer ended: expected the publication, got {other:?}")),
            }
            if crate::records::writer_word(w) != 0 {
                test_set_writer(w, 0);
            }
            if poke(mm::Poke::Unseal).is_err() || magic() != 0 {
                errors.push(String::from("the batch was not retired"));
            }
        } else {
            diag!("one CPU: only this CPU's writer word is set");
        }
    } else {
        diag!("no shadow stacks: no writer words (no WRSS), only the claims are tested");
    }
    // 2. Another CPU's claim (a publication in progress there).
    let theirs = SEALED_PENDING | other.unwrap_or(me + 1) as u64;
    force_magic(theirs);
    let at = mm::sealed_area().0 + MAGIC_LEN;
    // SAFETY: a readable word of the sealed area.
    let read = || unsafe { (at as *const u64).read_volatile() };
    let orig = read();
    match poke(mm::Poke::Sealed { offset: MAGIC_LEN, bytes: &(orig ^ u64::MAX).to_ne_bytes() }) {
        Err(VEC_UD) if read() == orig => {}
        other => errors.push(format!("claimed: expected the sealed writer refused, got {other:?}")),
    }
    match poke(mm::Poke::Unseal) {
        Err(VEC_UD) if magic() == theirs => {}
        other => errors.push(format!("claimed: expected the unsealer refused, got {other:?}, magic {:#x}", magic())),
    }
    match poke(mm::Poke::Publish) {
        Err(VEC_UD) if magic() == theirs => {}
        other => errors.push(format!("claimed: expected the publisher refused, got {other:?}, magic {:#x}", magic())),
    }
    // 3. This CPU's own claim, left by a publication an exception cut short:
    //    the redone publication takes it over.
    force_magic(SEALED_PENDING | me as u64);
    match poke(mm::Poke::Publish) {
        Ok(()) if magic() == SEALED_MAGIC => {}
        other => errors.push(format!("own claim: expected the publication, got {other:?}, magic {:#x}", magic())),
    }
    if poke(mm::Poke::Unseal).is_err() {
        errors.push(String::from("own claim: the batch was not retired"));
    }
    if magic() != 0 {
        force_magic(0);
    }
    normal_patch_works(&mut errors);
    super::outcome_of(&errors)
}
