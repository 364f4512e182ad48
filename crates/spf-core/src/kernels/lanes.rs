//! Sums over a contiguous slice in eight lanes, which the compiler vectorises: the CPU kernels'
//! one-read reductions.

/// `Σ x²` over `values`, summed in eight lanes, which the compiler vectorises.
pub(super) fn sum_of_squares<E>(values: &[E]) -> E
where
    E: Copy + Default + std::ops::Add<Output = E> + std::ops::Mul<Output = E>,
{
    lane_sum(values, |x| x * x)
}

/// `Σ f(x)` over `values`, summed in eight lanes, which the compiler vectorises.
pub(super) fn lane_sum<E>(values: &[E], f: impl Fn(E) -> E) -> E
where
    E: Copy + Default + std::ops::Add<Output = E>,
{
    let mut lanes = [E::default(); 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, &x) in lanes.iter_mut().zip(chunk) {
            *lane = *lane + f(x);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(E::default(), |s, &x| s + f(x));
    lanes.iter().fold(tail, |s, &lane| s + lane)
}
