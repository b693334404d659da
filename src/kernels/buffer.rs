//! Output buffers that are written in full by the kernel that fills them, so zeroing them first
//! is wasted work: with freed memory kept for reuse (see `memory::retain_freed_memory`), every
//! zeroed allocation is a `memset` over tens of MiB per step (3 % of the CPU time of a step).

use std::mem::MaybeUninit;

/// A vector of `len` floats, filled by `fill`.
///
/// # Safety
/// `fill` must write every element of the slice it is given (with `MaybeUninit::write`);
/// elements it skips would be read uninitialized.
pub unsafe fn filled(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: the capacity is `len` and, by the caller's contract, all `len` elements are written.
    unsafe { v.set_len(len) };
    v
}

/// `slots` set to zero, as initialized floats.
pub fn zeroed(slots: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    slots.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was just written.
    unsafe { std::slice::from_raw_parts_mut(slots.as_mut_ptr().cast(), slots.len()) }
}

/// `slots[i] += plus[i]` on slots a kernel has just filled.
///
/// # Safety
/// Every element of `slots` must have been written.
pub unsafe fn add_onto(slots: &mut [MaybeUninit<f32>], plus: &[f32]) {
    assert_eq!(slots.len(), plus.len(), "add_onto: lengths");
    // SAFETY: initialized, by the caller's contract.
    let values: &mut [f32] =
        unsafe { std::slice::from_raw_parts_mut(slots.as_mut_ptr().cast(), slots.len()) };
    add_in_place(values, plus);
}

/// `values[i] += plus[i]`.
pub fn add_in_place(values: &mut [f32], plus: &[f32]) {
    assert_eq!(values.len(), plus.len(), "add_in_place: lengths");
    values.iter_mut().zip(plus).for_each(|(v, p)| *v += p);
}

/// Floats per cache line (and per AVX-512 vector).
const LINE_FLOATS: usize = 16;

/// A zeroed scratch buffer of floats whose first element starts a cache line, so vectors at
/// multiples of 16 floats from it are whole lines (a load that straddles two lines costs two).
pub struct LineAligned {
    data: Vec<f32>,
    start: usize,
    len: usize,
}

impl LineAligned {
    pub fn zeroed(len: usize) -> Self {
        let data = vec![0.0; len + LINE_FLOATS - 1];
        let start = data.as_ptr().align_offset(4 * LINE_FLOATS);
        assert!(
            start < LINE_FLOATS,
            "a float buffer aligns within 16 floats"
        );
        Self { data, start, len }
    }
}

impl std::ops::Deref for LineAligned {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data[self.start..][..self.len]
    }
}

impl std::ops::DerefMut for LineAligned {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data[self.start..][..self.len]
    }
}
