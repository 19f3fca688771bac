"""Shared test fixtures: tiny random Hugging Face checkpoints built offline, in-process.

Nothing here touches the network. The models are random `transformers` models saved with `save_pretrained`; tests
of the model alone build theirs from a `transformers` config in the test itself (the `checkpoint` fixture). The
three session checkpoints add a tokenizer trained in milliseconds (tiny_tokenizers.py) with the real chat
template (tests/data/*.jinja) and generation_config.json, so `model.load` sees the layout it would see for SmolLM2,
Llama-3.1 or Phi-3.5-mini.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Tests must never reach the network. Set this before anything imports huggingface_hub,
# which reads it once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tiny_tokenizers import build_tokenizer, tokenizer_ids  # noqa: E402,F401  (tests import them from here)

# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------

# The shape of every tiny model: GQA (4 heads, 2 kv heads), untied embeddings, weights drawn with std 0.15.
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.15, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=2)

MODEL_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}


def save_random_model(config, out_dir, seed=0) -> str:
    """Save a random float32 `transformers` model of `config` into out_dir. Every norm weight and bias is perturbed
    too, so a loader that ignores a norm or a bias gives visibly different logits."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASSES[config.model_type])(config).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(out_dir))
    return str(out_dir)


@pytest.fixture
def checkpoint(tmp_path, tiny_llama_dir):
    """checkpoint(config, seed) -> a directory holding a random model of a `transformers` config, for tests of the
    model alone (logits parity, config handling). model.load wants a tokenizer too: it gets tiny_llama_dir's."""
    def make(config, seed=0, name="m"):
        out = save_random_model(config, tmp_path / name, seed)
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            shutil.copy(Path(tiny_llama_dir) / f, Path(out) / f)
        return out
    return make


def make_tiny_model(out_dir, arch: str = "llama", tokenizer_style: str = "chatml", seed: int = 0, **config_overrides) -> str:
    """A tiny random checkpoint of `arch` (TINY's shape) with a trained tokenizer of `tokenizer_style` and the
    generation_config.json of the model it imitates: chatml = SmolLM2, llama3 = Llama-3.1, spm = Phi-3.5-mini."""
    import transformers

    out = Path(out_dir)
    build_tokenizer(out, tokenizer_style)
    ids = tokenizer_ids(out)
    if tokenizer_style == "chatml":
        bos, eos, pad = ids["<|im_start|>"], ids["<|im_end|>"], ids["<|im_end|>"]
        gen_eos = eos  # SmolLM2's generation_config.json has a single int
        extra_gen = {}
    elif tokenizer_style == "spm":  # Phi-3.5-mini: generation_config lists <|end|>, <|assistant|>, <|endoftext|>
        bos, eos, pad = ids["<s>"], ids["<|endoftext|>"], ids["<|endoftext|>"]
        gen_eos = [ids["<|end|>"], ids["<|assistant|>"], ids["<|endoftext|>"]]
        extra_gen = {}
    else:
        bos, pad = ids["<|begin_of_text|>"], ids["<|end_of_text|>"]
        gen_eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
        eos = gen_eos
        extra_gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    kwargs = dict(TINY, vocab_size=ids["vocab_size"], bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)
    if arch in ("mistral", "phi3"):
        kwargs["sliding_window"] = None
    kwargs.update(config_overrides)
    config = getattr(transformers, {"llama": "LlamaConfig", "mistral": "MistralConfig", "phi3": "Phi3Config",
                                    "qwen2": "Qwen2Config"}[arch])(**kwargs)
    save_random_model(config, out, seed)
    gen = {"bos_token_id": bos, "eos_token_id": gen_eos, "pad_token_id": pad, **extra_gen}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return str(out)


def edit_config(model_dir, **changes) -> dict:
    """Rewrite keys of model_dir/config.json in place (value None deletes the key). Returns the new config."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg, indent=2))
    return cfg


# Llama-3.1's real rope scaling block.
LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


# Phi-3.5-style longrope with a tiny original context, so both factor sets are reachable in a test.
PHI3_LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "original_max_position_embeddings": 32,
    # head_dim 16 -> 8 factors each; distinct values so a swapped or misindexed list shows
    "short_factor": [1.0 + 0.1 * i for i in range(8)],
    "long_factor": [2.0 + 0.5 * i for i in range(8)],
}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """SmolLM2-like: llama, ChatML tokenizer, tied embeddings, GQA."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama", tokenizer_style="chatml", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory) -> str:
    """Llama-3.1-like: llama3 tokenizer (pad == an eos id), untied, llama3 rope scaling with a
    small original context (64) so that the scaling changes logits at short lengths."""
    return make_tiny_model(
        tmp_path_factory.mktemp("tiny_llama3"),
        arch="llama",
        tokenizer_style="llama3",
        seed=1,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        rope_parameters={**LLAMA31_ROPE, "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    )


@pytest.fixture(scope="session")
def tiny_phi3_dir(tmp_path_factory) -> str:
    """Phi-3.5-mini-like: phi3 (fused qkv / gate_up), longrope (original context 32, max 256), SentencePiece-style
    tokenizer with Phi-3.5's chat template."""
    return make_tiny_model(
        tmp_path_factory.mktemp("tiny_phi3"),
        arch="phi3",
        tokenizer_style="spm",
        seed=3,
        max_position_embeddings=256,
        original_max_position_embeddings=32,
        rope_parameters=dict(PHI3_LONGROPE),
    )


# Errors that mean the process group never came up (e.g. the port torchrun picked was taken before it was bound):
# a property of the machine, not of the code under test.
LAUNCH_ERRORS = ("Address already in use", "Connection reset by peer", "Connection refused", "DistNetworkError",
                 "RendezvousConnectionError", "connectFullMesh")


def run_command(cmd, **kwargs):
    """subprocess.run(cmd, capture_output=True, text=True, **kwargs), retried once if a torchrun launch failed
    while setting up its process group; any other failure is returned as is."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0 and "torch.distributed.run" in cmd and \
            any(e in result.stdout + result.stderr for e in LAUNCH_ERRORS):
        result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return result


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds; still run by CI (each under 2 minutes)")
