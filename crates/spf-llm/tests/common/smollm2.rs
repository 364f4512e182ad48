//! SmolLM2-135M from the fetched assets, loaded once per test binary, for the tests that need the
//! real model (the golden values, SPF on its LoRA adapters).

use std::io::Write;
use std::sync::OnceLock;

use burn::tensor::Device;
use spf_llm::chat::ChatTokenizer;
use spf_llm::gguf::Gguf;
use spf_llm::llama::Llama;
use spf_llm::smollm::Assets;

pub struct Loaded {
    /// Read by the golden tests only.
    #[allow(dead_code)]
    pub gguf: Gguf,
    pub tokenizer: ChatTokenizer,
    pub model: Llama,
}

/// The model, loaded once for all tests of a binary; `None` (after a message) when the assets
/// are missing on a developer's machine without network. In CI (`CI=true`, where the registries are reachable
/// and `.ci/run` fetches the assets first) missing assets fail the tests instead of skipping them.
pub fn loaded() -> Option<&'static Loaded> {
    static LOADED: OnceLock<Option<Loaded>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let assets = match Assets::locate() {
                Ok(a) => a,
                Err(why) => {
                    assert!(
                        std::env::var("CI").as_deref() != Ok("true"),
                        "CI must run the SmolLM2 tests, but {why}"
                    );
                    // Past the test harness's capture, so that the skip shows in the output.
                    let _ = writeln!(
                        std::io::stderr(),
                        "SKIPPED SmolLM2 tests (no assets on this machine; CI fails \
                         instead): {why}"
                    );
                    return None;
                }
            };
            let gguf = Gguf::open(&assets.model).expect("the fetched model parses");
            let tokenizer = ChatTokenizer::from_gguf(&gguf).expect("the tokenizer builds");
            let model = Llama::from_gguf(&gguf, &Device::default()).expect("the model loads");
            Some(Loaded {
                gguf,
                tokenizer,
                model,
            })
        })
        .as_ref()
}
