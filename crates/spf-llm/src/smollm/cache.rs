//! The experiment's cache, so that an interrupted grid resumes where it stopped: each finished
//! cell under a hash of everything that determines it ([`CellKey`]), each seed's aligned blocks
//! under a hash of the alignment's settings.

use std::path::{Path, PathBuf};

use burn::module::Module;
use serde::Serialize;
use spf_core::checkpoint;
use spf_harness::progress::Progress;
use spf_harness::seed::fnv;

use super::config::SmolConfig;
use super::results::{SmolModel, SmolRow};
use crate::LlmError;
use crate::llama::Llama;

/// Bumped when a change to the experiment changes what a cached cell holds.
const CACHE_VERSION: u32 = 2;

/// What a cell was computed from besides the configuration: the data (the fingerprint of the
/// asset files, [`Assets::fingerprint`](super::data::Assets::fingerprint)) and the engine (burn's
/// version and the device, whose float sums round differently), so a cell computed on burn 0.21
/// or on another backend is never served as this one's.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub(super) struct Provenance {
    data: String,
    engine: String,
}

impl Provenance {
    pub(super) fn new(data: String, device: &burn::tensor::Device) -> Self {
        Self {
            data,
            engine: spf_harness::provenance::engine(device),
        }
    }
}

/// What a cached cell depends on: the version of this code, its [`Provenance`], every setting but
/// those that only say how to run (threads, batch size of generation, the cache's place) or
/// which other cells to run, and the cell itself.
#[derive(Serialize)]
pub(super) struct CellKey {
    version: u32,
    provenance: Provenance,
    config: serde_json::Value,
    model: SmolModel,
    seed: Option<u64>,
}

impl CellKey {
    /// The key of `model`'s row: the configuration less what cannot change that row (how it
    /// runs, which other cells the grid holds, and the settings of stages the model did not
    /// go through), so an SFT cell is shared by every SPF ablation.
    pub(super) fn new(
        config: &SmolConfig,
        provenance: &Provenance,
        model: SmolModel,
        seed: Option<u64>,
    ) -> Self {
        const RUNTIME: &[&str] = &[
            "threads",
            "eval_batch",
            "cache_dir",
            "seeds",
            "harmful_shares",
            "methods",
        ];
        const PROJECTION: &[&str] = &[
            "mode",
            "target",
            "rank",
            "refresh",
            "screen",
            "screen_pass",
            "screen_calibration",
        ];
        const REFUSAL_DATA: &[&str] = &["safety_samples", "safe_instr_share"];
        const ATTACK: &[&str] = &["attack_steps", "attack_lr", "finetune_samples", "lora"];
        let unused: Vec<&[&str]> = match model {
            SmolModel::Base | SmolModel::Aligned => vec![PROJECTION, REFUSAL_DATA, ATTACK],
            SmolModel::Attacked { method, .. } => {
                let mut unused = Vec::new();
                if !method.projects() {
                    unused.push(PROJECTION);
                }
                if !method.projects() && !method.adds_refusals() {
                    unused.push(REFUSAL_DATA);
                }
                unused
            }
        };
        let mut value = serde_json::to_value(config).expect("a config serializes");
        if let Some(map) = value.as_object_mut() {
            for field in RUNTIME.iter().chain(unused.into_iter().flatten()) {
                map.remove(*field);
            }
            // An option that is off (`None`) is left out, so adding one keeps old cells valid.
            map.retain(|_, v| !v.is_null());
        }
        Self {
            version: CACHE_VERSION,
            provenance: provenance.clone(),
            config: value,
            model,
            seed,
        }
    }

    fn file(&self) -> String {
        let json = serde_json::to_string(self).expect("a key serializes");
        format!("{:016x}", fnv::of_str(&json))
    }
}

