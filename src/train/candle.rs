//! Training steps by candle's autograd and AdamW on any candle device:
//! how the teacher trains on GPUs (`--features cuda`), full softmax, hard
//! labels only.

use candle_core::Device;

use super::distillation::NO_LABEL;
use super::steps::{SlotLabels, Steps, TrainSettings};
use crate::config::{Softmax, device_ordinal};
use crate::error::{Error, Result};
use crate::model::sasrec::SasRec;
use crate::model::sasrec::candle::CandleSasRec;

/// The candle device a job's `device` names ([`device_ordinal`]).
pub fn device(name: &str) -> Result<Device> {
    match device_ordinal(name)? {
        None => Ok(Device::Cpu),
        Some(ordinal) => Device::new_cuda(ordinal)
            .map_err(|e| Error::config(format!("cannot open device {name:?}: {e}"))),
    }
}

/// Training steps by candle's autograd and AdamW on any device (full
/// softmax): how the teacher trains on GPUs.
pub struct CandleSteps {
    candle: CandleSasRec,
    optimizer: candle_nn::optim::AdamW,
}

impl CandleSteps {
    /// Copies `model` to `device` and sets up AdamW with `settings`.
    pub fn new(model: &SasRec, settings: &TrainSettings, device: &Device) -> Result<CandleSteps> {
        use candle_nn::optim::Optimizer;
        if settings.softmax != Softmax::Full {
            return Err(Error::config(
                "sampled softmax trains on the CPU only; use softmax = \"full\" on a GPU",
            ));
        }
        if !device.is_cpu() {
            // Dropout masks on the GPU come from its seeded generator.
            device.set_seed(settings.seed)?;
        }
        let candle = CandleSasRec::from_model(model, device)?;
        let optimizer = candle_nn::optim::AdamW::new(
            candle.vars.clone(),
            candle_nn::optim::ParamsAdamW {
                lr: settings.lr,
                beta1: settings.beta1,
                beta2: settings.beta2,
                eps: 1e-8,
                weight_decay: settings.weight_decay,
            },
        )?;
        Ok(CandleSteps { candle, optimizer })
    }
}

impl Steps for CandleSteps {
    fn step(
        &mut self,
        _model: &mut SasRec,
        inputs: &[u32],
        targets: &[u32],
        soft: SlotLabels<'_>,
        batch: usize,
        _step_seed: u64,
    ) -> Result<f64> {
        use candle_nn::optim::Optimizer;
        if soft.is_some_and(|(_, slots)| slots.iter().any(|&r| r != NO_LABEL)) {
            return Err(Error::config(
                "distillation trains on the CPU trainer; the candle trainer learns from hard labels only",
            ));
        }
        let loss = self.candle.loss(inputs, targets, batch, true)?;
        self.optimizer.backward_step(&loss)?;
        Ok(f64::from(loss.to_scalar::<f32>()?))
    }

    fn sync(&mut self, model: &mut SasRec) -> Result<()> {
        self.candle.store_into(model)
    }
}
