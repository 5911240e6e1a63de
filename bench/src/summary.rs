//! How repeated measurements become one figure, the same in every section.

/// The median of the finite values (the mean of the middle two for an even
/// count); NaN when there are none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

/// Fraction of slots whose value differs between two tables of one size.
pub fn changed_fraction(a: &[u32], b: &[u32]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

/// The smallest and largest of the finite values; NaN for both when there
/// are none.
pub fn range(xs: &[f64]) -> (f64, f64) {
    let finite = || xs.iter().copied().filter(|x| x.is_finite());
    match (finite().reduce(f64::min), finite().reduce(f64::max)) {
        (Some(lo), Some(hi)) => (lo, hi),
        _ => (f64::NAN, f64::NAN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(vec![f64::NAN, 5.0]), 5.0);
        assert!(median(vec![]).is_nan());
    }

    #[test]
    fn ranges() {
        assert_eq!(range(&[3.0, f64::NAN, 1.0, 2.0]), (1.0, 3.0));
        assert!(range(&[]).0.is_nan());
    }

    #[test]
    fn changed_fractions() {
        assert_eq!(changed_fraction(&[1, 2, 3, 4], &[1, 2, 4, 3]), 0.5);
    }
}
