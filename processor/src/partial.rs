//! Partial aggregates: what a stage-1 worker knows of one window.
//!
//! A stage-1 pipeline sees only the partitions its worker owns. For every
//! window it emits a [`Partial`]: the worker's whole contribution so far
//! (never a delta), as rows of additive integers keyed by the point's tag
//! values, plus an optional distinct-user sketch. The combiner keeps the
//! newest partial of each worker per window and merges them once every
//! worker's watermark has passed the window's end.
//!
//! Every merge is exact and order-independent (integer sums, HyperLogLog
//! register maxima), which is what makes the result the same bit for bit
//! whatever the number of workers and the partition-to-worker assignment.
//! Money is therefore carried in integer micro-units ([`to_micros`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::hll::Hll;

/// Identifies one window of one pipeline. Ordered by end first, so windows
/// close in the order a combiner walks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WindowId {
    /// End of the window (exclusive), epoch milliseconds.
    pub end: i64,
    /// Index of the pipeline in the running set.
    pub pipeline: u8,
    /// Which of the pipeline's window families (a tier, a trending size...).
    pub kind: u8,
    /// Start of the window, epoch milliseconds (the points' time).
    pub start: i64,
}

/// The tag values of one group, in the order the pipeline defines. Shared,
/// so the many rows of one group (one per window) and the combiner's merges
/// copy a pointer rather than the strings.
pub type RowKey = Arc<[Arc<str>]>;

/// A row's additive values. Inline (no pipeline has more than six), so
/// emitting, merging and dropping rows does not allocate per row.
pub type Values = SmallVec<[i64; 6]>;

/// Builds a row key from tag values.
pub fn row_key<const N: usize>(values: [&str; N]) -> RowKey {
    values.iter().map(|v| Arc::<str>::from(*v)).collect()
}

/// A worker's contribution to one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Partial {
    pub window: WindowId,
    /// Groups and their additive values, sorted by key.
    pub rows: Vec<(RowKey, Values)>,
    /// Distinct users of the window, when the pipeline counts them.
    pub users: Option<Hll>,
}

impl Partial {
    /// A partial with rows in any order (they are sorted here).
    pub fn new(window: WindowId, mut rows: Vec<(RowKey, Values)>, users: Option<Hll>) -> Self {
        rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Partial {
            window,
            rows,
            users,
        }
    }

    /// Merges partials of the same window into one. Rows are sorted by key
    /// in every partial, so this is a linear merge of sorted runs.
    pub fn merge<'a>(window: WindowId, parts: impl IntoIterator<Item = &'a Partial>) -> Partial {
        let mut rows: Vec<(RowKey, Values)> = Vec::new();
        let mut users: Option<Hll> = None;
        for p in parts {
            rows = if rows.is_empty() {
                p.rows.clone()
            } else {
                merge_sorted(rows, &p.rows)
            };
            if let Some(h) = &p.users {
                match &mut users {
                    Some(u) => u.merge(h),
                    None => users = Some(h.clone()),
                }
            }
        }
        Partial {
            window,
            rows,
            users,
        }
    }
}

/// Adds `values` into `sum` element-wise (growing `sum` when shorter).
fn add_into(sum: &mut Values, values: &[i64]) {
    if sum.len() < values.len() {
        sum.resize(values.len(), 0);
    }
    for (s, v) in sum.iter_mut().zip(values) {
        *s = s.wrapping_add(*v);
    }
}

/// Merges two row lists sorted by key, summing rows with equal keys.
fn merge_sorted(a: Vec<(RowKey, Values)>, b: &[(RowKey, Values)]) -> Vec<(RowKey, Values)> {
    let mut out = Vec::with_capacity(a.len().max(b.len()));
    let mut b = b.iter().peekable();
    for (key, mut values) in a {
        while let Some((bk, bv)) = b.next_if(|(bk, _)| *bk < key) {
            out.push((bk.clone(), bv.clone()));
        }
        if let Some((_, bv)) = b.next_if(|(bk, _)| *bk == key) {
            add_into(&mut values, bv);
        }
        out.push((key, values));
    }
    out.extend(b.map(|(k, v)| (k.clone(), v.clone())));
    out
}

/// Micro-units of a money amount (rounded), so sums are exact and associative.
pub fn to_micros(amount: f64) -> i64 {
    if amount.is_finite() {
        (amount * 1_000_000.0).round() as i64
    } else {
        0
    }
}

/// The amount of `micros` micro-units.
pub fn from_micros(micros: i64) -> f64 {
    micros as f64 / 1_000_000.0
}

#[cfg(test)]
mod tests {
    use smallvec::smallvec;

    use super::*;

    fn id() -> WindowId {
        WindowId {
            end: 60_000,
            pipeline: 0,
            kind: 0,
            start: 0,
        }
    }

    #[test]
    fn merge_sums_rows_and_unions_users() {
        let mut h1 = Hll::new();
        h1.insert(Hll::hash_user("a"));
        let mut h2 = Hll::new();
        h2.insert(Hll::hash_user("b"));
        h2.insert(Hll::hash_user("a"));
        let a = Partial::new(
            id(),
            vec![
                (row_key(["x"]), smallvec![1, 2]),
                (row_key(["w"]), smallvec![5]),
            ],
            Some(h1),
        );
        let b = Partial::new(id(), vec![(row_key(["x"]), smallvec![10, 20])], Some(h2));
        let m = Partial::merge(id(), [&a, &b]);
        assert_eq!(
            m.rows,
            vec![
                (row_key(["w"]), smallvec![5]),
                (row_key(["x"]), smallvec![11, 22])
            ]
        );
        assert_eq!(m.users.map(|u| u.estimate()), Some(2));
        assert_eq!(
            Partial::merge(id(), [&b, &a]),
            Partial::merge(id(), [&a, &b])
        );
    }

    #[test]
    fn micros_round_trip_and_are_exact() {
        assert_eq!(to_micros(0.1) + to_micros(0.2), to_micros(0.3));
        assert_eq!(from_micros(to_micros(12.345678)), 12.345678);
        assert_eq!(to_micros(f64::NAN), 0);
    }
}
