//! Which model format a module's engine takes, and whether a store entry fits it.
//! A module is llama.cpp-style when its native command's program or its container image
//! names `llama` (llama-server, llama.cpp images) or `ollama`: it takes one GGUF file.
//! It is vLLM-style when they name `vllm`: it takes a directory with `config.json` and
//! `*.safetensors`. Anything else is not checked.

use std::io::Read;
use std::path::Path;

use crate::manifest::{Module, NativeExec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    LlamaCpp,
    Vllm,
    Unknown,
}

pub fn engine_of(m: &Module) -> Engine {
    let program = match &m.native {
        Some(NativeExec::Command { argv, .. }) => argv.first().cloned(),
        Some(NativeExec::Unit(u)) => Some(u.clone()),
        None => None,
    };
    let image = m.container.as_ref().map(|c| c.image.clone());
    let names: Vec<String> = program
        .iter()
        .map(|p| {
            Path::new(p)
                .file_name()
                .map(|f| f.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default()
        })
        .chain(image.iter().map(|i| i.to_ascii_lowercase()))
        .collect();
    if names.iter().any(|n| n.contains("vllm")) {
        Engine::Vllm
    } else if names.iter().any(|n| n.contains("llama")) {
        Engine::LlamaCpp
    } else {
        Engine::Unknown
    }
}

/// Checks that `path` is a model the engine can load.
pub fn check(engine: Engine, path: &Path) -> Result<(), String> {
    match engine {
        Engine::LlamaCpp => {
            let mut magic = [0u8; 4];
            let ok = std::fs::File::open(path)
                .and_then(|mut f| f.read_exact(&mut magic))
                .is_ok()
                && &magic == b"GGUF";
            if ok {
                Ok(())
            } else {
                Err(format!(
                    "{} is not a GGUF file: a llama.cpp-style module needs one",
                    path.display()
                ))
            }
        }
        Engine::Vllm => {
            let dir = if path.is_dir() {
                path
            } else {
                path.parent().unwrap_or(path)
            };
            let has = |pred: &dyn Fn(&str) -> bool| {
                std::fs::read_dir(dir)
                    .is_ok_and(|rd| rd.flatten().any(|e| pred(&e.file_name().to_string_lossy())))
            };
            if has(&|n| n == "config.json") && has(&|n| n.ends_with(".safetensors")) {
                Ok(())
            } else {
                Err(format!(
                    "{}: a vLLM module needs a directory with config.json and *.safetensors",
                    dir.display()
                ))
            }
        }
        Engine::Unknown => Ok(()),
    }
}

/// Quantization methods vLLM runs on NVIDIA GPUs only (its CPU backend has none of them).
const GPU_ONLY_QUANT: &[&str] = &[
    "awq",
    "awq_marlin",
    "gptq",
    "gptq_marlin",
    "marlin",
    "fp8",
    "bitsandbytes",
    "exl2",
    "compressed-tensors",
];

/// The GPU-only quantization of a vLLM model directory (`config.json`'s
/// `quantization_config.quant_method`), if it has one. Blocking (reads a small file).
pub fn gpu_only_quantization(path: &Path) -> Option<String> {
    let dir = if path.is_dir() { path } else { path.parent()? };
    let f = std::fs::File::open(dir.join("config.json")).ok()?;
    let mut text = String::new();
    f.take(1 << 20).read_to_string(&mut text).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let method = v["quantization_config"]["quant_method"]
        .as_str()?
        .to_ascii_lowercase();
    GPU_ONLY_QUANT.contains(&method.as_str()).then_some(method)
}

/// A model that needs a GPU, for an engine on a machine without one (`has_gpu`: NVML shows at
/// least one GPU): refused before anything is restarted, with why.
pub fn check_gpu(engine: Engine, path: &Path, has_gpu: bool) -> Result<(), String> {
    if engine != Engine::Vllm || has_gpu {
        return Ok(());
    }
    match gpu_only_quantization(path) {
        Some(q) => Err(format!(
            "{} is quantized with {q}, which vLLM runs on NVIDIA GPUs only, and this machine has no GPU (NVML shows none): it would fail to load",
            path.display()
        )),
        None => Ok(()),
    }
}

/// What `ActivateModel` hands to validation: a store reference resolved to its file (and
/// checked against the engine), any other argument unchanged.
pub fn resolve_for(store_root: &Path, engine: Engine, requested: String) -> Result<String, String> {
    if !super::is_reference(&requested) {
        return Ok(requested);
    }
    let p = super::Store::at(store_root)
        .resolve(&requested)
        .map_err(|e| e.to_string())?;
    check(engine, &p)?;
    Ok(p.display().to_string())
}

#[cfg(test)]
mod gpu_tests {
    use super::*;

    #[test]
    fn gpu_only_quantizations_are_refused_without_a_gpu() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            d.path().join("config.json"),
            r#"{"architectures":["LlamaForCausalLM"],"quantization_config":{"quant_method":"AWQ","bits":4}}"#,
        )
        .expect("write");
        let e = check_gpu(Engine::Vllm, d.path(), false).expect_err("refused");
        assert!(
            e.contains("quantized with awq, which vLLM runs on NVIDIA GPUs only"),
            "{e}"
        );
        assert!(
            check_gpu(Engine::Vllm, d.path(), true).is_ok(),
            "a GPU: fine"
        );
        assert!(
            check_gpu(Engine::LlamaCpp, d.path(), false).is_ok(),
            "not vLLM"
        );
        std::fs::write(d.path().join("config.json"), r#"{"architectures":["X"]}"#).expect("write");
        assert!(
            check_gpu(Engine::Vllm, d.path(), false).is_ok(),
            "not quantized: CPU is possible"
        );
    }
}
