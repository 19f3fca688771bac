"""Tests for model.py's LoRA adapters. The oracles are PEFT (adapters saved by one side load in the other with the
same logits) and transformers (the merged export), neither of which the product imports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from model import (LORA_TARGETS, LoRALinear, adapters_disabled, add_lora, load, load_adapter, merge_lora, save,
                   save_adapter, token_logprobs, Transformer)

ERRORS = (ValueError, FileNotFoundError)


def hf_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def tokens(vocab, seed=0):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x):
    return model(x).float() if isinstance(model, Transformer) else model(input_ids=x).logits.float()


@torch.no_grad()
def randomize_adapters(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def assert_close(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-5)


def one_line(excinfo, *names):
    msg = str(excinfo.value)
    assert "\n" not in msg.strip() and any(n in msg for n in names), msg


def test_fresh_adapters_change_nothing_and_disabled_adapters_are_the_base(tiny_llama_dir):
    model, _ = load(tiny_llama_dir, dtype=torch.float32)
    x = tokens(model.args.vocab_size)
    base = logits(model, x)
    add_lora(model, r=4, alpha=8)
    assert torch.equal(logits(model, x), base)  # lora_B = 0
    randomize_adapters(model)
    adapted = logits(model, x)
    assert (adapted - base).abs().max() > 0.05
    with adapters_disabled(model):
        assert torch.equal(logits(model, x), base)
    assert torch.equal(logits(model, x), adapted)  # back on after the block


def test_adapters_sit_on_every_projection_and_only_they_get_gradients(tiny_llama3_dir):
    model, _ = load(tiny_llama3_dir, dtype=torch.float32)
    add_lora(model, r=4, alpha=16, dropout=0.1).train()
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == set(LORA_TARGETS)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 7 * model.args.n_layers
    randomize_adapters(model)
    x = tokens(model.args.vocab_size)
    token_logprobs(model, x, torch.tensor([1, 1]), torch.tensor([24, 24])).sum().backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.dtype == torch.float32 and p.grad.abs().max() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    base = {n: p.clone() for n, p in model.named_parameters() if "lora_" not in n}
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()  # as train.py builds it
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)  # bit-identical


def test_bf16_base_with_fp32_adapters(tiny_llama3_dir):
    model, _ = load(tiny_llama3_dir, dtype=torch.bfloat16)
    add_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    x = tokens(model.args.vocab_size)
    assert model(x).dtype == torch.bfloat16  # without autocast: adapters in fp32, the sum back in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = token_logprobs(model, x, torch.tensor([1, 1]), torch.tensor([24, 24])).sum()
    lp.backward()
    assert all(p.grad.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


def test_our_adapter_loads_in_peft(tmp_path, tiny_llama3_dir):
    model, _ = load(tiny_llama3_dir, dtype=torch.float32)
    add_lora(model, r=4, alpha=8, dropout=0.05)
    randomize_adapters(model)
    out = save_adapter(model, str(tmp_path / "adapter"), tiny_llama3_dir)
    config = json.loads((Path(out) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == tiny_llama3_dir and config["r"] == 4 and config["lora_alpha"] == 8
    peft = PeftModel.from_pretrained(hf_model(tiny_llama3_dir), out).eval()
    x = tokens(model.args.vocab_size)
    ours, theirs = logits(model.eval(), x), logits(peft, x)
    with peft.disable_adapter():
        assert (theirs - logits(peft, x)).abs().max() > 0.05  # the adapters matter
    assert_close(ours, theirs)


def test_peft_adapter_loads_in_ours(tmp_path, tiny_llama_dir):
    """PEFT's classic targets (q_proj, v_proj), saved by PEFT; load() of the adapter directory takes its base."""
    config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                        task_type="CAUSAL_LM")
    peft = get_peft_model(hf_model(tiny_llama_dir), config)
    randomize_adapters(peft, seed=1)
    peft.save_pretrained(str(tmp_path / "adapter"))
    model, tokenizer = load(str(tmp_path / "adapter"), dtype=torch.float32)
    assert tokenizer.eos_ids and not model.training
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)} == {"q_proj", "v_proj"}
    x = tokens(model.args.vocab_size, seed=2)
    assert_close(logits(model, x), logits(peft.eval(), x))


def test_merged_export_loads_in_transformers(tmp_path, tiny_llama3_dir):
    model, tokenizer = load(tiny_llama3_dir, dtype=torch.float32)
    add_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    x = tokens(model.args.vocab_size, seed=3)
    adapted = logits(model, x)
    with pytest.raises(ValueError) as e:  # the LoRA model itself has no HF layout
        save(model, tokenizer, str(tmp_path / "unmerged"))
    one_line(e, "merge_lora")
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())
    save(merged, tokenizer, str(tmp_path / "merged"))
    torch.testing.assert_close(logits(hf_model(tmp_path / "merged"), x), adapted, rtol=1e-5, atol=1e-4)


def test_phi3_is_refused(tiny_phi3_dir):
    model, _ = load(tiny_phi3_dir, dtype=torch.float32)
    with pytest.raises(ValueError) as e:
        add_lora(model, r=4, alpha=8)
    one_line(e, "phi3")


def test_adapter_errors_are_one_line(tmp_path, tiny_llama_dir):
    model, _ = load(tiny_llama_dir, dtype=torch.float32)
    out = Path(save_adapter(add_lora(model, r=4, alpha=8), str(tmp_path / "a"), tiny_llama_dir))
    config = json.loads((out / "adapter_config.json").read_text())
    fresh = lambda: load(tiny_llama_dir, dtype=torch.float32)[0]  # noqa: E731

    (out / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))  # the weights have rank 4
    with pytest.raises(ERRORS) as e:
        load_adapter(fresh(), str(out))
    one_line(e, "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight")

    (out / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))
    with pytest.raises(ERRORS) as e:  # the file has adapters on every projection
        load_adapter(fresh(), str(out))
    one_line(e, "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight' is (4, 128) here but absent")

    for bad in ({"use_dora": True}, {"target_modules": "all-linear"}, {"target_modules": ["lm_head"]},
                {"peft_type": "IA3"}):
        (out / "adapter_config.json").write_text(json.dumps({**config, **bad}))
        with pytest.raises(ERRORS) as e:
            load_adapter(fresh(), str(out))
        one_line(e, *bad)

    (out / "adapter_model.safetensors").unlink()
    with pytest.raises(ERRORS) as e:
        load_adapter(fresh(), str(out))
    one_line(e, "adapter_model.safetensors")
    (out / "adapter_config.json").unlink()
    with pytest.raises(ERRORS) as e:
        load_adapter(fresh(), str(out))
    one_line(e, "adapter_config.json")
