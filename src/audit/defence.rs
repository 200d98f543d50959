//! Defences against a curious cloud, applied as a deployment would apply them to what crosses the
//! wire, and what the attacker makes of each:
//! - `none`: the states as hat sends them (rounded to the wire's dtype);
//! - `noise=S`: Gaussian noise of `S` × each position's RMS added to the uplink states on the
//!   device. The cloud then computes on noisy states, so **outputs differ from the model's**; the
//!   audit measures how often the device's next token still agrees with the model's. The attacker
//!   is a user of the service too, so its own (state, token) pairs carry the same noise;
//! - `rotation`: a secret random orthogonal rotation of the residual stream across the wire (the
//!   device rotates what it sends and un-rotates what comes back; the cloud holds middle weights
//!   rotated to match, [`LayerStack::rotated`]). Outputs are unchanged, but a cloud that knows the
//!   public weights solves for the rotation from its own weights ([`recover_rotation`]) and reads
//!   the states as if there were none;
//! - `weights=S`: device weights the cloud cannot know. Every projection of the input submodel
//!   gets Gaussian noise of `S` × its row's RMS, drawn once per device from a secret seed
//!   ([`LayerStack::perturbed`]); the cloud's middle and the output submodel stay public. No
//!   fine-tune wins the accuracy back, so **outputs differ from the model's** as for noise; unlike
//!   noise the perturbation is the same at every position and in every session. The attacker's
//!   own device has secret weights of its own (another seed), so its (state, token) pairs come
//!   from other weights than the victim's; its replay runs the public input layers;
//! - `finetune=S`: the same secret start, then a private fine-tune of the input layers that wins
//!   the model's answers back through the public middle ([`super::finetune`]); the victim tunes
//!   on one half of the other conversations, the attacker's own device (another seed) on the
//!   other half.

use candle_core::{DType, Tensor};
use rand::SeedableRng;

use crate::audit::finetune::{private_finetune, FineTune, FineTuneReport};
use crate::error::{Error, Result};
use crate::model::rotate::{random_orthogonal, recover_rotation};
use crate::model::{LayerStack, Model};
use crate::net::protocol::WireDtype;
use crate::net::noise::add_relative_noise;

/// Mixed into the seed for the attacker's own device's secret weights (`weights=S`).
const ATTACKER_DEVICE_SEED: u64 = 0xA77A_C4E5;

/// One defence (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Defence {
    None,
    /// Noise of `sigma` × each position's RMS on the uplink.
    Noise { sigma: f32 },
    Rotation,
    /// Secret input-submodel weights: noise of `sigma` × each weight row's RMS.
    SecretWeights { sigma: f32 },
    /// Secret weights as for `SecretWeights`, then privately fine-tuned to give the model's
    /// answers again.
    PrivateFineTune { sigma: f32 },
}

impl Defence {
    /// `none`, `noise=S` (S ≥ 0, relative to each state's RMS), `rotation` or `weights=S` (S ≥ 0,
    /// relative to each weight row's RMS).
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        let level = |prefix: &str| match s.strip_prefix(prefix).map(str::parse::<f32>) {
            Some(Ok(sigma)) if sigma.is_finite() && sigma >= 0.0 => Some(sigma),
            _ => None,
        };
        match s {
            "none" => Ok(Self::None),
            "rotation" => Ok(Self::Rotation),
            _ => {
                if let Some(sigma) = level("noise=") {
                    Ok(Self::Noise { sigma })
                } else if let Some(sigma) = level("weights=") {
                    Ok(Self::SecretWeights { sigma })
                } else if let Some(sigma) = level("finetune=") {
                    Ok(Self::PrivateFineTune { sigma })
                } else {
                    Err(Error::invalid(format!(
                        "unknown defence {s:?}: give none, noise=S (S ≥ 0, relative to each state's RMS), rotation, weights=S (S ≥ 0, relative to each weight row's RMS) or finetune=S (weights=S, then a private fine-tune)"
                    )))
                }
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Noise { sigma } => format!("noise={sigma}"),
            Self::Rotation => "rotation".into(),
            Self::SecretWeights { sigma } => format!("weights={sigma}"),
            Self::PrivateFineTune { sigma } => format!("finetune={sigma}"),
        }
    }
}

/// A defence set up on one split: what the device sends, what the cloud computes on it, and
/// what the attacker reads of both.
pub struct Guard {
    pub defence: Defence,
    wire: WireDtype,
    /// The middle layers as the cloud holds them (rotated for `rotation`).
    cloud_middle: LayerStack,
    /// `rotation`: the secret rotation `(hidden, hidden)` and the attacker's estimate of it.
    rotation: Option<(Tensor, Tensor)>,
    /// `weights=S`, `finetune=S`: the victim's secret input layers and the attacker's own
    /// device's.
    secret_inputs: Option<(LayerStack, LayerStack)>,
    /// `finetune=S`: the victim's and the attacker's fine-tunes.
    finetunes: Option<(FineTuneReport, FineTuneReport)>,
    seed: u64,
}

