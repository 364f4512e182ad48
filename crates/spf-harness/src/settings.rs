//! The checks both experiments' configurations make before anything runs: a grid that names at
//! least one seed, method and share; shares in `[0, 1]`; counts of at least one; usable
//! learning rates. Each check names the setting it refuses ([`InvalidSetting`]), and each
//! experiment's error type wraps it as its configuration error.

/// A setting an experiment cannot run with, in words that name it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidSetting(pub String);

/// The grid over seeds, methods and harmful shares: at least one of each, every share a
/// probability.
///
/// # Errors
///
/// [`InvalidSetting`] naming the empty list or the share outside `[0, 1]`.
pub fn grid(seeds: usize, methods: usize, shares: &[f64]) -> Result<(), InvalidSetting> {
    if seeds == 0 || methods == 0 || shares.is_empty() {
        return Err(InvalidSetting(
            "seeds, methods and harmful shares must each name at least one".into(),
        ));
    }
    shares.iter().try_for_each(|&p| share("harmful share", p))
}

/// A share of a set, `name = value`, in `[0, 1]`.
///
/// # Errors
///
/// [`InvalidSetting`] for a value outside `[0, 1]` (NaN included).
pub fn share(name: &str, value: f64) -> Result<(), InvalidSetting> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(InvalidSetting(format!(
            "{name} must be in [0, 1], not {value}"
        )))
    }
}

/// Counts that must each be at least 1, as `(name, value)` pairs.
///
/// # Errors
///
/// [`InvalidSetting`] naming the first that is 0.
pub fn at_least_one(counts: &[(&str, usize)]) -> Result<(), InvalidSetting> {
    match counts.iter().find(|(_, value)| *value == 0) {
        Some((name, _)) => Err(InvalidSetting(format!("{name} must be at least 1"))),
        None => Ok(()),
    }
}

/// A learning rate, `name = lr`: finite and non-negative.
///
/// # Errors
///
/// [`InvalidSetting`] for a NaN, infinite or negative rate.
pub fn learning_rate(name: &str, lr: f64) -> Result<(), InvalidSetting> {
    if lr.is_finite() && lr >= 0.0 {
        Ok(())
    } else {
        Err(InvalidSetting(format!(
            "{name} must be finite and non-negative, not {lr}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_check_refuses_what_it_names_and_passes_the_rest() {
        assert!(grid(1, 1, &[0.0, 1.0]).is_ok());
        assert!(grid(0, 1, &[0.1]).is_err());
        assert!(grid(1, 0, &[0.1]).is_err());
        assert!(grid(1, 1, &[]).is_err());
        let err = grid(1, 1, &[0.1, 1.5]).unwrap_err();
        assert!(err.0.contains("1.5"), "{err}");
        assert!(share("s", f64::NAN).is_err() && share("s", -0.0).is_ok());
        let err = at_least_one(&[("a", 1), ("b", 0), ("c", 0)]).unwrap_err();
        assert_eq!(err.0, "b must be at least 1");
        assert!(at_least_one(&[("a", 3)]).is_ok());
        for lr in [f64::NAN, f64::INFINITY, -1e-9] {
            assert!(learning_rate("lr", lr).is_err(), "{lr}");
        }
        assert!(learning_rate("lr", 0.0).is_ok());
    }
}