/// What an aligned checkpoint depends on: its [`Provenance`] and the alignment's settings.
#[derive(Serialize)]
struct AlignKey<'a> {
    version: u32,
    provenance: &'a Provenance,
    seed: u64,
    train_layers: usize,
    align_steps: usize,
    align_lr: f64,
    batch_size: usize,
    max_answer_tokens: usize,
    advbench_test: usize,
    advbench_validation: usize,
    /// Left out when `None`, so that the checkpoints aligned before it existed stay valid.
    #[serde(skip_serializing_if = "Option::is_none")]
    align_prompts: Option<usize>,
    harmbench_test: usize,
    benign_train: usize,
    benign_eval: usize,
}

/// The cache directory: `cells/<key>.json` and `aligned/<key>.bpk`, for one [`Provenance`].
pub(super) struct Cache {
    dir: PathBuf,
    provenance: Provenance,
}

impl Cache {
    pub(super) fn new(dir: &Path, provenance: Provenance) -> Result<Self, LlmError> {
        for sub in ["cells", "aligned"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|source| LlmError::Io { path, source })?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            provenance,
        })
    }

    fn cell_path(&self, key: &CellKey) -> PathBuf {
        self.dir.join("cells").join(format!("{}.json", key.file()))
    }

    /// The cached row, if a readable one is there (an unreadable one is recomputed).
    pub(super) fn row(&self, key: &CellKey) -> Option<SmolRow> {
        let text = std::fs::read_to_string(self.cell_path(key)).ok()?;
        serde_json::from_str(&text).ok()
    }

    pub(super) fn store(&self, key: &CellKey, row: &SmolRow) -> Result<(), LlmError> {
        let path = self.cell_path(key);
        let json = serde_json::to_string_pretty(row).expect("a row serializes");
        // Written aside and renamed: a killed run leaves no half-written cell.
        let partial = path.with_extension(format!("json.{}.partial", std::process::id()));
        std::fs::write(&partial, json)
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|source| LlmError::Io { path, source })
    }

    fn aligned_path(&self, config: &SmolConfig, seed: u64) -> PathBuf {
        let key = AlignKey {
            version: CACHE_VERSION,
            provenance: &self.provenance,
            seed,
            train_layers: config.train_layers,
            align_steps: config.align_steps,
            align_lr: config.align_lr,
            batch_size: config.batch_size,
            max_answer_tokens: config.max_answer_tokens,
            advbench_test: config.advbench_test,
            advbench_validation: config.advbench_validation,
            align_prompts: config.align_prompts,
            harmbench_test: config.harmbench_test,
            benign_train: config.benign_train,
            benign_eval: config.benign_eval,
        };
        let json = serde_json::to_string(&key).expect("a key serializes");
        self.dir
            .join("aligned")
            .join(format!("{:016x}", fnv::of_str(&json)))
    }

    /// The seed's aligned top blocks, if a checkpoint that loads is there (on the device of
    /// `untrained`'s parameters).
    pub(super) fn aligned(
        &self,
        config: &SmolConfig,
        seed: u64,
        untrained: &Llama,
    ) -> Option<Llama> {
        let record = checkpoint::load(self.aligned_path(config, seed)).ok()?;
        let mut top = untrained.clone();
        top.blocks = top.blocks.load_record(record);
        Some(top)
    }

    pub(super) fn store_aligned(
        &self,
        config: &SmolConfig,
        seed: u64,
        top: &Llama,
    ) -> Result<(), LlmError> {
        checkpoint::save_atomic(
            top.blocks.clone().into_record(),
            self.aligned_path(config, seed),
        )
        .map(drop)
        .map_err(LlmError::Checkpoint)
    }
}

/// The cells of one run: each row read from the cache when it holds one, else computed and
/// stored there; counts the cells read.
pub(super) struct Cells<'a> {
    config: &'a SmolConfig,
    cache: Option<&'a Cache>,
    /// Cells read from the cache rather than computed.
    pub(super) cached: usize,
}

impl<'a> Cells<'a> {
    /// The cells of a run configured by `config`, kept in `cache` (`None`: every cell is
    /// computed).
    pub(super) fn new(config: &'a SmolConfig, cache: Option<&'a Cache>) -> Self {
        Self {
            config,
            cache,
            cached: 0,
        }
    }

