//! [`ProjectionStats`]: what one projection did to one gradient tensor.

use serde::{Deserialize, Serialize};

/// What one projection did to one gradient tensor.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ProjectionStats {
    /// Directions in the basis, `k`.
    pub directions: usize,
    /// Directions with `c_i < 0` before projection.
    pub conflicting: usize,
    /// Directions whose component was removed. `Pcgrad` removes at most the one direction `D`;
    /// `ColumnSpace`/`RowSpace` count the `u_i` (or `v_i`) along which `G` had any energy.
    pub removed: usize,
    /// `‖G‖²`.
    pub grad_energy: f64,
    /// `‖G‖² − ‖G̃‖²`, the energy removed.
    pub removed_energy: f64,
    /// `⟨G, D⟩ / (‖G‖‖D‖)` before projection; 0 when `G = 0` or `D = 0`.
    pub cosine_before: f64,
    /// `⟨G̃, D⟩ / (‖G̃‖‖D‖)` after projection; 0 when `G̃ = 0` or `D = 0`.
    pub cosine_after: f64,
}

impl ProjectionStats {
    /// `1 − ‖G̃‖²/‖G‖²`, or 0 for a zero gradient.
    pub fn removed_energy_share(&self) -> f64 {
        if self.grad_energy > 0.0 {
            self.removed_energy / self.grad_energy
        } else {
            0.0
        }
    }
}
