"""Tests for model.py: loading HF checkpoints, forward, generate, token_logprobs, save, tokenizer.

Every test checks model.py against something it does not share code with: `transformers`
(the reference implementation the checkpoints come from), a brute-force computation, or a
number worked out by hand. The checkpoints are tiny random models: the logits-parity tests build theirs
from a `transformers` config in the test; the rest use conftest.py's, which come with trained tokenizers.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

from conftest import LLAMA31_ROPE, PHI3_LONGROPE, TINY, edit_config, make_tiny_model, tokenizer_ids
from model import ALIASES, generate, load, save, token_logprobs

ATOL = 1e-4  # float32 logits parity with transformers

ERRORS = (ValueError, FileNotFoundError, OSError)


# --------------------------------------------------------------------------------------
# helpers (oracles)
# --------------------------------------------------------------------------------------


def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@torch.no_grad()
def hf_logits(hf, tokens, position_ids=None):
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    return hf(input_ids=tokens, attention_mask=torch.ones_like(tokens), **kwargs).logits.float()


@torch.no_grad()
def our_logits(model, tokens, positions=None):
    if positions is None:
        return model(tokens).float()
    return model(tokens, positions=positions).float()


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def random_tokens(vocab_size, batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


def assert_parity(model_dir, tokens, positions=None, atol=ATOL):
    """model.py logits == transformers logits on the same checkpoint. Returns the HF logits."""
    hf = hf_model(model_dir)
    model, _ = load(str(model_dir), dtype=torch.float32)
    ref = hf_logits(hf, tokens, None if positions is None else positions.expand_as(tokens))
    ours = our_logits(model, tokens, positions)
    assert ours.shape == (*tokens.shape, hf.config.vocab_size)
    diff = max_diff(ours, ref)
    assert diff <= atol, f"max |logits - transformers| = {diff:.3g} > {atol}"
    return ref


@torch.no_grad()
def brute_force_greedy(hf, prompt, n):
    """Greedy continuation by full recomputation, no cache, no stopping."""
    ids = torch.tensor([prompt])
    for _ in range(n):
        nxt = hf(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return ids[0, len(prompt):].tolist()


def cut_at_first(tokens, stop_ids):
    """Prefix of tokens up to and including the first token in stop_ids."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1]
    return list(tokens)


