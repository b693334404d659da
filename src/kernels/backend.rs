//! The burn side of the kernels: the [`CpuKernels`] backend extension, its implementation on
//! `Flex` (forward only) and on `Autodiff<Flex>` (forward plus a backward node per call).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Flex, backend_extension};
use burn::tensor::{Bytes, DType, Shape};
use burn_flex::{FlexTensor, Layout};

use super::batch_norm::{self, NormShape, ReluGate, Stats};
use super::conv::{self, InputGradient};
use super::fork::Fork;
use super::geometry::ConvGeometry;
use super::output_gradient::OutputGradient;
use super::shortcut::{self, ShortcutShape};

/// Operations splitaux supplies to burn for its CPU backend.
#[backend_extension(Flex, Autodiff)]
pub trait CpuKernels: Backend {
    /// Convolution without bias: square kernel, `stride` and `padding` on both axes. With a
    /// `fork` (a residual block's input, see [`Fork`]), it claims the fork and its backward adds
    /// what the other consumer handed over to its input gradient.
    ///
    /// # Shapes
    /// - `x`: `[batch, in, h, w]`; `weight`: `[out, in, k, k]`
    /// - output: `[batch, out, (h + 2p − k)/s + 1, (w + 2p − k)/s + 1]`
    fn conv2d_nchw(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: usize,
        fork: Option<Fork>,
    ) -> FloatTensor<Self>;

