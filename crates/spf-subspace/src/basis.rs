//! [`LowRankBasis`]: the rank-`k` factors `U Σ Vᵀ` of one parameter's safety gradient.

use burn::tensor::{Device, Tensor, TensorData};

use crate::SubspaceError;

/// The rank-`k` safety basis `U Σ Vᵀ` of one parameter.
///
/// For a parameter whose 2-D view is `d_in × d_out`, the basis holds
///
/// - `u: [d_in, k]` with orthonormal columns `u_i`,
/// - `sigma: [k]`, the non-negative, non-increasing singular values `σ_i`,
/// - `v: [d_out, k]` with orthonormal columns `v_i`.
///
/// The rank-1 matrices `B_i = u_i v_iᵀ` are then orthonormal under the Frobenius inner product,
/// so the coefficient of a gradient `G` along direction `i` is simply `c_i = ⟨G, B_i⟩ = u_iᵀ G v_i`,
/// and `D = U Σ Vᵀ` is the rank-`k` approximation of the safety gradient `G_s`.
///
/// `k = 0` is allowed: such a basis has no directions and projects nothing.
///
/// # Orthonormality tolerance
///
/// The constructor checks `max_ij |(FᵀF − I)_ij| ≤ tol` for `F ∈ {U, V}`. Each entry of `FᵀF` is a
/// dot product of `d` terms, whose floating-point error is bounded by `γ_d ≈ d·ε` (Higham,
/// *Accuracy and Stability of Numerical Algorithms*, §3.1). The default tolerance,
/// [`LowRankBasis::default_tolerance`], is `8·d·ε_f32` with `d = max(d_in, d_out)`: the factor 8
/// leaves room for the rounding of the stored factors themselves (for example an `f64` SVD stored
/// as `f32`). Use [`LowRankBasis::with_tolerance`] for lower-precision backends.
///
/// The host keeps a copy of the `k` singular values, so statistics that need `σ` cost no
/// device round trip.
#[derive(Debug, Clone)]
pub struct LowRankBasis {
    u: Tensor<2>,
    sigma: Tensor<1>,
    v: Tensor<2>,
    sigma_host: Vec<f64>,
}

impl LowRankBasis {
    /// Builds a basis from its factors, checked against [`Self::default_tolerance`].
    ///
    /// `sigma` and `v` are moved to the device of `u`.
    ///
    /// # Errors
    ///
    /// [`SubspaceError`] when the shapes disagree, `k > min(d_in, d_out)`, a factor is not
    /// finite, `sigma` is negative or not sorted from largest to smallest, or `U` or `V` is not
    /// orthonormal.
    ///
    /// # Example
    ///
    /// ```
    /// use burn::tensor::{Device, Tensor};
    /// use spf_subspace::LowRankBasis;
    ///
    /// let device = Device::default();
    /// let u = Tensor::<2>::from_floats([[1.0], [0.0], [0.0]], &device);
    /// let sigma = Tensor::<1>::from_floats([2.5], &device);
    /// let v = Tensor::<2>::from_floats([[0.0], [1.0]], &device);
    /// let basis = LowRankBasis::new(u, sigma, v)?;
    /// assert_eq!((basis.d_in(), basis.d_out(), basis.rank()), (3, 2, 1));
    /// assert_eq!(basis.energy(), 6.25);
    /// # Ok::<(), spf_subspace::SubspaceError>(())
    /// ```
    pub fn new(u: Tensor<2>, sigma: Tensor<1>, v: Tensor<2>) -> Result<Self, SubspaceError> {
        let [d_in, _] = u.dims();
        let [d_out, _] = v.dims();
        Self::with_tolerance(u, sigma, v, Self::default_tolerance(d_in, d_out))
    }

    /// The default orthonormality tolerance `8·max(d_in, d_out)·ε_f32`; see
    /// [the type's docs](LowRankBasis#orthonormality-tolerance).
    pub fn default_tolerance(d_in: usize, d_out: usize) -> f64 {
        8.0 * d_in.max(d_out).max(1) as f64 * f64::from(f32::EPSILON)
    }

