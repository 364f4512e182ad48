//! What a cached result was computed on besides its configuration and data: the engine.
//!
//! Both experiments cache their expensive stages (aligned models, scored cells) under a hash of
//! everything that determines them. The same configuration on another burn release or another
//! backend rounds its float sums differently, so its results are other results: the engine is
//! part of every key.

use burn::tensor::Device;

/// burn's release, which the workspace pins exactly (the root Cargo.toml).
pub const BURN: &str = "burn 0.22.1";

/// The engine a result on `device` is computed by: burn's release and the device, e.g.
/// `burn 0.22.1 on Device<Flex(..)>`.
pub fn engine(device: &Device) -> String {
    format!("{BURN} on {device:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_names_the_release_and_the_backend() {
        let flex = engine(&Device::flex());
        assert!(flex.starts_with(BURN), "{flex}");
        assert!(flex.to_lowercase().contains("flex"), "{flex}");
    }
}
