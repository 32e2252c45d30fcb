//! AdamW (decoupled weight decay, as PyTorch's `torch.optim.AdamW`), the learning-rate
//! schedule and global gradient-norm clipping.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

/// AdamW hyper-parameters (PyTorch's defaults, weight decay included).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε, added to `√v̂`.
    pub eps: f64,
    /// Decoupled weight decay: each step multiplies the parameters by `1 − lr·wd`.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW state: step count, the parameters it updates and their two moments.
///
/// Parameters and moments live flattened end to end, one tensor each, and an update flattens
/// the gradients the same way: the update is a dozen element-wise operations whatever the
/// number of parameters. A model with LoRA on every linear layer has hundreds of small
/// factors; updated one by one, a GPU spent a third of SmolLM2's training step launching
/// their kernels (`bench/results/h200`). The optimizer keeps the parameters rather than
/// taking them back each step, as flattening them again would cost one copy per factor; a
/// caller that changes them otherwise (a resumed run) hands them over with
/// [`set_params`](Self::set_params).
#[derive(Clone, Debug)]
pub struct AdamW {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// Updates done.
    pub step: u64,
    /// The parameters, flattened in order.
    p: Tensor<1>,
    /// First moments, flattened in parameter order.
    m: Tensor<1>,
    /// Second moments, flattened in parameter order.
    v: Tensor<1>,
    /// The parameters' shapes.
    shapes: Vec<[usize; 2]>,
}

impl AdamW {
    /// An optimizer of `params`, with zero moments.
    ///
    /// # Panics
    /// If `params` is empty.
    pub fn new(config: AdamWConfig, params: &[Tensor<2>]) -> Self {
        let shapes: Vec<[usize; 2]> = params.iter().map(|p| p.dims()).collect();
        let n = shapes.iter().map(|[r, c]| r * c).sum::<usize>();
        let device = params.first().expect("at least one parameter").device();
        Self {
            config,
            step: 0,
            p: flatten(params.to_vec(), &shapes),
            m: Tensor::zeros([n], &device),
            v: Tensor::zeros([n], &device),
            shapes,
        }
    }

    /// The parameters, in order.
    pub fn params(&self) -> Vec<Tensor<2>> {
        split(&self.p, &self.shapes)
    }

    /// Replaces the parameters (a resumed run's), in order.
    ///
    /// # Panics
    /// If the count or shapes differ from the parameters'.
    pub fn set_params(&mut self, params: Vec<Tensor<2>>) {
        assert_eq!(params.len(), self.shapes.len(), "one tensor per parameter");
        self.p = flatten(params, &self.shapes);
    }

    /// The moments `(m, v)` of each parameter, in order.
    pub fn moments(&self) -> Vec<(Tensor<2>, Tensor<2>)> {
        split(&self.m, &self.shapes)
            .into_iter()
            .zip(split(&self.v, &self.shapes))
            .collect()
    }

    /// Replaces the moments (a resumed run's), one pair per parameter in order.
    ///
    /// # Panics
    /// If the count or shapes differ from the parameters'.
    pub fn set_moments(&mut self, moments: Vec<(Tensor<2>, Tensor<2>)>) {
        assert_eq!(moments.len(), self.shapes.len(), "one pair per parameter");
        let (m, v): (Vec<_>, Vec<_>) = moments.into_iter().unzip();
        self.m = flatten(m, &self.shapes);
        self.v = flatten(v, &self.shapes);
    }

    /// One update with `grads` at learning rate `lr`; returns the parameters.
    ///
    /// # Panics
    /// If the counts or shapes of `grads` and the parameters differ.
    pub fn update(&mut self, grads: Vec<Tensor<2>>, lr: f64) -> Vec<Tensor<2>> {
        assert_eq!(grads.len(), self.shapes.len(), "one gradient per parameter");
        let g = flatten(grads, &self.shapes);
        self.update_flat(g, lr)
    }

