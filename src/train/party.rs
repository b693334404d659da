//! The two parties of split training: the client (its partition and auxiliary head) and the
//! server (the rest of the network). Each owns its model and its own optimizer.

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Gradients, Int, Tensor};

use crate::kernels::inject_gradient;
use crate::model::{ClientModel, ServerNet, cross_entropy};

/// A model with its optimizer.
pub struct Trainable<M: Module> {
    /// Always `Some` between calls; taken only while the optimizer rebuilds the model.
    model: Option<M>,
    optimizer: ModuleOptimizer,
}

impl<M: Module> Trainable<M> {
    pub fn new(model: M, optimizer: ModuleOptimizer) -> Self {
        Self {
            model: Some(model),
            optimizer,
        }
    }

    pub fn model(&self) -> &M {
        self.model
            .as_ref()
            .expect("model is present between optimizer steps")
    }

    /// One optimizer step with this model's part of `grads`.
    fn apply(&mut self, lr: f64, grads: Gradients) {
        let model = self
            .model
            .take()
            .expect("model is present between optimizer steps");
        let grads = GradientsParams::from_grads(grads, &model);
        self.model = Some(self.optimizer.step(lr, model, grads));
    }
}

/// Reads a scalar loss for logging and the divergence check.
fn value(loss: &Tensor<1>) -> f32 {
    loss.clone().into_scalar::<f32>()
}

/// The client: runs the first layers on its private data.
pub struct Client(pub Trainable<ClientModel>);

impl Client {
    /// # Shapes
    /// - images: `[batch, 3, 32, 32]`
    /// - output: `[batch, C, S, S]`, the activations at the cut (graph attached)
    pub fn forward(&self, images: Tensor<4>) -> Tensor<4> {
        self.0.model().net.forward(images)
    }

    /// Decoupled update: the auxiliary head's cross-entropy trains the client partition and the
    /// head. Returns the auxiliary loss.
    pub fn train_on_aux_loss(&mut self, h: Tensor<4>, labels: Tensor<1, Int>, lr: f64) -> f32 {
        let loss = cross_entropy(self.0.model().aux.forward(h), labels);
        let loss_value = value(&loss);
        self.0.apply(lr, loss.backward());
        loss_value
    }

    /// Coupled update: backpropagates the server's gradient at the cut through the partition.
    /// The surrogate's gradient with respect to `h` is `grad`, so its backward pass is exactly
    /// the chain rule continued from the server.
    pub fn train_on_cut_gradient(&mut self, h: Tensor<4>, grad: Tensor<4>, lr: f64) {
        let surrogate = inject_gradient(h, grad);
        self.0.apply(lr, surrogate.backward());
    }
}

/// The server: runs the rest of the network on the activations it receives.
pub struct Server(pub Trainable<ServerNet>);

impl Server {
    /// One server step on received activations `a` (a fresh leaf). With `want_cut_gradient`, the
    /// loss gradient with respect to `a` is returned for the client. Returns the loss too.
    pub fn train(
        &mut self,
        a: Tensor<4>,
        labels: Tensor<1, Int>,
        lr: f64,
        want_cut_gradient: bool,
    ) -> (f32, Option<Tensor<4>>) {
        let a = if want_cut_gradient {
            a.require_grad()
        } else {
            a
        };
        let loss = cross_entropy(self.0.model().forward(a.clone()), labels);
        let loss_value = value(&loss);
        let mut grads = loss.backward();
        let cut_gradient = if want_cut_gradient {
            a.grad_remove(&mut grads)
        } else {
            None
        };
        self.0.apply(lr, grads);
        (loss_value, cut_gradient)
    }
}
