//! The two numerical building blocks of the NormalFloat codebooks: PyTorch's `f32` linspace
//! and the inverse of the standard normal CDF.
//!
//! Both must reproduce the reference bit for bit once rounded to `f32`, since bitsandbytes and
//! PEFT build their tables with `norm.ppf(torch.linspace(...))`.

/// `torch.linspace(start, end, steps)` in `f32`, exactly as PyTorch's CPU kernel computes it.
///
/// # Algorithm
/// `step = (end − start) / (steps − 1)` in `f32`; the first half is `start + step·i`, the
/// second half `end − step·(steps − 1 − i)`, each a fused multiply-add rounded once to `f32`
/// (checked against the reference tables in `tests/fixtures/nf_codebooks.safetensors`).
///
/// # Panics
/// If `steps < 2`.
pub fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    assert!(steps >= 2, "linspace needs at least two points");
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// Standard normal CDF `Φ(x)`, accurate to a few ulps (through `erfc`).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)
}

/// Inverse standard normal CDF `Φ⁻¹(p)` (scipy's `norm.ppf`), to about `1e-15` relative.
///
/// # Algorithm
/// Acklam's rational approximation (relative error ≈ 1e-9) refined by two Halley steps on
/// `Φ(x) − p`, where `Φ` comes from an `erfc` accurate to an ulp; the upper half uses the
/// symmetry `Φ⁻¹(p) = −Φ⁻¹(1 − p)` so that the Newton residual never cancels.
///
/// # Numerical behaviour
/// Returns `−∞`/`+∞` at `p = 0`/`1` and NaN outside `[0, 1]`.
pub fn normal_ppf(p: f64) -> f64 {
    if !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    if p > 0.5 {
        // 1 − p is exact here (Sterbenz); the lower tail keeps `erfc` free of cancellation.
        return -normal_ppf(1.0 - p);
    }
    let mut x = acklam(p);
    for _ in 0..2 {
        let e = normal_cdf(x) - p;
        let u = e * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
        x -= u / (1.0 + x * u / 2.0);
    }
    x
}

fn acklam(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const P_LOW: f64 = 0.02425;
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - P_LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ppf_matches_scipy() {
        // scipy.stats.norm.ppf at these probabilities (f32 ones widened exactly).
        let cases = [
            (1e-10, -6.361340902404056),
            (0.001, -3.090232306167813),
            (0.02, -2.053748910631823),
            (0.3, -0.5244005127080409),
            (0.5, 0.0),
            (0.733_854_2_f32 as f64, 0.6245116059026193),
            (0.967_708_3_f32 as f64, 1.848130816262525),
            (0.975, 1.959963984540054),
            (0.999, 3.090232306167813),
            (1.0 - 1e-9, 5.997807019601637),
        ];
        for (p, want) in cases {
            let got = normal_ppf(p);
            assert!(
                (got - want).abs() <= 4e-15 * want.abs().max(1.0),
                "ppf({p}) = {got}, scipy {want}"
            );
        }
        assert!(normal_ppf(-0.1).is_nan());
        assert_eq!(normal_ppf(0.0), f64::NEG_INFINITY);
    }

    #[test]
    fn linspace_endpoints_and_symmetry() {
        let v = torch_linspace_f32(-1.0, 1.0, 16);
        assert_eq!(v[0], -1.0);
        assert_eq!(v[15], 1.0);
        for i in 0..16 {
            assert_eq!(v[i], -v[15 - i]);
        }
    }
}