    /// [`update`](Self::update) after scaling the gradients so that their global norm is at
    /// most `max_norm`, if given ([`clip_grad_norm`]'s rule), on the gradients flattened
    /// once for both. Returns the parameters and the norm before clipping.
    ///
    /// # Panics
    /// As [`update`](Self::update).
    pub fn update_clipped(
        &mut self,
        grads: Vec<Tensor<2>>,
        lr: f64,
        max_norm: Option<f64>,
    ) -> (Vec<Tensor<2>>, f64) {
        assert_eq!(grads.len(), self.shapes.len(), "one gradient per parameter");
        let mut g = flatten(grads, &self.shapes);
        let norm = flat_norm(&g);
        if let Some(factor) = max_norm.and_then(|max| clip_factor(norm, max)) {
            g = g.mul_scalar(factor);
        }
        (self.update_flat(g, lr), norm)
    }

    /// The update with the gradients `g` flattened in parameter order.
    fn update_flat(&mut self, g: Tensor<1>, lr: f64) -> Vec<Tensor<2>> {
        let c = self.config;
        self.step += 1;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        // WGPU and CUDA: one kernel, where the tensor ops below launch thirteen.
        let scalars = [
            c.beta1,
            1.0 - c.beta1,
            c.beta2,
            1.0 - c.beta2,
            1.0 - lr * c.weight_decay,
            bias2,
            c.eps,
            lr / bias1,
        ];
        if let Some([m, v, p]) =
            loftq_core::fused::adamw(&g, &self.m, &self.v, &self.p, scalars.map(|x| x as f32))
        {
            (self.m, self.v, self.p) = (m, v, p);
            return self.params();
        }
        let m = self.m.clone().mul_scalar(c.beta1) + g.clone().mul_scalar(1.0 - c.beta1);
        let v = self.v.clone().mul_scalar(c.beta2) + g.square().mul_scalar(1.0 - c.beta2);
        let p = match c.weight_decay {
            0.0 => self.p.clone(),
            wd => self.p.clone().mul_scalar(1.0 - lr * wd),
        };
        let step = m
            .clone()
            .div(v.clone().div_scalar(bias2).sqrt().add_scalar(c.eps));
        self.p = p - step.mul_scalar(lr / bias1);
        self.m = m;
        self.v = v;
        self.params()
    }
}

/// `tensors` (of `shapes`) end to end as one vector.
fn flatten(tensors: Vec<Tensor<2>>, shapes: &[[usize; 2]]) -> Tensor<1> {
    let flat = tensors
        .into_iter()
        .zip(shapes)
        .map(|(t, &shape)| {
            assert_eq!(t.dims(), shape, "a parameter's shape changed");
            t.reshape([shape[0] * shape[1]])
        })
        .collect::<Vec<_>>();
    // Eight parts to a kernel on WGPU and CUDA, where `cat` launches a copy per part.
    loftq_core::fused::cat(flat)
}

/// The inverse of [`flatten`]: views of `flat`, one per shape.
fn split(flat: &Tensor<1>, shapes: &[[usize; 2]]) -> Vec<Tensor<2>> {
    let mut at = 0;
    shapes
        .iter()
        .map(|&[r, c]| {
            let t = flat.clone().slice(at..at + r * c).reshape([r, c]);
            at += r * c;
            t
        })
        .collect()
}

/// How the learning rate moves after the warm-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// Constant.
    Constant,
    /// Half a cosine from the peak down to zero at the last step.
    Cosine,
    /// Linear down to zero at the last step.
    Linear,
}

/// Learning rate as a function of the step: a linear warm-up, `lr · min(1, (step+1)/warmup)`,
/// then the decay.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Peak learning rate.
    pub lr: f64,
    /// Warm-up steps.
    pub warmup: usize,
    /// After the warm-up.
    pub decay: Decay,
    /// Total steps (the decay reaches zero there).
    pub total: usize,
}