    /// Training-mode BatchNorm with the batch's statistics, then ReLU if `relu`. Returns the
    /// output, the batch mean and the biased batch variance.
    ///
    /// # Shapes
    /// - `x`, output: `[batch, channels, h, w]`
    /// - `gamma`, `beta`, mean, variance: `[channels]`
    fn batch_norm_nchw(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        relu: bool,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// A scalar whose gradient with respect to `h` is `g` (its value is 0): how the coupled client
    /// continues backpropagation from the gradient the server sent. The equivalent
    /// `(h · g).sum()` costs a multiply, a sum, and two more full passes in its backward.
    ///
    /// # Shapes
    /// - `h`, `g`: the same shape
    /// - output: `[1]`
    fn inject_gradient(h: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self>;

    /// `relu(batch_norm(x) + residual)`, the end of a residual block; otherwise as
    /// [`batch_norm_nchw`](CpuKernels::batch_norm_nchw). With a `fork` (the residual is the
    /// block's input, see [`Fork`]), the residual's gradient is handed over to it.
    ///
    /// # Shapes
    /// - `x`, `residual`, output: `[batch, channels, h, w]`
    /// - `gamma`, `beta`, mean, variance: `[channels]`
    fn batch_norm_add_relu_nchw(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        epsilon: f64,
        fork: Option<Fork>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// [`conv2d_nchw`](CpuKernels::conv2d_nchw) and then
    /// [`batch_norm_nchw`](CpuKernels::batch_norm_nchw) on its output, as one op with the same
    /// results: its backward makes the normalization's input gradient image by image inside the
    /// convolution's backward sweep (see `OutputGradient`) instead of through memory.
    ///
    /// # Shapes
    /// - `x`: `[batch, in, h, w]`; `weight`: `[out, in, k, k]`
    /// - output: `[batch, out, h', w']`; `gamma`, `beta`, mean, variance: `[out]`
    fn conv_batch_norm_nchw(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        conv: ConvSpec,
        relu: bool,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// [`conv2d_nchw`](CpuKernels::conv2d_nchw) and then
    /// [`batch_norm_add_relu_nchw`](CpuKernels::batch_norm_add_relu_nchw) on its output, as one
    /// op (see [`conv_batch_norm_nchw`](CpuKernels::conv_batch_norm_nchw)); `fork` is the
    /// residual's.
    ///
    /// # Shapes
    /// - `x`: `[batch, in, h, w]`; `weight`: `[out, in, k, k]`
    /// - `residual`, output: `[batch, out, h', w']`; `gamma`, `beta`, mean, variance: `[out]`
    #[allow(clippy::too_many_arguments)]
    fn conv_batch_norm_add_relu_nchw(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        residual: FloatTensor<Self>,
        conv: ConvSpec,
        epsilon: f64,
        fork: Option<Fork>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);

    /// The option-A shortcut: every `stride`-th row and column, then `pad` zero channels on
    /// each side. With a `fork` (`x` is the block's input, see [`Fork`]), the gradient of `x`
    /// is handed over to it.
    ///
    /// # Shapes
    /// - `x`: `[batch, channels, h, w]`
    /// - output: `[batch, channels + 2·pad, ⌈h/stride⌉, ⌈w/stride⌉]`
    fn shortcut_nchw(
        x: FloatTensor<Self>,
        stride: usize,
        pad: usize,
        fork: Option<Fork>,
    ) -> FloatTensor<Self>;
}

/// A convolution's arguments besides its tensors: square kernel, `stride` and `padding` on both
/// axes, and the [`Fork`] of its input when that is a residual block's input.
#[derive(Debug, Clone)]
pub struct ConvSpec {
    pub stride: usize,
    pub padding: usize,
    pub fork: Option<Fork>,
}

/// `t` in a dense row-major buffer (a copy only if it was a strided view).
fn dense(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("kernel inputs are dense f32 tensors (made so by `dense`)")
}

fn flex(data: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(data),
        Layout::contiguous(shape.into()),
        DType::F32,
    )
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let shape = t.layout().shape();
    assert_eq!(
        shape.num_dims(),
        4,
        "kernel input must be rank 4, got {shape:?}"
    );
    [shape[0], shape[1], shape[2], shape[3]]
}

fn geometry(x: &FlexTensor, weight: &FlexTensor, stride: usize, padding: usize) -> ConvGeometry {
    let [batch, in_channels, height, width] = dims4(x);
    let [out_channels, w_in, kernel, kw] = dims4(weight);
    assert!(
        w_in == in_channels && kernel == kw && height + 2 * padding >= kernel,
        "conv2d_nchw: input {:?} and weight {:?} do not fit",
        dims4(x),
        dims4(weight)
    );
    ConvGeometry {
        batch,
        in_channels,
        out_channels,
        height,
        width,
        kernel,
        stride,
        padding,
    }
}

fn conv_forward(x: &FlexTensor, weight: &FlexTensor, stride: usize, padding: usize) -> FlexTensor {
    let g = geometry(x, weight, stride, padding);
    let y = conv::forward(&g, values(x), values(weight));
    flex(y, [g.batch, g.out_channels, g.out_height(), g.out_width()])
}

fn norm_shape(x: &FlexTensor) -> NormShape {
    let [batch, channels, h, w] = dims4(x);
    NormShape {
        batch,
        channels,
        plane: h * w,
    }
}

/// Forward BatchNorm on dense inputs: `(y, stats)`.
fn norm_forward(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    residual: Option<&FlexTensor>,
    relu: bool,
    epsilon: f64,
) -> (FlexTensor, Stats) {
    let (y, stats) = batch_norm::forward(
        norm_shape(x),
        values(x),
        values(gamma),
        values(beta),
        residual.map(values),
        relu,
        epsilon,
    );
    (flex(y, x.layout().shape().clone()), stats)
}

/// The convolution of dense `x` and the BatchNorm of its output: `(h, y, stats)`, `h` the
/// convolution's output, the normalization's statistics gathered as the convolution writes each
/// image (while it is in cache; the same bits as [`norm_forward`] on `h`).
fn conv_norm_forward(
    [x, weight, gamma, beta]: [&FlexTensor; 4],
    conv: &ConvSpec,
    residual: Option<&FlexTensor>,
    relu: bool,
    epsilon: f64,
) -> (FlexTensor, FlexTensor, Stats) {
    let g = geometry(x, weight, conv.stride, conv.padding);
    let shape = NormShape {
        batch: g.batch,
        channels: g.out_channels,
        plane: g.out_plane(),
    };
    let moments = batch_norm::ImageMoments::new(shape);
    let record = |n: usize, image: &[f32]| moments.record(n, image);
    let h = conv::forward_observed(&g, values(x), values(weight), &record);
    let stats = moments.statistics();
    let (gamma, beta) = (values(gamma), values(beta));
    let y = batch_norm::normalize(
        shape,
        &h,
        gamma,
        beta,
        residual.map(values),
        relu,
        &stats,
        epsilon,
    );
    let dims = [g.batch, g.out_channels, g.out_height(), g.out_width()];
    (flex(h, dims), flex(y, dims), stats)
}

fn stats_tensors(stats: &Stats) -> (FlexTensor, FlexTensor) {
    let c = stats.mean.len();
    (
        flex(stats.mean.clone(), [c]),
        flex(stats.variance.clone(), [c]),
    )
}

/// The shortcut of dense `x` and its shape.
fn shortcut_forward(x: &FlexTensor, stride: usize, pad: usize) -> (FlexTensor, ShortcutShape) {
    let s = ShortcutShape::new(dims4(x), stride, pad);
    let [c, h, w] = s.out_dims();
    (flex(shortcut::forward(s, values(x)), [s.batch, c, h, w]), s)
}

impl CpuKernels for Flex {
    // Without autodiff there is no backward, so nothing to fork.
    fn shortcut_nchw(x: FlexTensor, stride: usize, pad: usize, _: Option<Fork>) -> FlexTensor {
        shortcut_forward(&dense(x), stride, pad).0
    }

    fn conv2d_nchw(
        x: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: usize,
        _: Option<Fork>,
    ) -> FlexTensor {
        conv_forward(&dense(x), &dense(weight), stride, padding)
    }

    fn inject_gradient(_h: FlexTensor, _g: FlexTensor) -> FlexTensor {
        flex(vec![0.0], [1])
    }

    fn batch_norm_nchw(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        relu: bool,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        norm_plain([x, gamma, beta], relu, epsilon)
    }

    fn batch_norm_add_relu_nchw(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        residual: FlexTensor,
        epsilon: f64,
        _: Option<Fork>,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        norm_plain([x, gamma, beta, residual], true, epsilon)
    }

    fn conv_batch_norm_nchw(
        x: FlexTensor,
        weight: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        conv: ConvSpec,
        relu: bool,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let [x, weight, gamma, beta] = [x, weight, gamma, beta].map(dense);
        let (_, y, stats) =
            conv_norm_forward([&x, &weight, &gamma, &beta], &conv, None, relu, epsilon);
        let (mean, variance) = stats_tensors(&stats);
        (y, mean, variance)
    }

    fn conv_batch_norm_add_relu_nchw(
        x: FlexTensor,
        weight: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        residual: FlexTensor,
        conv: ConvSpec,
        epsilon: f64,
        _: Option<Fork>,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let [x, weight, gamma, beta, residual] = [x, weight, gamma, beta, residual].map(dense);
        let inputs = [&x, &weight, &gamma, &beta];
        let (_, y, stats) = conv_norm_forward(inputs, &conv, Some(&residual), true, epsilon);
        let (mean, variance) = stats_tensors(&stats);
        (y, mean, variance)
    }
}

/// BatchNorm forward on `[x, gamma, beta]` or `[x, gamma, beta, residual]`: `(y, mean, variance)`.
fn norm_plain<const N: usize>(
    inputs: [FlexTensor; N],
    relu: bool,
    epsilon: f64,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let (x, gamma, beta, residual) = norm_inputs(inputs);
    let (y, stats) = norm_forward(&x, &gamma, &beta, residual.as_ref(), relu, epsilon);
    let (mean, variance) = stats_tensors(&stats);
    (y, mean, variance)
}

/// `[x, gamma, beta]` or `[x, gamma, beta, residual]`, each made dense.
fn norm_inputs<const N: usize>(
    inputs: [FlexTensor; N],
) -> (FlexTensor, FlexTensor, FlexTensor, Option<FlexTensor>) {
    let mut inputs = inputs.into_iter().map(dense);
    let mut next = || inputs.next().expect("BatchNorm takes x, gamma and beta");
    let (x, gamma, beta) = (next(), next(), next());
    (x, gamma, beta, inputs.next())
}

/// Registers each gradient with the parent it belongs to, if that parent is tracked.
fn register<const N: usize>(
    grads: &mut Gradients,
    parents: [Option<NodeId>; N],
    gradients: [Option<FlexTensor>; N],
) {
    for (parent, gradient) in parents.into_iter().zip(gradients) {
        if let (Some(id), Some(gradient)) = (parent, gradient) {
            grads.register::<Flex>(id, gradient);
        }
    }
}

/// The first `N` of `gradients` (a node without a residual parent drops the residual's).
fn first_n<const N: usize, const M: usize>(
    gradients: [Option<FlexTensor>; M],
) -> [Option<FlexTensor>; N] {
    let mut gradients = gradients.into_iter();
    std::array::from_fn(|_| gradients.next().flatten())
}

/// A gradient for a forked input (see [`Fork`]): handed over when the fork waits for it, else
/// returned, to be registered with burn.
fn hand_over(fork: Option<&Fork>, gradient: Vec<f32>) -> Option<Vec<f32>> {
    match fork {
        Some(fork) => fork.hand_over(gradient),
        None => Some(gradient),
    }
}

/// What a convolution's backward needs from its forward.
#[derive(Debug, Clone)]
struct ConvState {
    /// Dense input and weight.
    x: FlexTensor,
    weight: FlexTensor,
    stride: usize,
    padding: usize,
    /// The fork it claimed.
    fork: Option<Fork>,
}

impl ConvState {
    /// The state of a tracked convolution; claims `spec`'s fork when the input is tracked (its
    /// backward computes an input gradient only then).
    fn claiming(x: FlexTensor, weight: FlexTensor, spec: ConvSpec, x_tracked: bool) -> Self {
        let fork = spec.fork.filter(|_| x_tracked);
        fork.iter().for_each(Fork::claim);
        ConvState {
            x,
            weight,
            stride: spec.stride,
            padding: spec.padding,
            fork,
        }
    }

    /// `(dx, dw)`, each when wanted, from the output gradient `dy`; `dx` with what the fork
    /// collects added.
    fn gradients(
        self,
        dy: OutputGradient<'_>,
        [want_x, want_w]: [bool; 2],
    ) -> [Option<FlexTensor>; 2] {
        let other = self.fork.and_then(|fork| fork.collect());
        let input = match (&other, want_x) {
            (_, false) => InputGradient::Skip,
            (Some(other), true) => InputGradient::Plus(other),
            (None, true) => InputGradient::Plain,
        };
        let (x, weight) = (&self.x, &self.weight);
        let g = geometry(x, weight, self.stride, self.padding);
        let (dx, dw) = conv::backward(&g, values(x), values(weight), dy, input, want_w);
        [
            dx.map(|dx| flex(dx, x.layout().shape().clone())),
            dw.map(|dw| flex(dw, weight.layout().shape().clone())),
        ]
    }
}

/// Backward node of [`CpuKernels::conv2d_nchw`]; parents `[x, weight]`.
#[derive(Debug)]
struct ConvBackward;

impl Backward<Flex, 2> for ConvBackward {
    type State = ConvState;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let dy = dense(grads.consume::<Flex>(&ops.node));
        let wanted = ops.parents.each_ref().map(Option::is_some);
        let gradients = ops
            .state
            .gradients(OutputGradient::Given(values(&dy)), wanted);
        register(grads, ops.parents.map(|p| p.map(|node| node.id)), gradients);
    }
}

/// Backward node of [`CpuKernels::shortcut_nchw`]; parent `[x]`, state the shape.
#[derive(Debug)]
struct ShortcutBackward;

impl Backward<Flex, 1> for ShortcutBackward {
    /// The shape, and the fork the gradient is handed over to.
    type State = (ShortcutShape, Option<Fork>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (s, fork) = ops.state;
        let dy = dense(grads.consume::<Flex>(&ops.node));
        let dx = hand_over(fork.as_ref(), shortcut::backward(s, values(&dy)))
            .map(|dx| flex(dx, [s.batch, s.channels, s.height, s.width]));
        register(grads, ops.parents.map(|p| p.map(|node| node.id)), [dx]);
    }
}

/// What the BatchNorm backward needs from its forward.
#[derive(Debug, Clone)]
struct NormState {
    x: FlexTensor,
    gamma: FlexTensor,
    stats: Stats,
    gate: GateState,
    /// Whether a residual was added (the backward then hands its gradient on).
    residual: bool,
    epsilon: f64,
    /// Where the residual's gradient is handed over (see [`Fork`]).
    fork: Option<Fork>,
}

impl NormState {
    /// The state of a tracked BatchNorm of `x` whose forward gave `y` and `stats`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        x: FlexTensor,
        [gamma, beta]: [FlexTensor; 2],
        y: &FlexTensor,
        stats: Stats,
        relu: bool,
        residual: bool,
        epsilon: f64,
        fork: Option<Fork>,
    ) -> Self {
        // Without a residual the ReLU's mask follows from x; with one, from the output.
        let gate = match (relu, residual) {
            (false, _) => GateState::Open,
            (true, true) => GateState::Output(y.clone()),
            (true, false) => {
                let (scale, shift) =
                    batch_norm::affine(values(&gamma), values(&beta), &stats, epsilon);
                GateState::Affine { scale, shift }
            }
        };
        NormState {
            x,
            gamma,
            stats,
            gate,
            residual,
            epsilon,
            // Kept only if a convolution will collect.
            fork: fork.filter(Fork::is_claimed),
        }
    }

    /// The first half of the backward pass, for the output gradient `dy`.
    fn sums(&self, dy: &[f32]) -> batch_norm::Sums {
        batch_norm::backward_sums(
            norm_shape(&self.x),
            values(&self.x),
            dy,
            self.gate.gate(),
            values(&self.gamma),
            &self.stats,
            self.residual,
            self.epsilon,
        )
    }

    /// The input gradient that [`sums`](Self::sums) prepared, made on demand (`dy` may be left
    /// out when the sums wrote the gated gradient out, see [`forget_output`](Self::forget_output)).
    fn input_gradient<'a>(
        &'a self,
        dy: Option<&'a [f32]>,
        sums: &'a batch_norm::Sums,
    ) -> batch_norm::InputGradient<'a> {
        let (x, gate) = (values(&self.x), self.gate.gate());
        batch_norm::InputGradient::new(norm_shape(&self.x), x, dy, gate, sums)
    }

    /// Drops the forward output the ReLU gate reads, once [`sums`](Self::sums) wrote the gated
    /// gradient out (with a residual): the input gradient reads that instead.
    fn forget_output(&mut self, sums: &batch_norm::Sums) {
        if sums.d_residual.is_some() {
            self.gate = GateState::Open;
        }
    }

    /// `[dgamma, dbeta, d_residual]` as tensors, the residual's handed over to the fork when it
    /// waits for it.
    fn parameter_gradients(&self, sums: batch_norm::Sums) -> [Option<FlexTensor>; 3] {
        let c = self.stats.mean.len();
        let d_residual = sums
            .d_residual
            .and_then(|d| hand_over(self.fork.as_ref(), d))
            .map(|d| flex(d, self.x.layout().shape().clone()));
        [
            Some(flex(sums.dgamma, [c])),
            Some(flex(sums.dbeta, [c])),
            d_residual,
        ]
    }
}