    /// Builds a basis from its factors, checking orthonormality against `tolerance`.
    ///
    /// # Errors
    ///
    /// As [`Self::new`].
    pub fn with_tolerance(
        u: Tensor<2>,
        sigma: Tensor<1>,
        v: Tensor<2>,
        tolerance: f64,
    ) -> Result<Self, SubspaceError> {
        if !(tolerance.is_finite() && tolerance >= 0.0) {
            return Err(SubspaceError::InvalidTolerance { tolerance });
        }
        let [d_in, k] = u.dims();
        let [d_out, k_v] = v.dims();
        let [k_sigma] = sigma.dims();
        if k != k_v || k != k_sigma {
            return Err(SubspaceError::ShapeMismatch {
                u: u.dims().to_vec(),
                sigma: sigma.dims().to_vec(),
                v: v.dims().to_vec(),
            });
        }
        if k > d_in.min(d_out) {
            return Err(SubspaceError::RankTooLarge { k, d_in, d_out });
        }
        let device = u.device();
        let sigma = sigma.to_device(&device);
        let v = v.to_device(&device);

        let sigma_host = host_values(sigma.clone());
        check_sigma(&sigma_host)?;
        if k > 0 {
            check_orthonormal(&u, "u", tolerance)?;
            check_orthonormal(&v, "v", tolerance)?;
        }
        Ok(Self {
            u,
            sigma,
            v,
            sigma_host,
        })
    }

    /// A basis with no directions (`k = 0`) for a `d_in × d_out` parameter: it projects nothing.
    pub fn empty(d_in: usize, d_out: usize, device: &Device) -> Self {
        Self {
            u: Tensor::zeros([d_in, 0], device),
            sigma: Tensor::zeros([0], device),
            v: Tensor::zeros([d_out, 0], device),
            sigma_host: Vec::new(),
        }
    }

    /// The exact basis of a vector parameter's safety gradient `g`, viewed as an `n × 1` matrix:
    /// `u = g/‖g‖`, `σ = ‖g‖`, `v = [1]`, so that `U Σ Vᵀ = g`. A zero `g` gives the empty basis.
    ///
    /// # Errors
    ///
    /// [`SubspaceError::NonFinite`] with factor `"vector"` when `g` holds NaN or ±Inf, or its
    /// norm overflows the backend's float type.
    pub fn from_vector(g: Tensor<1>) -> Result<Self, SubspaceError> {
        let [n] = g.dims();
        let (device, dtype) = (g.device(), g.dtype());
        let values = host_values(g);
        if values.iter().any(|x| !x.is_finite()) {
            return Err(SubspaceError::NonFinite { factor: "vector" });
        }
        let norm = values.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            return Ok(Self::empty(n, 1, &device));
        }
        // Uploaded as f64 and converted to g's dtype.
        let unit: Vec<f64> = values.iter().map(|x| x / norm).collect();
        let u = Tensor::from_data(TensorData::new(unit, [n, 1]), (&device, dtype));
        let sigma = Tensor::from_data(TensorData::new(vec![norm], [1]), (&device, dtype));
        let v = Tensor::from_data(TensorData::new(vec![1.0f64], [1, 1]), (&device, dtype));
        // A norm beyond the backend's range becomes ±Inf in `sigma`, which `new` rejects.
        Self::new(u, sigma, v).map_err(|err| match err {
            SubspaceError::NonFinite { .. } => SubspaceError::NonFinite { factor: "vector" },
            other => other,
        })
    }

    /// Number of directions `k`.
    pub fn rank(&self) -> usize {
        self.sigma_host.len()
    }

    /// Rows of the parameter's 2-D view.
    pub fn d_in(&self) -> usize {
        self.u.dims()[0]
    }

    /// Columns of the parameter's 2-D view.
    pub fn d_out(&self) -> usize {
        self.v.dims()[0]
    }

    /// The left factor `U: [d_in, k]`.
    pub fn u(&self) -> &Tensor<2> {
        &self.u
    }

    /// The singular values `σ: [k]` on the device.
    pub fn sigma(&self) -> &Tensor<1> {
        &self.sigma
    }

    /// The right factor `V: [d_out, k]`.
    pub fn v(&self) -> &Tensor<2> {
        &self.v
    }

    /// The singular values `σ` as read back to the host when the basis was built.
    pub fn singular_values(&self) -> &[f64] {
        &self.sigma_host
    }

    /// `‖U Σ Vᵀ‖_F² = Σ σ_i²`, the energy of the rank-`k` safety gradient.
    pub fn energy(&self) -> f64 {
        self.sigma_host.iter().map(|s| s * s).sum()
    }

    /// The device the factors live on.
    pub fn device(&self) -> Device {
        self.u.device()
    }

    /// Keeps the `k` leading directions (the largest singular values); a no-op when the basis
    /// has at most `k`.
    pub fn truncate(self, k: usize) -> Self {
        if k >= self.rank() {
            return self;
        }
        let [d_in, d_out] = [self.d_in(), self.d_out()];
        let mut sigma_host = self.sigma_host;
        sigma_host.truncate(k);
        Self {
            u: self.u.slice([0..d_in, 0..k]),
            sigma: self.sigma.slice(0..k),
            v: self.v.slice([0..d_out, 0..k]),
            sigma_host,
        }
    }

    /// Moves the factors to `device`, through host memory.
    ///
    /// The devices may belong to two backends (the CPU and a GPU); burn 0.21's WGPU backend could
    /// not even move a tensor between two of its own devices. The factors are small,
    /// `(m + n + 1)·k` numbers, so the round trip through the host costs little and works between
    /// any two devices.
    pub fn to_device(self, device: &Device) -> Self {
        if self.device() == *device {
            return self;
        }
        fn moved<const D: usize>(t: Tensor<D>, device: &Device) -> Tensor<D> {
            Tensor::from_data(t.into_data(), device)
        }
        Self {
            u: moved(self.u, device),
            sigma: moved(self.sigma, device),
            v: moved(self.v, device),
            sigma_host: self.sigma_host,
        }
    }

    /// The factors `(U, σ, V)`.
    pub fn into_parts(self) -> (Tensor<2>, Tensor<1>, Tensor<2>) {
        (self.u, self.sigma, self.v)
    }
}

