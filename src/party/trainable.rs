//! A model with its optimizer: what each party trains.

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Gradients, Tensor};

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

    pub fn optimizer(&self) -> &ModuleOptimizer {
        &self.optimizer
    }

    /// Puts `model` in place of the current one (same architecture, the optimizer's state
    /// carries on) and returns the old one.
    pub fn replace_model(&mut self, model: M) -> M {
        self.model
            .replace(model)
            .expect("model is present between optimizer steps")
    }

    /// The model, without its optimizer.
    pub fn into_model(mut self) -> M {
        self.model
            .take()
            .expect("model is present between optimizer steps")
    }

    /// Replaces the model's values by `values` (as made by `state::flatten`) and the optimizer by
    /// `optimizer`; on a length mismatch nothing changes.
    pub fn restore(
        &mut self,
        values: &[f32],
        optimizer: ModuleOptimizer,
    ) -> Result<(), super::state::StateError> {
        let expected = self.model().num_params();
        if values.len() != expected {
            return Err(super::state::StateError::WrongLength {
                expected,
                got: values.len(),
            });
        }
        let model = self
            .model
            .take()
            .expect("model is present between optimizer steps");
        self.model = Some(super::state::load_flat(model, values)?);
        self.optimizer = optimizer;
        Ok(())
    }

    /// One optimizer step with this model's part of `grads`.
    pub fn apply(&mut self, lr: f64, grads: Gradients) {
        let model = self
            .model
            .take()
            .expect("model is present between optimizer steps");
        let grads = GradientsParams::from_grads(grads, &model);
        self.model = Some(self.optimizer.step(lr, model, grads));
    }
}

/// Reads a scalar loss for logging and the divergence check.
pub fn loss_value(loss: &Tensor<1>) -> f32 {
    loss.clone().into_scalar::<f32>()
}
