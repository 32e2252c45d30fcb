//! Choosing one quantizer per matrix under an average-bits budget: a multiple-choice knapsack
//! solved by dynamic programming over the budget (LQ-LoRA used an integer program).

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::{BaseQuantizer, CalibError, CalibratedConfig, Objective, calibrated};
use crate::dense::{Dense, DeviceOps};
use crate::loftq::{LoftqConfig, LoftqError};
use crate::quant::{PackedTensor, QuantConfig, Quantizer};
use crate::run::loftq;

/// One way to store one matrix.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Storage of the matrix in bits (codes and scales).
    pub bits: u64,
    /// The error this choice leaves; the allocation minimises the sum.
    pub error: f64,
}

/// The result of [`allocate`].
#[derive(Clone, Debug, PartialEq)]
pub struct Allocation {
    /// The index of the choice taken for each matrix.
    pub choice: Vec<usize>,
    /// Total bits of the choices taken.
    pub bits: u64,
    /// Sum of their errors.
    pub error: f64,
}

/// Budget steps of the dynamic program; above this the costs are rounded up to coarser steps.
const MAX_STEPS: u64 = 250_000;

/// Takes one [`Choice`] per matrix so that the total bits stay within `budget_bits` and the
/// summed error is smallest.
///
/// # Algorithm
/// Each matrix's cheapest choice is taken as given; the extra cost of the others is counted,
/// up to the budget or to every matrix's dearest choice if that is less, in steps of the
/// greatest common divisor of all extra costs (exact), or, when that would need more than
/// 250,000 steps, in coarser steps with every cost rounded up (the budget still
/// holds; the optimum is then that of slightly dearer choices). A table over the steps keeps,
/// matrix by matrix, the least error for each amount spent: `O(matrices · steps · choices)`.
///
/// # Errors
/// [`CalibError::Budget`] if even the cheapest choices exceed the budget, or a matrix has no
/// choice.
pub fn allocate(options: &[Vec<Choice>], budget_bits: u64) -> Result<Allocation, CalibError> {
    let mut base = 0u64;
    for (i, o) in options.iter().enumerate() {
        let min = o.iter().map(|c| c.bits).min().ok_or_else(|| {
            CalibError::Budget(format!("matrix {i} has no quantizer to choose from"))
        })?;
        base += min;
    }
    if base > budget_bits {
        return Err(CalibError::Budget(format!(
            "the cheapest quantizers need {base} bits, the budget is {budget_bits}"
        )));
    }
    let left = budget_bits - base;
    let extra: Vec<Vec<u64>> = options
        .iter()
        .map(|o| {
            let min = o.iter().map(|c| c.bits).min().unwrap_or(0);
            o.iter().map(|c| c.bits - min).collect()
        })
        .collect();
    // No more than every dearest choice can be spent: a budget above that (or candidates of
    // one size, where nothing can be) must not size the table (one such run took 6 GiB).
    let most: u64 = extra.iter().map(|e| e.iter().max().unwrap_or(&0)).sum();
    let room = left.min(most);
    let g = extra.iter().flatten().fold(0u64, |g, &c| gcd(g, c));
    let unit = if g == 0 {
        1
    } else if room / g <= MAX_STEPS {
        g
    } else {
        room.div_ceil(MAX_STEPS)
    };
    let steps = (room / unit) as usize;
    let cost: Vec<Vec<usize>> = extra
        .iter()
        .map(|e| e.iter().map(|&c| c.div_ceil(unit) as usize).collect())
        .collect();

    // best[s]: least error of the matrices so far spending at most s steps.
    let mut best = vec![0f64; steps + 1];
    let mut taken: Vec<Vec<u16>> = Vec::with_capacity(options.len());
    for (o, c) in options.iter().zip(&cost) {
        let mut next = vec![f64::INFINITY; steps + 1];
        let mut pick = vec![0u16; steps + 1];
        for s in 0..=steps {
            for (j, (choice, &cj)) in o.iter().zip(c).enumerate() {
                if cj <= s {
                    let e = best[s - cj] + choice.error;
                    if e < next[s] {
                        next[s] = e;
                        pick[s] = j as u16;
                    }
                }
            }
        }
        best = next;
        taken.push(pick);
    }
    let mut choice = vec![0usize; options.len()];
    let mut s = steps;
    for i in (0..options.len()).rev() {
        let j = usize::from(taken[i][s]);
        choice[i] = j;
        s -= cost[i][j];
    }
    let bits = choice.iter().zip(options).map(|(&j, o)| o[j].bits).sum();
    let error = choice.iter().zip(options).map(|(&j, o)| o[j].error).sum();
    Ok(Allocation {
        choice,
        bits,
        error,
    })
}

