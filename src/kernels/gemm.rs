//! A safe face for the `gemm` crate's single-threaded f32 matrix product (the crate burn-flex
//! multiplies with). Our kernels parallelize over images themselves, one product per image.
//!
//! There is no feature dispatch here: the crate picks its microkernel once per process itself
//! (AVX-512F with the `x86-v4` feature, else FMA, else scalar; `gemm-common`'s `init_gemm_fn`)
//! and exposes no way to force one, so `SPLITAUX_KERNEL_PATH` (see [`super::cpu`]) does not
//! reach the product. In the crate's main path each output element is one lane of one
//! accumulator, summed in `k` order within depth blocks (`kc`: `min(k, 512)` when `m, n ≤ 64`,
//! else derived from the L1 geometry and the microkernel's height but never below `min(k, 512)`:
//! `gemm-common` 0.19, `cache::kernel_params`), so the vector width alone does not change the
//! order, and neither does the blocking as long as `k ≤ 512`, which holds for every product the
//! convolutions here make of a CIFAR ResNet (`k` = 9·in ≤ 288 for the stride-2 forward passes,
//! out ≤ 64 for their input gradients, out_h·out_w ≤ 256 for the im2col weight gradients).
//! Deeper products may split differently on machines with other L1 geometries. Tiny products
//! (`m·n ≤ 256` with both operands contiguous along `k`) take lane-wise "horizontal" kernels
//! instead, whose order does depend on the vector width; ResNet's convolutions are all larger.
//! All of this is read from the crate's code, not compared across machines.

use std::mem::MaybeUninit;

/// A read-only strided view of a `rows × cols` matrix: element `(i, j)` is at
/// `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Index one past the last element the view can touch.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride + 1
        }
    }
}

/// `dst = a · b` (or `dst += a · b` when `accumulate`), with `dst` row-major `a.rows × b.cols`.
///
/// # Panics
/// If the shapes disagree or a view reaches past its slice (a bug in the caller).
pub fn matmul(dst: &mut [f32], a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    assert!(
        dst.len() >= a.rows * b.cols,
        "matmul: destination too small"
    );
    // SAFETY: `dst` is initialized and holds the product's `a.rows × b.cols` elements.
    unsafe { gemm_into(dst.as_mut_ptr(), a, b, accumulate) }
}

/// `dst = a · b` into uninitialized memory; every element of the `a.rows × b.cols` product is
/// written (the GEMM does not read its destination when not accumulating).
pub fn matmul_uninit(dst: &mut [MaybeUninit<f32>], a: MatRef<'_>, b: MatRef<'_>) {
    assert!(
        dst.len() >= a.rows * b.cols,
        "matmul: destination too small"
    );
    // SAFETY: `dst` holds the product's elements; with `accumulate = false` they are only written.
    unsafe { gemm_into(dst.as_mut_ptr().cast::<f32>(), a, b, false) }
}

/// # Safety
/// `dst` must be valid for writes of `a.rows × b.cols` floats (and initialized for reads when
/// `accumulate`), and alias neither input.
unsafe fn gemm_into(dst: *mut f32, a: MatRef<'_>, b: MatRef<'_>, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul: inner dimensions differ");
    assert!(
        a.extent() <= a.data.len() && b.extent() <= b.data.len(),
        "matmul: view out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts keep every index the product reads inside its input slices, the
    // caller vouches for `dst`, and `Parallelism::None` runs on this thread only.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: MatRef<'_>, b: MatRef<'_>) -> Vec<f32> {
        let mut out = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols)
                    .map(|p| {
                        a.data[i * a.row_stride + p * a.col_stride]
                            * b.data[p * b.row_stride + j * b.col_stride]
                    })
                    .sum();
            }
        }
        out
    }

    #[test]
    fn products_of_strided_views_match_the_definition() {
        let a: Vec<f32> = (0..12).map(|v| v as f32 * 0.5 - 2.0).collect(); // 3×4
        let b: Vec<f32> = (0..20).map(|v| (v % 7) as f32 - 3.0).collect(); // 4×5
        let (a, b) = (MatRef::row_major(&a, 3, 4), MatRef::row_major(&b, 4, 5));
        let mut dst = vec![0.0; 15];
        matmul(&mut dst, a, b, false);
        assert_eq!(dst, naive(a, b));

        // Transposed views: (bᵀ)ᵀ = b, and accumulation adds.
        let bt: Vec<f32> = (0..5)
            .flat_map(|j| (0..4).map(move |i| (i, j)))
            .map(|(i, j)| b.data[i * 5 + j])
            .collect();
        let mut again = dst.clone();
        matmul(&mut again, a, MatRef::row_major(&bt, 5, 4).t(), true);
        let doubled: Vec<f32> = dst.iter().map(|v| 2.0 * v).collect();
        assert_eq!(again, doubled);
    }
}