/// The owned form of [`ReluGate`].
#[derive(Debug, Clone)]
enum GateState {
    Open,
    Output(FlexTensor),
    Affine { scale: Vec<f32>, shift: Vec<f32> },
}

impl GateState {
    fn gate(&self) -> ReluGate<'_> {
        match self {
            GateState::Open => ReluGate::Open,
            GateState::Output(y) => ReluGate::Output(values(y)),
            GateState::Affine { scale, shift } => ReluGate::Affine { scale, shift },
        }
    }
}

/// Backward node of [`CpuKernels::batch_norm_nchw`]; parents `[x, gamma, beta]`, plus
/// `residual` when `N = 4`.
#[derive(Debug)]
struct NormBackward<const N: usize>;

impl<const N: usize> Backward<Flex, N> for NormBackward<N> {
    type State = NormState;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        let dy = dense(grads.consume::<Flex>(&ops.node));
        let sums = s.sums(values(&dy));
        let dx = flex(
            s.input_gradient(Some(values(&dy)), &sums).whole(),
            s.x.layout().shape().clone(),
        );
        let [dgamma, dbeta, d_residual] = s.parameter_gradients(sums);
        let gradients = first_n([Some(dx), dgamma, dbeta, d_residual]);
        register(grads, ops.parents.map(|p| p.map(|node| node.id)), gradients);
    }
}

