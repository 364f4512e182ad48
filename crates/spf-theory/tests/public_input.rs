//! Arbitrary values through every public constructor and configuration of the library crates:
//! each call returns a value or a typed error, and never panics. (A panic fails the property;
//! proptest then shrinks the input and saves it under `tests/public_input.proptest-regressions`.)
//!
//! What is fed: the factors and tolerance of `LowRankBasis::with_tolerance`, `new` and
//! `from_vector`; every field of `RandomizedSvdConfig` (and so `SketchConfig`) with an arbitrary
//! matrix; every field of `SpfConfig` and its `SubspaceConfig` (modes, targets, refresh policies,
//! regex filters, rank policies, non-finite policies) through `SpfConfig::init`,
//! `SafetySubspace::estimate`, `try_step`, `measure` and `SampleScreen::score` with an arbitrary
//! learning rate and gradients (of the parameter's shape or any other), and a refresh;
//! `project` and `project_without_stats` with a gradient of any shape; the randomized SVD's
//! public steps (`gaussian_sketch`, `range_finder`, `orthonormalize`, `truncated_svd`) on any
//! matrix, sketch width and range basis; the 2-D view (`view_2d`, `into_2d`, `from_2d` to any
//! shape); and the diagnostics `rank_for_energy`, `captured_energy`, `subspace_overlap`,
//! `direction_overlap` and `principal_angles`. Dimensions stay small (at most 5, or a count that
//! overflows) so that the properties run fast; values, counts and settings are the whole range
//! of their types.

use burn::module::Param;
use burn::nn::Linear;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Tensor, TensorData};
use proptest::prelude::*;
use spf_core::screen::{SampleScreen, ScreenThreshold};
use spf_core::{
    NonFinitePolicy, ParamFilter, ProjectionMode, ProjectionTarget, RankPolicy, RefreshPolicy,
    SpfConfig, StatsPolicy, SubspaceConfig, VectorPolicy, project, project_without_stats,
};
use spf_subspace::rsvd::{gaussian_sketch, orthonormalize, range_finder, truncated_svd};
use spf_subspace::view::{from_2d, into_2d, view_2d};
use spf_subspace::{
    LowRankBasis, RandomizedSvd, RandomizedSvdConfig, SafetySubspace, SketchConfig,
    captured_energy, direction_overlap, principal_angles, rank_for_energy, subspace_overlap,
};
use spf_theory::test_device;

/// Any `f32`, NaN and ±Inf included, but mostly ordinary numbers.
fn value() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => -4.0f32..4.0,
        1 => proptest::num::f32::ANY,
        1 => Just(f32::NAN),
    ]
}

/// A `rows × cols` matrix of [`value`]s, dimensions `0..=5`.
fn matrix() -> impl Strategy<Value = (usize, usize, Vec<f32>)> {
    (0usize..=5, 0usize..=5).prop_flat_map(|(rows, cols)| {
        proptest::collection::vec(value(), rows * cols).prop_map(move |v| (rows, cols, v))
    })
}

fn tensor2((rows, cols, values): &(usize, usize, Vec<f32>)) -> Tensor<2> {
    Tensor::from_data(
        TensorData::new(values.clone(), [*rows, *cols]),
        &test_device(),
    )
}

fn tensor1(values: &[f32]) -> Tensor<1> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), [values.len()]),
        &test_device(),
    )
}

fn sketch() -> impl Strategy<Value = SketchConfig> {
    (
        any::<usize>(),
        prop_oneof![0usize..4, any::<usize>()],
        any::<u64>(),
    )
        .prop_map(|(oversampling, power_iterations, seed)| {
            SketchConfig::new()
                .with_oversampling(oversampling)
                .with_power_iterations(power_iterations)
                .with_seed(seed)
        })
}

fn rank_policy() -> impl Strategy<Value = RankPolicy> {
    prop_oneof![
        prop_oneof![0usize..6, any::<usize>()].prop_map(RankPolicy::Fixed),
        (any::<f64>(), prop_oneof![0usize..6, any::<usize>()]).prop_map(|(threshold, max_rank)| {
            RankPolicy::Energy {
                threshold,
                max_rank,
            }
        }),
    ]
}

fn refresh_policy() -> impl Strategy<Value = RefreshPolicy> {
    prop_oneof![
        Just(RefreshPolicy::Never),
        prop_oneof![0usize..3, any::<usize>()].prop_map(RefreshPolicy::Every),
        (any::<usize>(), any::<usize>(), any::<f64>()).prop_map(|(initial, max, overlap)| {
            RefreshPolicy::Adaptive {
                initial: initial % 4,
                max,
                overlap,
            }
        }),
    ]
}

fn filter() -> impl Strategy<Value = ParamFilter> {
    prop_oneof![
        Just(ParamFilter::All),
        Just(ParamFilter::path_regex("weight")),
        "[a-z.*()|\\[\\]\\\\+?]{0,8}".prop_map(ParamFilter::path_regex),
    ]
}

