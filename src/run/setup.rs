//! One run's set-up, built once from the configuration: devices, the split model, the parties
//! and their in-memory links, and the memory meter. `train`, `bench` and the tests all build
//! through [`RunSetup::new`].

use std::sync::Arc;

use burn::module::Module;
use burn::tensor::Device;

use super::RunError;
use crate::backend::configure_cpu;
use crate::config::ExperimentConfig;
use crate::data::{Batcher, Normalization, Split};
use crate::memory::MemoryMeter;
use crate::model::{Cut, SplitResNetConfig};
use crate::party::client::client_state;
use crate::party::optim::build_optimizer;
use crate::party::state::with_stable_ids;
use crate::party::{
    ClientParts, ClientParty, Endpoint, Expected, Parties, ServerParts, ServerParty, StartingModel,
    Trainable,
};
use crate::protocol::Direction;
use crate::report::Parameters;
use crate::transport::memory_pair;

/// Parameter ids of the client-side model start here (and the server's at
/// [`SERVER_PARAM_IDS`]): the same in every party and process, so optimizer state moves.
pub const CLIENT_PARAM_IDS: u64 = 1 << 40;
pub const SERVER_PARAM_IDS: u64 = 2 << 40;

/// Frames in flight per direction of an in-memory link: a lock-step step has at most two
/// (activations and labels), and so has a hand-off (weights and optimizer state).
const LINK_DEPTH: usize = 2;

/// The split model `config` describes, for `classes` classes.
pub fn model_config(config: &ExperimentConfig, classes: usize) -> SplitResNetConfig {
    SplitResNetConfig {
        depth: config.model.depth,
        classes,
        cut: config.model.cut,
        aux: config.model.aux,
        aux_hidden: config.model.aux_hidden,
        aux_layers: config.model.aux_layers,
        kernels: config.model.kernels,
    }
}

/// Everything a run trains with.
pub struct RunSetup {
    pub config: ExperimentConfig,
    /// The plain device (evaluation) and its autodiff twin (training).
    pub device: Device,
    pub train_device: Device,
    pub cut: Cut,
    pub parameters: Parameters,
    pub parties: Parties,
    pub meter: MemoryMeter,
    /// SplitFed v1: bytes of the server's per-client model copies, as the meter read them while
    /// they were built (0 otherwise).
    pub server_copies_bytes: u64,
}

impl RunSetup {
    /// [`Self::new`] for `data`'s training images divided into `shards`.
    pub fn from_data(
        config: &ExperimentConfig,
        data: &super::PreparedData,
        shards: Vec<Vec<usize>>,
    ) -> Result<Self, RunError> {
        Self::new(
            config,
            data.classes,
            Arc::clone(&data.train),
            shards,
            data.normalization,
        )
    }

