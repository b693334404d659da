//! One epoch's running sums — losses, images, data time, the progress bar — and the metrics
//! and progress line they become once the epoch is evaluated. The in-process trainer and the
//! multi-process server keep them the same way, so their reports agree field by field.

use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::config::Mode;
use crate::party::StepLosses;
use crate::protocol::Bytes;
use crate::report::EpochMetrics;

/// Sums over the steps of one epoch.
#[derive(Default)]
pub struct EpochTally {
    server_loss: f64,
    client_loss: f64,
    steps: usize,
    images: usize,
    /// The server's learning rate at the latest step.
    pub lr: f64,
    pub data_seconds: f64,
    started: Option<Instant>,
    train_seconds: f64,
    bytes_before: Bytes,
    bar: Option<ProgressBar>,
}

impl EpochTally {
    /// Starts the clock of an epoch whose first rate is `lr`, with the run's traffic so far.
    pub fn begin(lr: f64, bytes_before: Bytes, bar: ProgressBar) -> Self {
        Self {
            lr,
            bytes_before,
            started: Some(Instant::now()),
            bar: Some(bar),
            ..Self::default()
        }
    }

    /// Counts a trained step of `images` images.
    pub fn add(&mut self, losses: StepLosses, images: usize) {
        self.server_loss += losses.server as f64;
        self.client_loss += losses.client.unwrap_or(0.0) as f64;
        self.steps += 1;
        self.images += images;
        if let (Some(bar), Some(started)) = (&self.bar, self.started) {
            bar.inc(1);
            bar.set_message(format!(
                "loss {:.3}  {:.0} img/s",
                self.server_loss / self.steps as f64,
                self.images as f64 / started.elapsed().as_secs_f64()
            ));
        }
    }

    /// Leaves the bar as it is (the run stopped mid-epoch).
    pub fn abandon(&self) {
        if let Some(bar) = &self.bar {
            bar.abandon();
        }
    }

    /// Ends the training part of the epoch (evaluation comes next).
    pub fn stop_clock(&mut self) {
        self.train_seconds = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    /// The epoch's metrics: `accuracy` (test, auxiliary head) from its evaluation, which took
    /// `eval_seconds`; `bytes_now` the run's traffic after it.
    pub fn metrics(
        &self,
        epoch: usize,
        mode: Mode,
        accuracy: (f64, Option<f64>),
        bytes_now: Bytes,
        eval_seconds: f64,
    ) -> EpochMetrics {
        let steps = self.steps.max(1) as f64;
        EpochMetrics {
            epoch,
            lr: self.lr,
            server_loss: self.server_loss / steps,
            client_loss: (mode == Mode::Decoupled).then_some(self.client_loss / steps),
            test_accuracy: accuracy.0,
            aux_accuracy: accuracy.1,
            bytes: bytes_now.since(&self.bytes_before),
            train_seconds: self.train_seconds,
            data_seconds: self.data_seconds,
            eval_seconds,
            images_per_s: self.images as f64 / self.train_seconds,
        }
    }

    /// Prints `metrics` as one line on stderr (above the bar, if one is drawn).
    pub fn print(&self, metrics: &EpochMetrics, mode: Mode, epochs: usize) {
        let line = format!(
            "{} epoch {}/{epochs}: loss {:.3}, test accuracy {:.2} %{}",
            mode.name(),
            metrics.epoch,
            metrics.server_loss,
            100.0 * metrics.test_accuracy,
            metrics
                .aux_accuracy
                .map_or(String::new(), |a| format!(", aux head {:.2} %", 100.0 * a)),
        );
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }
}

/// An epoch's progress bar: drawn only with `progress` on a terminal, below `multi`'s bars.
pub fn progress_bar(
    progress: bool,
    multi: Option<&MultiProgress>,
    steps: usize,
    epoch: usize,
    epochs: usize,
    mode: Mode,
) -> ProgressBar {
    use std::io::IsTerminal;
    if !progress || !std::io::stdout().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps as u64);
    let bar = match multi {
        Some(multi) => multi.add(bar),
        None => bar,
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{} epoch {epoch}/{epochs}", mode.name()));
    bar
}
