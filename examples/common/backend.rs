//! The `--backend` choice the examples share: which of burn's devices an example runs on.

use burn::tensor::Device;
use clap::ValueEnum;

/// Which burn backend an example runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// burn's CPU backend of this build: `flex` (the default feature), or `ndarray` when built
    /// with `--features ndarray` and without `flex`.
    Cpu,
    /// burn's `flex` CPU backend (the default feature `flex`).
    Flex,
    /// burn's `ndarray` CPU backend (build with `--features ndarray`; deprecated by burn).
    Ndarray,
    /// burn's WGPU backend (build with `--features wgpu`).
    Wgpu,
    /// burn's CUDA backend (build with `--features cuda`).
    Cuda,
}

impl Backend {
    /// The device with autodiff, and its name for the reports; an error naming the feature to
    /// rebuild with when the backend is not compiled in.
    #[allow(deprecated)] // burn-ndarray, kept for the users who name it
    pub fn device(self) -> Result<(Device, &'static str), Box<dyn std::error::Error>> {
        let (device, name) = match self {
            #[cfg(feature = "flex")]
            Self::Cpu | Self::Flex => (Device::flex(), "flex (CPU)"),
            #[cfg(all(feature = "ndarray", not(feature = "flex")))]
            Self::Cpu => (Device::ndarray(), "ndarray (CPU)"),
            #[cfg(feature = "ndarray")]
            Self::Ndarray => (Device::ndarray(), "ndarray (CPU)"),
            #[cfg(feature = "wgpu")]
            Self::Wgpu => (
                Device::wgpu(burn::tensor::DeviceKind::DefaultDevice),
                "wgpu",
            ),
            #[cfg(feature = "cuda")]
            Self::Cuda => (Device::cuda(0), "cuda"),
            #[allow(unreachable_patterns)]
            other => {
                return Err(format!(
                    "the {other:?} backend is not compiled in: rebuild with `--features {}`",
                    match other {
                        Self::Cpu | Self::Flex => "flex",
                        Self::Ndarray => "ndarray",
                        Self::Wgpu => "wgpu",
                        Self::Cuda => "cuda",
                    }
                )
                .into());
            }
        };
        Ok((device.autodiff(), name))
    }
}
