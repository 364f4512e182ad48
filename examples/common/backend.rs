//! The `--backend` choice the examples share, and the dispatch to a generic `run::<B>`.

use clap::ValueEnum;

/// Which burn backend an example runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// burn's ndarray backend on the CPU.
    Cpu,
    /// burn's WGPU backend (build with `--features wgpu`).
    Wgpu,
    /// burn's CUDA backend (build with `--features cuda`).
    Cuda,
}

/// Calls `$run::<Autodiff<backend>>($args, name)` for the chosen backend, or returns an error
/// naming the feature to rebuild with when that backend is not compiled in.
macro_rules! run_on {
    ($backend:expr, $run:ident($args:expr)) => {
        match $backend {
            Backend::Cpu => {
                $run::<burn::backend::Autodiff<burn::backend::NdArray>>($args, "ndarray (CPU)")
            }
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => $run::<burn::backend::Autodiff<burn::backend::Wgpu>>($args, "wgpu"),
            #[cfg(feature = "cuda")]
            Backend::Cuda => $run::<burn::backend::Autodiff<burn::backend::Cuda>>($args, "cuda"),
            #[allow(unreachable_patterns)]
            other => Err(format!(
                "the {other:?} backend is not compiled in: rebuild with `--features {}`",
                format!("{other:?}").to_lowercase()
            )
            .into()),
        }
    };
}
pub(crate) use run_on;
