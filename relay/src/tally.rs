//! Relayed calls' outcomes, counted per replica in the shapes Python's metrics keep
//! (kubeforge/metrics.py): calls, errors, the latency sum, the sliding window's log-scale
//! histogram and the Prometheus duration buckets. Python folds one tally per replica into its
//! windows each time it drains, instead of one sample per call: at tens of thousands of calls a
//! second, folding samples one by one took milliseconds of Python every tenth of a second, on
//! the same two cores the relay and the replicas run on.
//!
//! The scale (sub-buckets per power of two, the duration buckets' bounds) comes from Python,
//! and the bucket arithmetic is the very float arithmetic metrics.py does, so a tally folds into
//! the same windows its samples would have (tests/unit/test_relay_tally.py checks it).

use std::collections::BTreeMap;

/// How Python buckets latencies: `sub` histogram buckets per power of two of microseconds, and
/// the Prometheus duration buckets' upper bounds in seconds.
pub struct Scale {
    pub sub: u32,
    pub bounds: Vec<f64>,
}

impl From<(u32, Vec<f64>)> for Scale {
    /// As Python passes it: `metrics.SCALE`.
    fn from((sub, bounds): (u32, Vec<f64>)) -> Self {
        Scale { sub, bounds }
    }
}

/// One replica's relayed calls since the last drain.
#[derive(Debug, Default, PartialEq)]
pub struct Tally {
    pub count: u64,
    pub errors: u64,
    pub latency_sum: f64,
    /// Log-scale bucket -> calls (metrics.py `_bucket_of`).
    pub hist: BTreeMap<i64, u64>,
    /// Calls per duration bucket, the last for those above every bound (`Histogram.observe`).
    pub durations: Vec<u64>,
}

impl Tally {
    pub fn add(&mut self, scale: &Scale, seconds: f64, ok: bool) {
        self.count += 1;
        if !ok {
            self.errors += 1;
        }
        self.latency_sum += seconds;
        *self.hist.entry(bucket_of(seconds, scale.sub)).or_insert(0) += 1;
        if self.durations.is_empty() {
            self.durations = vec![0; scale.bounds.len() + 1];
        }
        // Python's bisect_left: the bounds below `seconds`.
        self.durations[scale.bounds.partition_point(|b| *b < seconds)] += 1;
    }
}

/// metrics.py `_bucket_of`: `frexp` of the microseconds, then the mantissa's sub-bucket.
pub fn bucket_of(seconds: f64, sub: u32) -> i64 {
    let micros = seconds * 1e6;
    if micros.is_nan() || micros < 1.0 || micros.is_infinite() {
        return 0; // below a microsecond (or not a number: never measured, never fatal)
    }
    let (mantissa, exponent) = frexp(micros);
    i64::from(exponent) * i64::from(sub) + ((mantissa - 0.5) * 2.0 * f64::from(sub)) as i64
}

/// C's frexp for a finite x >= 1 (always a normal number): x = mantissa * 2**exponent with
/// mantissa in [0.5, 1), exactly.
fn frexp(x: f64) -> (f64, i32) {
    const EXPONENT: u64 = 0x7ff << 52;
    let bits = x.to_bits();
    let exponent = ((bits & EXPONENT) >> 52) as i32 - 1022;
    (f64::from_bits((bits & !EXPONENT) | (1022 << 52)), exponent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_frexp() {
        // 1 µs = 0.5 * 2**1: bucket 8; 3 µs = 0.75 * 2**2: 16 + 4; 1 ms = 0.9765625 * 2**10.
        assert_eq!(bucket_of(1e-6, 8), 8);
        assert_eq!(bucket_of(3e-6, 8), 20);
        assert_eq!(bucket_of(1e-3, 8), 87);
        assert_eq!(bucket_of(0.0, 8), 0);
        assert_eq!(bucket_of(f64::NAN, 8), 0);
        assert_eq!(frexp(1.0), (0.5, 1));
        assert_eq!(frexp(1000.0), (0.9765625, 10));
    }

    #[test]
    fn a_tally_counts_errors_sums_and_buckets() {
        let scale = Scale {
            sub: 8,
            bounds: vec![0.001, 0.01],
        };
        let mut tally = Tally::default();
        for (seconds, ok) in [(0.0005, true), (0.001, true), (0.005, false), (1.0, true)] {
            tally.add(&scale, seconds, ok);
        }
        assert_eq!((tally.count, tally.errors), (4, 1));
        assert!((tally.latency_sum - 1.0065).abs() < 1e-12);
        // At a bound counts as in it (le), as bisect_left has it.
        assert_eq!(tally.durations, vec![2, 1, 1]);
        assert_eq!(tally.hist.values().sum::<u64>(), 4);
    }
}
