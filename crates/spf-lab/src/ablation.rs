//! The ablations: the default defence with one knob moved at a time ([`ablation_grid`]), each
//! cell fine-tuned at shares 0 and 0.1 on the first seed ([`ablate`]).

use burn::tensor::Device;
use std::path::Path;

use serde::{Deserialize, Serialize};
use spf_core::RefreshPolicy;
use spf_harness::progress::Progress;

use crate::error::LabError;
use crate::experiment::{ExperimentConfig, aligned_model, world_and_sets};
use crate::finetune::{CosineProbe, DefenceConfig, Method, Run, SafetyFormat, Stage, safety_batch};

/// The setting an ablation varies, one at a time around the default defence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Knob {
    /// Samples in the safety batch.
    SafetyBatch,
    /// The safety batch's prompt format.
    SafetyFormat,
    /// The refresh policy.
    Refresh,
    /// Directions per matrix.
    Rank,
    /// Gradient or update projection.
    Target,
    /// No defence: the SFT reference row.
    None,
}

impl Knob {
    /// Its name in tables.
    pub fn label(self) -> &'static str {
        match self {
            Knob::SafetyBatch => "safety batch",
            Knob::SafetyFormat => "safety format",
            Knob::Refresh => "refresh",
            Knob::Rank => "rank",
            Knob::Target => "target",
            Knob::None => "none (SFT)",
        }
    }
}

/// One cell of the ablation grid: the knob it varies, and the defence and method it gives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AblationCell {
    /// The knob.
    pub knob: Knob,
    /// The defence with the knob set.
    pub defence: DefenceConfig,
    /// The method run.
    pub method: Method,
}

impl AblationCell {
    /// The knob's value in this cell, in words.
    pub fn value(&self) -> String {
        match self.knob {
            Knob::SafetyBatch => self.defence.safety_samples.to_string(),
            Knob::SafetyFormat => format!("{:?}", self.defence.safety_format),
            Knob::Refresh => format!("{:?}", self.defence.refresh),
            Knob::Rank => self.defence.rank.to_string(),
            Knob::Target => self
                .method
                .projection()
                .map_or(String::new(), |(_, t)| format!("{t:?}")),
            Knob::None => "-".into(),
        }
    }
}

/// One ablation: a cell of the grid and its run at each share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ablation {
    /// What was varied.
    pub cell: AblationCell,
    /// The run at each share.
    pub runs: Vec<Run>,
}

/// The ablation grid around `base`: one knob at a time.
pub fn ablation_grid(base: &DefenceConfig) -> Vec<AblationCell> {
    let mut grid = Vec::new();
    let mut add = |knob, defence, method| {
        grid.push(AblationCell {
            knob,
            defence,
            method,
        });
    };
    for n in [1, 8, 32] {
        add(
            Knob::SafetyBatch,
            base.clone().with_safety_samples(n),
            Method::SpfConflictOnly,
        );
    }
    for format in [SafetyFormat::AlignmentTasks, SafetyFormat::FinetuneTask] {
        add(
            Knob::SafetyFormat,
            base.clone().with_safety_format(format),
            Method::SpfConflictOnly,
        );
    }
    for refresh in [
        RefreshPolicy::Every(1),
        RefreshPolicy::Every(10),
        RefreshPolicy::Never,
    ] {
        add(
            Knob::Refresh,
            base.clone().with_refresh(refresh),
            Method::SpfConflictOnly,
        );
    }
    for k in [4, 8, 16] {
        add(
            Knob::Rank,
            base.clone().with_rank(k),
            Method::SpfConflictOnly,
        );
    }
    for method in [Method::SpfConflictOnly, Method::SpfUpdate] {
        add(Knob::Target, base.clone(), method);
    }
    add(Knob::None, base.clone(), Method::Sft);
    grid
}

/// Runs the ablation grid of `config.defence` on the first seed at shares 0 and 0.1.
///
/// # Errors
///
/// As [`run`](crate::experiment::run).
pub fn ablate(
    config: &ExperimentConfig,
    device: &Device,
    cache: Option<&Path>,
    progress: &mut dyn Progress,
) -> Result<Vec<Ablation>, LabError> {
    let (world, sets) = world_and_sets(config)?;
    let seed = config.seeds[0];
    let aligned = aligned_model(config, &world, seed, cache, device, progress)?;
    let grid = ablation_grid(&config.defence);
    let shares = [0.0, 0.1];
    progress.start(
        "ablations",
        (grid.len() * shares.len() * config.finetune.steps) as u64,
    );
    let mut out = Vec::new();
    for cell in grid {
        let safety = safety_batch(
            &world,
            &cell.defence,
            &config.finetune,
            &config.align.tasks,
            seed,
        )?;
        let stage = Stage {
            world: &world,
            aligned: &aligned,
            finetune: &config.finetune,
            defence: &cell.defence,
            sets: &sets,
            safety: &safety,
            device,
        };
        let runs = shares
            .iter()
            .map(|&p| stage.run(cell.method, p, seed, CosineProbe::Off, progress))
            .collect::<Result<_, _>>()?;
        out.push(Ablation { cell, runs });
    }
    progress.finish("ablations done");
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ablation_grid_moves_one_knob_at_a_time() {
        let base = DefenceConfig::new();
        let grid = ablation_grid(&base);
        for cell in &grid {
            let defence = &cell.defence;
            let changed = [
                defence.safety_samples != base.safety_samples,
                defence.safety_format != base.safety_format,
                defence.refresh != base.refresh,
                defence.rank != base.rank,
                cell.method != Method::SpfConflictOnly,
            ];
            assert!(changed.iter().filter(|&&c| c).count() <= 1, "{cell:?}");
        }
        let knobs: std::collections::HashSet<_> = grid.iter().map(|cell| cell.knob).collect();
        for knob in [
            Knob::SafetyBatch,
            Knob::SafetyFormat,
            Knob::Refresh,
            Knob::Rank,
            Knob::Target,
        ] {
            assert!(knobs.contains(&knob), "{knob:?}");
        }
    }
}