fn spf_config() -> impl Strategy<Value = SpfConfig> {
    (
        proptest::sample::select(ProjectionMode::ALL.to_vec()),
        prop_oneof![
            Just(ProjectionTarget::Gradient),
            Just(ProjectionTarget::Update)
        ],
        refresh_policy(),
        (filter(), rank_policy(), sketch(), any::<bool>()),
        prop_oneof![
            Just(NonFinitePolicy::Error),
            Just(NonFinitePolicy::SkipStep),
            Just(NonFinitePolicy::ZeroNonFinite),
            Just(NonFinitePolicy::Unchecked)
        ],
        prop_oneof![Just(StatsPolicy::EveryStep), Just(StatsPolicy::Off)],
    )
        .prop_map(
            |(mode, target, refresh, (filter, rank, sketch, vectors), non_finite, stats)| {
                let vector_policy = if vectors {
                    VectorPolicy::Pcgrad
                } else {
                    VectorPolicy::Skip
                };
                SpfConfig::new()
                    .with_mode(mode)
                    .with_target(target)
                    .with_refresh(refresh)
                    .with_non_finite(non_finite)
                    .with_stats(stats)
                    .with_estimator(
                        SubspaceConfig::new()
                            .with_filter(filter)
                            .with_rank(rank)
                            .with_sketch(sketch)
                            .with_vector_policy(vector_policy),
                    )
            },
        )
}

/// A 3 → 2 linear layer with the given weights (6 values) and bias (2 values).
fn layer(weights: &[f32], bias: &[f32]) -> Linear {
    let device = test_device().autodiff();
    Linear {
        weight: Param::from_data(TensorData::new(weights.to_vec(), [3, 2]), &device),
        bias: Some(Param::from_data(
            TensorData::new(bias.to_vec(), [2]),
            &device,
        )),
    }
}