def copy_dir(src, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def one_line_error(excinfo, *names):
    """The error message is one line and names at least one of `names`."""
    msg = str(excinfo.value)
    assert msg.strip(), "empty error message"
    assert "\n" not in msg.strip(), f"error message is not one line:\n{msg}"
    assert any(n in msg for n in names), f"error message {msg!r} names none of {names}"


def phi3_config(**overrides):
    """Phi-3.5-mini in miniature: fused qkv / gate_up, longrope with an original context of 32 (max 256)."""
    return Phi3Config(**{**TINY, "max_position_embeddings": 256, "original_max_position_embeddings": 32,
                         "rope_parameters": dict(PHI3_LONGROPE), "sliding_window": None, **overrides})


def qwen2_checkpoint(checkpoint, name="m"):
    """Qwen2.5 in miniature: q/k/v biases, tied embeddings."""
    d = checkpoint(Qwen2Config(**{**TINY, "tie_word_embeddings": True}, use_sliding_window=False, max_window_layers=1),
                   seed=4, name=name)
    # Real Qwen2.5 configs carry a sliding_window value that is switched off by use_sliding_window.
    edit_config(d, sliding_window=4096, layer_types=None)
    return d


# --------------------------------------------------------------------------------------
# 1. logits parity with transformers
# --------------------------------------------------------------------------------------


def test_logits_llama_tied_gqa(tiny_llama_dir):
    with safe_open(str(Path(tiny_llama_dir) / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: the checkpoint has no lm_head
    tokens = random_tokens(tokenizer_ids(tiny_llama_dir)["vocab_size"], 2, 24)
    ref = assert_parity(tiny_llama_dir, tokens)
    assert ref.std() > 0.1  # the random model is not degenerate


def test_logits_llama3_rope_scaling_past_original_context(tiny_llama3_dir):
    # original_max_position_embeddings is 64 here; 100 tokens reach well past it.
    vocab = tokenizer_ids(tiny_llama3_dir)["vocab_size"]
    tokens = random_tokens(vocab, 2, 100, seed=1)
    ref = assert_parity(tiny_llama3_dir, tokens)

    # The scaling must matter for this test to mean anything: without it, logits change.
    hf = hf_model(tiny_llama3_dir)
    hf.config.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    unscaled = type(hf)(hf.config).eval()
    unscaled.load_state_dict(hf.state_dict())
    assert max_diff(hf_logits(unscaled, tokens), ref) > 1e-2


@pytest.mark.parametrize("positions_shape", ["(T,)", "(B,T)"])
def test_logits_positions_past_8192_with_llama31_scaling(checkpoint, positions_shape):
    config = LlamaConfig(**{**TINY, "max_position_embeddings": 131072},
                         rope_parameters={**LLAMA31_ROPE, "rope_theta": 500000.0})
    d = checkpoint(config, seed=2)
    tokens = random_tokens(config.vocab_size, 2, 16, seed=2)
    positions = torch.arange(9000, 9016)
    if positions_shape == "(B,T)":
        positions = positions.expand(2, 16).clone()
    assert_parity(d, tokens, positions=positions)


def test_logits_linear_rope_scaling(checkpoint):
    """Linear ("position interpolation") scaling divides every position by the factor: parity with transformers, and
    visibly different logits from the unscaled model at the same positions."""
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    config = LlamaConfig(**{**TINY, "max_position_embeddings": 16384}, rope_parameters=rope)
    d = checkpoint(config, seed=3)
    tokens = random_tokens(config.vocab_size, 2, 16, seed=3)
    positions = torch.arange(9000, 9016)
    scaled = assert_parity(d, tokens, positions=positions)
    plain = checkpoint(LlamaConfig(**{**TINY, "max_position_embeddings": 16384},
                                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), seed=3, name="plain")
    assert max_diff(our_logits(load(plain)[0], tokens, positions), scaled) > 1e-2


def test_logits_default_positions_equal_arange(tiny_llama_dir):
    model, _ = load(tiny_llama_dir)
    tokens = random_tokens(tokenizer_ids(tiny_llama_dir)["vocab_size"], 2, 12)
    base = our_logits(model, tokens)
    assert max_diff(base, our_logits(model, tokens, torch.arange(12))) <= 1e-6
    # RoPE only sees relative positions: shifting all of them leaves the logits unchanged ...
    assert max_diff(base, our_logits(model, tokens, torch.arange(12) + 100)) <= 1e-4
    # ... while spreading them out changes the logits
    assert max_diff(base, our_logits(model, tokens, torch.arange(12) * 3)) > 1e-2


def test_logits_mistral(checkpoint):
    config = MistralConfig(**TINY, sliding_window=None, rms_norm_eps=1e-2,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    assert_parity(checkpoint(config, seed=5), random_tokens(config.vocab_size, 2, 30, seed=5))


def test_logits_phi3_longrope_long_and_short(tiny_phi3_dir):
    d = tiny_phi3_dir
    vocab = tokenizer_ids(d)["vocab_size"]
    long_tokens = random_tokens(vocab, 2, 48, seed=6)  # 48 > original 32: long factors
    ref_long = assert_parity(d, long_tokens)
    short_tokens = long_tokens[:, :20]  # 20 <= 32: short factors
    ref_short = assert_parity(d, short_tokens)
    # the two factor sets really differ on the shared prefix, so both branches were tested
    assert max_diff(ref_long[:, :20], ref_short) > 1e-2
    # at the boundary: 32 tokens still use the short factors, 33 the long ones
    assert_parity(d, long_tokens[:, :32])
    assert_parity(d, long_tokens[:, :33])


def test_logits_qwen2_biases_tied(checkpoint):
    d = qwen2_checkpoint(checkpoint)
    tensors = load_file(str(Path(d) / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.bias"].abs().max() > 0.05  # biases are non-zero
    assert "lm_head.weight" not in tensors
    assert_parity(d, random_tokens(TINY["vocab_size"], 2, 30, seed=7))


def _to_classic_rope_keys(d, case):
    """Rewrite config.json the way pre-v5 transformers (and most hub checkpoints) write it."""
    cfg = json.loads((Path(d) / "config.json").read_text())
    rp = dict(cfg.pop("rope_parameters"))
    theta = rp.pop("rope_theta")
    if case == "default":
        scaling = None
    elif case == "llama3":
        scaling = rp  # {"rope_type": "llama3", "factor": ..., ...}
    else:  # Phi-3 style: {"type": "longrope", short_factor, long_factor}; original max at top level
        scaling = {"type": "longrope", "short_factor": rp["short_factor"], "long_factor": rp["long_factor"]}
    cfg["rope_theta"] = theta
    cfg["rope_scaling"] = scaling
    (Path(d) / "config.json").write_text(json.dumps(cfg, indent=2))


@pytest.mark.parametrize("case", ["default", "llama3", "longrope"])
def test_classic_rope_keys_and_rope_parameters_both_load(checkpoint, tmp_path, case):
    if case == "default":
        config = LlamaConfig(**TINY, rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    elif case == "llama3":
        config = LlamaConfig(**TINY, rope_parameters={**LLAMA31_ROPE, "original_max_position_embeddings": 16,
                                                      "rope_theta": 500000.0})
    else:
        config = phi3_config()
    d = checkpoint(config, seed=8, name="new")
    classic = copy_dir(d, tmp_path / "classic")
    _to_classic_rope_keys(classic, case)
    assert "rope_parameters" in json.loads((Path(d) / "config.json").read_text())
    assert "rope_parameters" not in json.loads((Path(classic) / "config.json").read_text())

    tokens = random_tokens(config.vocab_size, 2, 40, seed=8)
    ref = assert_parity(d, tokens)
    # transformers reads the hand-written classic config to the same model (checks the rewrite)
    assert max_diff(hf_logits(hf_model(classic), tokens), ref) <= 1e-6
    assert_parity(classic, tokens)


# Checkpoint features outside the core contract. Silently loading them wrong is the one
# unacceptable outcome: model.py must either match transformers or refuse with a one-line error.
MATCH_OR_REFUSE = {
    "llama_explicit_head_dim": lambda: LlamaConfig(**TINY, head_dim=32),
    "mistral_explicit_head_dim": lambda: MistralConfig(**TINY, sliding_window=None, head_dim=8),
    "llama_attention_bias": lambda: LlamaConfig(**TINY, attention_bias=True),
    "llama_mlp_bias": lambda: LlamaConfig(**TINY, mlp_bias=True),
    "phi3_partial_rotary": lambda: phi3_config(rope_parameters={  # 4 factors: rope covers half of head_dim 16
        **PHI3_LONGROPE, "partial_rotary_factor": 0.5, "short_factor": PHI3_LONGROPE["short_factor"][:4],
        "long_factor": PHI3_LONGROPE["long_factor"][:4]}),
    "phi3_sliding_window": lambda: phi3_config(sliding_window=8),
}


@pytest.mark.parametrize("case", list(MATCH_OR_REFUSE))
def test_unusual_config_matches_or_is_refused(checkpoint, case):
    d = checkpoint(MATCH_OR_REFUSE[case](), seed=3 if case.startswith("phi3") else 9)
    tokens = random_tokens(TINY["vocab_size"], 2, 24, seed=9)
    try:
        model, _ = load(d, dtype=torch.float32)
    except ERRORS as e:
        msg = str(e).strip()
        assert msg and "\n" not in msg, f"refusal must be one line: {msg!r}"
        return
    diff = max_diff(our_logits(model, tokens), hf_logits(hf_model(d), tokens))
    assert diff <= ATOL, f"{case}: loaded without error but logits differ from transformers by {diff:.3g}"


def test_load_dtype_bfloat16(tiny_llama_dir):
    model, _ = load(tiny_llama_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = random_tokens(tokenizer_ids(tiny_llama_dir)["vocab_size"], 1, 16)
    ref = hf_logits(hf_model(tiny_llama_dir), tokens)
    assert max_diff(our_logits(model, tokens), ref) < 0.25 * ref.abs().max().item()


# --------------------------------------------------------------------------------------
# 2. generate
# --------------------------------------------------------------------------------------


def chat_prompts(tok):
    texts = [
        [{"role": "user", "content": "What is 6 times 7?"}],
        [{"role": "system", "content": "Let's think step by step."}, {"role": "user", "content": "Natalia sold 48 clips in April and half as many in May. How many clips altogether?"}],
        [{"role": "user", "content": "Hi"}],
    ]
    return [tok.encode(tok.apply_chat_template(m, add_generation_prompt=True), add_special_tokens=True) for m in texts]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_llama3_dir"])
def test_greedy_generate_matches_transformers(request, fixture):
    from transformers import GenerationConfig

    d = request.getfixturevalue(fixture)
    model, tok = load(d, dtype=torch.float32)
    prompts = chat_prompts(tok)
    if fixture == "tiny_llama3_dir":
        # pad id == an eos id (<|end_of_text|>): put it inside a prompt; it is a real token there
        assert tok.pad_id in model.args.eos_token_ids
        prompts[2] = prompts[2][:3] + [tok.pad_id] + prompts[2][3:]
    assert len({len(p) for p in prompts}) == 3

    hf = hf_model(d)
    expected = []
    for p in prompts:  # one prompt at a time, unpadded: no HF padding conventions involved
        ids = torch.tensor([p])
        gc = GenerationConfig(do_sample=False, max_new_tokens=16, eos_token_id=list(model.args.eos_token_ids), pad_token_id=tok.pad_id)
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
        expected.append(out[0, len(p):].tolist())
    got = generate(model, prompts, max_new_tokens=16)
    assert got == expected


def test_compiled_decode_gives_the_eager_tokens(tiny_llama3_dir):
    """generate(compiled=True) keeps finished rows in a fixed-shape batch and runs torch.compile's decoding step;
    it must emit exactly the eager path's tokens: greedy (against transformers, one prompt at a time) with rows
    that stop early, and seeded sampling with several samples per prompt."""
    model, tok = load(tiny_llama3_dir, dtype=torch.float32)
    prompts = chat_prompts(tok)
    hf = hf_model(tiny_llama3_dir)
    ref = [brute_force_greedy(hf, p, 12) for p in prompts]
    stop_id = ref[0][3]  # row 0 stops at step 3 and then rides along, masked, for 8 more steps
    eager = generate(model, prompts, max_new_tokens=12, stop=[stop_id])
    assert eager == [cut_at_first(r, {stop_id} | set(model.args.eos_token_ids)) for r in ref]
    assert generate(model, prompts, max_new_tokens=12, stop=[stop_id], compiled=True) == eager
    kw = dict(max_new_tokens=10, temperature=1.0, num_samples=3, seed=[5, 6, 7])
    assert generate(model, prompts, compiled=True, **kw) == generate(model, prompts, **kw)


def test_generate_stops_at_stop_id_inclusive(tiny_llama_dir):
    model, tok = load(tiny_llama_dir, dtype=torch.float32)
    prompts = chat_prompts(tok)
    hf = hf_model(tiny_llama_dir)
    ref = [brute_force_greedy(hf, p, 12) for p in prompts]
    stop_id = ref[0][3]  # the token greedy decoding emits at step 3 of row 0
    eos = set(model.args.eos_token_ids)
    expected = [cut_at_first(r, {stop_id}) for r in ref]
    assert len(expected[0]) <= 4 and expected[0][-1] == stop_id
    assert not any(eos & set(e) for e in expected), "test precondition: no eos before the cut"
    assert generate(model, prompts, max_new_tokens=12, stop=[stop_id]) == expected


def test_generate_stops_at_eos_from_generation_config(tmp_path, tiny_llama_dir):
    hf = hf_model(tiny_llama_dir)
    _, tok = load(tiny_llama_dir, dtype=torch.float32)
    prompts = chat_prompts(tok)
    ref = [brute_force_greedy(hf, p, 12) for p in prompts]
    new_eos = ref[1][2]
    d = copy_dir(tiny_llama_dir, tmp_path / "m")
    gen_path = Path(d) / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["eos_token_id"] = [gen["eos_token_id"], new_eos]
    gen_path.write_text(json.dumps(gen))

    model, _ = load(d, dtype=torch.float32)
    assert new_eos in model.args.eos_token_ids
    eos = set(model.args.eos_token_ids)
    assert generate(model, prompts, max_new_tokens=12) == [cut_at_first(r, eos) for r in ref]


def test_greedy_num_samples_rows_are_adjacent_copies(tiny_llama_dir):
    model, tok = load(tiny_llama_dir, dtype=torch.float32)
    prompts = chat_prompts(tok)[:2]
    single = generate(model, prompts, max_new_tokens=8)
    assert generate(model, prompts, max_new_tokens=8, num_samples=2) == [single[0], single[0], single[1], single[1]]
    # top_k=1 and a tiny top_p make sampling greedy: same rows, in prompt-major order
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        rows = generate(model, prompts, max_new_tokens=8, temperature=1.0, num_samples=3, seed=0, **kw)
        assert rows == [single[0]] * 3 + [single[1]] * 3, kw


def test_sampling_is_seeded(tiny_llama_dir):
    model, tok = load(tiny_llama_dir, dtype=torch.float32)
    prompts = chat_prompts(tok)[:2]
    kw = dict(max_new_tokens=10, temperature=1.0, num_samples=3, stop=[])
    a = generate(model, prompts, seed=123, **kw)
    b = generate(model, prompts, seed=123, **kw)
    c = generate(model, prompts, seed=124, **kw)
    assert len(a) == 6 and all(len(r) == 10 for r in a)
    assert a == b
    assert a != c
    assert len({tuple(r) for r in a[:3]}) > 1, "samples of one prompt should differ at temperature 1"


def test_samples_of_a_prompt_do_not_depend_on_the_rest_of_the_batch(tiny_llama_dir):
    # model.generate documents this: a prompt's samples depend only on its seed (seed + prompt index for an int)
    model, tok = load(tiny_llama_dir, dtype=torch.float32)
    p0, p1 = chat_prompts(tok)[:2]
    kw = dict(max_new_tokens=6, temperature=1.0, num_samples=3, stop=[])
    both = generate(model, [p0, p1], seed=5, **kw)
    assert both[:3] == generate(model, [p0], seed=5, **kw)


def test_rows_that_finish_early_leave_the_batch_without_changing_the_others(tiny_llama_dir):
    # Stop on a quarter of the vocabulary so rows finish at scattered steps: generate() then drops finished rows
    # from the batch (and its KV cache) as it goes. Each prompt's rows must equal that prompt sampled alone.
    model, tok = load(tiny_llama_dir, dtype=torch.float32)
    prompts = chat_prompts(tok)[:3]
    stop = list(range(0, model.args.vocab_size, 4))
    for kw in (dict(temperature=1.0, seed=[3, 4, 5]), dict(temperature=0.0)):
        batched = generate(model, prompts, max_new_tokens=12, num_samples=4, stop=stop, **kw)
        lengths = [len(r) for r in batched]
        assert min(lengths) < max(lengths) and max(lengths) > 2, lengths  # finishes really are spread out
        for i, p in enumerate(prompts):
            seed = kw.get("seed") and [kw["seed"][i]]
            alone = generate(model, [p], max_new_tokens=12, num_samples=4, stop=stop, **(kw | {"seed": seed}))
            assert batched[4 * i:4 * i + 4] == alone
        for row in batched:
            assert all(t not in stop for t in row[:-1]) and (len(row) == 12 or row[-1] in stop)


def _first_token_counts(model, prompt, n, vocab_size, **kw):
    """How often each token id is sampled as the first new token, over n samples."""
    rows = generate(model, [prompt], max_new_tokens=1, num_samples=n, stop=[], **kw)
    assert len(rows) == n and all(len(r) == 1 for r in rows)
    return torch.bincount(torch.tensor([r[0] for r in rows]), minlength=vocab_size).double()


def _hf_next_token_probs(d, prompt, temperature):
    logits = hf_logits(hf_model(d), torch.tensor([prompt]))[0, -1]
    return torch.softmax(logits.double() / temperature, -1)


def test_sampling_distribution_matches_softmax_with_temperature(tiny_llama_dir):
    model, tok = load(tiny_llama_dir, dtype=torch.float32)
    prompt = chat_prompts(tok)[0]
    n, temperature = 4000, 0.7
    probs = _hf_next_token_probs(tiny_llama_dir, prompt, temperature)
    counts = _first_token_counts(model, prompt, n, len(probs), temperature=temperature, seed=0)
    freq = counts / n
    # each likely token's frequency within 5 standard errors of its probability
    for t in torch.argsort(probs, descending=True)[:10].tolist():
        se = math.sqrt(probs[t] * (1 - probs[t]) / n)
        assert abs(freq[t] - probs[t]) <= 5 * se + 1e-3, (t, freq[t].item(), probs[t].item())
    # and the whole distribution is closer to softmax(logits/0.7) than to softmax(logits)
    tv = 0.5 * (freq - probs).abs().sum().item()
    tv_wrong = 0.5 * (freq - _hf_next_token_probs(tiny_llama_dir, prompt, 1.0)).abs().sum().item()
    assert tv < tv_wrong


def test_top_k_sampling(tiny_llama_dir):
    model, tok = load(tiny_llama_dir, dtype=torch.float32)
    prompt = chat_prompts(tok)[1]
    n, k = 3000, 5
    probs = _hf_next_token_probs(tiny_llama_dir, prompt, 1.0)
    top = torch.argsort(probs, descending=True)[:k]
    renorm = probs[top] / probs[top].sum()
    counts = _first_token_counts(model, prompt, n, len(probs), temperature=1.0, top_k=k, seed=1)
    assert counts.sum() == counts[top].sum(), "sampled a token outside the top k"
    for t, p in zip(top.tolist(), renorm.tolist()):
        assert abs(counts[t] / n - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-3


def test_top_p_sampling(tiny_llama_dir):
    model, tok = load(tiny_llama_dir, dtype=torch.float32)
    prompt = chat_prompts(tok)[1]
    probs = _hf_next_token_probs(tiny_llama_dir, prompt, 1.0)
    order = torch.argsort(probs, descending=True)
    cum = probs[order].cumsum(0)
    # top_p halfway between the mass of the top 4 and the top 5: the nucleus is exactly the
    # top 5 (the smallest set whose mass reaches top_p, including the token that crosses it)
    top_p = ((cum[3] + cum[4]) / 2).item()
    nucleus = order[:5]
    counts = _first_token_counts(model, prompt, 3000, len(probs), temperature=1.0, top_p=top_p, seed=2)
    assert counts.sum() == counts[nucleus].sum(), "sampled a token outside the nucleus"
    assert (counts[nucleus] > 0).all(), f"a nucleus token was never sampled: {counts[nucleus].tolist()}"


def _pick_spanning_stop_string(hf_tok, out):
    """A 2-char string made of the last char of token k and the first char of token k+1 (both
    plain ASCII text tokens), whose first occurrence in the decoded continuation completes at
    token k+1. Returns (string, k+1)."""
    for k in range(len(out) - 1):
        a, b = hf_tok.decode([out[k]]), hf_tok.decode([out[k + 1]])
        if not (a.isascii() and b.isascii() and a.strip() and b.strip() and a.isprintable() and b.isprintable()):
            continue
        s = a[-1] + b[0]
        first = next(j for j in range(len(out)) if s in hf_tok.decode(out[: j + 1]))
        if first == k + 1 and s not in b:
            return s, k + 1
    return None, None


def test_stop_string_spanning_token_boundary(tiny_llama_dir):
    model, tok = load(tiny_llama_dir, dtype=torch.float32)
    hf, hf_tok = hf_model(tiny_llama_dir), hf_tokenizer(tiny_llama_dir)
    prompts = chat_prompts(tok)
    found = None
    for i, p in enumerate(prompts):
        out = brute_force_greedy(hf, p, 20)
        s, end = _pick_spanning_stop_string(hf_tok, out)
        if s is not None and end >= 2:
            found = (i, p, out, s, end)
            break
    assert found is not None, "test setup: no greedy continuation with two adjacent text tokens"
    i, p, out, s, end = found
    rows = generate(model, [p], max_new_tokens=20, stop=[s], tokenizer=tok)
    assert rows == [out[: end + 1]], f"stop string {s!r}"
    assert s in hf_tok.decode(rows[0]) and s not in hf_tok.decode(rows[0][:-1])

    # a mixed list: an int id and a string; whichever completes first ends the row
    rows = generate(model, [p], max_new_tokens=20, stop=[out[0], s], tokenizer=tok)
    assert rows == [out[:1]]


def test_stop_string_in_prompt_does_not_stop(tiny_llama_dir):
    model, tok = load(tiny_llama_dir, dtype=torch.float32)
    hf_tok = hf_tokenizer(tiny_llama_dir)
    prompt = tok.encode("The answer is 18. The answer is")
    full = generate(model, [prompt], max_new_tokens=8, stop=[])
    text = hf_tok.decode(full[0])
    stop = "The answer"
    assert stop not in text  # precondition for this random model
    assert generate(model, [prompt], max_new_tokens=8, stop=[stop], tokenizer=tok) == full


def test_stop_strings_need_a_tokenizer(tiny_llama_dir):
    model, tok = load(tiny_llama_dir)
    with pytest.raises(ValueError):
        generate(model, [tok.encode("Hi")], max_new_tokens=4, stop=["###"])


# --------------------------------------------------------------------------------------
# 3. token_logprobs
# --------------------------------------------------------------------------------------


def naive_logprobs(logits, tokens, starts, ends, temperature):
    """log softmax(logits[b, t-1] / T)[tokens[b, t]] on [starts, ends), zero elsewhere."""
    lp = torch.log_softmax(logits.float() / temperature, dim=-1)
    out = torch.zeros(tokens.shape, dtype=torch.float32)
    picked = lp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    t = torch.arange(tokens.shape[1])
    mask = (t[None] >= starts[:, None]) & (t[None] < ends[:, None])
    out[:, 1:] = picked
    return torch.where(mask, out, torch.zeros_like(out)), mask


def _logprob_batch(vocab):
    tokens = random_tokens(vocab, 3, 14, seed=11)
    starts = torch.tensor([1, 4, 6])
    ends = torch.tensor([14, 10, 6])  # row 2: empty span
    return tokens, starts, ends


def test_token_logprobs_values_match_transformers(tiny_llama3_dir):
    model, _ = load(tiny_llama3_dir, dtype=torch.float32)
    tokens, starts, ends = _logprob_batch(tokenizer_ids(tiny_llama3_dir)["vocab_size"])
    temperature = 0.7
    expected, mask = naive_logprobs(hf_logits(hf_model(tiny_llama3_dir), tokens), tokens, starts, ends, temperature)
    with torch.no_grad():
        got = token_logprobs(model, tokens, starts, ends, temperature=temperature)
    assert got.dtype == torch.float32 and got.shape == tokens.shape
    assert max_diff(got, expected) <= 1e-5
    assert (got[~mask] == 0).all()
    assert (got[2] == 0).all()  # empty span
    assert (got[mask] < 0).all()


def test_token_logprobs_gradient_matches_naive(tiny_llama_dir):
    model, _ = load(tiny_llama_dir, dtype=torch.float32)
    tokens, starts, ends = _logprob_batch(tokenizer_ids(tiny_llama_dir)["vocab_size"])
    weights = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(3))
    temperature = 1.3
    params = [p for p in model.parameters() if p.requires_grad]
    assert params

    got = token_logprobs(model, tokens, starts, ends, temperature=temperature)
    grads = torch.autograd.grad((got * weights).sum(), params, allow_unused=True)
    naive, _ = naive_logprobs(model(tokens), tokens, starts, ends, temperature)
    ref_grads = torch.autograd.grad((naive * weights).sum(), params, allow_unused=True)
    assert max_diff(got.detach(), naive.detach()) <= 1e-5
    for p, g, r in zip(params, grads, ref_grads):
        g = torch.zeros_like(p) if g is None else g
        r = torch.zeros_like(p) if r is None else r
        assert max_diff(g, r) <= 1e-4
    assert sum(r.abs().sum().item() for r in ref_grads if r is not None) > 0


def test_token_logprobs_ignores_padding_after_ends(tiny_llama_dir):
    model, tok = load(tiny_llama_dir, dtype=torch.float32)
    tokens, starts, ends = _logprob_batch(tokenizer_ids(tiny_llama_dir)["vocab_size"])
    padded = tokens.clone()
    padded[1, 10:] = tok.pad_id  # right padding after row 1's span
    padded[2, 6:] = 0
    with torch.no_grad():
        a = token_logprobs(model, tokens, starts, ends)
        b = token_logprobs(model, padded, starts, ends)
    assert max_diff(a, b) <= 1e-6


def test_token_logprobs_bfloat16_model_returns_float32(tiny_llama_dir):
    model, _ = load(tiny_llama_dir, dtype=torch.bfloat16)
    tokens, starts, ends = _logprob_batch(tokenizer_ids(tiny_llama_dir)["vocab_size"])
    with torch.no_grad():
        got = token_logprobs(model, tokens, starts, ends)
    expected, _ = naive_logprobs(hf_logits(hf_model(tiny_llama_dir), tokens), tokens, starts, ends, 1.0)
    assert got.dtype == torch.float32
    assert max_diff(got, expected) < 0.3


def test_token_logprobs_rejects_start_zero(tiny_llama_dir):
    model, _ = load(tiny_llama_dir)
    tokens = random_tokens(tokenizer_ids(tiny_llama_dir)["vocab_size"], 1, 8)
    with pytest.raises(ValueError):
        token_logprobs(model, tokens, torch.tensor([0]), torch.tensor([8]))
    with pytest.raises(ValueError):
        token_logprobs(model, tokens, torch.tensor([1]), torch.tensor([9]))


# --------------------------------------------------------------------------------------
# 4. save / sharded load
# --------------------------------------------------------------------------------------


def _safetensors_keys(d):
    d = Path(d)
    index = d / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("arch", ["llama_tied", "llama3", "phi3", "qwen2"])
def test_save_then_transformers_loads_same_model(tmp_path, request, arch):
    from transformers import GenerationConfig

    if arch == "llama_tied":
        src = request.getfixturevalue("tiny_llama_dir")
    elif arch == "llama3":
        src = request.getfixturevalue("tiny_llama3_dir")
    elif arch == "phi3":
        src = request.getfixturevalue("tiny_phi3_dir")
    else:
        src = qwen2_checkpoint(request.getfixturevalue("checkpoint"), name="src")
    model, tok = load(src, dtype=torch.float32)
    out = tmp_path / "saved"
    save(model, tok, str(out))
    assert (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).exists(), name
    assert _safetensors_keys(out) == _safetensors_keys(src)  # same HF names (phi3: fused qkv/gate_up)

    vocab = json.loads((Path(src) / "config.json").read_text())["vocab_size"]
    tokens = random_tokens(vocab, 2, 40, seed=12)  # phi3: past original 32
    ref = hf_logits(hf_model(src), tokens)
    assert max_diff(hf_logits(hf_model(out), tokens), ref) <= ATOL
    reloaded, tok2 = load(str(out), dtype=torch.float32)
    assert max_diff(our_logits(reloaded, tokens), ref) <= ATOL

    gen_src = GenerationConfig.from_pretrained(src).eos_token_id
    gen_out = GenerationConfig.from_pretrained(str(out)).eos_token_id
    as_set = lambda x: {x} if isinstance(x, int) else set(x)  # noqa: E731
    assert as_set(gen_out) >= as_set(gen_src)

    msgs = [{"role": "user", "content": "What is 6 times 7?"}]
    a, b = hf_tokenizer(src), hf_tokenizer(out)
    assert b.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == a.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert b.encode("The answer is 18.") == a.encode("The answer is 18.")


def test_save_bfloat16_records_its_dtype(tmp_path, tiny_llama_dir):
    from transformers import AutoConfig

    model, tok = load(tiny_llama_dir, dtype=torch.bfloat16)
    out = tmp_path / "bf16"
    save(model, tok, str(out))
    tensors = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    # config.json must say so, or transformers/vLLM with dtype="auto" load it as float32
    cfg = json.loads((out / "config.json").read_text())
    stated = {k: cfg[k] for k in ("dtype", "torch_dtype") if k in cfg}
    assert stated and set(stated.values()) == {"bfloat16"}, f"config.json dtype fields: {stated}"
    assert AutoConfig.from_pretrained(str(out)).dtype == torch.bfloat16


def test_load_sharded_checkpoint(tmp_path):
    src = make_tiny_model(tmp_path / "src", tokenizer_style="llama3", seed=13)
    d = tmp_path / "sharded"
    hf = hf_model(src)
    hf.save_pretrained(str(d), max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(Path(src) / name, d / name)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (d / "model.safetensors").exists()
    assert_parity(str(d), random_tokens(tokenizer_ids(src)["vocab_size"], 2, 20, seed=13))


def test_save_in_shards_then_transformers_loads_same_model(tmp_path, tiny_phi3_dir):
    model, tok = load(tiny_phi3_dir, dtype=torch.float32)
    out = tmp_path / "sharded"
    save(model, tok, str(out), max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files == sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == _safetensors_keys(tiny_phi3_dir)  # fused qkv / gate_up again
    tokens = random_tokens(model.args.vocab_size, 2, 40, seed=14)
    assert max_diff(hf_logits(hf_model(out), tokens), our_logits(model, tokens)) <= ATOL


# --------------------------------------------------------------------------------------
# 5. tokenizer
# --------------------------------------------------------------------------------------

TEXTS = [
    "The answer is 18.",
    "Let's think step by step",
    "  leading spaces, trailing spaces  ",
    "Natalia sold 48/2 = 24 clips in May.\n\nThen 1,234 + 0.5 = ?",
    "héllo wörld 🤖 — naïve café",
    "a , b . c ! d ?",  # the llama3 config says clean_up_tokenization_spaces: transformers ignores it for BPE
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>",
    "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n",
    " x",
    "",
]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_llama3_dir", "tiny_phi3_dir"])
def test_encode_decode_match_transformers(request, fixture):
    d = request.getfixturevalue(fixture)
    _, tok = load(d)
    ref = hf_tokenizer(d)
    for text in TEXTS:
        for special in (True, False):
            ids = ref.encode(text, add_special_tokens=special)
            assert tok.encode(text, add_special_tokens=special) == ids, (text, special)
            for skip in (False, True):
                assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (text, skip)
    # a slice that cuts a multi-byte character in half decodes like transformers does
    ids = ref.encode("héllo", add_special_tokens=False)
    assert tok.decode(ids[:2]) == ref.decode(ids[:2])


def test_special_token_ids(tiny_llama_dir, tiny_llama3_dir, tiny_phi3_dir):
    ids = tokenizer_ids(tiny_llama_dir)
    model, tok = load(tiny_llama_dir)
    assert tok.bos_id == ids["<|im_start|>"] == 1
    assert tok.pad_id == ids["<|im_end|>"] == 2
    assert ids["<|im_end|>"] in tok.eos_ids and ids["<|im_end|>"] in model.args.eos_token_ids
    assert tok.encode("Hi") == hf_tokenizer(tiny_llama_dir).encode("Hi")  # no BOS for SmolLM2
    assert tok.encode("Hi")[0] != tok.bos_id

    ids3 = tokenizer_ids(tiny_llama3_dir)
    model3, tok3 = load(tiny_llama3_dir)
    end_of_turn = {ids3["<|end_of_text|>"], ids3["<|eom_id|>"], ids3["<|eot_id|>"]}
    assert tok3.bos_id == ids3["<|begin_of_text|>"]
    assert tok3.pad_id == ids3["<|end_of_text|>"]
    assert end_of_turn <= set(model3.args.eos_token_ids)
    assert end_of_turn <= set(tok3.eos_ids)

    ids_phi = tokenizer_ids(tiny_phi3_dir)
    model_phi, tok_phi = load(tiny_phi3_dir)
    end_of_turn = {ids_phi["<|end|>"], ids_phi["<|assistant|>"], ids_phi["<|endoftext|>"]}
    assert tok_phi.bos_id == ids_phi["<s>"] == 1
    assert tok_phi.pad_id == ids_phi["<|endoftext|>"]
    assert end_of_turn <= set(model_phi.args.eos_token_ids)
    assert end_of_turn <= set(tok_phi.eos_ids)


@pytest.mark.parametrize("fixture,bos_text", [("tiny_llama3_dir", "<|begin_of_text|>"), ("tiny_phi3_dir", "<s>")])
def test_no_double_bos(request, fixture, bos_text):
    d = request.getfixturevalue(fixture)
    _, tok = load(d)
    ref = hf_tokenizer(d)
    bos = tok.bos_id
    assert tok.encode("Hello") == ref.encode("Hello")
    assert tok.encode("Hello")[0] == bos
    text = bos_text + "Hello"
    # transformers would add a second BOS here; the contract is: never two
    assert tok.encode(text) == ref.encode(text, add_special_tokens=False)
    assert tok.encode(text).count(bos) == 1
    if fixture == "tiny_llama3_dir":  # Llama-3.1's template writes the BOS itself
        chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        assert chat.startswith(bos_text)
        assert tok.encode(chat).count(bos) == 1


CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 6 times 7?"}],
    "system_multi_turn": [
        {"role": "system", "content": "  You are a helpful assistant. Please reason step by step.  "},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 = 4. The answer is 4."},
        {"role": "user", "content": "And 3+3?\n"},
    ],
}


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_llama3_dir", "tiny_phi3_dir"])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(request, fixture, conversation, add_generation_prompt):
    d = request.getfixturevalue(fixture)
    _, tok = load(d)
    msgs = CONVERSATIONS[conversation]
    expected = hf_tokenizer(d).apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt) == expected


# transformers renders templates with trim_blocks and lstrip_blocks on; this template's output
# depends on both.
BLOCKY_TEMPLATE = """{% for message in messages %}
    {% if message['role'] == 'user' %}
User: {{ message['content'] }}
    {% else %}
{{ message['role'] | capitalize }}: {{ message['content'] }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
Assistant:{% endif %}"""


def test_chat_template_whitespace_control_matches_transformers(tmp_path, tiny_llama_dir):
    d = copy_dir(tiny_llama_dir, tmp_path / "m")
    cfg_path = Path(d) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = BLOCKY_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    msgs = CONVERSATIONS["system_multi_turn"]
    _, tok = load(d)
    expected = hf_tokenizer(d).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == expected


# --------------------------------------------------------------------------------------
# 6. bad inputs: one-line errors that name the file or field
# --------------------------------------------------------------------------------------


@pytest.fixture
def broken_dir(tmp_path, tiny_llama_dir):
    return Path(copy_dir(tiny_llama_dir, tmp_path / "broken"))


def test_error_missing_config(broken_dir):
    (broken_dir / "config.json").unlink()
    with pytest.raises(ERRORS) as e:
        load(str(broken_dir))
    one_line_error(e, "config.json")


def test_error_missing_weights(broken_dir):
    (broken_dir / "model.safetensors").unlink()
    with pytest.raises(ERRORS) as e:
        load(str(broken_dir))
    one_line_error(e, "safetensors")


def test_error_invalid_config_json(broken_dir):
    (broken_dir / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ERRORS) as e:
        load(str(broken_dir))
    one_line_error(e, "config.json")


def test_error_missing_shard(tmp_path, tiny_llama_dir):
    d = tmp_path / "sharded"
    hf_model(tiny_llama_dir).save_pretrained(str(d), max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(Path(tiny_llama_dir) / name, d / name)
    shard = sorted(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values()))[-1]
    (d / shard).unlink()
    with pytest.raises(ERRORS) as e:
        load(str(d))
    one_line_error(e, shard)


def test_error_unknown_model_type(broken_dir):
    edit_config(broken_dir, model_type="gpt2")
    with pytest.raises(ERRORS) as e:
        load(str(broken_dir))
    one_line_error(e, "gpt2")


def test_error_wrong_tensor_shape(broken_dir):
    path = broken_dir / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.1.self_attn.k_proj.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ERRORS) as e:
        load(str(broken_dir))
    one_line_error(e, name)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.float8_e4m3fn])
def test_error_quantized_tensor(broken_dir, dtype):
    """A quantized checkpoint (an int8 q_proj, or fp8) is refused, not silently cast to float."""
    path = broken_dir / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].clamp(-1, 1).mul(100).to(dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError) as e:
        load(str(broken_dir))
    one_line_error(e, name)
    assert str(e.value) == (f"{path}: tensor {name!r} is {str(dtype).removeprefix('torch.')}; expected float weights "
                            "(float32, bfloat16 or float16; quantized checkpoints are not supported)")


def test_error_missing_tensor(broken_dir):
    path = broken_dir / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.0.mlp.down_proj.weight"
    del tensors[name]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ERRORS) as e:
        load(str(broken_dir))
    one_line_error(e, name)


def test_error_truncated_safetensors(broken_dir):
    path = broken_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ERRORS) as e:
        load(str(broken_dir))
    one_line_error(e, "model.safetensors")


def test_error_unknown_rope_type(broken_dir):
    edit_config(broken_dir, rope_parameters={"rope_type": "made-up-rope", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(ERRORS) as e:
        load(str(broken_dir))
    one_line_error(e, "made-up-rope")


@pytest.mark.parametrize(
    "arch,changes",
    [
        ("mistral", {"sliding_window": 16}),  # smaller than max_position_embeddings (512)
        ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0}),
    ],
)
def test_error_sliding_window_that_matters(checkpoint, arch, changes):
    d = checkpoint({"mistral": MistralConfig(**TINY, sliding_window=None), "qwen2": Qwen2Config(**TINY)}[arch])
    edit_config(d, **changes)
    with pytest.raises(ERRORS) as e:
        load(d)
    one_line_error(e, "sliding_window")


@pytest.mark.parametrize("arch,changes", [("mistral", {"sliding_window": 4096}), ("mistral", {"sliding_window": None})])
def test_sliding_window_that_does_not_matter_loads(checkpoint, arch, changes):
    d = checkpoint(MistralConfig(**TINY, sliding_window=None), seed=14)
    edit_config(d, **changes)
    if changes["sliding_window"] is not None:
        assert json.loads((Path(d) / "config.json").read_text())["sliding_window"] == 4096
    assert_parity(d, random_tokens(TINY["vocab_size"], 1, 20, seed=14))


def _offline(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))


@pytest.mark.parametrize("name", ["no-such-model-xyz", "no-such-org/no-such-model", "/tmp/no/such/model/dir", "./no-such-dir"])
def test_error_unknown_name_offline(monkeypatch, tmp_path, name):
    _offline(monkeypatch, tmp_path)
    with pytest.raises(ERRORS) as e:
        load(name)
    one_line_error(e, name)


def test_aliases(monkeypatch, tmp_path):
    assert ALIASES["smollm2-135m"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert all(isinstance(v, str) and "/" in v for v in ALIASES.values())
    # an alias resolves to its hub id: offline and uncached, the error names one of the two
    _offline(monkeypatch, tmp_path)
    with pytest.raises(ERRORS) as e:
        load("smollm2-135m")
    one_line_error(e, "HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m")


def test_hub_download_takes_only_the_hf_layout_files():
    """resolve() downloads through huggingface_hub's own pattern filter: Mistral-7B-Instruct-v0.3's repo (file list
    as on the hub) also holds a 14 GB consolidated.safetensors in Mistral's layout, which must not be fetched."""
    from huggingface_hub.utils import filter_repo_objects
    import model
    repo = ["consolidated.safetensors", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors", "model.safetensors.index.json", "params.json", "tokenizer.model.v3",
            "tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json", "README.md"]
    assert sorted(filter_repo_objects(repo, allow_patterns=model.HUB_FILES)) == [
        "config.json", "generation_config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"]
