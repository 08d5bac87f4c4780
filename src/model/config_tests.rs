//! `ModelConfig::from_hf_config` on the layouts `transformers` writes, and its refusals.

use serde_json::{json, Value};

use super::*;

/// SmolLM2-135M's shape, plus `extra` keys.
fn config(extra: Value) -> Result<ModelConfig, ModelError> {
    let mut c = json!({
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "max_position_embeddings": 8192, "hidden_act": "silu",
    });
    for (k, v) in extra.as_object().expect("an object") {
        c[k] = v.clone();
    }
    let path = std::env::temp_dir().join(format!(
        "sluice-config-{}-{}.json",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&path, c.to_string()).unwrap();
    let cfg = ModelConfig::from_hf_config(&path);
    let _ = std::fs::remove_file(&path);
    cfg
}

fn refusal(extra: Value) -> String {
    config(extra).expect_err("refused").to_string()
}

const LLAMA3: &str = r#"{"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}"#;

#[test]
fn rope_theta_is_read_from_either_layout() {
    assert_eq!(config(json!({})).unwrap().rope_theta, 10_000.0);
    assert_eq!(
        config(json!({"rope_theta": 100000.0})).unwrap().rope_theta,
        100_000.0
    );
    // transformers 5: only under rope_parameters.
    let v5 = json!({"rope_parameters": {"rope_type": "default", "rope_theta": 100000.0}});
    let cfg = config(v5).unwrap();
    assert_eq!((cfg.rope_theta, cfg.rope_scaling), (100_000.0, None));
    let both = json!({"rope_theta": 5e5, "rope_parameters": {"rope_theta": 5e5}});
    assert_eq!(config(both).unwrap().rope_theta, 5e5);
    let e = refusal(json!({"rope_theta": 1e4, "rope_parameters": {"rope_theta": 5e5}}));
    assert!(
        e.contains("rope_theta 10000 and rope_parameters.rope_theta 500000"),
        "{e}"
    );
}

#[test]
fn llama3_scaling_is_read_from_either_layout() {
    let mut scaling: Value = serde_json::from_str(LLAMA3).unwrap();
    scaling["rope_type"] = json!("llama3");
    let want = Some(Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    });
    let v4 = config(json!({"rope_theta": 5e5, "rope_scaling": scaling.clone()})).unwrap();
    assert_eq!(v4.rope_scaling, want);
    let mut params = scaling.clone();
    params["rope_theta"] = json!(5e5);
    let v5 = config(json!({"rope_parameters": params})).unwrap();
    assert_eq!((v5.rope_theta, v5.rope_scaling), (5e5, want));
}

#[test]
fn rope_types_it_does_not_implement_are_refused_by_name() {
    for (key, ty) in [("rope_scaling", "yarn"), ("rope_parameters", "linear")] {
        let e = refusal(json!({key: {"rope_type": ty, "factor": 4.0}}));
        assert!(e.contains(&format!("{key} type \"{ty}\"")), "{e}");
    }
    let e = refusal(json!({"rope_scaling": {"type": "dynamic", "factor": 2.0}}));
    assert!(e.contains("\"dynamic\""), "{e}");
}

#[test]
fn keys_that_change_the_math_are_refused_by_name() {
    for (extra, named) in [
        (
            json!({"hidden_act": "gelu_pytorch_tanh"}),
            "hidden_act \"gelu_pytorch_tanh\"",
        ),
        (json!({"mlp_bias": true}), "mlp_bias"),
        (
            json!({"partial_rotary_factor": 0.5}),
            "partial_rotary_factor 0.5",
        ),
        (json!({"num_local_experts": 8}), "mixture of 8 experts"),
    ] {
        let e = refusal(extra);
        assert!(e.contains(named) && e.contains("not supported"), "{e}");
    }
    // The values sluice implements load.
    config(json!({"mlp_bias": false, "partial_rotary_factor": 1.0})).unwrap();
}