/// Backward node of [`CpuKernels::conv_batch_norm_nchw`]; parents `[x, weight, gamma, beta]`,
/// plus `residual` when `N = 5`.
#[derive(Debug)]
struct ConvNormBackward<const N: usize>;

impl<const N: usize> Backward<Flex, N> for ConvNormBackward<N> {
    type State = (ConvState, NormState);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (conv, mut norm) = ops.state;
        let dy = dense(grads.consume::<Flex>(&ops.node));
        let sums = norm.sums(values(&dy));
        // With a residual the sums wrote the gated gradient out: the output gradient and the
        // forward output go before the convolution's backward (lower peak memory).
        norm.forget_output(&sums);
        let dy = sums.d_residual.is_none().then_some(dy);
        let wanted = [0, 1].map(|i| ops.parents[i].is_some());
        // The convolution's output gradient is the normalization's input gradient, made image by
        // image in the convolution's backward.
        let dh = norm.input_gradient(dy.as_ref().map(values), &sums);
        let dh = OutputGradient::Normalized(dh);
        let [dx, dw] = conv.gradients(dh, wanted);
        let [dgamma, dbeta, d_residual] = norm.parameter_gradients(sums);
        let gradients = first_n([dx, dw, dgamma, dbeta, d_residual]);
        register(grads, ops.parents.map(|p| p.map(|node| node.id)), gradients);
    }
}

