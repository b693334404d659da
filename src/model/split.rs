//! Cutting a CIFAR ResNet into a client partition (stem + first blocks) and a server partition
//! (remaining blocks + classifier), with the client's auxiliary head at the cut.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::module::adaptive_avg_pool2d;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::kernels::Kernels;

use super::aux_head::{AuxHead, AuxHeadConfig, AuxKind};
use super::resnet::{
    BasicBlock, INPUT_SIDE, STAGE_WIDTHS, ShapeError, Stem, block_specs, blocks_per_stage,
};

/// Where to cut: a number of residual blocks kept on the client, or a named preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum CutSpec {
    /// Residual blocks on the client: 0 = stem only … 3n = every block.
    Blocks(usize),
    Preset(CutPreset),
}

/// Named cuts of the paper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CutPreset {
    /// End of stage 1.
    Shallow,
    /// End of stage 2.
    Middle,
    /// Middle of stage 3.
    Deep,
}

impl Default for CutSpec {
    fn default() -> Self {
        CutSpec::Preset(CutPreset::Shallow)
    }
}

impl std::str::FromStr for CutSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "shallow" => Ok(CutSpec::Preset(CutPreset::Shallow)),
            "middle" => Ok(CutSpec::Preset(CutPreset::Middle)),
            "deep" => Ok(CutSpec::Preset(CutPreset::Deep)),
            _ => s.parse().map(CutSpec::Blocks).map_err(|_| {
                format!("`{s}` is not a cut: use shallow, middle, deep or a number of blocks")
            }),
        }
    }
}

impl std::fmt::Display for CutSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CutSpec::Blocks(b) => write!(f, "{b}"),
            CutSpec::Preset(CutPreset::Shallow) => f.write_str("shallow"),
            CutSpec::Preset(CutPreset::Middle) => f.write_str("middle"),
            CutSpec::Preset(CutPreset::Deep) => f.write_str("deep"),
        }
    }
}

/// A resolved cut of a particular network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cut {
    /// Residual blocks on the client.
    pub blocks: usize,
    /// Residual blocks in the whole network (3n).
    pub total_blocks: usize,
    /// Shape of one image's activations crossing the cut: `[channels, side, side]`.
    pub activation_shape: [usize; 3],
}

impl Cut {
    pub fn resolve(spec: CutSpec, depth: usize) -> Result<Self, ShapeError> {
        let n = blocks_per_stage(depth)?;
        let total = 3 * n;
        let blocks = match spec {
            CutSpec::Blocks(b) => b,
            CutSpec::Preset(CutPreset::Shallow) => n,
            CutSpec::Preset(CutPreset::Middle) => 2 * n,
            CutSpec::Preset(CutPreset::Deep) => 2 * n + n.div_ceil(2),
        };
        if blocks > total {
            return Err(ShapeError::Cut {
                cut: blocks,
                depth,
                total,
            });
        }
        // The stage of the last client block (the stem counts as stage 0).
        let stage = if blocks == 0 { 0 } else { (blocks - 1) / n };
        let side = INPUT_SIDE >> stage;
        Ok(Self {
            blocks,
            total_blocks: total,
            activation_shape: [STAGE_WIDTHS[stage], side, side],
        })
    }

    pub fn channels(&self) -> usize {
        self.activation_shape[0]
    }
}

/// The client partition: stem and the first `cut` blocks.
#[derive(Module, Debug)]
pub struct ClientNet {
    stem: Stem,
    blocks: Vec<BasicBlock>,
}

impl ClientNet {
    /// # Shapes
    /// - input: `[batch, 3, 32, 32]`
    /// - output: `[batch, C, S, S]`, the cut's activation shape
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.blocks
            .iter()
            .fold(self.stem.forward(x), |h, block| block.forward(h))
    }
}

/// The server partition: the remaining blocks, global average pool and the classifier.
#[derive(Module, Debug)]
pub struct ServerNet {
    blocks: Vec<BasicBlock>,
    fc: Linear,
}

impl ServerNet {
    /// # Shapes
    /// - input: `[batch, C, S, S]`, the cut's activation shape
    /// - output: `[batch, classes]` logits
    pub fn forward(&self, a: Tensor<4>) -> Tensor<2> {
        let h = self.blocks.iter().fold(a, |h, block| block.forward(h));
        let [b, c, _, _] = h.dims();
        self.fc
            .forward(adaptive_avg_pool2d(h, [1, 1]).reshape([b, c]))
    }
}

