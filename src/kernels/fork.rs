//! [`Fork`]: a tensor read by two fused ops, whose two gradients the kernels add themselves.
//!
//! A residual block's input feeds its first convolution and its shortcut, so its gradient is a
//! sum of two. burn's autodiff adds them when the second is registered, on one thread while the
//! others wait: about 1 % of a ResNet-20 training step on 2 cores. Instead, the shortcut side's
//! backward (the block-ending BatchNorm for an identity shortcut, the shortcut kernel for a
//! downsampling one) *hands over* its gradient, and the convolution's backward adds it to its own
//! input gradient image by image, in parallel, while each image is in cache. It is the same one
//! float addition per element that burn does, so the sums have the same bits.
//!
//! The life of a fork, one per block and forward pass:
//! 1. the convolution's forward *claims* it (a fused op on a tracked input: its backward will
//!    compute an input gradient and look for a handed-over one);
//! 2. the shortcut side's backward hands its gradient over if the fork is claimed and not yet
//!    collected, else registers it with burn as any op does;
//! 3. the convolution's backward *collects* what was handed over (if anything).
//!
//! Backward runs a block's ops from its end, so an identity shortcut's BatchNorm always hands
//! over before the convolution collects. The shortcut kernel of a downsampling block sits at the
//! same depth of the graph as the convolution and may run after it; it then finds the fork
//! collected and registers its gradient with burn, which adds the two. Either way the gradient
//! arrives once. Both consumers must feed the loss being differentiated (as a block's do), or a
//! handed-over gradient would wait for a convolution backward that never runs.

use std::sync::{Arc, Mutex, PoisonError};

/// See the module documentation. Cloning shares the fork.
#[derive(Debug, Clone, Default)]
pub struct Fork(Arc<Mutex<Stage>>);

#[derive(Debug, Default)]
enum Stage {
    /// Nothing claimed it: gradients go to burn.
    #[default]
    Open,
    /// A convolution will collect; nothing handed over yet.
    Claimed,
    /// Handed over, waiting for the convolution.
    Handed(Vec<f32>),
    /// The convolution has collected (whatever was there).
    Collected,
}

impl Fork {
    pub fn new() -> Self {
        Self::default()
    }

    fn stage(&self) -> std::sync::MutexGuard<'_, Stage> {
        // A panic elsewhere cannot leave `Stage` half-written: every update is one assignment.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The convolution's forward: its backward will collect.
    pub(crate) fn claim(&self) {
        let mut stage = self.stage();
        if matches!(*stage, Stage::Open) {
            *stage = Stage::Claimed;
        }
    }

    /// Whether a convolution claimed the fork (and so whether handing over is worth keeping it).
    pub(crate) fn is_claimed(&self) -> bool {
        !matches!(*self.stage(), Stage::Open)
    }

    /// Hands `gradient` to the claiming convolution; gives it back when the fork is not waiting
    /// for one (unclaimed, already collected, or already holding one), for burn to register.
    pub(crate) fn hand_over(&self, gradient: Vec<f32>) -> Option<Vec<f32>> {
        let mut stage = self.stage();
        match *stage {
            Stage::Claimed => {
                *stage = Stage::Handed(gradient);
                None
            }
            Stage::Open | Stage::Handed(_) | Stage::Collected => Some(gradient),
        }
    }

    /// The convolution's backward: the handed-over gradient, if one came first.
    pub(crate) fn collect(&self) -> Option<Vec<f32>> {
        match std::mem::replace(&mut *self.stage(), Stage::Collected) {
            Stage::Handed(gradient) => Some(gradient),
            Stage::Open | Stage::Claimed | Stage::Collected => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Fork;

    #[test]
    fn a_gradient_arrives_once_whatever_the_order() {
        // Claimed, handed over, collected: the convolution gets it.
        let fork = Fork::new();
        fork.claim();
        assert!(fork.is_claimed());
        assert_eq!(fork.hand_over(vec![1.0]), None);
        assert_eq!(fork.collect(), Some(vec![1.0]));

        // Collected first: the late gradient goes back to its sender (for burn).
        let fork = Fork::new();
        fork.claim();
        assert_eq!(fork.collect(), None);
        assert_eq!(fork.hand_over(vec![2.0]), Some(vec![2.0]));

        // Never claimed: nothing is kept.
        let fork = Fork::new();
        assert!(!fork.is_claimed());
        assert_eq!(fork.hand_over(vec![3.0]), Some(vec![3.0]));
        assert_eq!(fork.collect(), None);

        // A second hand-over is refused, the first kept.
        let fork = Fork::new();
        fork.claim();
        assert_eq!(fork.hand_over(vec![4.0]), None);
        assert_eq!(fork.hand_over(vec![5.0]), Some(vec![5.0]));
        assert_eq!(fork.collect(), Some(vec![4.0]));
    }
}
