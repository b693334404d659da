//! A model's state as values that can cross a link: every parameter and BatchNorm buffer
//! flattened in the module's visiting order, and the optimizer's record as bytes.
//!
//! burn keys optimizer state by parameter id, and ids are drawn at random when a module is
//! built. [`with_stable_ids`] renumbers a module's parameters by position, so that two copies of
//! the same architecture — in two parties, or two processes — agree on every id and one side's
//! optimizer record loads into the other's optimizer.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{ModuleOptimizer, OptimizerRecord};
use burn::tensor::{Tensor, TensorData};

/// A model state that does not fit the model it is loaded into.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error("weights hold {got} values, the model has {expected}")]
    WrongLength { expected: usize, got: usize },
    #[error("optimizer state is not a valid record: {0}")]
    Record(String),
}

/// A model's full state at one moment: its values (as made by [`flatten`], or
/// `party::client::client_state`) and its optimizer's record (as made by [`optimizer_bytes`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelState {
    pub weights: Vec<f32>,
    pub optimizer: Vec<u8>,
}

/// Every float parameter and buffer of `module`, flattened in visiting order.
pub fn flatten<M: Module>(module: &M) -> Vec<f32> {
    struct Flatten(Vec<f32>);
    impl ModuleVisitor for Flatten {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let data = param.val().into_data();
            match data.as_slice::<f32>() {
                Ok(values) => self.0.extend_from_slice(values),
                Err(_) => self.0.extend(data.convert::<f32>().iter::<f32>()),
            }
        }
    }
    let mut out = Flatten(Vec::with_capacity(module.num_params()));
    module.visit(&mut out);
    out.0
}

/// `module` with its parameters and buffers replaced, in visiting order, by `values` (as made by
/// [`flatten`] of the same architecture). Ids and gradient requirements stay those of `module`.
pub fn load_flat<M: Module>(module: M, values: &[f32]) -> Result<M, StateError> {
    let expected = module.num_params();
    if values.len() != expected {
        return Err(StateError::WrongLength {
            expected,
            got: values.len(),
        });
    }
    struct Load<'a> {
        values: &'a [f32],
    }
    impl ModuleMapper for Load<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (id, tensor, mapper) = param.consume();
            let shape = tensor.shape();
            let (head, rest) = self.values.split_at(shape.num_elements());
            self.values = rest;
            let loaded =
                Tensor::<D>::from_data(TensorData::new(head.to_vec(), shape), &tensor.device())
                    .set_require_grad(tensor.is_require_grad());
            Param::from_mapped_value(id, loaded, mapper)
        }
    }
    Ok(module.map(&mut Load { values }))
}

/// `module` with its parameters renumbered `namespace + 0, 1, 2, …` in visiting order.
pub fn with_stable_ids<M: Module>(module: M, namespace: u64) -> M {
    struct Renumber {
        next: u64,
    }
    impl ModuleMapper for Renumber {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let (_, tensor, mapper) = param.consume();
            let id = ParamId::from(self.next);
            self.next += 1;
            Param::from_mapped_value(id, tensor, mapper)
        }
    }
    module.map(&mut Renumber { next: namespace })
}

/// The optimizer's state as bytes: burn's optimizer record (the burnpack format), with its
/// tensors in name order. burn writes them in hash-map order, which changes from call to call
/// and, through alignment padding, the length; sorted, the same state is the same bytes.
pub fn optimizer_bytes(optimizer: &ModuleOptimizer) -> Result<Vec<u8>, StateError> {
    let record = |e: &dyn std::fmt::Display| StateError::Record(e.to_string());
    let bytes = optimizer.to_record().into_bytes().map_err(|e| record(&e))?;
    let reader = burn_pack::Reader::from_bytes(bytes).map_err(|e| record(&e))?;
    let scalars = reader.scalars().clone();
    let metadata = reader.metadata().clone();
    // The reader lists tensors by name.
    let tensors = reader.into_tensors().map_err(|e| record(&e))?;
    let mut writer = burn_pack::Writer::new(tensors);
    for (key, value) in &scalars {
        writer = writer.with_scalar(key, *value);
    }
    for (key, value) in &metadata {
        writer = writer.with_metadata(key, value);
    }
    Ok(writer.into_bytes().map_err(|e| record(&e))?.to_vec())
}

/// `optimizer` carrying the state in `bytes` (from [`optimizer_bytes`]).
pub fn load_optimizer(
    optimizer: ModuleOptimizer,
    bytes: Vec<u8>,
) -> Result<ModuleOptimizer, StateError> {
    let record = OptimizerRecord::from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
        .map_err(|e| StateError::Record(e.to_string()))?;
    // burn's `load_record` panics on a record it cannot place (a tensor without a parameter
    // id); the bytes may come from a peer, so that is an error here, not a crash.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        optimizer.load_record(record)
    }))
    .map_err(|_| StateError::Record("the optimizer state does not fit this model".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OptimConfig;
    use crate::kernels::Kernels;
    use crate::model::{
        AUX_HIDDEN, AUX_LAYERS, AuxKind, CutSpec, SplitResNetConfig, cross_entropy,
    };
    use crate::party::optim::build_optimizer;
    use burn::optim::GradientsParams;
    use burn::tensor::{Device, Int};

    #[test]
    fn state_round_trips_and_optimizer_bytes_are_canonical() {
        let device = Device::flex().autodiff();
        let model = || {
            let (client, _, _) = SplitResNetConfig {
                depth: 8,
                classes: 10,
                cut: CutSpec::Blocks(1),
                aux: AuxKind::Linear,
                aux_hidden: AUX_HIDDEN,
                aux_layers: AUX_LAYERS,
                kernels: Kernels::Fused,
            }
            .init(&device)
            .unwrap();
            with_stable_ids(client, 1 << 40)
        };
        let mut trained = model();
        let mut optimizer = build_optimizer(&OptimConfig::default());
        let images = Tensor::<4>::ones([4, 3, 32, 32], &device);
        let labels =
            Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4], [4]), &device);
        let loss = cross_entropy(trained.aux.forward(trained.net.forward(images)), labels);
        let grads = GradientsParams::from_grads(loss.backward(), &trained);
        trained = optimizer.step(0.1, trained, grads);

        // Weights into a model of the same architecture: the same values; a wrong length is
        // refused.
        let values = flatten(&trained.net);
        let loaded = load_flat(model().net, &values).unwrap();
        assert_eq!(flatten(&loaded), values);
        assert_eq!(
            load_flat(model().net, &values[1..]).unwrap_err(),
            StateError::WrongLength {
                expected: values.len(),
                got: values.len() - 1
            }
        );

        // Optimizer state: the same bytes every time, and they load into a fresh optimizer
        // keyed by the same (stable) ids.
        let bytes = optimizer_bytes(&optimizer).unwrap();
        for _ in 0..5 {
            assert_eq!(optimizer_bytes(&optimizer).unwrap(), bytes);
        }
        let reloaded = load_optimizer(build_optimizer(&OptimConfig::default()), bytes.clone());
        assert_eq!(optimizer_bytes(&reloaded.unwrap()).unwrap(), bytes);
        assert!(load_optimizer(build_optimizer(&OptimConfig::default()), vec![1, 2, 3]).is_err());
    }
}