/// Reads a tensor back to the host as `f64`, whatever the backend's float type.
fn host_values<const D: usize>(tensor: Tensor<D>) -> Vec<f64> {
    tensor.into_data().iter::<f64>().collect()
}

fn check_sigma(sigma: &[f64]) -> Result<(), SubspaceError> {
    for (index, &value) in sigma.iter().enumerate() {
        if !value.is_finite() {
            return Err(SubspaceError::NonFinite { factor: "sigma" });
        }
        if value < 0.0 {
            return Err(SubspaceError::NegativeSigma { index, value });
        }
        if index > 0 && value > sigma[index - 1] {
            return Err(SubspaceError::UnsortedSigma {
                index,
                prev: sigma[index - 1],
                next: value,
            });
        }
    }
    Ok(())
}

/// Checks `max |FᵀF − I| ≤ tolerance`. A non-finite `F` makes the Gram matrix non-finite.
fn check_orthonormal(
    factor: &Tensor<2>,
    name: &'static str,
    tolerance: f64,
) -> Result<(), SubspaceError> {
    let [_, k] = factor.dims();
    let gram = host_values(factor.clone().transpose().matmul(factor.clone()));
    let mut deviation = 0.0f64;
    for (index, value) in gram.into_iter().enumerate() {
        if !value.is_finite() {
            return Err(SubspaceError::NonFinite { factor: name });
        }
        let identity = if index / k == index % k { 1.0 } else { 0.0 };
        deviation = deviation.max((value - identity).abs());
    }
    if deviation > tolerance {
        return Err(SubspaceError::NotOrthonormal {
            factor: name,
            deviation,
            tolerance,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor2(rows: &[&[f32]]) -> Tensor<2> {
        let n = rows.len();
        let m = rows.first().map_or(0, |r| r.len());
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(TensorData::new(flat, [n, m]), &Default::default())
    }

    fn tensor1(values: &[f32]) -> Tensor<1> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), [values.len()]),
            &Default::default(),
        )
    }

    /// A valid 3×2 basis with k = 2: u = e1, e2 and v = a 45° rotation.
    fn parts() -> (Tensor<2>, Tensor<1>, Tensor<2>) {
        let h = std::f32::consts::FRAC_1_SQRT_2;
        (
            tensor2(&[&[1.0, 0.0], &[0.0, 1.0], &[0.0, 0.0]]),
            tensor1(&[3.0, 1.0]),
            tensor2(&[&[h, -h], &[h, h]]),
        )
    }

    #[test]
    fn accepts_valid_factors() {
        let (u, s, v) = parts();
        let basis = LowRankBasis::new(u, s, v).unwrap();
        assert_eq!(basis.rank(), 2);
        assert_eq!(basis.singular_values(), &[3.0, 1.0]);
        assert_eq!(basis.energy(), 10.0);
    }

    #[test]
    fn rejects_mismatched_rank() {
        let (u, _, v) = parts();
        let err = LowRankBasis::new(u, tensor1(&[1.0]), v).unwrap_err();
        assert!(matches!(err, SubspaceError::ShapeMismatch { .. }), "{err}");
    }

    #[test]
    fn rejects_rank_above_min_dimension() {
        let u = tensor2(&[&[1.0, 0.0]]);
        let v = tensor2(&[&[1.0, 0.0], &[0.0, 1.0]]);
        let err = LowRankBasis::new(u, tensor1(&[1.0, 1.0]), v).unwrap_err();
        assert_eq!(
            err,
            SubspaceError::RankTooLarge {
                k: 2,
                d_in: 1,
                d_out: 2
            }
        );
    }

    #[test]
    fn rejects_non_orthonormal_factor() {
        let (_, s, v) = parts();
        let u = tensor2(&[&[1.0, 0.1], &[0.0, 1.0], &[0.0, 0.0]]);
        let err = LowRankBasis::new(u, s, v).unwrap_err();
        match err {
            SubspaceError::NotOrthonormal {
                factor, deviation, ..
            } => {
                assert_eq!(factor, "u");
                assert!((deviation - 0.1).abs() < 1e-6, "{deviation}");
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn rejects_non_finite_factors() {
        let (u, s, _) = parts();
        let v = tensor2(&[&[f32::NAN, 0.0], &[0.0, 1.0]]);
        assert_eq!(
            LowRankBasis::new(u, s, v).unwrap_err(),
            SubspaceError::NonFinite { factor: "v" }
        );
        let (u, _, v) = parts();
        assert_eq!(
            LowRankBasis::new(u, tensor1(&[f32::INFINITY, 1.0]), v).unwrap_err(),
            SubspaceError::NonFinite { factor: "sigma" }
        );
    }

    #[test]
    fn rejects_negative_and_unsorted_sigma() {
        let (u, _, v) = parts();
        let err = LowRankBasis::new(u.clone(), tensor1(&[1.0, -1.0]), v.clone()).unwrap_err();
        assert_eq!(
            err,
            SubspaceError::NegativeSigma {
                index: 1,
                value: -1.0
            }
        );
        let err = LowRankBasis::new(u, tensor1(&[1.0, 2.0]), v).unwrap_err();
        assert_eq!(
            err,
            SubspaceError::UnsortedSigma {
                index: 1,
                prev: 1.0,
                next: 2.0
            }
        );
    }

    #[test]
    fn tolerance_is_configurable() {
        let (_, s, v) = parts();
        let u = tensor2(&[&[1.0, 1e-3], &[0.0, 1.0], &[0.0, 0.0]]);
        assert!(LowRankBasis::new(u.clone(), s.clone(), v.clone()).is_err());
        assert!(LowRankBasis::with_tolerance(u.clone(), s.clone(), v.clone(), 1e-2).is_ok());
        // A NaN tolerance would compare false and pass any factors (it used to).
        for tolerance in [f64::NAN, f64::INFINITY, -1e-3] {
            let err = LowRankBasis::with_tolerance(u.clone(), s.clone(), v.clone(), tolerance);
            assert!(
                matches!(err, Err(SubspaceError::InvalidTolerance { .. })),
                "{tolerance}"
            );
        }
    }

    #[test]
    fn empty_basis_has_rank_zero() {
        let basis = LowRankBasis::empty(4, 3, &Default::default());
        assert_eq!((basis.d_in(), basis.d_out(), basis.rank()), (4, 3, 0));
        assert_eq!(basis.energy(), 0.0);
    }

    #[test]
    fn zero_rank_factors_are_accepted() {
        let device = Default::default();
        let basis = LowRankBasis::new(
            Tensor::zeros([5, 0], &device),
            Tensor::zeros([0], &device),
            Tensor::zeros([2, 0], &device),
        )
        .unwrap();
        assert_eq!(basis.rank(), 0);
    }

    #[test]
    fn vector_basis_reconstructs_the_vector() {
        let g = [3.0f32, 0.0, -4.0];
        let basis = LowRankBasis::from_vector(tensor1(&g)).unwrap();
        assert_eq!((basis.d_in(), basis.d_out(), basis.rank()), (3, 1, 1));
        assert_eq!(basis.singular_values(), &[5.0]);
        let d = basis
            .u()
            .clone()
            .mul_scalar(5.0)
            .matmul(basis.v().clone().transpose());
        let d: Vec<f32> = d.into_data().try_to_vec::<f32>().unwrap();
        for (a, b) in d.iter().zip(g) {
            assert!((a - b).abs() <= 4.0 * f32::EPSILON * 5.0, "{a} vs {b}");
        }
        assert_eq!(
            LowRankBasis::from_vector(tensor1(&[0.0, 0.0]))
                .unwrap()
                .rank(),
            0
        );
        assert_eq!(
            LowRankBasis::from_vector(tensor1(&[f32::NAN])).unwrap_err(),
            SubspaceError::NonFinite { factor: "vector" }
        );
    }

    #[test]
    fn truncate_keeps_leading_directions() {
        let (u, s, v) = parts();
        let basis = LowRankBasis::new(u, s, v).unwrap().truncate(1);
        assert_eq!(basis.rank(), 1);
        assert_eq!(basis.u().dims(), [3, 1]);
        assert_eq!(basis.v().dims(), [2, 1]);
        assert_eq!(basis.singular_values(), &[3.0]);
        assert_eq!(basis.clone().truncate(5).rank(), 1);
    }
}
