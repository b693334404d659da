//! The shape of a convolution, shared by the im2col + GEMM path ([`super::conv`]) and the direct
//! kernel ([`super::direct`]). A leaf module: it imports neither, so the two kernels depend on it
//! instead of on each other. Layouts that belong to one kernel (the im2col patch matrix, the
//! direct kernel's padded-width grid) stay with that kernel.

/// Shape of a square-kernel convolution without dilation, groups or bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeometry {
    pub batch: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeometry {
    pub fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }

    pub fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }

    /// Elements of one image of the input, `in · h · w`.
    pub fn in_len(&self) -> usize {
        self.in_channels * self.height * self.width
    }

    /// Elements of one image of the output, `out · out_h · out_w`.
    pub fn out_len(&self) -> usize {
        self.out_channels * self.out_plane()
    }

    /// Elements of one output channel, `out_h · out_w`.
    pub fn out_plane(&self) -> usize {
        self.out_height() * self.out_width()
    }

    /// Terms of one output element's sum, `in · k · k`: the rows of the im2col patch matrix and
    /// the columns of the flattened weight `[out, in·k·k]`.
    pub fn patch_len(&self) -> usize {
        self.in_channels * self.kernel * self.kernel
    }
}
