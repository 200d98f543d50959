//! Cutting a model into the device and cloud bundles, and loading them back.
//!
//! A model with L layers is cut at `K1` and `L - K2`:
//! - `device/`: embedding, layers `[0, K1)` (input submodel), layers `[L-K2, L)` + final norm +
//!   LM head (output submodel), tokenizer and chat template;
//! - `cloud/`: layers `[K1, L-K2)` (middle submodel) only: no embedding, head or tokenizer.
//!
//! Each bundle is a `weights.safetensors` (Hugging Face tensor names) and a `manifest.json`
//! whose **split id** is derived from the model's content hash and the layer ranges, so both
//! halves of one split, and the same split made twice, carry the same id.
//!
//! - [`plan`]: the plan, the split id, the manifest;
//! - [`write`](mod@write): cutting a loaded model into bundles;
//! - [`bundle`]: loading the bundles back;
//! - [`pipeline`]: input → middle → output in one process, the reference a split must compute.
//!
//! May use [`crate::model`], [`crate::io`], [`crate::decode`] and [`crate::util`]; never a role.

pub mod bundle;
pub mod pipeline;
pub mod plan;
pub mod write;

pub use bundle::{read_manifest, CloudBundle, DeviceBundle};
pub use pipeline::{LocalSplitDecoder, SplitPipeline};
pub use plan::{parse_dtype, Manifest, Role, SourceInfo, SplitPlan, FORMAT_VERSION, MANIFEST_FILE, WEIGHTS_FILE};
pub use write::{write_split, SplitOutcome};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_validation_and_ranges() {
        let p = SplitPlan::new(30, 2, 3).unwrap();
        assert_eq!((p.input_range(), p.middle_range(), p.output_range()), (0..2, 2..27, 27..30));
        assert!(SplitPlan::new(30, 0, 2).is_err());
        assert!(SplitPlan::new(30, 2, 0).is_err());
        assert!(SplitPlan::new(30, 15, 15).is_err());
        assert!(SplitPlan::new(30, 14, 15).is_ok());
    }

    #[test]
    fn split_id_depends_on_hash_and_ranges_only() {
        let p = SplitPlan::new(30, 2, 2).unwrap();
        assert_eq!(p.split_id("abc"), p.split_id("abc"));
        assert_ne!(p.split_id("abc"), p.split_id("abd"));
        assert_ne!(p.split_id("abc"), SplitPlan::new(30, 3, 2).unwrap().split_id("abc"));
        assert_eq!(p.split_id("abc").len(), 32);
    }
}
