//! [`avx2_or_baseline!`]: a function compiled twice, for AVX2 + FMA and for the baseline x86-64
//! (SSE2) the crate is built for, picking one per call ([`cpu::avx2_passes`]).
//!
//! The crate targets the baseline so that one binary runs on any x86-64; only code inside a
//! `#[target_feature]` function gets wider vectors. The direct convolution's tiles are written
//! with intrinsics; BatchNorm's passes are plain loops that LLVM vectorizes, at 4 lanes with
//! scalar leftovers on the baseline (measured on Zen 3: its passes were 16 % of a ResNet-20
//! step). Both copies run the same operations in the same order (no FMA contraction: Rust does
//! not let LLVM fuse `a * b + c`), so they give the same bits, and
//! `SPLITAUX_KERNEL_PATH=portable` runs the baseline copy on any machine.
//!
//! LLVM does not vectorize reductions into several partial sums well (it paired the two sums of
//! one element instead, at 2 lanes, and turned a masked gradient into per-element branches), so
//! those are written against [`Lanes8`]: eight `f32` lanes, `[f32; 8]` in the baseline copy and
//! one AVX register in the AVX2 copy (each copy of a body sees its own as `V`). Both are exact
//! element-wise IEEE operations, so they give the same bits.
//!
//! [`cpu::avx2_passes`]: super::cpu::avx2_passes

/// Defines `fn $name($args) -> $ret` whose body (which may name `V: Lanes8`) runs compiled for AVX2 + FMA when
/// [`super::cpu::avx2_passes`] allows it, and as ordinary code otherwise; both copies stay
/// reachable as `$name::baseline` and `$name::avx2` (for the tests that compare their bits). The
/// body should be a loop nest without calls that stay out of line (closures and
/// `#[inline(always)]` helpers are inlined into it, and so vectorized with it); it sees the
/// enclosing module's items.
macro_rules! avx2_or_baseline {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    ) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if $crate::kernels::cpu::avx2_passes() {
                // SAFETY: `avx2_passes` holds only on a CPU with AVX2 and FMA.
                return unsafe { $name::avx2($($arg),*) };
            }
            $name::baseline($($arg),*)
        }

        /// The two compilations of the function of the same name.
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[inline(always)]
            pub(super) fn baseline($($arg: $ty),*) $(-> $ret)? {
                #[allow(dead_code)]
                type V = [f32; 8];
                $body
            }

            /// # Safety
            /// The CPU has AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            pub(super) unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                #[allow(dead_code)]
                type V = $crate::kernels::vectorize::Avx;
                $body
            }
        }
    };
}

pub(crate) use avx2_or_baseline;

/// Eight `f32` lanes and the exact element-wise operations the reductions need. Making a value
/// is `unsafe` (the CPU must have the type's instruction set); a value, once made, proves it,
/// so the operations on it are safe.
pub(crate) trait Lanes8: Copy + 'static {
    /// # Safety
    /// The CPU has this type's instruction set (AVX for [`Avx`]; any for `[f32; 8]`).
    unsafe fn splat(v: f32) -> Self;
    /// # Safety
    /// As [`Lanes8::splat`].
    unsafe fn load(v: &[f32; 8]) -> Self;
    fn add(self, other: Self) -> Self;
    fn sub(self, other: Self) -> Self;
    fn mul(self, other: Self) -> Self;
    /// `self` in the lanes where `gate > 0` (not where it is NaN), +0 elsewhere.
    fn where_positive(self, gate: Self) -> Self;
    fn to_array(self) -> [f32; 8];
}

impl Lanes8 for [f32; 8] {
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        [v; 8]
    }
    #[inline(always)]
    unsafe fn load(v: &[f32; 8]) -> Self {
        *v
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        std::array::from_fn(|l| self[l] + other[l])
    }
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        std::array::from_fn(|l| self[l] - other[l])
    }
    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        std::array::from_fn(|l| self[l] * other[l])
    }
    #[inline(always)]
    fn where_positive(self, gate: Self) -> Self {
        std::array::from_fn(|l| if gate[l] > 0.0 { self[l] } else { 0.0 })
    }
    #[inline(always)]
    fn to_array(self) -> [f32; 8] {
        self
    }
}

/// One AVX register of eight lanes, made only through the `unsafe` [`Lanes8::splat`] and
/// [`Lanes8::load`] (in the `avx2` copies of [`avx2_or_baseline!`] functions, which run only on
/// a CPU with AVX2, [`super::cpu::avx2_passes`]): the other methods' `unsafe` relies on it.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Avx(std::arch::x86_64::__m256);

#[cfg(target_arch = "x86_64")]
impl Lanes8 for Avx {
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        // SAFETY (every method): the caller of `splat` and `load` promised AVX; every other
        // method has an `Avx` made by them.
        Avx(unsafe { std::arch::x86_64::_mm256_set1_ps(v) })
    }
    #[inline(always)]
    unsafe fn load(v: &[f32; 8]) -> Self {
        Avx(unsafe { std::arch::x86_64::_mm256_loadu_ps(v.as_ptr()) })
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        Avx(unsafe { std::arch::x86_64::_mm256_add_ps(self.0, other.0) })
    }
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        Avx(unsafe { std::arch::x86_64::_mm256_sub_ps(self.0, other.0) })
    }
    #[inline(always)]
    fn mul(self, other: Self) -> Self {
        Avx(unsafe { std::arch::x86_64::_mm256_mul_ps(self.0, other.0) })
    }
    #[inline(always)]
    fn where_positive(self, gate: Self) -> Self {
        use std::arch::x86_64::*;
        Avx(unsafe {
            let open = _mm256_cmp_ps::<_CMP_GT_OQ>(gate.0, _mm256_setzero_ps());
            _mm256_and_ps(open, self.0)
        })
    }
    #[inline(always)]
    fn to_array(self) -> [f32; 8] {
        let mut out = [0.0; 8];
        unsafe { std::arch::x86_64::_mm256_storeu_ps(out.as_mut_ptr(), self.0) };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `where_positive` is `if gate > 0.0 { d } else { 0.0 }` bit for bit, on both lane types,
    /// for NaN, ±0, subnormal and ordinary gates and values (the BatchNorm tests draw ordinary
    /// values only).
    #[test]
    fn where_positive_is_the_scalar_gate() {
        let specials = [f32::NAN, -f32::NAN, -0.0, 0.0, 1e-40, -1e-40, 1.5, -2.5];
        let gates: [f32; 8] = specials;
        for d in specials {
            let want: Vec<u32> = gates
                .iter()
                .map(|&g| if g > 0.0 { d } else { 0.0 }.to_bits())
                .collect();
            let bits = |v: [f32; 8]| v.map(f32::to_bits).to_vec();
            // SAFETY: `[f32; 8]` needs no instruction set.
            let scalar = unsafe { <[f32; 8]>::splat(d).where_positive(<[f32; 8]>::load(&gates)) };
            assert_eq!(bits(scalar.to_array()), want, "[f32; 8], d = {d}");
            #[cfg(target_arch = "x86_64")]
            if super::super::cpu::avx2_passes() {
                // SAFETY: `avx2_passes` holds only on a CPU with AVX2.
                let avx = unsafe { Avx::splat(d).where_positive(Avx::load(&gates)) };
                assert_eq!(bits(avx.to_array()), want, "Avx, d = {d}");
            }
        }
    }
}
