//! Records: round trips, a record loaded into a wrapper for a fresh copy of the model, bases
//! that do not fit, and bases loaded onto another device.

use super::*;
use crate::RECORD_VERSION;
use burn::tensor::TensorData;
use spf_subspace::SubspaceError;

/// A saved factor times two: no longer orthonormal.
fn doubled(factor: &TensorData) -> TensorData {
    let t = Tensor::<2>::from_data(factor.clone(), &test_device());
    t.mul_scalar(2.0).into_data()
}

#[test]
fn record_round_trip_continues_identically() {
    let device = test_device();
    let model = Net::new(&device);
    let cfg = config(ProjectionMode::ConflictOnly).with_target(ProjectionTarget::Update);
    let mut optim = cfg
        .init(AdamWConfig::new().init(), &model, bases(&model))
        .unwrap();
    let model = train(&mut optim, model, 0..2);

    let record = round_trip(optim.to_record());
    let mut restored = cfg
        .init(AdamWConfig::new().init(), &model, [])
        .unwrap()
        .load_record(record);
    assert_eq!(restored.steps(), 2);
    assert_eq!(restored.bases().len(), 3);

    let a = optim.step(1e-2, model.clone(), grads(&model, 2));
    let b = restored.step(1e-2, model.clone(), grads(&model, 2));
    assert_same(&a, &b, "after the round trip");
}

/// burn-train resumes by building the model and the wrapper afresh (new parameter ids) and then
/// loading both records: the wrapper adopts the saved ids, the module takes them on, and training
/// continues exactly. Stepping a module that never loaded its record is refused.
#[test]
fn a_record_loads_into_a_wrapper_built_for_a_fresh_copy_of_the_model() {
    let device = test_device();
    let cfg = config(ProjectionMode::ConflictOnly).with_refresh(crate::RefreshPolicy::Never);
    let model = Net::new(&device);
    let mut optim = cfg
        .init(AdamWConfig::new().init(), &model, bases(&model))
        .unwrap();
    let model = train(&mut optim, model, 0..2);

    let optim_record = round_trip(optim.to_record());
    let model_record = round_trip(model.clone().into_record());

    let fresh = Net::new(&device);
    assert_ne!(fresh.attn.weight.id, model.attn.weight.id, "new ids");
    let mut restored = cfg
        .init(AdamWConfig::new().init(), &fresh, [])
        .unwrap()
        .try_load_record(optim_record)
        .unwrap();
    assert_eq!(restored.bases().len(), 3);

    let refused = restored
        .try_step(1e-2, fresh.clone(), grads(&fresh, 2))
        .unwrap_err();
    assert_eq!(refused.error, SpfError::ModuleMismatch);

    let resumed = fresh.load_record(model_record);
    assert_eq!(resumed.attn.weight.id, model.attn.weight.id);
    let a = optim.step(1e-2, model.clone(), grads(&model, 2));
    let b = restored.step(1e-2, resumed.clone(), grads(&resumed, 2));
    assert!(optim.last_stats().removed() > 0);
    assert_eq!(optim.last_stats(), restored.last_stats());
    assert_same(&a, &b, "after resuming into a fresh copy");
}

#[test]
fn init_rejects_bases_that_do_not_fit() {
    let device = test_device();
    let model = Net::new(&device);
    let basis = |d_in, d_out| Gaussian::new(0).basis(d_in, d_out, 1).to_device(&device);
    let init = |bases: Vec<(ParamId, LowRankBasis)>| {
        config(ProjectionMode::ConflictOnly)
            .init(SgdConfig::new().init(), &model, bases)
            .map(|_| ())
    };

    let stranger = ParamId::new();
    assert_eq!(
        init(vec![(stranger, basis(4, 6))]),
        Err(SpfError::UnknownParam { id: stranger })
    );
    assert_eq!(
        init(vec![(model.head.weight.id, basis(5, 3))]),
        Err(SpfError::UntargetedParam {
            path: "head.weight".into()
        })
    );
    assert_eq!(
        init(vec![(model.attn.bias.as_ref().unwrap().id, basis(6, 1))]),
        Err(SpfError::UntargetedParam {
            path: "attn.bias".into()
        })
    );
    assert_eq!(
        init(vec![(model.attn.weight.id, basis(6, 4))]),
        Err(SpfError::ShapeMismatch {
            path: Some("attn.weight".into()),
            expected: vec![4, 6],
            found: vec![6, 4],
        })
    );
    let bad_regex = SpfConfig::new()
        .with_estimator(SubspaceConfig::new().with_filter(ParamFilter::path_regex("(")))
        .init(SgdConfig::new().init(), &model, []);
    assert!(matches!(
        bad_regex,
        Err(SpfError::Subspace(SubspaceError::InvalidFilter { .. }))
    ));
}

#[test]
fn bases_are_truncated_to_the_configured_rank() {
    let device = test_device();
    let model = Net::new(&device);
    let optim = config(ProjectionMode::ConflictOnly)
        .with_estimator(estimator().with_rank(RankPolicy::Fixed(1)))
        .init(SgdConfig::new().init(), &model, bases(&model))
        .unwrap();
    assert!(optim.bases().values().all(|b| b.rank() == 1));
}