type AdTensor = FloatTensor<Autodiff<Flex>>;

/// Runs the BatchNorm forward on autodiff inputs and records `NormBackward<N>` when tracked.
fn norm_autodiff<C: CheckpointStrategy, const N: usize>(
    inputs: [&AdTensor; N],
    relu: bool,
    epsilon: f64,
    fork: Option<Fork>,
) -> (AdTensor, AdTensor, AdTensor) {
    let (x, gamma, beta, residual) = norm_inputs(inputs.map(|t| t.primitive().clone()));
    let (y, stats) = norm_forward(&x, &gamma, &beta, residual.as_ref(), relu, epsilon);
    let (mean, variance) = stats_tensors(&stats);
    let output = match NormBackward::<N>
        .prepare::<C>(inputs.map(|t| t.node()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let has_residual = residual.is_some();
            let state = NormState::new(
                x,
                [gamma, beta],
                &y,
                stats,
                relu,
                has_residual,
                epsilon,
                fork,
            );
            prep.finish(state, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    (output, AdTensor::new(mean), AdTensor::new(variance))
}

/// Runs a convolution and the BatchNorm of its output on autodiff inputs `[x, weight, gamma,
/// beta]` (and `residual` when `N = 5`), recording `ConvNormBackward<N>` when tracked.
fn conv_norm_autodiff<C: CheckpointStrategy, const N: usize>(
    inputs: [&AdTensor; N],
    conv: ConvSpec,
    relu: bool,
    epsilon: f64,
    fork: Option<Fork>,
) -> (AdTensor, AdTensor, AdTensor) {
    let mut dense_inputs = inputs.iter().map(|t| dense(t.primitive().clone()));
    let mut next = || {
        dense_inputs
            .next()
            .expect("a convolution and BatchNorm take x, weight, gamma and beta")
    };
    let (x, weight, gamma, beta) = (next(), next(), next(), next());
    let residual = dense_inputs.next();
    let conv_norm_inputs = [&x, &weight, &gamma, &beta];
    let (h, y, stats) =
        conv_norm_forward(conv_norm_inputs, &conv, residual.as_ref(), relu, epsilon);
    let (mean, variance) = stats_tensors(&stats);
    let output = match ConvNormBackward::<N>
        .prepare::<C>(inputs.map(|t| t.node()))
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let conv = ConvState::claiming(x, weight, conv, inputs[0].is_tracked());
            let has_residual = residual.is_some();
            let norm = NormState::new(
                h,
                [gamma, beta],
                &y,
                stats,
                relu,
                has_residual,
                epsilon,
                fork,
            );
            prep.finish((conv, norm), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(y),
    };
    (output, AdTensor::new(mean), AdTensor::new(variance))
}

/// Backward node of [`CpuKernels::inject_gradient`]; parent `[h]`, state `g`.
#[derive(Debug)]
struct InjectBackward;

impl Backward<Flex, 1> for InjectBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let upstream = dense(grads.consume::<Flex>(&ops.node));
        let scale = values(&upstream)[0];
        let g = if scale == 1.0 {
            ops.state
        } else {
            let g = dense(ops.state);
            let scaled = values(&g).iter().map(|v| v * scale).collect();
            flex(scaled, g.layout().shape().clone())
        };
        register(grads, ops.parents.map(|p| p.map(|node| node.id)), [Some(g)]);
    }
}

impl<C: CheckpointStrategy> CpuKernels for Autodiff<Flex, C> {
    fn inject_gradient(h: AdTensor, g: AdTensor) -> AdTensor {
        let zero = flex(vec![0.0], [1]);
        match InjectBackward
            .prepare::<C>([h.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(g.primitive().clone(), zero),
            OpsKind::UnTracked(prep) => prep.finish(zero),
        }
    }

    fn shortcut_nchw(x: AdTensor, stride: usize, pad: usize, fork: Option<Fork>) -> AdTensor {
        let (y, shape) = shortcut_forward(&dense(x.primitive().clone()), stride, pad);
        match ShortcutBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((shape, fork.filter(Fork::is_claimed)), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn conv2d_nchw(
        x: AdTensor,
        weight: AdTensor,
        stride: usize,
        padding: usize,
        fork: Option<Fork>,
    ) -> AdTensor {
        let (xp, wp) = (
            dense(x.primitive().clone()),
            dense(weight.primitive().clone()),
        );
        let y = conv_forward(&xp, &wp, stride, padding);
        match ConvBackward
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let spec = ConvSpec {
                    stride,
                    padding,
                    fork,
                };
                prep.finish(ConvState::claiming(xp, wp, spec, x.is_tracked()), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn batch_norm_nchw(
        x: AdTensor,
        gamma: AdTensor,
        beta: AdTensor,
        relu: bool,
        epsilon: f64,
    ) -> (AdTensor, AdTensor, AdTensor) {
        norm_autodiff::<C, 3>([&x, &gamma, &beta], relu, epsilon, None)
    }

    fn batch_norm_add_relu_nchw(
        x: AdTensor,
        gamma: AdTensor,
        beta: AdTensor,
        residual: AdTensor,
        epsilon: f64,
        fork: Option<Fork>,
    ) -> (AdTensor, AdTensor, AdTensor) {
        norm_autodiff::<C, 4>([&x, &gamma, &beta, &residual], true, epsilon, fork)
    }

    fn conv_batch_norm_nchw(
        x: AdTensor,
        weight: AdTensor,
        gamma: AdTensor,
        beta: AdTensor,
        conv: ConvSpec,
        relu: bool,
        epsilon: f64,
    ) -> (AdTensor, AdTensor, AdTensor) {
        conv_norm_autodiff::<C, 4>([&x, &weight, &gamma, &beta], conv, relu, epsilon, None)
    }

    fn conv_batch_norm_add_relu_nchw(
        x: AdTensor,
        weight: AdTensor,
        gamma: AdTensor,
        beta: AdTensor,
        residual: AdTensor,
        conv: ConvSpec,
        epsilon: f64,
        fork: Option<Fork>,
    ) -> (AdTensor, AdTensor, AdTensor) {
        let inputs = [&x, &weight, &gamma, &beta, &residual];
        conv_norm_autodiff::<C, 5>(inputs, conv, true, epsilon, fork)
    }
}