    /// Builds the parties for `config`; `shards[i]` holds client `i`'s images, as indices into
    /// `train` (one shard per client), normalized with `normalization`. Client 0 starts with the
    /// model; with one client, this is exactly the single-client set-up (same initialization,
    /// same data streams).
    pub fn new(
        config: &ExperimentConfig,
        classes: usize,
        train: Arc<Split>,
        shards: Vec<Vec<usize>>,
        normalization: Normalization,
    ) -> Result<Self, RunError> {
        if shards.is_empty() {
            return Err(RunError::NoClients);
        }
        configure_cpu(config.train.threads);
        let device = config.train.backend.device()?;
        let train_device = device.clone().autodiff();
        device.seed(config.train.seed);
        train_device.seed(config.train.seed);

        let model = model_config(config, classes);
        let (client_model, server_net, cut) = model.init(&train_device)?;
        let parameters = Parameters {
            client: client_model.net.num_params(),
            aux_head: client_model.aux.num_params(),
            server: server_net.num_params(),
        };
        let mode = config.train.mode;
        let schedule = config.clients.schedule;
        let n = shards.len();
        let client_model = with_stable_ids(client_model, CLIENT_PARAM_IDS);
        // Sequential: client 0 starts with the model. SplitFed: the server keeps the global
        // client-side model and every client loads it at the start of a round.
        let global_client = schedule
            .is_federated()
            .then(|| client_state(&client_model, mode.client_update().carries_aux_head()));
        let mut models = vec![if schedule.is_federated() {
            StartingModel::Template(client_model)
        } else {
            StartingModel::Holds(client_model)
        }];
        // Other clients load what they receive into a model of the same architecture, built
        // after the real one so its draws do not shift; so do evaluation (SplitFed) and the
        // server's per-client copies (SplitFed v1).
        let template = || -> Result<_, RunError> {
            let (client, server, _) = model.init(&train_device)?;
            Ok((
                with_stable_ids(client, CLIENT_PARAM_IDS),
                with_stable_ids(server, SERVER_PARAM_IDS),
            ))
        };
        for _ in 1..n {
            models.push(StartingModel::Template(template()?.0));
        }
        let eval_template = match schedule.is_federated() {
            true => Some(template()?.0),
            false => None,
        };
        let meter = MemoryMeter::new(&device, config.train.backend.host_resident());
        let before_copies = meter.live();
        let mut server_templates = Vec::new();
        if schedule.server_copies() {
            for _ in 0..n {
                server_templates.push(template()?.1);
            }
        }
        let server_copies_bytes = meter.live().saturating_sub(before_copies);

        let mut server_links = Vec::with_capacity(n);
        let mut client_links = Vec::with_capacity(n);
        for i in 0..n {
            let (client_end, server_end) =
                memory_pair(&format!("client {i}"), "server", LINK_DEPTH);
            client_links.push(Endpoint::new(Box::new(client_end), Direction::Up));
            server_links.push(Endpoint::new(Box::new(server_end), Direction::Down));
        }
        // Sequential: the hand-off ring, client i → client i+1 (mod n).
        let mut to_next: Vec<Option<Endpoint>> = (0..n).map(|_| None).collect();
        let mut from_prev: Vec<Option<Endpoint>> = (0..n).map(|_| None).collect();
        if n > 1 && !schedule.is_federated() {
            for (i, to_next) in to_next.iter_mut().enumerate() {
                let next = (i + 1) % n;
                let (a, b) = memory_pair(
                    &format!("client {i}"),
                    &format!("client {next}"),
                    LINK_DEPTH,
                );
                *to_next = Some(Endpoint::new(Box::new(a), Direction::Up));
                from_prev[next] = Some(Endpoint::new(Box::new(b), Direction::Up));
            }
        }

        let augment = config.data.augment;
        let clients = shards
            .into_iter()
            .zip(models)
            .zip(client_links)
            .zip(to_next.into_iter().zip(from_prev))
            .enumerate()
            .map(
                |(id, (((shard, model), to_server), (to_next, from_prev)))| {
                    ClientParty::new(ClientParts {
                        id,
                        data: Arc::clone(&train),
                        shard,
                        batcher: Batcher::new(normalization, augment),
                        update: mode.client_update(),
                        optim: config.optim.clone(),
                        device: train_device.clone(),
                        to_server,
                        to_next,
                        from_prev,
                        model,
                    })
                },
            )
            .collect();
        let server = ServerParty::new(ServerParts {
            model: Trainable::new(
                with_stable_ids(server_net, SERVER_PARAM_IDS),
                build_optimizer(&config.optim),
            ),
            templates: server_templates,
            global_client,
            links: server_links,
            returns_gradient: mode.server_returns_gradient(),
            device: train_device.clone(),
            expects: Expected {
                activation_shape: cut.activation_shape,
                max_batch: config.train.batch_size,
                classes,
            },
        });
        Ok(Self {
            config: config.clone(),
            device,
            train_device,
            cut,
            parameters,
            parties: Parties {
                clients,
                server,
                eval_template,
            },
            meter,
            server_copies_bytes,
        })
    }
}