impl Guard {
    /// `input`, `middle`: the public input and middle layers of `model`'s split; `texts`: token
    /// ids the devices fine-tune on (`finetune=S`: the victim on the first half, the attacker's
    /// own device on the second), `tune` how; `step` names a fine-tune as it begins.
    #[allow(clippy::too_many_arguments)]
    pub fn new(defence: Defence, model: &Model, input: &LayerStack, middle: &LayerStack, wire: WireDtype, seed: u64, texts: &[Vec<u32>], tune: FineTune, step: &mut dyn FnMut(&str)) -> Result<Self> {
        let mut finetunes = None;
        let secret_inputs = match defence {
            Defence::SecretWeights { sigma } => Some((input.perturbed(sigma, seed)?, input.perturbed(sigma, seed ^ ATTACKER_DEVICE_SEED)?)),
            Defence::PrivateFineTune { sigma } => {
                let (mine, theirs) = texts.split_at(texts.len() / 2);
                step("the victim's private fine-tune");
                let (device, a) = private_finetune(model, input, mine, sigma, seed, tune, |_, _| {})?;
                step("the attacker's own private fine-tune");
                let (attacker, b) = private_finetune(model, input, theirs, sigma, seed ^ ATTACKER_DEVICE_SEED, tune, |_, _| {})?;
                finetunes = Some((a, b));
                Some((device, attacker))
            }
            _ => None,
        };
        let hidden = model.config.hidden_size;
        let (cloud_middle, rotation) = match defence {
            Defence::Rotation => {
                let m = random_orthogonal(hidden, seed)?;
                let rotated = middle.rotated(&m)?;
                let estimate = recover_rotation(middle, &rotated)?;
                (rotated, Some((m, estimate)))
            }
            _ => (middle.clone(), None),
        };
        Ok(Self { defence, wire, cloud_middle, rotation, secret_inputs, finetunes, seed })
    }

    /// `weights=S`, `finetune=S`: the input layers of the victim's device and of the
    /// attacker's own, whose states replace the public layers'; `None` for the other defences.
    pub fn secret_inputs(&self) -> Option<(&LayerStack, &LayerStack)> {
        self.secret_inputs.as_ref().map(|(device, attacker)| (device, attacker))
    }

    /// `finetune=S`: how the victim's and the attacker's fine-tunes went; `None` for the other
    /// defences.
    pub fn finetunes(&self) -> Option<(FineTuneReport, FineTuneReport)> {
        self.finetunes
    }

    /// `rotation`: the largest error of the attacker's estimate of it (an entry of a matrix
    /// whose rows have unit norm).
    pub fn rotation_error(&self) -> Result<Option<f32>> {
        match &self.rotation {
            Some((m, estimate)) => Ok(Some((m - estimate)?.abs()?.flatten_all()?.max(0)?.to_scalar()?)),
            None => Ok(None),
        }
    }

    /// What leaves the device for the uplink states `h` `(1, n, hidden)` of one text (`salt`
    /// tells texts apart for the noise), rounded as the wire rounds.
    pub fn send(&self, h: &Tensor, salt: u64) -> Result<Tensor> {
        let h = match (&self.defence, &self.rotation) {
            (Defence::Noise { sigma }, _) if *sigma > 0.0 => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15));
                add_relative_noise(h, *sigma, &mut rng)?
            }
            (_, Some((m, _))) => h.broadcast_matmul(m)?,
            _ => h.clone(),
        };
        self.wire.round_trip(&h.to_dtype(DType::F32)?)
    }

    /// The cloud's reply to what was sent, as the downlink carries it.
    pub fn middle(&self, sent: &Tensor) -> Result<Tensor> {
        self.wire.round_trip(&self.cloud_middle.forward(sent, 0, &mut self.cloud_middle.new_cache())?)
    }

    /// What the attacker reads of a state that crossed the wire, either way: un-rotated by its
    /// estimate for `rotation`, as it came otherwise.
    pub fn attacker_reads(&self, seen: &Tensor) -> Result<Tensor> {
        match &self.rotation {
            Some((_, estimate)) => Ok(seen.broadcast_matmul(&estimate.t()?)?),
            None => Ok(seen.clone()),
        }
    }

    /// What the device reads of the downlink: un-rotated by the true rotation.
    pub fn device_reads(&self, down: &Tensor) -> Result<Tensor> {
        match &self.rotation {
            Some((m, _)) => Ok(down.broadcast_matmul(&m.t()?)?),
            None => Ok(down.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defences_parse_and_bad_ones_are_refused() {
        assert_eq!(Defence::parse("none").unwrap(), Defence::None);
        assert_eq!(Defence::parse(" noise=0.25").unwrap(), Defence::Noise { sigma: 0.25 });
        assert_eq!(Defence::parse("rotation").unwrap(), Defence::Rotation);
        assert_eq!(Defence::parse("weights=0.05").unwrap(), Defence::SecretWeights { sigma: 0.05 });
        assert_eq!(Defence::parse(&Defence::SecretWeights { sigma: 0.5 }.name()).unwrap(), Defence::SecretWeights { sigma: 0.5 });
        assert_eq!(Defence::parse(&Defence::PrivateFineTune { sigma: 0.3 }.name()).unwrap(), Defence::PrivateFineTune { sigma: 0.3 });
        for bad in ["noise", "noise=-1", "noise=nan", "shuffle", "", "weights", "weights=-0.1", "weights=inf", "finetune", "finetune=-1"] {
            assert!(Defence::parse(bad).unwrap_err().to_string().contains("unknown defence"), "{bad}");
        }
        assert_eq!(Defence::parse(&Defence::Noise { sigma: 0.5 }.name()).unwrap(), Defence::Noise { sigma: 0.5 });
    }
}