impl Schedule {
    /// The learning rate of step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        match self.decay {
            Decay::Constant => self.lr,
            Decay::Cosine => self.lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear => self.lr * (1.0 - progress),
        }
    }
}

/// The global L2 norm of `grads`.
pub fn grad_norm(grads: &[Tensor<2>]) -> f64 {
    if grads.is_empty() {
        return 0.0;
    }
    let shapes: Vec<[usize; 2]> = grads.iter().map(|g| g.dims()).collect();
    flat_norm(&flatten(grads.to_vec(), &shapes))
}

/// The L2 norm of every gradient flattened into one vector: two element-wise kernels, not
/// two per gradient.
fn flat_norm(flat: &Tensor<1>) -> f64 {
    let total = loftq_core::quant::host_f32(&flat.clone().square().sum())[0];
    f64::from(total).sqrt()
}

/// PyTorch's `clip_grad_norm_` factor `max_norm / (norm + 1e-6)`, where it is below 1.
fn clip_factor(norm: f64, max_norm: f64) -> Option<f64> {
    let factor = max_norm / (norm + 1e-6);
    (factor < 1.0).then_some(factor)
}

/// Scales `grads` so that their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1). Returns the norm
/// before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor<2>], max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    if let Some(factor) = clip_factor(norm, max_norm) {
        for g in grads.iter_mut() {
            *g = g.clone().mul_scalar(factor);
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let s = Schedule {
            lr: 1.0,
            warmup: 10,
            decay: Decay::Constant,
            total: 200,
        };
        assert_eq!(s.lr(0), 0.1);
        assert_eq!(s.lr(9), 1.0);
        assert_eq!(s.lr(150), 1.0);
        let c = Schedule {
            decay: Decay::Cosine,
            ..s
        };
        assert!((c.lr(10) - 1.0).abs() < 1e-12);
        assert!((c.lr(105) - 0.5).abs() < 1e-12);
        assert!(c.lr(200).abs() < 1e-12);
        let l = Schedule {
            decay: Decay::Linear,
            ..s
        };
        assert!((l.lr(105) - 0.5).abs() < 1e-12);
    }

    /// Two steps of AdamW on one scalar, against the update worked out by hand (PyTorch's
    /// algorithm: decay first, bias-corrected moments, ε outside the root).
    #[test]
    fn adamw_matches_the_formula() {
        let device = loftq_core::DeviceSpec::Cpu.device().expect("cpu");
        let p: Tensor<2> = Tensor::from_floats([[1.0]], &device);
        let cfg = AdamWConfig {
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(cfg, std::slice::from_ref(&p));
        let (lr, g1, g2) = (0.01, 0.5, -0.25);
        let p1 = opt.update(vec![Tensor::from_floats([[g1]], &device)], lr);
        let p2 = opt.update(vec![Tensor::from_floats([[g2]], &device)], lr);

        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        let mut x = 1.0f64;
        let (mut m, mut v) = (0.0, 0.0);
        let mut expect = Vec::new();
        for (t, g) in [(1, g1), (2, g2)] {
            x *= 1.0 - lr * 0.1;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let mh = m / (1.0 - b1.powi(t));
            let vh = v / (1.0 - b2.powi(t));
            x -= lr * mh / (vh.sqrt() + eps);
            expect.push(x);
        }
        let got = |t: &Tensor<2>| f64::from(t.clone().into_scalar::<f32>());
        assert!(
            (got(&p1[0]) - expect[0]).abs() < 1e-6,
            "{} vs {}",
            got(&p1[0]),
            expect[0]
        );
        assert!((got(&p2[0]) - expect[1]).abs() < 1e-6);
    }

    /// The flattened update of several parameters equals each parameter's own update, bit for
    /// bit, and the moments read back per parameter.
    #[test]
    fn parameters_update_as_if_alone() {
        let device = loftq_core::DeviceSpec::Cpu.device().expect("cpu");
        let shapes = [[2usize, 3usize], [1, 1], [4, 2]];
        let tensor = |shape: [usize; 2], seed: f32| {
            let v: Vec<f32> = (0..shape[0] * shape[1])
                .map(|i| ((i as f32 + seed) * 0.37).sin())
                .collect();
            Tensor::<2>::from_data(burn::tensor::TensorData::new(v, shape), &device)
        };
        let params: Vec<_> = shapes.iter().map(|&s| tensor(s, 1.0)).collect();
        let cfg = AdamWConfig::default();
        let mut all = AdamW::new(cfg, &params);
        let mut alone: Vec<AdamW> = params
            .iter()
            .map(|p| AdamW::new(cfg, std::slice::from_ref(p)))
            .collect();
        let (mut together, mut separate) = (params.clone(), params);
        for step in 0..3 {
            if step == 1 {
                // A resumed run hands back the parameters it read.
                all.set_params(together.iter().map(|t| t.clone().mul_scalar(1.0)).collect());
            }
            let grads: Vec<_> = shapes
                .iter()
                .map(|&s| tensor(s, step as f32 + 2.0))
                .collect();
            together = all.update(grads.clone(), 0.01);
            separate = (alone.iter_mut().zip(grads))
                .map(|(o, g)| o.update(vec![g], 0.01).remove(0))
                .collect();
        }
        let host = |t: &Tensor<2>| loftq_core::quant::host_f32(t);
        for (i, (a, b)) in together.iter().zip(&separate).enumerate() {
            assert_eq!(a.dims(), shapes[i]);
            assert_eq!(host(a), host(b), "parameter {i}");
            let (m, v) = &all.moments()[i];
            let (m1, v1) = &alone[i].moments()[0];
            assert_eq!((host(m), host(v)), (host(m1), host(v1)), "moments {i}");
        }
    }

    /// Clipping inside the update equals clipping the gradients and then updating, bit for
    /// bit, whether the norm is above the bound or not.
    #[test]
    fn clipped_update_equals_clip_then_update() {
        let device = loftq_core::DeviceSpec::Cpu.device().expect("cpu");
        let params = vec![
            Tensor::<2>::from_floats([[1.0, -2.0], [0.5, 3.0]], &device),
            Tensor::<2>::from_floats([[0.25]], &device),
        ];
        let grads = vec![
            Tensor::<2>::from_floats([[3.0, 0.0], [-1.0, 2.0]], &device),
            Tensor::<2>::from_floats([[4.0]], &device),
        ];
        let host = |t: &Tensor<2>| loftq_core::quant::host_f32(t);
        for max in [None, Some(1.0), Some(100.0)] {
            let mut a = AdamW::new(AdamWConfig::default(), &params);
            let mut b = a.clone();
            let (pa, na) = a.update_clipped(grads.clone(), 0.01, max);
            let mut g = grads.clone();
            let nb = match max {
                Some(m) => clip_grad_norm(&mut g, m),
                None => grad_norm(&g),
            };
            let pb = b.update(g, 0.01);
            assert_eq!(na, nb, "{max:?}");
            for (x, y) in pa.iter().zip(&pb) {
                assert_eq!(host(x), host(y), "{max:?}");
            }
        }
    }

    #[test]
    fn clipping_bounds_the_norm() {
        let device = loftq_core::DeviceSpec::Cpu.device().expect("cpu");
        let mut g = vec![
            Tensor::<2>::from_floats([[3.0, 0.0]], &device),
            Tensor::<2>::from_floats([[4.0]], &device),
        ];
        let before = clip_grad_norm(&mut g, 1.0);
        assert!((before - 5.0).abs() < 1e-6);
        assert!((grad_norm(&g) - 1.0).abs() < 1e-5);
        let before = clip_grad_norm(&mut g, 10.0);
        assert!((before - 1.0).abs() < 1e-5);
        assert!((grad_norm(&g) - 1.0).abs() < 1e-5);
    }
}
