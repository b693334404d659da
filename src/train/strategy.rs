//! How one training step is ordered across the cut: the only thing that differs between coupled
//! and decoupled split learning. The shared loop in [`super::runner`] calls a [`Strategy`] once
//! per batch.

use burn::tensor::{Device, Int, Tensor};

use super::party::{Client, Server};
use crate::config::Mode;
use crate::link::{Link, LinkError, MessageKind};
use crate::memory::{MemoryMeter, Phase};

/// Everything a step touches besides the batch.
pub struct StepContext<'a> {
    pub client: &'a mut Client,
    pub server: &'a mut Server,
    pub link: &'a mut Link,
    pub memory: &'a mut MemoryMeter,
    /// Where received tensors are materialized (the server's and the client's device).
    pub device: &'a Device,
}

impl StepContext<'_> {
    /// The client sends its activations at the cut (detached: only values cross) and the labels;
    /// returns the server's received copies.
    fn send_up(
        &mut self,
        h: &Tensor<4>,
        labels: Tensor<1, Int>,
    ) -> Result<(Tensor<4>, Tensor<1, Int>), LinkError> {
        let a = self
            .link
            .send_float(MessageKind::Activations, h.clone().detach(), self.device)?;
        let y = self.link.send_labels(labels, self.device)?;
        Ok((a, y))
    }
}

/// Losses of one step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLosses {
    /// The server's (true) cross-entropy.
    pub server: f32,
    /// The client's auxiliary cross-entropy (decoupled only).
    pub client: Option<f32>,
}

/// The ordering of one split training step.
pub trait Strategy {
    fn mode(&self) -> Mode;

    /// Trains both parties on one batch, sending every cross-cut tensor over `ctx.link`.
    ///
    /// # Shapes
    /// - images: `[batch, 3, 32, 32]` on the autodiff device
    /// - labels: `[batch]`
    fn step(
        &self,
        ctx: &mut StepContext<'_>,
        images: Tensor<4>,
        labels: Tensor<1, Int>,
        lr: f64,
    ) -> Result<StepLosses, LinkError>;
}

/// The strategy of a [`Mode`].
pub fn strategy_for(mode: Mode) -> Box<dyn Strategy> {
    match mode {
        Mode::Coupled => Box::new(Coupled),
        Mode::Decoupled => Box::new(Decoupled),
    }
}

/// Classic split learning: the server returns the gradient at the cut and the client
/// backpropagates it, so the client's graph stays alive while the server works.
pub struct Coupled;

impl Strategy for Coupled {
    fn mode(&self) -> Mode {
        Mode::Coupled
    }

    fn step(
        &self,
        ctx: &mut StepContext<'_>,
        images: Tensor<4>,
        labels: Tensor<1, Int>,
        lr: f64,
    ) -> Result<StepLosses, LinkError> {
        ctx.memory.enter(Phase::Client);
        let h = ctx.client.forward(images); // [b, C, S, S], graph kept for the returning gradient
        let (a, y) = ctx.send_up(&h, labels)?;

        ctx.memory.enter(Phase::Server);
        let (server_loss, cut_gradient) = ctx.server.train(a, y, lr, true);
        let cut_gradient = cut_gradient.expect("the received activations require a gradient");
        let g = ctx
            .link
            .send_float(MessageKind::Gradients, cut_gradient, ctx.device)?;

        ctx.memory.enter(Phase::Client);
        ctx.client.train_on_cut_gradient(h, g, lr);
        Ok(StepLosses {
            server: server_loss,
            client: None,
        })
    }
}

/// Decoupled split learning: the client finishes its own update on the auxiliary loss before the
/// server starts; no gradient crosses the cut.
pub struct Decoupled;

impl Strategy for Decoupled {
    fn mode(&self) -> Mode {
        Mode::Decoupled
    }

    fn step(
        &self,
        ctx: &mut StepContext<'_>,
        images: Tensor<4>,
        labels: Tensor<1, Int>,
        lr: f64,
    ) -> Result<StepLosses, LinkError> {
        ctx.memory.enter(Phase::Client);
        let h = ctx.client.forward(images); // [b, C, S, S]
        let (a, y) = ctx.send_up(&h, labels.clone())?;
        let client_loss = ctx.client.train_on_aux_loss(h, labels, lr);

        ctx.memory.enter(Phase::Server);
        let (server_loss, _) = ctx.server.train(a, y, lr, false);
        Ok(StepLosses {
            server: server_loss,
            client: Some(client_loss),
        })
    }
}
