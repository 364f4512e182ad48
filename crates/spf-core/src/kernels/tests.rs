//! The kernels against burn's generic operations, on every CPU backend compiled in.

use burn::tensor::{Device, Tensor, Tolerance};

use super::{dispatch, product, squared_norm, subtract_product, sum};
use crate::testing::{Gaussian, upload};

/// The CPU devices whose kernels this build has, and the test device (the generic path on WGPU).
fn devices() -> Vec<Device> {
    let mut devices = vec![Device::flex()];
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)] // burn-ndarray, kept for the users who name it
    devices.push(Device::ndarray());
    devices.push(crate::testing::test_device());
    devices
}

fn inputs(seed: u64, device: &Device) -> [Tensor<2>; 3] {
    let mut rng = Gaussian::new(seed);
    [rng.matrix(37, 23), rng.matrix(37, 5), rng.matrix(5, 23)].map(|m| upload(&m, device))
}

#[test]
fn the_product_is_subtracted_as_the_generic_path_does_it() {
    for device in devices() {
        for seed in 0..4 {
            let [g, a, b] = inputs(seed, &device);
            let generic = g.clone() - a.clone().matmul(b.clone());
            let got = subtract_product(g, a, b).into_data();
            // Bit for bit: the same product, subtracted once, so the one-pass removal changes no
            // result.
            assert_eq!(got, generic.into_data(), "{device:?}, seed {seed}");
        }
    }
}

#[test]
fn the_product_is_the_generic_matmul() {
    for device in devices() {
        for seed in 0..4 {
            let [g, a, _] = inputs(seed, &device);
            // Both operand layouts the projection uses: Uᵀ G (a transposed view on the left) and
            // G V.
            let left = a.clone().transpose();
            let generic = left.clone().matmul(g.clone()).into_data();
            assert_eq!(
                product(left, g.clone()).into_data(),
                generic,
                "{device:?}, seed {seed}"
            );
            let v = inputs(seed + 10, &device)[1].clone().slice([0..23, 0..5]);
            let generic = g.clone().matmul(v.clone()).into_data();
            assert_eq!(
                product(g, v).into_data(),
                generic,
                "{device:?}, seed {seed}"
            );
        }
    }
}

#[test]
fn the_squared_norm_is_the_sum_of_squares() {
    for device in devices() {
        for seed in 0..4 {
            let [g, _, _] = inputs(seed, &device);
            let generic: f32 = g.clone().square().sum().into_scalar();
            let got: f32 = squared_norm(&g).into_scalar();
            // Summed in another order: equal to rounding.
            assert!(
                (got - generic).abs() <= 1e-5 * generic,
                "{device:?}: {got} vs {generic}"
            );
            // A transposed view is summed through its strides (or by the generic path).
            let t: f32 = squared_norm(&g.transpose()).into_scalar();
            assert!(
                (t - generic).abs() <= 1e-5 * generic,
                "{device:?}: {t} vs {generic}"
            );
        }
    }
}

#[test]
fn the_sum_is_the_sum() {
    for device in devices() {
        for seed in 0..4 {
            let [g, _, _] = inputs(seed, &device);
            let generic: f32 = g.clone().sum().into_scalar();
            let got: f32 = sum(g.clone()).into_scalar();
            // Summed in another order: equal to rounding, against the sum of magnitudes.
            let scale: f32 = g.clone().abs().sum().into_scalar();
            assert!(
                (got - generic).abs() <= 1e-5 * scale,
                "{device:?}: {got} vs {generic}"
            );
            // A vector, and a value that is not finite: the probe's purpose.
            let v = g.clone().reshape([37 * 23]);
            let total: f32 = sum(v).into_scalar();
            assert!((total - generic).abs() <= 1e-5 * scale, "{device:?}");
            let poisoned = g.slice_assign([3..4, 5..6], Tensor::from_data([[f32::NAN]], &device));
            assert!(sum(poisoned).into_scalar::<f32>().is_nan(), "{device:?}");
        }
    }
}

#[test]
fn a_shared_gradient_is_copied_not_overwritten() {
    for device in devices() {
        let [g, a, b] = inputs(9, &device);
        let kept = g.clone().into_data();
        let other_handle = g.clone();
        let got = subtract_product(g, a, b);
        assert_eq!(other_handle.into_data(), kept, "{device:?}");
        assert_ne!(got.into_data(), kept, "{device:?}");
    }
}

#[test]
fn transposed_operands_are_read_through_their_strides() {
    for device in devices() {
        let [g, a, b] = inputs(3, &device);
        let (at, bt) = (a.clone().transpose(), b.clone().transpose());
        let expected = g.clone() - a.matmul(b);
        // `a` and `b` given as transposes of stored transposes: non-standard layouts.
        let got = subtract_product(g, at.transpose(), bt.transpose());
        got.into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::absolute(1e-5));
    }
}

#[test]
fn tracked_and_f64_tensors_are_computed_too() {
    for device in devices() {
        // An autodiff-tracked operand takes the generic path; `f64` its own kernel.
        let tracked = device.clone().autodiff();
        let [g, a, b] = inputs(5, &tracked);
        let expected = (g.clone() - a.clone().matmul(b.clone())).into_data();
        assert_eq!(
            subtract_product(g, a, b).into_data(),
            expected,
            "{device:?}"
        );
        let [g, a, b] = inputs(5, &device).map(|t| t.cast(burn::tensor::DType::F64));
        let expected = (g.clone() - a.clone().matmul(b.clone())).into_data();
        assert_eq!(
            subtract_product(g, a, b).into_data(),
            expected,
            "{device:?}"
        );
    }
}

#[test]
fn the_kernels_take_plain_cpu_tensors_and_hand_back_the_rest() {
    let [g, _, _] = inputs(1, &Device::flex());
    assert!(dispatch::squared_norm(&g).is_some(), "flex's norm");
    assert!(dispatch::sum(&g).is_some(), "flex's sum");
    let tracked = g.clone().autodiff().require_grad();
    assert!(
        dispatch::squared_norm(&tracked).is_none(),
        "a tracked tensor"
    );
    assert!(dispatch::sum(&tracked).is_none(), "a tracked tensor");
    #[cfg(feature = "ndarray")]
    {
        #[allow(deprecated)] // burn-ndarray, kept for the users who name it
        let [g, a, b] = inputs(1, &Device::ndarray());
        assert!(dispatch::squared_norm(&g).is_some(), "ndarray's norm");
        assert!(
            dispatch::product(a.clone(), b.clone()).is_ok(),
            "ndarray's product"
        );
        let removed = dispatch::subtract_product(g.clone(), a.clone(), b.clone());
        assert!(removed.is_ok(), "ndarray's removal");
        let back = dispatch::subtract_product(g.clone(), a.cast(burn::tensor::DType::F64), b);
        let Err((g_back, _, _)) = back else {
            panic!("mixed dtypes are handed back")
        };
        assert_eq!(g_back.into_data(), g.into_data(), "handed back untouched");
    }
}
