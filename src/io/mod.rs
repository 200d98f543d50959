//! Getting models and data in: model sources (Hugging Face directory, hub id, GGUF) and their
//! loaders, the hub client, tokenizers with chat templates and streaming detokenization, and
//! conversation data sets.
//!
//! May use [`crate::model`] (a loaded source builds the engine's pieces) and [`crate::util`];
//! never a role (`edge`, `cloud`, `train`).

pub mod dataset;
pub mod hub;
pub mod source;
pub mod tokenizer;
