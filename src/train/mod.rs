//! Training: how a model's weights are learned from the training set. It
//! may import the config, the dataset and the models; models never import
//! it, and it never imports a stage.
//!
//! ```text
//! fit ──► steps::Steps: cpu::Trainer (hand-written passes, Adam)
//!  │                    candle::CandleSteps (autograd on any candle device)
//!  │                    both draw sampled-softmax negatives from sampler
//!  ├──► stopping (validation, early stopping) ──► history (training/<model>.parquet)
//!  └──► distillation (soft labels streamed through a shuffle buffer) ──► losses
//!        from a file, or made per epoch by a neighbour baseline (neighbor_labels)
//! meanpool: the baseline's own candle loop, with the same early stopping
//! ```

pub mod candle;
pub mod cpu;
pub mod distillation;
pub mod fit;
pub mod history;
pub mod losses;
pub mod meanpool;
pub mod neighbor_labels;
pub mod pool;
pub mod sampler;
pub mod steps;
pub mod stopping;

pub use distillation::{
    Distillation, GroupOrder, HeldLabels, LabelInfo, LabelSource, NO_LABEL, ShuffleBuffer, SoftRows,
};
pub use fit::{
    fill_window, fit, fit_distilled, fit_on_device, fit_with, target_position, train_sequences,
};
pub use neighbor_labels::NeighborLabels;
pub use pool::thread_pool;
pub use steps::{SlotLabels, Steps, TrainSettings};
pub use stopping::{EarlyStopping, EpochLog, best_epoch};