    /// The row of `model` on `seed`: cached, or made by `compute` and then cached.
    pub(super) fn row(
        &mut self,
        (model, seed): (SmolModel, Option<u64>),
        progress: &mut dyn Progress,
        compute: impl FnOnce(&mut dyn Progress) -> Result<SmolRow, LlmError>,
    ) -> Result<SmolRow, LlmError> {
        let Some(cache) = self.cache else {
            return compute(progress);
        };
        let key = CellKey::new(self.config, &cache.provenance, model, seed);
        if let Some(row) = cache.row(&key) {
            self.cached += 1;
            progress.start(&format!("{} (seed {:?}): cached", row.model, row.seed), 1);
            progress.finish("read from the cache");
            return Ok(row);
        }
        let row = compute(progress)?;
        cache.store(&key, &row)?;
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smollm::config::SmolMethod;
    use crate::smollm::protocol::EvalSplit;
    use spf_core::ProjectionTarget;
    use spf_core::screen::ScreenThreshold;
    use spf_subspace::RankPolicy;

    const DATA: &str = "0123456789abcdef";
    const ENGINE: &str = "burn 0.22.1 on Device<Flex>";

    fn data(fingerprint: &str, engine: &str) -> Provenance {
        Provenance {
            data: fingerprint.to_owned(),
            engine: engine.to_owned(),
        }
    }

    #[test]
    fn cell_keys_ignore_how_a_run_is_run_but_not_what_it_computes() {
        let base = SmolConfig::new();
        let model = SmolModel::Attacked {
            method: SmolMethod::Spf,
            p: 0.1,
        };
        let key = |c: &SmolConfig| CellKey::new(c, &data(DATA, ENGINE), model, Some(0)).file();
        assert_eq!(
            key(&base),
            key(&base.clone().with_threads(7).with_seeds(vec![0, 1, 2]))
        );
        assert_ne!(
            key(&base),
            key(&base.clone().with_rank(RankPolicy::Fixed(32)))
        );
        assert_ne!(
            key(&base),
            key(&base.clone().with_split(EvalSplit::Validation))
        );
        assert_ne!(
            CellKey::new(&base, &data(DATA, ENGINE), model, Some(0)).file(),
            CellKey::new(&base, &data(DATA, ENGINE), model, Some(1)).file()
        );
        // Other data, the same configuration: another cell.
        assert_ne!(
            CellKey::new(&base, &data(DATA, ENGINE), model, Some(0)).file(),
            CellKey::new(&base, &data("fedcba9876543210", ENGINE), model, Some(0)).file()
        );
        // The same data on another engine (burn version or device): another cell.
        assert_ne!(
            CellKey::new(&base, &data(DATA, ENGINE), model, Some(0)).file(),
            CellKey::new(&base, &data(DATA, "burn 0.21.0 on NdArray"), model, Some(0)).file()
        );
        assert_ne!(
            key(&base),
            key(&base.clone().with_screen(Some(ScreenThreshold::Fixed(0.5))))
        );
        // A model's key leaves out the settings of stages it did not go through: SFT's cell
        // serves every SPF ablation; SafeInstr's depends on the refusal data, not on SPF.
        let other = |method| {
            let model = SmolModel::Attacked { method, p: 0.1 };
            move |c: &SmolConfig| CellKey::new(c, &data(DATA, ENGINE), model, Some(0)).file()
        };
        let (sft, safe_instr) = (other(SmolMethod::Sft), other(SmolMethod::SafeInstr));
        let spf_only = base
            .clone()
            .with_rank(RankPolicy::Fixed(32))
            .with_target(ProjectionTarget::Update)
            .with_screen(Some(ScreenThreshold::Fixed(0.5)));
        assert_eq!(sft(&base), sft(&spf_only));
        assert_eq!(sft(&base), sft(&base.clone().with_safety_samples(32)));
        assert_ne!(sft(&base), sft(&base.clone().with_attack_steps(61)));
        assert_eq!(safe_instr(&base), safe_instr(&spf_only));
        assert_ne!(
            safe_instr(&base),
            safe_instr(&base.clone().with_safety_samples(32))
        );
    }
}
