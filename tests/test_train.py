"""train.py end to end on a tiny model: distributed equivalence, exact resume, HF-loadable checkpoints, bad input."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, run_command

QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = 7", "7"),
    ("A box holds 12 pens. How many pens are in 2 boxes?", "12 * 2 = 24", "24"),
    ("Sara had 10 dollars and spent 4. How many dollars are left?", "10 - 4 = 6", "6"),
    ("There are 5 birds and 3 fly away. How many birds remain?", "5 - 3 = 2", "2"),
    ("Each bag has 1,000 beads. How many beads are in 2 bags?", "1,000 * 2 = 2,000", "2,000"),
    ("Ann reads 8 pages a day. How many pages in 3 days?", "8 * 3 = 24", "24"),
    ("A class has 9 boys and 11 girls. How many children?", "9 + 11 = 20", "20"),
    ("Ben splits 18 candies among 3 friends. How many each?", "18 / 3 = 6", "6"),
]
SMALL = ["--steps", "2", "--max-rationale-tokens", "10", "--questions-per-step", "4", "--num-samples", "3",
         "--micro-batch-size", "5", "--lr", "1e-4", "--seed", "3", "--dtype", "float32", "--eval-every", "0",
         "--answer-weight", "1"]  # both terms of L: with alpha = 0 a tiny model's unstopped rows get no gradient


@pytest.fixture(scope="module")
def gsm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": f"{r}\n#### {a}"}) + "\n" for q, r, a in QUESTIONS))
    return str(path)


def run(args, nproc=1, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "train.py", *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
         "train.py", *args]
    p = run_command(cmd, cwd=REPO_ROOT, env=env, timeout=240)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def weights(checkpoint):
    return load_file(os.path.join(checkpoint, "model.safetensors"))


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_training(dir_a, dir_b):
    """Weights after 2 steps agree within 1e-6, and so do the logged rewards, KL and losses of both steps (step 2
    samples from the step-1 weights, so its metrics match only if step 1 did). Float sums in another order differ
    by ~1e-7 relative, and Adam's update g / (|g| + eps) turns that into up to 2 * lr for the rare weight whose
    gradient is ~0; those few weights (< 0.1%) are allowed past 1e-6, while a real bug (an unsynchronised gradient,
    a wrong normaliser) moves most weights by ~lr = 1e-4."""
    a, b = weights(os.path.join(dir_a, "checkpoint-000002")), weights(os.path.join(dir_b, "checkpoint-000002"))
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diffs > 1e-6).float().mean().item() < 1e-3, diffs.max().item()
    assert diffs.max().item() < 2 * 2 * 1e-4
    rows_a = [json.loads(line) for line in open(os.path.join(dir_a, "metrics.jsonl"))]
    rows_b = [json.loads(line) for line in open(os.path.join(dir_b, "metrics.jsonl"))]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("reward", "kl", "loss", "loss_pg", "loss_answer", "rationale_len", "stop_rate"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (ra["step"], key)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_llama_dir, gsm_file):
    out = str(tmp_path_factory.mktemp("single"))
    p = run(["--model", tiny_llama_dir, "--dataset", gsm_file, "--out", out, "--save-every", "1", *SMALL])
    return out, p.stdout


def test_single_process_run_writes_metrics_and_checkpoints(single_run, tiny_llama_dir):
    out, stdout = single_run
    assert "preflight | model" in stdout and "done |" in stdout
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward", "kl", "loss", "loss_pg", "loss_answer", "rationale_len", "stop_rate", "accuracy",
                "advantage_std", "tokens_per_s", "peak_memory_gb", "lr"):
        assert key in rows[0], key
    assert rows[0]["lr"] == pytest.approx(1e-4) and rows[1]["lr"] == pytest.approx(5e-5)  # linear decay to 0
    # (curves.png too when matplotlib is installed)
    assert {"checkpoint-000001", "checkpoint-000002", "config.json", "metrics.jsonl"} <= set(os.listdir(out))
    # weights moved away from the initial model
    initial = load_file(os.path.join(tiny_llama_dir, "model.safetensors"))
    final = weights(os.path.join(out, "checkpoint-000002"))
    assert max_diff({k: final[k] for k in initial}, initial) > 0


def test_checkpoint_loads_in_transformers(single_run):
    from transformers import AutoModelForCausalLM
    from model import load
    ckpt = os.path.join(single_run[0], "checkpoint-000002")
    ours, _ = load(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    x = torch.randint(0, ours.args.vocab_size, (2, 12))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4


def test_two_processes_equal_one(single_run, tmp_path, tiny_llama_dir, gsm_file):
    """Same global batch on 2 gloo ranks (each samples half the questions with per-question seeds, the penalty's
    batch mean and the gradients are reduced across ranks) == 1 process."""
    out = str(tmp_path / "ddp")
    p = run(["--model", tiny_llama_dir, "--dataset", gsm_file, "--out", out, *SMALL], nproc=2)
    assert "| DDP |" in p.stdout
    assert_same_training(single_run[0], out)


def test_two_processes_fsdp_equal_one(single_run, tmp_path, tiny_llama_dir, gsm_file):
    out = str(tmp_path / "fsdp")
    p = run(["--model", tiny_llama_dir, "--dataset", gsm_file, "--out", out, "--fsdp", "on", *SMALL], nproc=2)
    assert "FSDP2" in p.stdout
    assert_same_training(single_run[0], out)


def test_resume_two_plus_two_equals_four_bit_for_bit(tmp_path, tiny_llama_dir, gsm_file):
    args = ["--dataset", gsm_file, *SMALL]
    args[args.index("--steps") + 1] = "4"
    straight = str(tmp_path / "straight")
    run(["--model", tiny_llama_dir, "--out", straight, "--save-every", "2", *args])
    # A run that stopped after step 2 (its checkpoint-000002 is all it left), resumed to step 4.
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    os.rename(os.path.join(straight, "checkpoint-000002"), os.path.join(resumed, "checkpoint-000002"))
    p = run(["--resume", os.path.join(resumed, "checkpoint-000002"), *args])
    assert "steps 2->4" in p.stdout
    a, b = weights(os.path.join(straight, "checkpoint-000004")), weights(os.path.join(resumed, "checkpoint-000004"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in open(os.path.join(resumed, "metrics.jsonl"))]
    assert steps == [3, 4]


def test_sft_baseline_lowers_its_loss(tmp_path, tiny_llama_dir, gsm_file):
    out = str(tmp_path / "sft")
    run(["--model", tiny_llama_dir, "--dataset", gsm_file, "--out", out, "--method", "sft", "--steps", "6",
         "--questions-per-step", "8", "--lr", "3e-3", "--no-save", "--eval-every", "0", "--dtype", "float32"])
    losses = [json.loads(line)["loss"] for line in open(os.path.join(out, "metrics.jsonl"))]
    # the same 8 questions every step (one epoch per step): plain supervised descent on a fixed batch
    assert losses[-1] < losses[0] - 0.5, losses


HELD_OUT = [("Mia has 6 cups and breaks 2. How many cups are left?", "6 - 2 = 4", "4"),
            ("A pack has 5 pens. How many pens are in 3 packs?", "5 * 3 = 15", "15"),
            ("Leo walks 2 km then 7 km. How far does he walk?", "2 + 7 = 9", "9"),
            ("There are 20 seats and 8 are taken. How many are free?", "20 - 8 = 12", "12"),
            ("Each box holds 4 cakes. How many cakes fit in 6 boxes?", "4 * 6 = 24", "24")]


@pytest.fixture(scope="module")
def held_out_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "held_out.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": f"{r}\n#### {a}"}) + "\n" for q, r, a in HELD_OUT))
    return str(path)


def test_validation_accuracy_is_eval_py_on_those_weights_and_the_best_checkpoint_is_kept(
        tmp_path, tiny_llama_dir, gsm_file, held_out_file):
    """--eval-every evaluates disjoint questions before the first step, every N steps and after the last, with
    eval.py's code on the current weights: its rationales and accuracy equal eval.py's on the initial model and on
    the saved checkpoints (a stale sampling copy or an evaluation before the optimizer step would differ). best.json
    names the argmax step (the earliest on ties), whose checkpoint --keep-last 1 does not delete."""
    out = str(tmp_path / "evaluated")
    p = run(["--model", tiny_llama_dir, "--dataset", gsm_file, "--out", out, *SMALL, "--eval-every", "1",
             "--eval-dataset", held_out_file, "--eval-limit", "5", "--eval-max-new-tokens", "12", "--keep-last", "1",
             "--steps", "3"])
    assert [line.split(" | ")[1] for line in p.stdout.splitlines() if line.startswith("eval | ")] == \
        ["step 0", "step 1", "step 2", "step 3"]
    assert "held_out accuracy" in p.stdout and "held-out" not in p.stdout
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all("eval_accuracy" in r for r in rows)
    accuracy = {r["step"]: r["eval_accuracy"] for r in rows}
    best_step = max((1, 2, 3), key=lambda s: (accuracy[s], -s))
    best = json.load(open(os.path.join(out, "best.json")))
    assert best["step"] == best_step and best["checkpoint"].endswith(f"checkpoint-{best_step:06d}")
    kept = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert kept == sorted({f"checkpoint-{best_step:06d}", "checkpoint-000003"})  # --keep-last 1, plus the best
    assert f"best {os.path.join(out, best['checkpoint'])} (step {best_step}" in p.stdout
    for model, step in ((tiny_llama_dir, 0), (os.path.join(out, "checkpoint-000003"), 3)):
        result = str(tmp_path / f"eval-{step}.jsonl")
        e = run_command([sys.executable, "eval.py", "--model", model, "--dataset", held_out_file, "--limit", "5",
                         "--max-new-tokens", "12", "--dtype", "float32", "--out", result], cwd=REPO_ROOT,
                        env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
        assert e.returncode == 0, e.stderr[-3000:]
        summary = json.load(open(result.replace(".jsonl", ".summary.json")))
        assert accuracy[step] == summary["accuracy"]
        assert rows[step]["eval_tokens"] == summary["generated_tokens"] / summary["n"]
        logged = [json.loads(line) for line in open(os.path.join(out, "eval", f"step-{step:06d}.jsonl"))]
        assert [r["rationale"] for r in logged] == [json.loads(line)["rationale"] for line in open(result)]
    first, last = (open(os.path.join(out, "eval", f"step-00000{s}.jsonl")).read() for s in (0, 3))
    assert first != last  # training changed the greedy rationales


def test_best_step_is_the_argmax_of_validation_accuracy_earliest_on_ties():
    import train
    run = train.Run(best=None)
    picked = [s for s, acc in [(1, 0.2), (2, 0.4), (3, 0.4), (4, 0.1), (5, 0.5), (6, 0.5)]
              if train.new_best(run, {"step": s, "eval_accuracy": acc})]
    assert picked == [1, 2, 5] and run.best == (5, 0.5)


@pytest.mark.parametrize("flags,message", [
    (["--eval-every", "2"], "is one file, with no held-out split; pass --eval-dataset"),        # a file: no split
    (["--eval-every", "2", "--eval-dataset", "TRAIN"], "8 of the 8 evaluation questions are also training"),
    (["--eval-every", "2", "--dataset", "arith", "--eval-split", "x"], "--eval-split x: arith has the splits"),
])
def test_held_out_accuracy_needs_data_disjoint_from_training(tmp_path, tiny_llama_dir, gsm_file, flags, message):
    flags = [gsm_file if f == "TRAIN" else f for f in flags]
    base = ["--model", tiny_llama_dir, "--dataset", gsm_file, "--out", str(tmp_path / "o"), "--steps", "1", *flags]
    p = run(base, check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and message in lines[0], p.stderr
    assert not os.path.exists(tmp_path / "o" / "metrics.jsonl")


def test_in_loop_evaluation_reads_test_only_when_asked():
    import train
    args = train.fill_defaults(train.parse_args(["--eval-split", "test", "--eval-every", "5"]))
    train.check_args(args, world=1)          # asked for explicitly: allowed
    args.explicit.remove("eval_split")       # e.g. restored from an old run's checkpoint, not asked for now
    with pytest.raises(ValueError, match="reads test only when asked"):
        train.check_args(args, world=1)
    assert train.fill_defaults(train.parse_args([])).eval_split == "validation"


def test_exact_reward_run_records_its_objective(tmp_path, tiny_llama_dir, gsm_file):
    """--reward exact (the verifiable-reward baseline) end to end, sampling with --compile: the run records the
    objective it optimised (alpha defaults to 0 for it), and its logged reward is a fraction of the rows, as
    R in {0, 1} makes it."""
    out = str(tmp_path / "exact")
    run(["--model", tiny_llama_dir, "--dataset", gsm_file, "--out", out, "--reward", "exact", "--compile",
         "--no-save", *SMALL[:-2]])  # without SMALL's --answer-weight: exact's own default
    recorded = json.load(open(os.path.join(out, "config.json")))
    assert recorded["latro"]["reward_kind"] == "exact" and recorded["latro"]["answer_weight"] == 0.0
    assert recorded["latro"]["stop_strings"] and recorded["latro"]["compiled"] is True
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert len(rows) == 2
    for r in rows:  # 4 questions x K=3 = 12 rows per step
        assert 0.0 <= r["reward"] <= 1.0 and (r["reward"] * 12) == pytest.approx(round(r["reward"] * 12))
        assert r["loss_answer"] > 0  # still logged, weighted by alpha = 0


@pytest.mark.parametrize("flags,message", [
    (["--dataset", "no_such_dataset"], "no_such_dataset"),
    (["--num-samples", "1"], "--num-samples 1"),
    (["--lr", "3"], "--lr 3"),
    (["--questions-per-step", "0"], "--questions-per-step 0"),
    (["--model", "no-such-model-xyz"], "no-such-model-xyz"),
    (["--resume", "/nonexistent/checkpoint"], "trainer_state.json"),
])
def test_bad_input_is_one_clear_line(tmp_path, tiny_llama_dir, gsm_file, flags, message):
    base = {"--model": tiny_llama_dir, "--dataset": gsm_file, "--out": str(tmp_path / "o"), "--steps": "1"}
    for i in range(0, len(flags), 2):
        base[flags[i]] = flags[i + 1]
    p = run([x for kv in base.items() for x in kv], check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert not os.path.exists(str(tmp_path / "o" / "metrics.jsonl"))


def test_batch_must_divide_world_size():
    import train
    args = train.fill_defaults(train.parse_args(["--questions-per-step", "3"]))
    with pytest.raises(ValueError, match="not divisible by the world size 2"):
        train.check_args(args, world=2)


def test_existing_run_is_not_overwritten(single_run, tiny_llama_dir, gsm_file):
    out = single_run[0]
    before = open(os.path.join(out, "metrics.jsonl")).read()
    p = run(["--model", tiny_llama_dir, "--dataset", gsm_file, "--out", out, "--steps", "1"], check=False)
    assert p.returncode == 2 and "already holds a run" in p.stderr
    assert open(os.path.join(out, "metrics.jsonl")).read() == before


def test_resume_from_a_different_model_is_refused(single_run, tmp_path, gsm_file):
    from conftest import make_tiny_model
    other = make_tiny_model(tmp_path / "other", seed=9)
    p = run(["--resume", os.path.join(single_run[0], "checkpoint-000001"), "--model", other, "--dataset", gsm_file],
            check=False)
    assert p.returncode == 2 and "its weights are not the run's base model" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_non_finite_losses_skip_steps_then_abort(monkeypatch, tmp_path, tiny_llama_dir, gsm_file, capsys):
    import latro
    import train
    monkeypatch.setattr(latro, "backward_on_rollout", lambda *a, **k: {"loss": float("nan"), "loss_pg": 0.0,
                                                                         "loss_answer": 0.0})
    args = train.parse_args(["--model", tiny_llama_dir, "--dataset", gsm_file, "--out", str(tmp_path / "nan"),
                             *SMALL[:SMALL.index("--steps")], "--steps", "5", *SMALL[2:]])
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        train.train(args)
    assert capsys.readouterr().out.count("non-finite loss") == 3
    assert not any(name.startswith("checkpoint") for name in os.listdir(tmp_path / "nan"))


# ---------------------------------------------------------------------------------------------------------------
# LoRA: adapters only, the frozen base as pi_ref, PEFT's checkpoint layout, exact resume, 2 processes == 1

LORA = ["--lora", "4", "--lr", "1e-3"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_llama3_dir, gsm_file):
    out = str(tmp_path_factory.mktemp("lora") / "run")
    args = ["--dataset", gsm_file, *SMALL, *LORA, "--steps", "4", "--save-every", "2"]
    run(["--model", tiny_llama3_dir, "--out", out, *args])
    return out, args


def test_lora_trains_the_adapters_alone_and_its_checkpoint_loads_in_peft(lora_run, tiny_llama3_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from model import load
    out, _ = lora_run
    ckpt = os.path.join(out, "checkpoint-000004")
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"} <= \
        set(os.listdir(ckpt)) and "model.safetensors" not in os.listdir(ckpt)
    adapters = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    assert all(".lora_" in k for k in load_file(os.path.join(ckpt, "optimizer.safetensors")))
    assert any(adapters[k].abs().max() > 0 for k in adapters if "lora_B" in k)  # trained (B starts at zero)
    ours, _ = load(ckpt, dtype=torch.float32)  # an adapter directory: its base, then the adapters
    base = AutoModelForCausalLM.from_pretrained(tiny_llama3_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    peft = PeftModel.from_pretrained(base, ckpt).eval()
    x = torch.randint(0, ours.args.vocab_size, (2, 12))
    with torch.no_grad():
        assert (ours(x) - peft(input_ids=x).logits).abs().max().item() < 1e-4
    merged = str(tmp_path / "merged")  # --merge-lora: the HF layout, which transformers loads
    p = run_command([sys.executable, "train.py", "--merge-lora", ckpt, merged], cwd=REPO_ROOT, timeout=240)
    assert p.returncode == 0, p.stderr
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < 1e-4
    base_after = load_file(os.path.join(tiny_llama3_dir, "model.safetensors"))
    assert all(torch.equal(before[k], base_after[k]) for k in base_after if k in before)  # the base never moved
    e = run_command([sys.executable, "eval.py", "--model", ckpt, "--dataset", gsm_file_of(lora_run), "--limit", "2",
                     "--max-new-tokens", "4", "--dtype", "float32", "--out", str(tmp_path / "e.jsonl")], cwd=REPO_ROOT,
                    timeout=240)
    assert e.returncode == 0, e.stderr


def gsm_file_of(lora_run):
    return lora_run[1][lora_run[1].index("--dataset") + 1]


def test_lora_resume_two_plus_two_equals_four_bit_for_bit(lora_run, tmp_path):
    out, _ = lora_run
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    import shutil
    shutil.copytree(os.path.join(out, "checkpoint-000002"), os.path.join(resumed, "checkpoint-000002"))
    p = run(["--resume", os.path.join(resumed, "checkpoint-000002")])
    assert "steps 2->4" in p.stdout and "LoRA r=4" in p.stdout
    a, b = (load_file(os.path.join(d, "checkpoint-000004", "adapter_model.safetensors")) for d in (out, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_two_processes_equal_one(lora_run, tiny_llama3_dir, tmp_path):
    out, args = lora_run
    ddp = str(tmp_path / "ddp")
    p = run(["--model", tiny_llama3_dir, "--out", ddp, *args], nproc=2)
    assert "| DDP |" in p.stdout
    a, b = (load_file(os.path.join(d, "checkpoint-000004", "adapter_model.safetensors")) for d in (out, ddp))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
