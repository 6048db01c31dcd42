//! Latency statistics: quantiles of what requests saw, and the histogram the
//! closed loop records into.

use std::time::Duration;

use hdrhistogram::Histogram;

use super::client::CallResult;

/// Latencies, sorted, for reading quantiles.
pub struct Latencies(Vec<Duration>);

impl Latencies {
    pub fn new(latencies: impl IntoIterator<Item = Duration>) -> Latencies {
        let mut v: Vec<Duration> = latencies.into_iter().collect();
        v.sort();
        Latencies(v)
    }

    /// The latencies, fastest first.
    pub fn iter(&self) -> impl Iterator<Item = Duration> + '_ {
        self.0.iter().copied()
    }

    /// How many latencies there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `q` quantile (0.5 is the median, 1.0 the maximum): the nearest
    /// rank, no interpolation; zero when there are none.
    pub fn at(&self, q: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        self.0[((self.0.len() - 1) as f64 * q).round() as usize]
    }

    /// p50, p99 and the maximum.
    pub fn p50_p99_max(&self) -> (Duration, Duration, Duration) {
        (self.at(0.5), self.at(0.99), self.at(1.0))
    }
}

/// The `q` quantile of latencies.
pub fn quantile(results: &[CallResult], q: f64) -> Duration {
    Latencies::new(results.iter().map(|r| r.latency)).at(q)
}

/// p50, p99 and the maximum latency of `results`.
pub fn q3(results: &[&CallResult]) -> (Duration, Duration, Duration) {
    Latencies::new(results.iter().map(|r| r.latency)).p50_p99_max()
}

/// An empty histogram of latencies in µs, from 1 µs to a minute, three
/// significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static bounds")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank_and_zero_when_empty() {
        let ms = Duration::from_millis;
        let l = Latencies::new([ms(4), ms(1), ms(3), ms(2), ms(5)]);
        assert_eq!(l.p50_p99_max(), (ms(3), ms(5), ms(5)));
        assert_eq!(l.at(0.0), ms(1));
        assert_eq!(Latencies::new([]).p50_p99_max(), Default::default());
    }
}