/// The client's trainable part: its partition and the auxiliary head at the cut.
#[derive(Module, Debug)]
pub struct ClientModel {
    pub net: ClientNet,
    pub aux: AuxHead,
}

/// A ResNet split at a cut.
#[derive(Debug, Clone, Copy)]
pub struct SplitResNetConfig {
    pub depth: usize,
    pub classes: usize,
    pub cut: CutSpec,
    pub aux: AuxKind,
    /// `mlp` head: units of each hidden layer (`model.aux_hidden`).
    pub aux_hidden: usize,
    /// `mlp` head: number of hidden layers (`model.aux_layers`).
    pub aux_layers: usize,
    /// Which implementation runs convolutions and BatchNorms.
    pub kernels: Kernels,
}

impl SplitResNetConfig {
    /// Builds the client (with its auxiliary head) and the server. Parameters are drawn at once,
    /// in network order — stem, blocks, classifier, then the auxiliary head — so a seed gives the
    /// same network whatever the cut or mode.
    pub fn init(&self, device: &Device) -> Result<(ClientModel, ServerNet, Cut), ShapeError> {
        let cut = Cut::resolve(self.cut, self.depth)?;
        let n = blocks_per_stage(self.depth)?;
        let stem = Stem::init(self.kernels, device);
        let mut blocks: Vec<BasicBlock> = block_specs(n)
            .into_iter()
            .map(|spec| BasicBlock::init(spec, self.kernels, device))
            .collect();
        super::materialize(&stem);
        super::materialize(&blocks);
        let fc = LinearConfig::new(STAGE_WIDTHS[2], self.classes).init(device);
        super::materialize(&fc);
        let server_blocks = blocks.split_off(cut.blocks);
        let aux = AuxHeadConfig::new(self.aux, cut.channels(), self.classes)
            .with_shape(self.aux_hidden, self.aux_layers)
            .init(device)?;
        super::materialize(&aux);
        Ok((
            ClientModel {
                net: ClientNet { stem, blocks },
                aux,
            },
            ServerNet {
                blocks: server_blocks,
                fc,
            },
            cut,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::aux_head::{AUX_HIDDEN, AUX_LAYERS};

    #[test]
    fn presets_of_resnet20_and_110() {
        let shallow = Cut::resolve("shallow".parse().unwrap(), 20).unwrap();
        assert_eq!(
            (shallow.blocks, shallow.activation_shape),
            (3, [16, 32, 32])
        );
        let middle = Cut::resolve("middle".parse().unwrap(), 20).unwrap();
        assert_eq!((middle.blocks, middle.activation_shape), (6, [32, 16, 16]));
        let deep = Cut::resolve("deep".parse().unwrap(), 110).unwrap();
        assert_eq!((deep.blocks, deep.activation_shape), (45, [64, 8, 8]));
        let stem = Cut::resolve(CutSpec::Blocks(0), 20).unwrap();
        assert_eq!(stem.activation_shape, [16, 32, 32]);
    }

    #[test]
    fn impossible_cut_is_an_error() {
        let err = Cut::resolve(CutSpec::Blocks(10), 20).unwrap_err();
        assert!(err.to_string().contains("0..=9"), "{err}");
        assert!("sideways".parse::<CutSpec>().is_err());
    }

    #[test]
    fn partitions_compose_to_logits() {
        let device = Device::flex();
        for blocks in [0, 4, 9] {
            let config = SplitResNetConfig {
                depth: 20,
                classes: 10,
                cut: CutSpec::Blocks(blocks),
                aux: AuxKind::Linear,
                aux_hidden: AUX_HIDDEN,
                aux_layers: AUX_LAYERS,
                kernels: Kernels::Fused,
            };
            let (client, server, cut) = config.init(&device).unwrap();
            let h = client.net.forward(Tensor::zeros([2, 3, 32, 32], &device));
            let [c, s, _] = cut.activation_shape;
            assert_eq!(h.dims(), [2, c, s, s]);
            assert_eq!(client.aux.forward(h.clone()).dims(), [2, 10]);
            assert_eq!(server.forward(h).dims(), [2, 10]);
        }
    }
}