#[test]
fn sliding_windows_are_read_per_layer_as_transformers_applies_them() {
    let window = |extra: Value| config(extra).unwrap().sliding_window;
    let every = |size| {
        Some(SlidingWindow {
            size,
            layers: vec![true; 30],
        })
    };
    // Mistral 7B v0.1: a 4,096-token window over a 32k context, every layer, served whole.
    let mistral = json!({"model_type": "mistral", "max_position_embeddings": 32768,
                         "sliding_window": 4096});
    assert_eq!(
        config(mistral.clone()).unwrap().max_position_embeddings,
        32768
    );
    assert_eq!(window(mistral), every(4096));
    // Later Mistrals turn it off with null; a window as wide as the context changes nothing.
    assert_eq!(
        window(json!({"model_type": "mistral", "sliding_window": null})),
        None
    );
    assert_eq!(window(json!({"sliding_window": 8192})), None);
    // Qwen2 names a window it uses only with use_sliding_window (off by default), from
    // max_window_layers on.
    let qwen = |extra: Value| {
        let mut c = json!({"model_type": "qwen2", "sliding_window": 4096, "max_window_layers": 21});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        window(c)
    };
    assert_eq!(qwen(json!({})), None);
    assert_eq!(qwen(json!({"use_sliding_window": false})), None);
    let layers: Vec<bool> = (0..30).map(|l| l >= 21).collect();
    assert_eq!(
        qwen(json!({"use_sliding_window": true})),
        Some(SlidingWindow { size: 4096, layers })
    );
    // transformers 5 writes layer_types, which wins for Qwen2 (not for Mistral, whose model
    // windows every layer whatever it says).
    let mut types = vec!["full_attention"; 30];
    types[1] = "sliding_attention";
    let got = qwen(json!({"use_sliding_window": true, "layer_types": types}));
    assert_eq!(
        got.map(|w| w.layers.iter().filter(|&&l| l).count()),
        Some(1)
    );
    let mistral_types =
        json!({"model_type": "mistral", "sliding_window": 16, "layer_types": types});
    assert_eq!(window(mistral_types), every(16));
    // Layer types it does not implement, or a list of the wrong length, are refused.
    types[2] = "chunked_attention";
    let e = refusal(json!({"sliding_window": 16, "layer_types": types}));
    assert!(
        e.contains("\"chunked_attention\"") && e.contains("not supported"),
        "{e}"
    );
    let e = refusal(json!({"sliding_window": 16, "layer_types": ["full_attention"]}));
    assert!(e.contains("layer_types names 1 layers"), "{e}");
}

/// Gemma 2's keys with `transformers`' defaults (its 2B config leaves most out), the window
/// on even layers where `layer_types` is absent, and its refusals.
#[test]
fn gemma2_is_read_with_transformers_defaults() {
    let gemma = |extra: Value| {
        let mut c = json!({"model_type": "gemma2", "hidden_act": "gelu_pytorch_tanh",
                           "sliding_window": 4096, "num_hidden_layers": 4});
        for (k, v) in extra.as_object().expect("an object") {
            c[k] = v.clone();
        }
        config(c)
    };
    let c = gemma(json!({})).unwrap();
    let g = c.gemma2.expect("Gemma 2's settings");
    assert_eq!(g.query_pre_attn_scalar, 256.0);
    assert_eq!(g.attn_logit_softcap, Some(50.0));
    assert_eq!(g.final_logit_softcap, Some(30.0));
    let w = c.sliding_window.expect("a window");
    assert_eq!((w.size, w.layers), (4096, vec![true, false, true, false]));

    let c = gemma(
        json!({"query_pre_attn_scalar": 144, "attn_logit_softcapping": null,
                         "final_logit_softcapping": 30.0,
                         "layer_types": ["full_attention", "sliding_attention",
                                         "full_attention", "sliding_attention"]}),
    )
    .unwrap();
    let g = c.gemma2.unwrap();
    assert_eq!(
        (g.query_pre_attn_scalar, g.attn_logit_softcap),
        (144.0, None)
    );
    assert_eq!(c.sliding_window.unwrap().layers, [false, true, false, true]);
    assert_eq!(config(json!({})).unwrap().gemma2, None);

    let refused = |extra: Value| gemma(extra).expect_err("refused").to_string();
    assert!(refused(json!({"hidden_activation": "gelu"})).contains("hidden_activation"));
    assert!(refused(json!({"use_bidirectional_attention": true})).contains("bidirectional"));
    assert!(refused(json!({"final_logit_softcapping": -1.0})).contains("final_logit_softcapping"));
}