#[test]
fn load_record_rejects_records_that_do_not_fit() {
    let device = test_device();
    let model = Net::new(&device);
    let cfg = config(ProjectionMode::ConflictOnly);
    let optim = cfg
        .init(SgdConfig::new().init(), &model, bases(&model))
        .unwrap();
    let fresh = || cfg.init(SgdConfig::new().init(), &model, []).unwrap();

    let mut record = optim.to_record();
    record.version = RECORD_VERSION + 1;
    assert_eq!(
        fresh().try_load_record(record).err().map(|e| e.error),
        Some(SpfError::UnsupportedRecordVersion {
            found: RECORD_VERSION + 1,
            supported: RECORD_VERSION
        })
    );

    // A record saved for another architecture: a parameter path it does not have, or one
    // parameter fewer.
    let mut renamed = optim.to_record();
    renamed.params[0].path = "elsewhere.weight".into();
    assert!(matches!(
        fresh().try_load_record(renamed).map_err(|e| e.error),
        Err(SpfError::RecordMismatch { .. })
    ));
    let mut fewer = optim.to_record();
    fewer.params.pop();
    assert!(matches!(
        fresh().try_load_record(fewer).map_err(|e| e.error),
        Err(SpfError::RecordMismatch { .. })
    ));

    // The right id with factors of another shape.
    let mut record = optim.to_record();
    let wrong = Gaussian::new(2).basis(5, 4, 1).to_device(&device);
    let (u, sigma, v) = wrong.into_parts();
    record.bases[0].u = u.into_data();
    record.bases[0].sigma = sigma.into_data();
    record.bases[0].v = v.into_data();
    assert!(matches!(
        fresh().try_load_record(record).map_err(|e| e.error),
        Err(SpfError::ShapeMismatch { .. })
    ));

    // Factors that are not a basis at all.
    let mut record = optim.to_record();
    record.bases[0].u = doubled(&record.bases[0].u);
    assert!(matches!(
        fresh().try_load_record(record).map_err(|e| e.error),
        Err(SpfError::InvalidBasis { .. })
    ));
}

/// A refused record hands the wrapper back as it was: its bases, its step counter and its inner
/// optimizer's state (before, `try_load_record` consumed the wrapper and lost all three).
#[test]
fn a_refused_record_hands_the_optimizer_back_unchanged() {
    let device = test_device();
    let model = Net::new(&device);
    let mut optim = config(ProjectionMode::ConflictOnly)
        .init(AdamWConfig::new().init(), &model, bases(&model))
        .unwrap();
    let trained = train(&mut optim, model.clone(), 0..3);
    let mut twin = optim.clone();

    let mut record = optim.to_record();
    record.bases[0].u = doubled(&record.bases[0].u);
    let refused = optim.try_load_record(record).err().unwrap();
    assert!(matches!(refused.error, SpfError::InvalidBasis { .. }));
    let mut back = *refused.optimizer;
    assert_eq!(back.steps(), 3);
    assert_eq!(back.bases().len(), 3);
    // The inner AdamW's moments are intact: the next steps match the twin's bit for bit.
    let a = train(&mut back, trained.clone(), 3..5);
    let b = train(&mut twin, trained, 3..5);
    assert_same(&a, &b, "after a refused load");
}

/// A record's bases are loaded onto burn's default device (WGPU, with `test-wgpu`) while the
/// parameters live on another (the CPU): the step is the same as with the bases in place, and
/// afterwards every basis lives on its parameter's device. With the CPU alone nothing could be
/// apart, so this runs with the `test-wgpu` feature only.
#[cfg(feature = "test-wgpu")]
#[test]
fn bases_loaded_onto_another_device_move_to_their_parameters() {
    if !on_gpu("bases_loaded_onto_another_device_move_to_their_parameters") {
        return;
    }
    let here = Device::flex();
    assert_ne!(
        here,
        Device::default(),
        "the record loads onto another device"
    );
    let model = Net::new(&here);
    let cfg = config(ProjectionMode::ConflictOnly);
    let place = |bases: Vec<(ParamId, LowRankBasis)>| {
        let place = |(id, basis): (ParamId, LowRankBasis)| (id, basis.to_device(&here));
        bases.into_iter().map(place).collect::<Vec<_>>()
    };
    let mut optim = cfg
        .init(SgdConfig::new().build(), &model, place(bases(&model)))
        .unwrap();
    let model = train(&mut optim, model, 0..2);

    let mut restored = cfg
        .init(SgdConfig::new().build(), &model, [])
        .unwrap()
        .load_record(round_trip(optim.to_record()));
    assert!(
        restored
            .bases()
            .values()
            .all(|b| b.device() == Device::default())
    );

    let a = optim.step(1e-2, model.clone(), grads(&model, 2));
    let b = restored.step(1e-2, model.clone(), grads(&model, 2));
    assert!(restored.bases().values().all(|b| b.device() == here));
    assert_close(&a, &b, 1e-6);
}