/// What storing `w` `[out, in]` with each of `candidates` costs and leaves, for [`allocate`].
///
/// With `fit`, each candidate runs that LoftQ configuration with its quantizer (calibrated
/// for the `objective` when given, round to nearest); without, the base alone is scored
/// (QLoRA's start). The score is the absolute squared error, `‖W − W'‖²_F`, or with an
/// objective `‖D^{1/2}·(W − W')·S‖²_F` (the output error on the calibration inputs, each
/// row weighted when `D` is given: the weights' scale counts here); the bits are those of
/// the packed base (codes and scales), the adapter not included.
///
/// Squared absolute errors add up over matrices, so the allocation minimises the whole
/// model's error rather than an average of ratios. One iteration (`iters = 1`: the
/// quantization of `W`, then the best adapter for it) is the cheap estimate `loftq init`
/// uses.
///
/// # Errors
/// As [`loftq`] and [`calibrated`]; [`LoftqError::Config`] if the objective does not fit `w`.
pub fn score(
    w: &Tensor<2>,
    objective: Option<Objective<'_>>,
    candidates: &[QuantConfig],
    fit: Option<&LoftqConfig>,
) -> Result<Vec<Choice>, LoftqError> {
    let ops = DeviceOps(w.device());
    if let Some(o) = &objective {
        o.check(w.dims())?;
    }
    let measure = objective.map(|o| o.measure(&ops));
    let energy = |t: &Tensor<2>| {
        let norm = match &measure {
            Some(m) => m.norm(&ops, t),
            None => ops.norm(t),
        };
        f64::from(norm).powi(2)
    };
    let reference = energy(w);
    candidates
        .iter()
        .map(|&quant| {
            let (packed, error) = match (fit, objective) {
                (Some(cfg), Some(wg)) => {
                    let cfg = CalibratedConfig {
                        loftq: LoftqConfig {
                            quant,
                            ..cfg.clone()
                        },
                        base: BaseQuantizer::Rtn,
                    };
                    let r = calibrated(w, wg, &cfg)?;
                    let e = f64::from(r.weighted_err()).powi(2) * reference;
                    (r.start.packed, e)
                }
                (Some(cfg), None) => {
                    let cfg = LoftqConfig {
                        quant,
                        ..cfg.clone()
                    };
                    let r = loftq(w, &cfg)?;
                    let e = f64::from(r.rel_err()).powi(2) * reference;
                    (r.packed, e)
                }
                (None, _) => {
                    let (codes, q) = Quantizer::new(quant)?.quantize_dequantize(w)?;
                    let e = energy(&(w.clone() - q));
                    (PackedTensor::pack(&codes.into_host(), quant), e)
                }
            };
            Ok(Choice {
                bits: packed.storage_bits() as u64,
                error,
            })
        })
        .collect()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lowrank::Gaussian;

    /// Every combination of a small case, checked against the allocator.
    #[test]
    fn optimal_on_enumerable_cases() {
        let mut g = Gaussian::new(7);
        for case in 0..40 {
            let n = 2 + case % 5;
            let options: Vec<Vec<Choice>> = (0..n)
                .map(|_| {
                    (0..3 + case % 2)
                        .map(|_| Choice {
                            bits: 100 + (g.uniform() * 900.0) as u64,
                            error: g.uniform(),
                        })
                        .collect()
                })
                .collect();
            let budget = (n as f64 * (300.0 + g.uniform() * 500.0)) as u64;
            let mut best: Option<(f64, u64)> = None;
            let k: Vec<usize> = options.iter().map(Vec::len).collect();
            let total: usize = k.iter().product();
            for mut code in 0..total {
                let (mut bits, mut err) = (0, 0.0);
                for (o, &kk) in options.iter().zip(&k) {
                    bits += o[code % kk].bits;
                    err += o[code % kk].error;
                    code /= kk;
                }
                if bits <= budget && best.is_none_or(|(e, _)| err < e) {
                    best = Some((err, bits));
                }
            }
            match (best, allocate(&options, budget)) {
                (Some((e, _)), Ok(a)) => {
                    assert!(a.bits <= budget, "case {case}: over budget");
                    assert!(
                        (a.error - e).abs() < 1e-12,
                        "case {case}: {} vs {e}",
                        a.error
                    );
                }
                (None, Err(CalibError::Budget(_))) => {}
                (b, a) => panic!("case {case}: enumeration {b:?}, allocator {a:?}"),
            }
        }
    }

    /// Large budgets take the coarse steps and still never exceed the budget.
    #[test]
    fn budget_holds_with_coarse_steps() {
        let mut g = Gaussian::new(3);
        let options: Vec<Vec<Choice>> = (0..50)
            .map(|_| {
                let p = 1_000_000 + (g.uniform() * 1e6) as u64;
                [2.5, 3.5, 4.5, 8.5]
                    .iter()
                    .map(|b| Choice {
                        bits: (p as f64 * b) as u64 + 1,
                        error: 4f64.powf(-b) * p as f64 * (0.5 + g.uniform()),
                    })
                    .collect()
            })
            .collect();
        let params: u64 = options.iter().map(|o| (o[0].bits - 1) * 2 / 5).sum();
        let budget = params * 3;
        let a = allocate(&options, budget).unwrap();
        assert!(a.bits <= budget);
        // Nearly all of the budget is used: no room left for any single upgrade.
        let spare = budget - a.bits;
        let cheapest_upgrade = options
            .iter()
            .zip(&a.choice)
            .flat_map(|(o, &j)| {
                o.iter()
                    .filter(move |c| c.bits > o[j].bits)
                    .map(move |c| c.bits - o[j].bits)
            })
            .min()
            .unwrap();
        assert!(spare < cheapest_upgrade * 2, "{spare} bits left");
        assert!(allocate(&options, params).is_err());
    }

    /// A budget beyond every dearest choice, or candidates all of one size, take the dearest
    /// (or the only) choices without a table the size of the budget (which would not fit).
    #[test]
    fn spare_budget_does_not_size_the_table() {
        let c = |bits, error| Choice { bits, error };
        let options = vec![vec![c(10, 2.0), c(30, 1.0)], vec![c(20, 5.0), c(25, 0.5)]];
        let a = allocate(&options, 1 << 60).unwrap();
        assert_eq!((a.choice, a.bits, a.error), (vec![1, 1], 55, 1.5));
        let same = vec![vec![c(64, 1.0), c(64, 0.25)]; 3];
        let a = allocate(&same, 1 << 60).unwrap();
        assert_eq!((a.choice, a.bits), (vec![1, 1, 1], 192));
    }
}