/// The gradients of `Σ (x W + b)` at `model`, for an input row `x`.
fn grads(model: &Linear, x: &[f32]) -> GradientsParams {
    let input = Tensor::<2>::from_data(TensorData::new(x.to_vec(), [1, 3]), &test_device());
    GradientsParams::from_grads(model.forward(input).sum().backward(), model)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn basis_constructors_return_a_basis_or_an_error(
        u in matrix(),
        sigma in proptest::collection::vec(value(), 0..=5),
        v in matrix(),
        tolerance in prop_oneof![Just(1e-3), any::<f64>()],
        vector in proptest::collection::vec(value(), 0..=5),
    ) {
        let (u, s, v) = (tensor2(&u), tensor1(&sigma), tensor2(&v));
        let _ = LowRankBasis::with_tolerance(u.clone(), s.clone(), v.clone(), tolerance);
        let _ = LowRankBasis::new(u, s, v);
        let _ = LowRankBasis::from_vector(tensor1(&vector));
    }

    #[test]
    fn randomized_svd_returns_a_basis_or_an_error(
        a in matrix(),
        rank in prop_oneof![0usize..6, any::<usize>()],
        sketch in sketch(),
        rank_tolerance in proptest::option::of(any::<f64>()),
    ) {
        let config = RandomizedSvdConfig::new(rank)
            .with_sketch(sketch)
            .with_rank_tolerance(rank_tolerance);
        let _ = RandomizedSvd::new(config).compute(&tensor2(&a));
    }

    #[test]
    fn the_wrapper_inits_steps_and_refreshes_or_errs(
        config in spf_config(),
        weights in proptest::collection::vec(value(), 6),
        bias in proptest::collection::vec(value(), 2),
        x in proptest::collection::vec(value(), 3),
        lr in prop_oneof![Just(1e-2), any::<f64>()],
        basis in (matrix(), proptest::collection::vec(value(), 0..=3), matrix()),
        other in matrix(),
    ) {
        let model = layer(&weights, &bias);
        let g = grads(&model, &x);
        let _ = SafetySubspace::estimate(&model, &g, &config.estimator);
        let (u, s, v) = basis;
        let given: Vec<_> =
            LowRankBasis::new(tensor2(&u), tensor1(&s), tensor2(&v))
                .into_iter()
                .map(|b| (model.weight.id, b))
                .collect();
        let Ok(optim) = config.init(SgdConfig::new().init(), &model, given) else {
            return Ok(());
        };
        let source = move |m: &Linear| {
            let input = Tensor::<2>::ones([1, 3], &test_device());
            m.forward(input).sum()
        };
        let mut optim = optim.with_safety_source(source);
        let mut model = model;
        for _ in 0..2 {
            let g = grads(&model, &x);
            let _ = optim.measure(&model, grads(&model, &x));
            let _ = SampleScreen::score(&optim, &model, grads(&model, &x));
            model = match optim.try_step(lr, model, g) {
                Ok(model) => model,
                Err(refused) => refused.module,
            };
        }
        // A gradient of any shape for the weight: measured, screened and stepped on.
        let misshaped = || {
            let mut g = grads(&model, &x);
            let _: Option<Tensor<2>> = g.remove(model.weight.id);
            g.register(model.weight.id, tensor2(&other));
            g
        };
        let _ = optim.measure(&model, misshaped());
        let _ = SampleScreen::score(&optim, &model, misshaped());
        let _ = optim.try_step(lr, model.clone(), misshaped());
    }

    #[test]
    fn project_returns_a_projection_or_an_error(
        grad in matrix(),
        basis in (matrix(), proptest::collection::vec(value(), 0..=3), matrix()),
        mode in proptest::sample::select(ProjectionMode::ALL.to_vec()),
    ) {
        let (u, s, v) = basis;
        if let Ok(basis) = LowRankBasis::with_tolerance(
            tensor2(&u),
            tensor1(&s),
            tensor2(&v),
            f64::MAX,
        ) {
            let _ = project(tensor2(&grad), &basis, mode);
            let _ = project_without_stats(tensor2(&grad), &basis, mode);
            let _ = direction_overlap(&basis, &basis);
        }
    }

    #[test]
    fn the_randomized_svd_steps_return_a_matrix_or_an_error(
        a in matrix(),
        q in matrix(),
        l in prop_oneof![0usize..6, any::<usize>()],
        k in prop_oneof![0usize..6, any::<usize>()],
        power_iterations in 0usize..3,
        seed in any::<u64>(),
        tolerance in any::<f64>(),
        rows in prop_oneof![0usize..6, (usize::MAX / 2)..=usize::MAX],
        cols in 0usize..6,
    ) {
        let a = tensor2(&a);
        let l = l.min(8);
        let _ = gaussian_sketch(rows, cols, seed, &test_device());
        let _ = range_finder(&a, l, power_iterations, seed);
        let _ = orthonormalize(tensor2(&q));
        let _ = truncated_svd(&a, tensor2(&q), k, tolerance);
    }

    #[test]
    fn the_2d_view_returns_a_tensor_or_an_error(
        m in matrix(),
        dims in proptest::collection::vec(0usize..6, 3),
    ) {
        let t = tensor2(&m);
        let _ = view_2d(&dims);
        let flat = into_2d(t.clone());
        let _ = from_2d(flat.clone(), [dims[0], dims[1], dims[2]]);
        let _ = from_2d(flat.clone(), [dims[0], dims[1]]);
        let _ = from_2d(flat, [dims[0]]);
    }

    #[test]
    fn diagnostics_return_a_number_or_an_error(
        sigma in proptest::collection::vec(any::<f64>(), 0..=6),
        total in any::<f64>(),
        threshold in any::<f64>(),
        max_rank in any::<usize>(),
        u1 in matrix(),
        u2 in matrix(),
    ) {
        let _ = rank_for_energy(&sigma, total, threshold, max_rank);
        let _ = captured_energy(&sigma, total);
        let _ = principal_angles(&tensor2(&u1), &tensor2(&u2));
        let _ = subspace_overlap(&tensor2(&u1), &tensor2(&u2));
        let _ = SampleScreen::new(threshold);
    }

    /// The self-set screen takes any `k` and any scores: an error for a `k` out of range, and
    /// otherwise a threshold in `[0, 1]` (or 1 before a finite score), whatever it was fed.
    #[test]
    fn the_self_set_screen_judges_any_scores(
        sigmas in any::<f64>(),
        batches in proptest::collection::vec(proptest::collection::vec(any::<f64>(), 0..=9), 0..=4),
    ) {
        let Ok(mut screen) = SampleScreen::with_threshold(ScreenThreshold::Outlier { sigmas })
        else {
            prop_assert!(!(sigmas.is_finite() && sigmas >= 0.0));
            return Ok(());
        };
        for scores in &batches {
            let threshold = screen.judge(scores).unwrap();
            prop_assert!((0.0..=1.0).contains(&threshold), "{threshold}");
            for &score in scores {
                let _ = screen.keeps(score);
            }
        }
    }

    /// The calibrated screen takes any `α` and any calibration and batch scores: an error for
    /// an `α` out of range or a batch judged before any finite calibration score, and
    /// otherwise a threshold in `[0, 1]`.
    #[test]
    fn the_calibrated_screen_judges_any_scores(
        drop_share in any::<f64>(),
        rounds in proptest::collection::vec(
            (proptest::collection::vec(any::<f64>(), 0..=6), proptest::collection::vec(any::<f64>(), 0..=6)),
            0..=4,
        ),
    ) {
        let rule = ScreenThreshold::Calibrated { drop_share };
        let Ok(mut screen) = SampleScreen::with_threshold(rule) else {
            prop_assert!(!(drop_share > 0.0 && drop_share < 1.0));
            return Ok(());
        };
        for (calibration, scores) in &rounds {
            screen.calibrate(calibration);
            match screen.judge(scores) {
                Ok(threshold) => prop_assert!((0.0..=1.0).contains(&threshold), "{threshold}"),
                Err(e) => {
                    prop_assert!(matches!(e, spf_core::SpfError::ScreenNotCalibrated), "{e}");
                    prop_assert_eq!(screen.calibration_len(), 0);
                }
            }
        }
    }
}
