//! Noise on the uplink: a privacy defence that **changes the outputs**.
//!
//! [`add_relative_noise`] adds Gaussian noise of `sigma` × each position's RMS to hidden states;
//! [`NoisyUplink`] wraps any [`MiddleLink`] so that every block the device sends carries such
//! noise. The device's own caches (input submodel, draft path) keep the clean states; the cloud
//! computes its middle layers on the noisy ones, so the device's output submodel then reads a
//! perturbed model: its answers differ from `hat generate`'s, and drafts (made from clean
//! states) are accepted less often. `hat audit --defences noise=S` measures what the noise hides
//! from a curious cloud; `run-edge --uplink-noise S` what it costs a real session.
//!
//! The generator is seeded from the operating system's entropy for every session (a seed the
//! cloud could guess would let it subtract the noise); a replayed session (see
//! [`crate::net::ResilientLink`]) re-sends the frames it already sent, noise included.

use candle_core::{Device, Tensor, D};
use rand::SeedableRng;

use crate::error::{Error, Result};
use crate::net::link::{LinkStats, MiddleLink, MiddleReply};
use crate::util::linalg::standard_normal;

/// `h + sigma · rms(h) · z` for hidden states `h` `(b, n, hidden)`, with `rms` taken over each
/// position's `hidden` values and `z` standard normal draws from `rng` (f32 result).
pub fn add_relative_noise(h: &Tensor, sigma: f32, rng: &mut impl rand::Rng) -> Result<Tensor> {
    let h = h.to_dtype(candle_core::DType::F32)?;
    if sigma == 0.0 {
        return Ok(h);
    }
    let (b, n, hidden) = h.dims3()?;
    let gauss: Vec<f32> = (0..b * n * hidden).map(|_| standard_normal(rng) as f32).collect();
    let rms = h.sqr()?.mean_keepdim(D::Minus1)?.sqrt()?;
    Ok((&h + Tensor::from_vec(gauss, (b, n, hidden), &Device::Cpu)?.to_device(h.device())?.broadcast_mul(&(rms * sigma as f64)?)?)?)
}

/// Checks a noise scale given by a user: finite and at least 0.
pub fn check_sigma(sigma: f32) -> Result<f32> {
    if sigma.is_finite() && sigma >= 0.0 {
        Ok(sigma)
    } else {
        Err(Error::invalid(format!("uplink noise {sigma}: give a scale of 0 or more, relative to each state's RMS (e.g. 0.1)")))
    }
}

/// A [`MiddleLink`] whose uplink carries noise (see the module doc); replies pass unchanged.
pub struct NoisyUplink<L> {
    inner: L,
    sigma: f32,
    rng: rand::rngs::StdRng,
}

impl<L: MiddleLink> NoisyUplink<L> {
    /// Noise of `sigma` × each position's RMS on every block sent through `inner`.
    pub fn new(inner: L, sigma: f32) -> Result<Self> {
        Ok(Self { inner, sigma: check_sigma(sigma)?, rng: rand::rngs::StdRng::from_os_rng() })
    }

    /// The link underneath (probes and the handshake's figures go to it directly).
    pub fn inner_mut(&mut self) -> &mut L {
        &mut self.inner
    }

    pub fn into_inner(self) -> L {
        self.inner
    }
}

impl<L: MiddleLink> MiddleLink for NoisyUplink<L> {
    fn predicted_compute_ms(&self, rows: usize, start: usize) -> Option<f64> {
        self.inner.predicted_compute_ms(rows, start)
    }

    fn submit_tree(&mut self, start: usize, hidden: &Tensor, parents: &[u16], keep: &[u16]) -> Result<()> {
        if self.sigma == 0.0 {
            return self.inner.submit_tree(start, hidden, parents, keep);
        }
        let noisy = add_relative_noise(hidden, self.sigma, &mut self.rng)?;
        self.inner.submit_tree(start, &noisy, parents, keep)
    }

    fn receive(&mut self) -> Result<MiddleReply> {
        self.inner.receive()
    }

    fn try_receive(&mut self) -> Result<Option<MiddleReply>> {
        self.inner.try_receive()
    }

    fn stats(&self) -> LinkStats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_relative_to_each_position_and_zero_changes_nothing() {
        let h = Tensor::from_vec(vec![1f32, -1., 1., -1., 100., -100., 100., -100.], (1, 2, 4), &Device::Cpu).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        assert_eq!(add_relative_noise(&h, 0.0, &mut rng).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), h.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        // Many draws: the deviation of each position scales with its RMS (1 and 100).
        let big = Tensor::cat(&vec![h.clone(); 500], 0).unwrap();
        let d = (add_relative_noise(&big, 0.5, &mut rng).unwrap() - &big).unwrap();
        let rms = d.sqr().unwrap().mean(2).unwrap().mean(0).unwrap().sqrt().unwrap().to_vec1::<f32>().unwrap();
        assert!((rms[0] - 0.5).abs() < 0.05, "{rms:?}");
        assert!((rms[1] - 50.0).abs() < 5.0, "{rms:?}");
        assert!(check_sigma(-1.0).is_err() && check_sigma(f32::NAN).is_err() && check_sigma(0.0).is_ok());
    }
}
