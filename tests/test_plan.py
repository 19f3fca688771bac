"""The memory plan (plan.py, train.py --plan) and the FSDP2 paths it depends on: the 8B paper run fits, the plan
matches a real 2-rank run, hand-computed resident bytes, sharded gradients after every micro-batch, the trained
policy equals the sampler, and the recipe follows the resolved checkpoint."""
import json
import os
import re
import sys
import time

import pytest
import torch

from conftest import REPO_ROOT, run_command

sys.path.insert(0, os.path.join(str(REPO_ROOT), "tests"))
from fsdp_checks import SMALL  # noqa: E402


def torchrun(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join("tests", "fsdp_checks.py"), *args]
    p = run_command(cmd, cwd=REPO_ROOT, env=env, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return p.stdout


@pytest.mark.slow
def test_llama_8b_paper_recipe_plans_under_70_gib_on_8_x_80():
    """The headline run with default flags: the plan picks FSDP2 with activation checkpointing and peaks at
    <= 70 GiB per GPU (the issue's measurement of the old defaults: 96.65 GiB)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    p = run_command([sys.executable, "train.py", "--model", "llama-3.1-8b", "--plan", "--nproc", "8",
                     "--gpu-memory", "80"], cwd=REPO_ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    title = p.stdout.splitlines()[0]
    assert "paper recipe: K=16, L=500, 24 questions/step, micro-batch 4" in title
    assert "FSDP2" in title and "activation checkpointing on" in title
    peak = float(re.search(r"fits: peak ([\d.]+) GiB", p.stdout).group(1))
    assert peak <= 70.0, p.stdout
    # The resident rows against arithmetic on Llama-3.1-8B's shapes: 8,030,261,248 parameters, fp32 and sharded
    # 8 ways (the embedding and lm_head split by rows, 128256 / 8 exactly), the bf16 sampling copy whole.
    rows = {line[:28].strip(): [float(x) for x in line[28:].split()] for line in p.stdout.splitlines()[2:11]}
    n = 8_030_261_248
    assert rows["params"][0] == pytest.approx(4 * n / 8 / 2**30, abs=0.01)
    assert rows["optimizer state"][0] == pytest.approx(8 * n / 8 / 2**30, abs=0.01)
    assert rows["sampler copy"][0] == pytest.approx(2 * n / 2**30, abs=0.01)
    assert rows["reference"][0] == pytest.approx(2 * n / 8 / 2**30, abs=0.01)
    # 48 rows (3 questions x K=16) x 750 positions x 32 layers x 8 kv heads x 128 x (k, v) in bf16
    assert rows["KV cache"][1] == pytest.approx(48 * 750 * 32 * 8 * 128 * 2 * 2 / 2**30, abs=0.01)
    print(f"8B plan: {time.time() - t0:.1f}s")


def test_plan_matches_a_real_two_rank_gloo_run():
    """The same simulate() with real tensors on a real 2-rank gloo group (FSDP2's real all-gathers, reduce-scatters
    and buffers) vs fake tensors on the fake group: each phase's peak within 15%."""
    from tools import plan
    out = torchrun("plan")
    real = json.loads(next(line for line in out.splitlines() if line.startswith("PLAN "))[5:])
    fake = plan.simulate(SMALL, 2, True, torch.bfloat16, num_samples=4, questions_per_step=4, max_rationale_tokens=48,
                         micro_batch_size=2, checkpointing=True, prompt_tokens=24, answer_tokens=8)
    for phase in ("train", "sample", "score"):
        measured, planned = sum(real[phase].values()), plan.total(fake[phase])
        assert planned == pytest.approx(measured, rel=0.15), (phase, planned, measured)
    assert fake["step"] == pytest.approx(real["step"], rel=0.15)


def test_plan_resident_bytes_by_hand():
    """Sharded on 2 ranks, rank 0 holds the first ceil(rows / 2) rows of every parameter (FSDP2 shards dim 0)."""
    from tools import plan
    from model import ModelArgs, Transformer
    r = plan.simulate(SMALL, 2, True, torch.bfloat16, num_samples=4, questions_per_step=4, max_rationale_tokens=48,
                      micro_batch_size=2, checkpointing=True, prompt_tokens=24, answer_tokens=8)
    shapes = [p.shape for p in Transformer(ModelArgs.from_hf_config(SMALL), SMALL).parameters()]
    full = sum(s.numel() for s in shapes)
    rank0 = sum((s[0] + 1) // 2 * (s.numel() // s[0]) for s in shapes)
    rope = 4 * 16  # the fp32 inv_freq buffer (head_dim 32 / 2 entries), counted with the frozen copies
    assert r["train"]["params"] == 4 * rank0
    assert 8 * rank0 <= r["train"]["optimizer state"] <= 8 * rank0 + 4 * len(shapes)  # + AdamW's step scalars
    assert r["train"]["reference"] == 2 * rank0 + rope
    assert r["train"]["sampler copy"] == 2 * full + rope
    layers, rows, kv_heads, length, head_dim = 4, 2 * 4, 2, 24 + 48, 32
    assert r["sample"]["KV cache"] == 2 * layers * rows * kv_heads * length * head_dim * 2


def test_gradients_are_reduce_scattered_every_micro_batch_under_fsdp2(tiny_llama_dir):
    assert "OK grads" in torchrun("grads", tiny_llama_dir)


def test_sampler_and_policy_logprobs_identical_under_fsdp_bf16(tiny_llama_dir):
    assert "OK policy" in torchrun("policy", tiny_llama_dir)


def test_recipe_follows_the_resolved_checkpoint(tmp_path, tiny_llama_dir):
    """The paper's recipe for the paper's models however they are named (alias, hub id, a local copy); the laptop
    recipe for anything else."""
    from tools import plan
    import train
    local = tmp_path / "my-llama"
    local.mkdir()
    (local / "config.json").write_text(json.dumps(plan.CONFIGS["llama-3.1-8b"]))
    for model, recipe in (("llama-3.1-8b", "paper"), ("meta-llama/Llama-3.1-8B-Instruct", "paper"),
                          ("mistralai/Mistral-7B-Instruct-v0.3", "paper"), (str(local), "paper"),
                          (tiny_llama_dir, "laptop"), ("smollm2-135m", "laptop")):
        args = train.fill_defaults(train.parse_args(["--model", model]))
        assert args.recipe == recipe, model
        assert args.num_samples == (16 if recipe == "paper" else 8), model


def test_device_index_under_torchrun_is_one_clear_error(monkeypatch):
    import parallel
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"--device cuda:1: under torchrun each rank uses cuda:LOCAL_RANK"):
        parallel.setup_distributed("cuda:1")


def test_fsdp_auto_is_decided_by_the_plan(tmp_path, capsys):
    """--fsdp auto: a replica that the plan says fits stays DDP; one whose weights, gradients and moments alone pass
    the limit is sharded (and then gets activation checkpointing). The plan needs only config.json."""
    import train
    (tmp_path / "config.json").write_text(json.dumps(SMALL))
    flags = ["--plan", "--model", str(tmp_path), "--nproc", "2", "--max-rationale-tokens", "16"]
    train.main([*flags, "--gpu-memory", "80"])
    out = capsys.readouterr().out
    assert "| DDP |" in out and "activation checkpointing off" in out and "fits: peak" in out
    # 994,432 parameters x 16 bytes = 15.2 MiB > 0.875 x 4 MiB
    train.main([*flags, "--gpu-memory", str(4 / 1024)])
    out = capsys.readouterr().out
    assert "| FSDP2 |" in out and "activation checkpointing on" in out and "does NOT fit" in out
