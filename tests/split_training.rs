//! Split training at the library level: coupled split training equals end-to-end training of the
//! unsplit network, and in decoupled mode the auxiliary head trains the client with no gradient
//! crossing the cut.

use std::sync::Mutex;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use splitaux::config::OptimConfig;
use splitaux::kernels::Kernels;
use splitaux::link::Link;
use splitaux::memory::MemoryMeter;
use splitaux::model::{AuxKind, CutSpec, SplitResNetConfig, cross_entropy};
use splitaux::train::optim::build_optimizer;
use splitaux::train::party::{Client, Server, Trainable};
use splitaux::train::strategy::{Coupled, Decoupled, StepContext, StepLosses, Strategy};

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
        kernels: Kernels::Fused,
    }
}

fn sgd() -> OptimConfig {
    OptimConfig {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 1e-4,
        ..OptimConfig::default()
    }
}

/// Everything a split step needs, owned by the test.
struct Parties {
    client: Client,
    server: Server,
    link: Link,
    memory: MemoryMeter,
    device: Device,
}

impl Parties {
    fn new(client: Client, server: Server, device: &Device) -> Self {
        Self {
            client,
            server,
            link: Link::new(),
            memory: MemoryMeter::new(device, true),
            device: device.clone(),
        }
    }

    fn step(
        &mut self,
        strategy: &dyn Strategy,
        images: &Tensor<4>,
        labels: &Tensor<1, Int>,
        lr: f64,
    ) -> StepLosses {
        self.memory.begin_step();
        let mut ctx = StepContext {
            client: &mut self.client,
            server: &mut self.server,
            link: &mut self.link,
            memory: &mut self.memory,
            device: &self.device,
        };
        let losses = strategy
            .step(&mut ctx, images.clone(), labels.clone(), lr)
            .unwrap();
        self.memory.end_step();
        losses
    }
}

#[test]
fn coupled_step_equals_end_to_end_step() {
    let _guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    for cut in [0, 1, 2] {
        device.seed(5);
        let (client_model, server_net, _) = config(cut).init(&device).unwrap();
        device.seed(5);
        let (reference_client, reference_server, _) = config(cut).init(&device).unwrap();
        assert_eq!(
            flat(&client_model.net),
            flat(&reference_client.net),
            "same seed, same init"
        );

        // Split: two parties, messages over the link.
        let mut split = Parties::new(
            Client(Trainable::new(client_model, build_optimizer(&sgd()))),
            Server(Trainable::new(server_net, build_optimizer(&sgd()))),
            &device,
        );
        let (images, labels) = batch(&device, 16);
        for _ in 0..2 {
            split.step(&Coupled, &images, &labels, 0.1);
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
        let split_client = flat(&split.client.0.model().net);
        assert!(
            max_abs_diff(&split_client, &before) > 1e-4,
            "cut {cut}: client trained"
        );
        let diff_client = max_abs_diff(&split_client, &flat(&net));
        let diff_server = max_abs_diff(&flat(split.server.0.model()), &flat(&head));
        assert!(
            diff_client < 1e-5,
            "cut {cut}: client differs by {diff_client}"
        );
        assert!(
            diff_server < 1e-5,
            "cut {cut}: server differs by {diff_server}"
        );
        assert_eq!(
            split.link.traffic().gradients,
            split.link.traffic().activations
        );
    }
}

#[test]
fn decoupled_aux_head_trains_the_client_without_gradients() {
    let _guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    device.seed(3);
    let (client_model, server_net, _) = config(1).init(&device).unwrap();
    let initial_client = flat(&client_model.net);
    let initial_aux = flat(&client_model.aux);
    let initial_server = flat(&server_net);
    let optim = OptimConfig {
        lr: 0.2,
        ..OptimConfig::default()
    };
    let mut split = Parties::new(
        Client(Trainable::new(client_model, build_optimizer(&optim))),
        Server(Trainable::new(server_net, build_optimizer(&optim))),
        &device,
    );
    let (images, labels) = batch(&device, 20);
    let mut aux_losses = Vec::new();
    for _ in 0..8 {
        let losses = split.step(&Decoupled, &images, &labels, 0.2);
        aux_losses.push(losses.client.expect("decoupled reports the aux loss"));
    }
    assert!(max_abs_diff(&flat(&split.client.0.model().net), &initial_client) > 1e-4);
    assert!(max_abs_diff(&flat(&split.client.0.model().aux), &initial_aux) > 1e-4);
    assert!(max_abs_diff(&flat(split.server.0.model()), &initial_server) > 1e-4);
    assert!(
        *aux_losses.last().unwrap() < aux_losses[0] - 0.3,
        "aux loss falls on a repeated batch: {aux_losses:?}"
    );
    assert_eq!(split.link.traffic().gradients, 0);
    assert_eq!(split.link.traffic().messages, 16);
    let peaks = split.memory.peaks().unwrap();
    assert!(peaks.client_phase > 0 && peaks.server_phase > 0);
}

#[test]
fn coupled_client_gradient_matches_plain_sgd_on_client_only() {
    // The aux head is untouched in coupled mode: it receives no gradient.
    let _guard = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    device.seed(4);
    let (client_model, server_net, _) = config(2).init(&device).unwrap();
    let aux_before = flat(&client_model.aux);
    let mut split = Parties::new(
        Client(Trainable::new(client_model, SgdConfig::new().init())),
        Server(Trainable::new(server_net, SgdConfig::new().init())),
        &device,
    );
    let (images, labels) = batch(&device, 8);
    let losses = split.step(&Coupled, &images, &labels, 0.1);
    assert!(losses.client.is_none());
    assert_eq!(flat(&split.client.0.model().aux), aux_before);
}
