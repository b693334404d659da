//! Split training at the library level: coupled split training equals end-to-end training of the
//! unsplit network, and in decoupled mode the auxiliary head trains the client with no gradient
//! crossing the cut.

use std::sync::{Arc, Mutex};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use splitaux::config::{ExperimentConfig, Mode, OptimConfig, Schedule};
use splitaux::data::{Normalization, Split};
use splitaux::kernels::Kernels;
use splitaux::model::{AUX_HIDDEN, AUX_LAYERS, AuxKind, CutSpec, SplitResNetConfig, cross_entropy};
use splitaux::party::optim::build_optimizer;
use splitaux::party::{Rates, StepLosses};
use splitaux::run::RunSetup;

/// Every float parameter of a module, flattened in visiting order.
struct Flatten(Vec<f32>);

impl ModuleVisitor for Flatten {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.extend(
            param
                .val()
                .into_data()
                .convert::<f32>()
                .as_slice::<f32>()
                .unwrap(),
        );
    }
}

fn flat<M: Module>(m: &M) -> Vec<f32> {
    let mut v = Flatten(Vec::new());
    m.visit(&mut v);
    v.0
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// burn's seed is process-wide: tests that seed and draw must not interleave.
static SEEDED: Mutex<()> = Mutex::new(());

fn batch(device: &Device, n: usize) -> (Tensor<4>, Tensor<1, Int>) {
    // Noise plus a class-dependent colour, so that the classes are learnable.
    device.seed(99);
    let labels: Vec<i64> = (0..n as i64).map(|i| (i * 3) % 10).collect();
    let noise = Tensor::<4>::random([n, 3, 32, 32], Distribution::Normal(0.0, 1.0), device);
    let colours: Vec<f32> = labels
        .iter()
        .flat_map(|&l| (0..3).map(move |c| ((l * 7 + c * 3) % 10) as f32 / 5.0 - 1.0))
        .collect();
    let colours = Tensor::<4>::from_data(TensorData::new(colours, [n, 3, 1, 1]), device);
    let images = noise + colours; // [n, 3, 32, 32]
    (
        images,
        Tensor::from_data(TensorData::new(labels, [n]), device),
    )
}

fn config(cut: usize) -> SplitResNetConfig {
    SplitResNetConfig {
        depth: 8,
        classes: 10,
        cut: CutSpec::Blocks(cut),
        aux: AuxKind::Linear,
        aux_hidden: AUX_HIDDEN,
        aux_layers: AUX_LAYERS,
        kernels: Kernels::Fused,
    }
}

fn sgd() -> OptimConfig {
    OptimConfig {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 1e-4,
        schedule: Schedule::Constant,
        ..OptimConfig::default()
    }
}

/// One client and the server, built by the run set-up: the model is `config(cut)` initialized
/// under `seed`.
fn setup(cut: usize, mode: Mode, optim: OptimConfig, seed: u64) -> RunSetup {
    setup_clients(cut, mode, optim, seed, 1)
}

/// [`setup`] with `clients` clients; client 0 holds the model.
fn setup_clients(
    cut: usize,
    mode: Mode,
    optim: OptimConfig,
    seed: u64,
    clients: usize,
) -> RunSetup {
    let mut config = ExperimentConfig::default();
    config.model.depth = 8;
    config.model.cut = CutSpec::Blocks(cut);
    config.train.mode = mode;
    config.train.seed = seed;
    config.optim = optim;
    let identity = Normalization {
        mean: [0.0; 3],
        std: [1.0; 3],
    };
    let shards = (0..clients).map(|_| Vec::new()).collect();
    RunSetup::new(&config, 10, Arc::new(Split::default()), shards, identity).unwrap()
}

fn step(split: &mut RunSetup, images: &Tensor<4>, labels: &Tensor<1, Int>, lr: f64) -> StepLosses {
    step_of(split, 0, images, labels, lr)
}

fn step_of(
    split: &mut RunSetup,
    client: usize,
    images: &Tensor<4>,
    labels: &Tensor<1, Int>,
    lr: f64,
) -> StepLosses {
    split
        .parties
        .step(
            client,
            images.clone(),
            labels.clone(),
            Rates::both(lr),
            &mut split.meter,
        )
        .unwrap()
}

fn client_model(split: &RunSetup) -> &splitaux::model::ClientModel {
    split.parties.clients[0].model().unwrap()
}

#[test]
fn coupled_step_equals_end_to_end_step() {
    let _guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    for cut in [0, 1, 2] {
        // Split: two parties, messages over their link.
        let mut split = setup(cut, Mode::Coupled, sgd(), 5);
        device.seed(5);
        let (reference_client, reference_server, _) = config(cut).init(&device).unwrap();
        assert_eq!(
            flat(&client_model(&split).net),
            flat(&reference_client.net),
            "same seed, same init"
        );
        let (images, labels) = batch(&device, 16);
        for _ in 0..2 {
            step(&mut split, &images, &labels, 0.1);
        }

        // End to end: one graph through both partitions, one backward, the same optimizer.
        let (mut net, mut head) = (reference_client.net, reference_server);
        let mut net_opt = build_optimizer(&sgd());
        let mut head_opt = build_optimizer(&sgd());
        for _ in 0..2 {
            let loss = cross_entropy(head.forward(net.forward(images.clone())), labels.clone());
            let mut grads = loss.backward();
            let net_grads = GradientsParams::from_module(&mut grads, &net);
            let head_grads = GradientsParams::from_module(&mut grads, &head);
            net = net_opt.step(0.1, net, net_grads);
            head = head_opt.step(0.1, head, head_grads);
        }

        let before = flat(&config(cut).init(&device).unwrap().0.net);
        let split_client = flat(&client_model(&split).net);
        assert!(
            max_abs_diff(&split_client, &before) > 1e-4,
            "cut {cut}: client trained"
        );
        let diff_client = max_abs_diff(&split_client, &flat(&net));
        let diff_server = max_abs_diff(&flat(split.parties.server.model()), &flat(&head));
        assert!(
            diff_client < 1e-5,
            "cut {cut}: client differs by {diff_client}"
        );
        assert!(
            diff_server < 1e-5,
            "cut {cut}: server differs by {diff_server}"
        );
        let bytes = split.parties.bytes();
        assert_eq!(bytes.gradients, bytes.activations);
        assert_eq!(bytes.up, bytes.activations + bytes.labels);
    }
}

#[test]
fn decoupled_aux_head_trains_the_client_without_gradients() {
    let _guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    let optim = OptimConfig {
        lr: 0.2,
        ..OptimConfig::default()
    };
    let mut split = setup(1, Mode::Decoupled, optim, 3);
    let initial_client = flat(&client_model(&split).net);
    let initial_aux = flat(&client_model(&split).aux);
    let initial_server = flat(split.parties.server.model());
    let (images, labels) = batch(&device, 20);
    let mut aux_losses = Vec::new();
    for _ in 0..8 {
        let losses = step(&mut split, &images, &labels, 0.2);
        aux_losses.push(losses.client.expect("decoupled reports the aux loss"));
    }
    assert!(max_abs_diff(&flat(&client_model(&split).net), &initial_client) > 1e-4);
    assert!(max_abs_diff(&flat(&client_model(&split).aux), &initial_aux) > 1e-4);
    assert!(max_abs_diff(&flat(split.parties.server.model()), &initial_server) > 1e-4);
    assert!(
        *aux_losses.last().unwrap() < aux_losses[0] - 0.3,
        "aux loss falls on a repeated batch: {aux_losses:?}"
    );
    let bytes = split.parties.bytes();
    assert_eq!((bytes.gradients, bytes.down), (0, 0));
    assert_eq!(bytes.messages, 16);
    let peaks = split.meter.peaks().unwrap();
    assert!(peaks.client_phase > 0 && peaks.server_phase > 0);
}

#[test]
fn coupled_client_gradient_matches_plain_sgd_on_client_only() {
    // The aux head is untouched in coupled mode: it receives no gradient.
    let _guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    let plain = OptimConfig {
        momentum: 0.0,
        weight_decay: 0.0,
        ..sgd()
    };
    let mut split = setup(2, Mode::Coupled, plain, 4);
    let aux_before = flat(&client_model(&split).aux);
    let (images, labels) = batch(&device, 8);
    let losses = step(&mut split, &images, &labels, 0.1);
    assert!(losses.client.is_none());
    assert_eq!(flat(&client_model(&split).aux), aux_before);
}

#[test]
fn sequential_hand_off_carries_weights_buffers_and_optimizer_state_exactly() {
    // One client taking two steps == client 0 taking one, handing the model to client 1 over
    // their link, and client 1 taking the second: bit for bit, in both modes. Momentum SGD, so
    // a lost optimizer state (or BatchNorm buffer) would show.
    let _guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    for mode in [Mode::Coupled, Mode::Decoupled] {
        let mut alone = setup_clients(1, mode, sgd(), 11, 1);
        let mut pair = setup_clients(1, mode, sgd(), 11, 2);
        let (first, first_labels) = batch(&device, 12);
        let (second, second_labels) = {
            let (images, labels) = batch(&device, 12);
            (images.flip([3]), labels)
        };
        step(&mut alone, &first, &first_labels, 0.1);
        step(&mut alone, &second, &second_labels, 0.1);
        step_of(&mut pair, 0, &first, &first_labels, 0.1);
        let before = pair.parties.bytes();
        pair.parties.hand_off(0, 1).unwrap();
        assert!(!pair.parties.clients[0].holds_model());
        step_of(&mut pair, 1, &second, &second_labels, 0.1);

        // `valid` synchronizes the BatchNorm running statistics, so they are compared too.
        let travelled = pair.parties.clients[1].model().unwrap().valid();
        let reference = client_model(&alone).valid();
        assert_eq!(
            flat(&travelled.net),
            flat(&reference.net),
            "{mode:?}: partition"
        );
        if mode == Mode::Decoupled {
            assert_eq!(
                flat(&travelled.aux),
                flat(&reference.aux),
                "aux head travels"
            );
        }
        assert_eq!(
            flat(pair.parties.server.model()),
            flat(alone.parties.server.model())
        );

        // The hand-off: one weights frame (rank 1, f32) and one optimizer-state frame.
        let handoff = pair.parties.bytes().since(&before);
        let values = reference.net.num_params()
            + if mode == Mode::Decoupled {
                reference.aux.num_params()
            } else {
                0
            };
        assert_eq!(handoff.weights, (6 + 4 + 4 * values) as u64, "{mode:?}");
        assert!(handoff.optimizer_state > 4 * reference.net.num_params() as u64);
        let client_bytes = pair.parties.clients[1].bytes();
        assert_eq!(
            client_bytes.weights, handoff.weights,
            "received by client 1"
        );
    }
}
