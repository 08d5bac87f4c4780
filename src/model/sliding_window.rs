//! Sliding-window attention as configs name it: which layers attend only to their last `size`
//! positions, the query's own included (transformers' `kv_idx > q_idx - sliding_window`).

use super::ModelError;

#[derive(Debug, Clone, PartialEq)]
pub struct SlidingWindow {
    pub size: usize,
    /// Per layer: whether it attends through the window (else to the whole context).
    pub layers: Vec<bool>,
}

impl SlidingWindow {
    /// The window of `layer` (a global layer index), if it has one.
    pub fn of_layer(&self, layer: usize) -> Option<usize> {
        self.layers
            .get(layer)
            .copied()
            .unwrap_or(false)
            .then_some(self.size)
    }

    /// The window's size where every layer has it: then a sequence needs only the blocks of
    /// its window (`CacheConfig::sliding_window`).
    pub fn on_every_layer(&self) -> Option<usize> {
        self.layers.iter().all(|&w| w).then_some(self.size)
    }

    /// The layers' windows as a Hugging Face config states them: Mistral and Phi-3 window every
    /// layer; Qwen2 those from `max_window_layers` on, when `use_sliding_window`; Gemma 2 the
    /// even ones; a
    /// `layer_types` list (transformers 5) names each layer's kind, and is honoured wherever
    /// the architecture reads it. `None` when no layer's window is shorter than the context.
    pub fn from_hf(
        arch: &str,
        size: Option<usize>,
        layer_types: Option<&[String]>,
        max_window_layers: Option<usize>,
        num_layers: usize,
        max_position_embeddings: usize,
        source: &str,
    ) -> Result<Option<Self>, ModelError> {
        let layers: Vec<bool> = match (layer_types, arch) {
            // transformers' Mistral windows every layer whatever `layer_types` says.
            (Some(types), a) if a != "mistral" => {
                if types.len() != num_layers {
                    return Err(ModelError::Invalid(format!(
                        "{source}: layer_types names {} layers, the model has {num_layers}",
                        types.len()
                    )));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        "full_attention" => Ok(false),
                        "sliding_attention" => Ok(true),
                        other => Err(ModelError::Unsupported(format!(
                            "{source}: layer type {other:?} is not supported (supported: \
                             \"full_attention\", \"sliding_attention\")"
                        ))),
                    })
                    .collect::<Result<_, _>>()?
            }
            (_, "gemma2") => super::gemma2::default_windowed_layers(num_layers),
            (_, "qwen2") => {
                // transformers' default.
                let from = max_window_layers.unwrap_or(28);
                (0..num_layers).map(|l| l >= from).collect()
            }
            _ => vec![true; num_layers],
        };
        let Some(size) = size else {
            if layers.iter().any(|&w| w) && layer_types.is_some() {
                return Err(ModelError::Invalid(format!(
                    "{source}: layer_types names sliding_attention layers but sliding_window \
                     is not set"
                )));
            }
            return Ok(None);
        };
        if size == 0 {
            return Err(ModelError::Invalid(format!(
                "{source}: sliding_window is 0"
            )));
        }
        // A window at least as long as any sequence changes nothing.
        if size >= max_position_embeddings || !layers.iter().any(|&w| w) {
            return Ok(None);
        }
        Ok(Some(Self { size, layers }))
    }

    /// Every layer windowed with `size` (GGUF's `<arch>.attention.sliding_window`).
    pub fn every_layer(
        size: usize,
        num_layers: usize,
        max_position_embeddings: usize,
    ) -> Option<Self> {
        (size > 0 && size < max_position_embeddings).then(|| Self {
            size,
            layers: vec![true; num_layers],
        })
    }
}
