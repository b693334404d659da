//! [`OutputGradient`]: where a convolution's backward pass gets the gradient of its output —
//! given whole, or made image by image by the BatchNorm that read the convolution's output (that
//! normalization's input gradient is the convolution's output gradient). Made inside the
//! convolution's backward sweep, each image is computed while the sweep needs it, in cache, and
//! the whole gradient never goes through memory.

use std::borrow::Cow;
use std::mem::MaybeUninit;

use super::batch_norm;

/// See the module documentation.
#[derive(Clone, Copy)]
pub enum OutputGradient<'a> {
    /// `[batch, out, out_h, out_w]`, whole.
    Given(&'a [f32]),
    /// The input gradient of the BatchNorm after the convolution, made on demand.
    Normalized(batch_norm::InputGradient<'a>),
}

impl<'a> OutputGradient<'a> {
    /// Floats in the whole gradient.
    pub fn len(&self) -> usize {
        match self {
            OutputGradient::Given(dy) => dy.len(),
            OutputGradient::Normalized(dx) => dx.batch() * dx.image_len(),
        }
    }

    /// Whether the gradient has no elements (an empty batch).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole gradient: borrowed when given, else computed.
    pub fn whole(&self) -> Cow<'a, [f32]> {
        match *self {
            OutputGradient::Given(dy) => Cow::Borrowed(dy),
            OutputGradient::Normalized(dx) => Cow::Owned(dx.whole()),
        }
    }

    /// A scratch buffer for [`image`](Self::image): empty when the gradient is given.
    pub fn scratch(&self, image_len: usize) -> Vec<MaybeUninit<f32>> {
        match self {
            OutputGradient::Given(_) => Vec::new(),
            OutputGradient::Normalized(_) => vec![MaybeUninit::uninit(); image_len],
        }
    }

    /// Image `n`, `image_len` floats: a slice of the given gradient, or made in `scratch` (from
    /// [`scratch`](Self::scratch)).
    pub fn image<'s>(
        &'s self,
        n: usize,
        image_len: usize,
        scratch: &'s mut [MaybeUninit<f32>],
    ) -> &'s [f32] {
        match self {
            OutputGradient::Given(dy) => &dy[n * image_len..][..image_len],
            OutputGradient::Normalized(dx) => {
                assert_eq!(
                    dx.image_len(),
                    image_len,
                    "output gradient: image length of the BatchNorm input gradient"
                );
                let slots = &mut scratch[..image_len];
                dx.image(n, slots);
                // SAFETY: `image` wrote all `image_len` slots.
                unsafe { std::slice::from_raw_parts(slots.as_ptr().cast(), image_len) }
            }
        }
    }
}
