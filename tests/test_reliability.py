"""train.py under bad input and faults (issue 12) and resume across sharding modes (issue 7): the run directory is
never corrupted, a resume continues the same run, and every failure is one clear line."""
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO_ROOT, edit_config, make_tiny_model, run_command

QUESTIONS = [("Tom has 3 apples and buys 4 more. How many apples?", "3 + 4 = 7", "7"),
             ("A box holds 12 pens. How many pens in 2 boxes?", "12 * 2 = 24", "24"),
             ("Sara had 10 dollars and spent 4. How many are left?", "10 - 4 = 6", "6"),
             ("There are 5 birds and 3 fly away. How many remain?", "5 - 3 = 2", "2"),
             ("Ann reads 8 pages a day. How many pages in 3 days?", "8 * 3 = 24", "24"),
             ("A class has 9 boys and 11 girls. How many children?", "9 + 11 = 20", "20")]
ARC = [{"id": f"q{i}", "question": f"Which is bigger, {i} or {i + 1}?",
        "choices": {"text": [str(i), str(i + 1)], "label": ["A", "B"]}, "answerKey": "B"} for i in range(4)]
TINY = ["--max-rationale-tokens", "6", "--questions-per-step", "2", "--num-samples", "2", "--micro-batch-size", "4",
        "--lr", "1e-4", "--dtype", "float32", "--eval-every", "0", "--answer-weight", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def model_451(tmp_path_factory):
    """A tiny llama whose vocabulary (451 rows: tokenizer's 420 + padding) does not divide by 2 ranks."""
    return make_tiny_model(tmp_path_factory.mktemp("m451"), tie_word_embeddings=True, vocab_size=451)


@pytest.fixture(scope="module")
def gsm6(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "six.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": f"{r}\n#### {a}"}) + "\n" for q, r, a in QUESTIONS))
    return str(path)


def train(args, nproc=1, check=True, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **kw.pop("env", {})}
    script = os.path.join(REPO_ROOT, "train.py")
    cmd = [sys.executable, script, *args] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script, *args]
    p = run_command(cmd, env=env, timeout=300, **{"cwd": REPO_ROOT, **kw})
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def one_line_error(p, *phrases, rc=2):
    lines = p.stderr.strip().splitlines()
    assert p.returncode == rc and len(lines) == 1 and lines[0].startswith("error: "), (p.returncode, p.stderr[-3000:])
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def main_error(argv, capsys, *phrases, rc=2):
    """train.main in this process (no interpreter start-up: for failures that come before or just after loading):
    exit code rc and exactly one 'error:' line holding the phrases."""
    import train as trainer
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        trainer.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == rc and len(err) == 1 and err[0].startswith("error: "), err
    for phrase in phrases:
        assert phrase in err[0], err[0]
    return err[0]


def weights(checkpoint):
    return load_file(os.path.join(checkpoint, "model.safetensors"))


def steps_of(run_dir):
    return [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def snapshot(directory):
    """Every file under a directory with its bytes, to check that nothing changed."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, directory)] = open(path, "rb").read()
    return out


@pytest.fixture(scope="module")
def straight(tmp_path_factory, model_451, gsm6):
    """4 single-process steps with a checkpoint every step: the reference the resume tests must reproduce."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    train(["--model", model_451, "--dataset", gsm6, "--out", out, "--steps", "4", "--save-every", "1", *TINY])
    return out


def copy_checkpoint(run_dir, step, dest):
    """A run that stopped after `step`: its metrics up to there and that checkpoint."""
    os.makedirs(dest)
    shutil.copytree(os.path.join(run_dir, f"checkpoint-{step:06d}"), os.path.join(dest, f"checkpoint-{step:06d}"))
    lines = open(os.path.join(run_dir, "metrics.jsonl")).readlines()[:step]
    open(os.path.join(dest, "metrics.jsonl"), "w").writelines(lines)
    return os.path.join(dest, f"checkpoint-{step:06d}")


# ---------------------------------------------------------------------------------------------------------------
# Resume continues the same run (items 4, 5, 6)

def test_resume_alone_restores_every_flag_and_matches_a_straight_run(straight, tmp_path):
    """`train.py --resume CKPT` and nothing else: the local 6-question file, K=2, L=6, lr and seed all come from the
    checkpoint (the defaults would be gsm8k - a download, refused offline - with K=4 and L=96); a torn last metrics
    line left by a kill is dropped; the result is bit-identical to the straight run."""
    ckpt = copy_checkpoint(straight, 2, str(tmp_path / "r"))
    with open(os.path.join(tmp_path / "r", "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # killed mid-write
    p = train(["--resume", ckpt])
    assert "6 questions" in p.stdout and "K=2" in p.stdout and "steps 2->4" in p.stdout, p.stdout
    assert "downloading" not in p.stdout
    a, b = weights(os.path.join(straight, "checkpoint-000004")), weights(str(tmp_path / "r" / "checkpoint-000004"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert steps_of(str(tmp_path / "r")) == [1, 2, 3, 4]
    saved = json.load(open(tmp_path / "r" / "checkpoint-000004" / "trainer_state.json"))["args"]
    original = json.load(open(os.path.join(straight, "checkpoint-000004", "trainer_state.json")))["args"]
    for key in ("dataset", "num_samples", "max_rationale_tokens", "questions_per_step", "lr", "seed", "limit"):
        assert saved[key] == original[key], key


def test_resume_refuses_a_recipe_change_unless_allowed_and_records_it(straight, tmp_path, capsys):
    ckpt = copy_checkpoint(straight, 2, str(tmp_path / "r"))
    before = snapshot(str(tmp_path / "r"))
    main_error(["--resume", ckpt, "--num-samples", "3"], capsys, "--num-samples 3", "(the run has 2)",
               "--allow-recipe-change")
    assert snapshot(str(tmp_path / "r")) == before
    main_error(["--resume", ckpt, "--steps", "6"], capsys, "--steps 6", "(the run has 4)")
    p = train(["--resume", ckpt, "--num-samples", "3", "--allow-recipe-change", "--steps", "3"])
    assert "K=3" in p.stdout
    state = json.load(open(tmp_path / "r" / "checkpoint-000003" / "trainer_state.json"))
    assert state["args"]["recipe_changes"] == [{"step": 2, "flag": "steps", "from": 4, "to": 3},
                                               {"step": 2, "flag": "num_samples", "from": 2, "to": 3}]


def test_resume_with_steps_not_past_the_checkpoint_is_an_error(straight, tmp_path, capsys):
    ckpt = copy_checkpoint(straight, 4, str(tmp_path / "r"))
    before = snapshot(str(tmp_path / "r"))
    main_error(["--resume", ckpt, "--steps", "2"], capsys, "--steps 2", "already at step 4")
    # a finished run resumed without --steps: its recorded --steps 4 is reached already
    main_error(["--resume", ckpt], capsys, "--steps 4", "pass --steps N > 4")
    assert snapshot(str(tmp_path / "r")) == before


# ---------------------------------------------------------------------------------------------------------------
# Resume across sharding modes and world sizes (issue 7 items 4 and 9)

def test_fsdp_resume_with_uneven_vocabulary_and_across_modes(straight, tmp_path, model_451, gsm6):
    """FSDP2 on 2 gloo ranks, vocabulary 451 (uneven shards): 2 + 2 == 4 bit for bit. Then the sharding mode and
    world size change at resume: the single-process checkpoint continues under FSDP2, and the FSDP2 checkpoint
    continues in one process; both land where the straight run of the other mode did (float-order tolerance)."""
    fsdp = str(tmp_path / "fsdp")
    p = train(["--model", model_451, "--dataset", gsm6, "--out", fsdp, "--steps", "4", "--save-every", "2",
               "--fsdp", "on", *TINY], nproc=2)
    assert "FSDP2" in p.stdout
    ckpt = copy_checkpoint(fsdp, 2, str(tmp_path / "fsdp_resumed"))
    train(["--resume", ckpt], nproc=2)
    a, b = weights(os.path.join(fsdp, "checkpoint-000004")), weights(str(tmp_path / "fsdp_resumed" / "checkpoint-000004"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    def close(x, y):  # as test_train.assert_same_training: a few weights with gradient ~0 may move by 2 * lr
        d = torch.cat([(x[k] - y[k]).abs().flatten() for k in x])
        return (d > 1e-6).float().mean().item() < 1e-3 and d.max().item() < 4e-4

    to_fsdp = copy_checkpoint(straight, 2, str(tmp_path / "to_fsdp"))
    p = train(["--resume", to_fsdp, "--fsdp", "on"], nproc=2)
    assert "FSDP2" in p.stdout
    assert close(weights(os.path.join(straight, "checkpoint-000004")), weights(str(tmp_path / "to_fsdp" / "checkpoint-000004")))
    to_single = copy_checkpoint(fsdp, 2, str(tmp_path / "to_single"))
    p = train(["--resume", to_single])  # the run's --fsdp on cannot hold in one process: resumed unsharded
    assert "| single |" in p.stdout
    assert close(weights(os.path.join(fsdp, "checkpoint-000004")), weights(str(tmp_path / "to_single" / "checkpoint-000004")))


def test_adamw_step_is_restored_where_the_optimizer_keeps_it(straight, tmp_path):
    """After a resume, every AdamW state tensor equals the checkpoint's and sits where a freshly stepped optimizer
    of the same kind keeps it (load_state_dict's rule: fused/capturable on the parameter's device, else the CPU)."""
    import rundir
    from model import load
    ckpt = os.path.join(straight, "checkpoint-000002")
    policy, _ = load(ckpt, device="cpu", dtype=torch.float32)
    saved = load_file(os.path.join(ckpt, "optimizer.safetensors"))
    for fused in (False, True):
        opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, fused=fused)
        rundir.load_optimizer_tensors(opt, policy, saved, sharded=False)
        fresh = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=1e-4, fused=fused)
        fresh.param_groups[0]["params"][0].grad = torch.ones(2)
        fresh.step()
        ref = next(iter(fresh.state.values()))["step"]
        for name, p in policy.named_parameters():
            st = opt.state[p]
            assert torch.equal(st["exp_avg"], saved[f"{name}.exp_avg"]) and st["step"].item() == 2
            assert st["step"].device == ref.device and st["step"].dtype == ref.dtype


# ---------------------------------------------------------------------------------------------------------------
# The run directory (items 1, 2, 3, 9, 10, 16, 20)

def test_second_run_into_a_busy_dir_is_refused_and_ctrl_c_says_how_to_resume(tmp_path, model_451, gsm6):
    out = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    a = subprocess.Popen([sys.executable, "train.py", "--model", model_451, "--dataset", gsm6, "--out", out,
                          "--steps", "500", "--save-every", "1", *TINY], cwd=REPO_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         # Ctrl-C's default action, even when pytest runs as a background job (whose shell ignores
                         # SIGINT for its children, and Python then never raises KeyboardInterrupt)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, ".lock")) and time.time() < deadline and a.poll() is None:
            time.sleep(0.05)
        # B starts while A is still before or in its first step
        b = train(["--model", model_451, "--dataset", gsm6, "--out", out, "--steps", "2", *TINY], check=False)
        one_line_error(b, "in use by another run", f"pid {a.pid}")
        while not os.path.isdir(os.path.join(out, "checkpoint-000002")) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        a.send_signal(signal.SIGINT)
        stdout, stderr = a.communicate(timeout=60)
    line = one_line_error(subprocess.CompletedProcess(a.args, a.returncode, stdout, stderr), "interrupted during step",
                          "continue with: python train.py --resume", rc=130)
    last = line.split("--resume ")[1]
    assert os.path.isfile(os.path.join(last, "trainer_state.json"))
    assert not any(".partial" in n for n in os.listdir(out)) and not os.path.exists(os.path.join(out, ".lock"))
    assert steps_of(out) == list(range(1, len(steps_of(out)) + 1))  # one run's steps, in order


def test_a_stale_lock_of_a_dead_process_is_reported_and_taken_over(tmp_path, model_451, gsm6, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(f"{socket.gethostname()} {dead.pid}")
    p = train(["--model", model_451, "--dataset", gsm6, "--out", str(out), "--steps", "1", "--no-save", *TINY])
    assert f"taking over the lock of pid {dead.pid}" in p.stdout
    (out / ".lock").write_text(f"{socket.gethostname()} {os.getpid()}")  # a live process: refused
    main_error(["--model", model_451, "--dataset", gsm6, "--out", str(out), "--steps", "1", "--overwrite", *TINY],
               capsys, "in use by another run")


def test_resume_into_a_dir_holding_another_run_is_refused_then_moved_aside(straight, tmp_path, model_451, gsm6,
                                                                            capsys):
    other = str(tmp_path / "other")
    train(["--model", model_451, "--dataset", gsm6, "--out", other, "--steps", "2", "--seed", "9", *TINY[:-2]])
    before = snapshot(other)
    ckpt = os.path.join(straight, "checkpoint-000002")
    main_error(["--resume", ckpt, "--out", other], capsys, "already holds another run")
    assert snapshot(other) == before
    p = train(["--resume", ckpt, "--out", other, "--overwrite"])
    assert f"moved the previous run in {other} to {other}.bak" in p.stdout
    assert snapshot(other + ".bak") == before
    assert steps_of(other) == [1, 2, 3, 4]  # the straight run's first two lines came along with its checkpoint
    a, b = weights(os.path.join(straight, "checkpoint-000004")), weights(os.path.join(other, "checkpoint-000004"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_overwrite_moves_the_whole_old_run_aside(tmp_path, model_451, gsm6):
    out = str(tmp_path / "run")
    train(["--model", model_451, "--dataset", gsm6, "--out", out, "--steps", "3", "--save-every", "1", *TINY])
    before = snapshot(out)
    train(["--model", model_451, "--dataset", gsm6, "--out", out, "--steps", "1", "--overwrite", *TINY[:-2],
           "--seed", "5"])
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-000001"]
    assert steps_of(out) == [1]
    assert snapshot(out + ".bak") == before


def test_out_under_a_regular_file_is_refused_before_anything_loads(tmp_path, gsm6, capsys):
    (tmp_path / "file").write_text("x")
    main_error(["--model", str(tmp_path / "no-such-model"), "--dataset", gsm6, "--out", str(tmp_path / "file" / "run"),
                "--steps", "1"], capsys, "--out", "cannot create the run directory")


def test_a_failed_save_leaves_no_partial_and_says_so(tmp_path, model_451, gsm6):
    """RLIMIT_FSIZE makes the 430 kB model file fail like a full disk (metrics and config are small)."""
    out = str(tmp_path / "run")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))  # noqa: E731
    p = train(["--model", model_451, "--dataset", gsm6, "--out", out, "--steps", "1", *TINY], check=False,
              preexec_fn=limit)
    one_line_error(p, "checkpoint-000001: could not be written", "File too large", "partial files were removed", rc=1)
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl"]


def test_stale_partials_are_removed_and_a_moved_aside_checkpoint_is_put_back(straight, tmp_path):
    ckpt = copy_checkpoint(straight, 2, str(tmp_path / "r"))
    run_dir = tmp_path / "r"
    (run_dir / "checkpoint-000003.partial").mkdir()
    (run_dir / "checkpoint-000003.partial" / "model.safetensors").write_bytes(b"\0" * 1000)
    (run_dir / "checkpoint-000003.partial.tmp-12345").mkdir()
    shutil.copytree(ckpt, run_dir / "checkpoint-000001.old")  # killed between the two renames of a re-save
    p = train(["--resume", ckpt, "--steps", "3", "--allow-recipe-change"])
    assert "removed 2 partial checkpoint(s)" in p.stdout
    assert sorted(set(os.listdir(run_dir)) - {"curves.png"}) == [
        "checkpoint-000001", "checkpoint-000002", "checkpoint-000003", "config.json", "metrics.jsonl"]


def test_keep_last_keeps_the_newest(tmp_path, model_451, gsm6):
    out = str(tmp_path / "run")
    train(["--model", model_451, "--dataset", gsm6, "--out", out, "--steps", "4", "--save-every", "1",
           "--keep-last", "2", *TINY])
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-000003",
                                                                                "checkpoint-000004"]
    import rundir
    rundir.prune_checkpoints(out, 1, os.path.join(out, "checkpoint-000004"))
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-000004"]


# ---------------------------------------------------------------------------------------------------------------
# One clear line (items 7, 8, 11, 12, 17, 18)

@pytest.mark.parametrize("name", ["optimizer.safetensors", "rng-rank0.safetensors"])
def test_a_truncated_optimizer_or_rng_file_is_one_line(straight, tmp_path, name, capsys):
    ckpt = copy_checkpoint(straight, 2, str(tmp_path / "r"))
    path = os.path.join(ckpt, name)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])
    main_error(["--resume", ckpt], capsys, path, "not a readable safetensors file")


def test_resume_of_a_missing_dir_or_a_run_dir_lists_the_checkpoints(straight, capsys):
    main_error(["--resume", straight], capsys, "is a run directory", os.path.join(straight, "checkpoint-000004"))
    missing = os.path.join(straight, "checkpoint-000099")
    main_error(["--resume", missing], capsys, "trainer_state.json", os.path.join(straight, "checkpoint-000001"))


def test_fsdp_on_in_one_process_is_one_line(tmp_path, model_451, gsm6, capsys):
    main_error(["--model", model_451, "--dataset", gsm6, "--out", str(tmp_path / "o"), "--fsdp", "on"], capsys,
               "--fsdp on", "--fsdp off")
    assert not os.path.exists(tmp_path / "o")


def test_a_tokenizer_without_any_eos_fails_at_load(tmp_path):
    from model import load
    d = make_tiny_model(tmp_path / "m")
    edit_config(d, eos_token_id=None)
    for name in ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json"):
        cfg = json.load(open(os.path.join(d, name)))
        cfg.pop("eos_token_id", None)
        cfg.pop("eos_token", None)
        json.dump(cfg, open(os.path.join(d, name), "w"))
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        load(d)


def test_offline_hub_error_says_how_to_fix_it():
    from model import resolve
    with pytest.raises(ValueError) as e:  # conftest sets HF_HUB_OFFLINE=1
        resolve("some-org/not-in-the-cache")
    assert "--model /path/to/a/local/HF/directory" in str(e.value) and "HF_HUB_OFFLINE=0" not in str(e.value)


def test_the_task_and_beta_come_from_the_data_layout(tmp_path, gsm6, monkeypatch):
    import data
    import train as trainer
    arc = tmp_path / "gsm_named.jsonl"  # an ARC file whose name says gsm
    arc.write_text("".join(json.dumps(r) + "\n" for r in ARC))
    assert trainer.fill_defaults(trainer.parse_args(["--dataset", str(arc)])).beta == 0.25
    assert trainer.fill_defaults(trainer.parse_args(["--dataset", gsm6])).beta == 0.05
    # --dataset arc_challenge whose local copy holds GSM8K records: refused
    (tmp_path / "local" / "arc_challenge").mkdir(parents=True)
    shutil.copy(gsm6, tmp_path / "local" / "arc_challenge" / "train.jsonl")
    monkeypatch.setenv("LATRO_DATA_DIR", str(tmp_path / "local"))
    with pytest.raises(ValueError, match="holds gsm8k-layout records, not arc_challenge"):
        data.load_dataset("arc_challenge", "train")


def test_non_finite_abort_is_one_line_naming_what_and_the_last_checkpoint(monkeypatch, tmp_path, model_451, gsm6,
                                                                            capsys):
    import latro
    import train as trainer
    out = str(tmp_path / "nan")
    trainer.main(["--model", model_451, "--dataset", gsm6, "--out", out, "--steps", "1", *TINY])
    monkeypatch.setattr(latro, "backward_on_rollout", lambda *a, **k: {"loss": float("nan"), "loss_pg": 0.0,
                                                                         "loss_answer": float("inf")})
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        trainer.main(["--resume", os.path.join(out, "checkpoint-000001"), "--steps", "5", "--allow-recipe-change"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1, err
    assert "steps 2-4: 3 non-finite losses in a row (loss nan, loss_answer inf)" in err[0]
    assert err[0].endswith(os.path.join(out, "checkpoint-000001"))


# ---------------------------------------------------------------------------------------------------------------
# Progress inside a step (item 19)

def test_generate_reports_progress_that_adds_up(model_451):
    from model import generate, load
    model, _ = load(model_451, device="cpu", dtype=torch.float32)
    calls = []
    out = generate(model, [[1, 2, 3], [4, 5]], 7, temperature=1.0, num_samples=3, seed=0,
                   progress=lambda **c: calls.append(c))
    assert [c["done"] for c in calls] == list(range(1, len(calls) + 1)) and all(c["total"] == 7 for c in calls)
    assert calls[-1]["tokens"] == sum(len(o) for o in out) and calls[-1]["rows_finished"] == 6
    finished = [c["rows_finished"] for c in calls]
    assert finished == sorted(finished)
    assert len(calls) == max(len(o) for o in out)  # one call per decoding step taken


def test_step_progress_prints_plain_lines_to_a_file_and_rewrites_one_line_on_a_terminal():
    import rundir
    log = io.StringIO()
    p = rundir.StepProgress(3, stream=log, every=0.0)
    p("sample", done=2, total=8, rows_finished=1, rows=4, tokens=7)
    p("score", done=1, total=2, rows_finished=4, rows=8, tokens=0)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 3 | sample 2/8 decoding steps | 1/4 rows done | 7 tokens")
    assert "ETA <=" in lines[0] and "score 1/2 micro-batches" in lines[1]

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    term = Terminal()
    p = rundir.StepProgress(3, stream=term)
    p("sample", done=8, total=8, rows_finished=4, rows=4, tokens=20)
    p.close()
    assert term.getvalue().startswith("\rstep 3 | sample 8/8") and term.getvalue().endswith("\r")
    assert "\n" not in term.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# Round 2 (issue 18): nothing lost, nothing silently wrong, one clear line

def test_resume_of_an_earlier_checkpoint_never_overwrites_later_ones(straight, tmp_path, capsys):
    before = snapshot(straight)
    main_error(["--resume", os.path.join(straight, "checkpoint-000002"), "--lr", "5e-5", "--allow-recipe-change"],
               capsys, "the run has later checkpoints", "checkpoint-000004", "--out NEW_DIR")
    assert snapshot(straight) == before
    branch = str(tmp_path / "branch")  # a branch goes into a new --out, with the run's metrics up to its step
    train(["--resume", os.path.join(straight, "checkpoint-000002"), "--out", branch, "--steps", "3",
           "--allow-recipe-change"])
    assert steps_of(branch) == [1, 2, 3] and snapshot(straight) == before


def test_the_base_model_is_pinned_by_its_weights_and_may_move(tmp_path, gsm6, model_451, capsys):
    base = tmp_path / "base"
    shutil.copytree(model_451, base)
    out = str(tmp_path / "run")
    train(["--model", "base", "--dataset", gsm6, "--out", out, "--steps", "1", *TINY], cwd=tmp_path)  # relative
    ckpt = copy_checkpoint(out, 1, str(tmp_path / "r"))
    moved = tmp_path / "moved"
    os.rename(base, moved)                     # the base model moved: pass its new place, same weights
    p = train(["--resume", ckpt, "--model", str(moved), "--steps", "2", "--allow-recipe-change"])
    assert "steps 1->2" in p.stdout
    other = make_tiny_model(tmp_path / "other", tie_word_embeddings=True, vocab_size=451, seed=7)  # same shape
    shutil.rmtree(moved)
    shutil.copytree(other, moved)              # replaced at the same path: not the KL reference the run had
    before = snapshot(str(tmp_path / "r"))
    main_error(["--resume", os.path.join(str(tmp_path / "r"), "checkpoint-000002"), "--model", str(moved),
                "--steps", "3", "--allow-recipe-change"], capsys, "its weights are not the run's base model")
    assert snapshot(str(tmp_path / "r")) == before


def test_a_changed_training_file_is_refused_on_resume_unless_allowed(tmp_path, gsm6, capsys, model_451):
    data = tmp_path / "six.jsonl"
    shutil.copy(gsm6, data)
    out = str(tmp_path / "run")
    train(["--model", model_451, "--dataset", str(data), "--out", out, "--steps", "2", "--save-every", "1", *TINY])
    ckpt = copy_checkpoint(out, 1, str(tmp_path / "r"))
    with open(data, "a") as f:
        f.write(json.dumps({"question": "One more?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    main_error(["--resume", ckpt], capsys, "its questions changed since the run started", "--allow-recipe-change")
    train(["--resume", ckpt, "--allow-recipe-change"])
    state = json.load(open(os.path.join(str(tmp_path / "r"), "checkpoint-000002", "trainer_state.json")))
    assert {"step": 1, "flag": "dataset content"}.items() <= state["args"]["recipe_changes"][-1].items()


def test_training_past_the_context_is_refused_before_any_weight_loads(tmp_path, gsm6, capsys):
    small = make_tiny_model(tmp_path / "ctx64", max_position_embeddings=64)
    os.remove(os.path.join(small, "model.safetensors"))  # refused before the weights are read
    out = tmp_path / "o"
    main_error(["--model", small, "--dataset", gsm6, "--out", str(out), "--max-rationale-tokens", "200"], capsys,
               "--max-rationale-tokens", "exceeds the model's context of 64")
    assert not out.exists()
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"question": "Count: " + "one two three " * 40, "answer": "3\n#### 3"}) + "\n")
    main_error(["--model", small, "--dataset", str(long), "--out", str(out), "--max-rationale-tokens", "4"], capsys,
               "question long-0", "the prompt alone does not fit")


@pytest.mark.parametrize("flag,value", [("--beta", "-1"), ("--top-p", "0"), ("--top-p", "2"), ("--top-k", "-1"),
                                        ("--warmup-steps", "-1"), ("--save-every", "-1"), ("--eval-every", "-1"),
                                        ("--penalty-factor", "-1"), ("--answer-weight", "-1"), ("--eval-limit", "0"),
                                        ("--keep-last", "-2"), ("--test-limit", "-1")])
def test_every_numeric_flag_is_checked_before_anything_loads(tmp_path, gsm6, flag, value, capsys):
    out = tmp_path / "o"
    main_error(["--model", str(tmp_path / "no-model"), "--dataset", gsm6, "--out", str(out), flag, value], capsys,
               f"{flag} {value}: expected")
    assert not out.exists()


def test_a_full_disk_while_logging_is_one_line_and_leaves_no_torn_record(tmp_path, model_451, gsm6, monkeypatch,
                                                                         capsys):
    import errno
    import data
    path = tmp_path / "log.jsonl"
    data.append_lines(path, ['{"step": 1}'])
    real_write = os.write

    def half_then_full(fd, body):  # the disk fills part-way through the record
        real_write(fd, bytes(body[:5]))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        data.append_lines(path, ['{"step": 2, "loss": 0.5}'])
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}\n'  # cut back: no torn line

    import rundir
    out = str(tmp_path / "run")
    calls = []

    def full_at_step_2(p, m):
        calls.append(m["step"])
        if m["step"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", p)
        data.append_lines(p, [json.dumps(m)])
    monkeypatch.setattr(rundir, "append_metrics", full_at_step_2)
    err = main_error(["--model", model_451, "--dataset", gsm6, "--out", out, "--steps", "3", "--save-every", "1",
                      *TINY], capsys, "metrics.jsonl: could not write (No space left on device)", rc=1)
    assert "continue with: python train.py --resume" in err and err.endswith("checkpoint-000001")
    monkeypatch.undo()
    train(["--resume", os.path.join(out, "checkpoint-000001")])  # the rerun resumes cleanly
    assert steps_of(out) == [1, 2, 3]


def test_sigterm_is_one_line_with_the_resume_command_and_releases_the_lock(tmp_path, model_451, gsm6):
    out = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    a = subprocess.Popen([sys.executable, "train.py", "--model", model_451, "--dataset", gsm6, "--out", out,
                          "--steps", "500", "--save-every", "1", *TINY], cwd=REPO_ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.isdir(os.path.join(out, "checkpoint-000001")) and time.time() < deadline:
        time.sleep(0.05)
    a.send_signal(signal.SIGTERM)
    stdout, stderr = a.communicate(timeout=60)
    one_line_error(subprocess.CompletedProcess(a.args, a.returncode, stdout, stderr), "terminated (SIGTERM) during",
                   "continue with: python train.py --resume", rc=143)
    assert not os.path.exists(os.path.join(out, ".lock"))


def test_a_lost_peer_is_one_line_from_the_survivor(tmp_path, model_451, gsm6):
    """kill -9 of rank 1 under torchrun: rank 0's collective fails, and it says so in one line with the command that
    resumes, and releases the lock (torchrun then prints its own report of the dead rank)."""
    out = str(tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "train.py", "--model", model_451, "--dataset", gsm6, "--out", out, "--steps", "500",
                          "--save-every", "1", *TINY], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 180
    while not os.path.isdir(os.path.join(out, "checkpoint-000001")) and time.time() < deadline:
        time.sleep(0.05)
    ranks = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    os.kill(int(sorted(ranks, key=int)[-1]), signal.SIGKILL)
    _, stderr = p.communicate(timeout=120)
    ours = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "a peer process was lost during step" in ours[0], stderr[-3000:]
    assert "continue with: torchrun --nproc_per_node 2 train.py --resume" in ours[0]
    assert not os.path.exists(os.path.join(out, ".lock"))


def test_a_lock_of_a_reused_pid_is_stale_and_a_live_one_says_how_to_clear_it(tmp_path, model_451, gsm6, capsys):
    import parallel
    out = tmp_path / "run"
    out.mkdir()
    # this test's own pid is alive, but the lock says it started at another time: a pid reused after a restart
    (out / ".lock").write_text(f"{socket.gethostname()} {os.getpid()} 1 2020-01-01T00:00:00")
    p = train(["--model", model_451, "--dataset", gsm6, "--out", str(out), "--steps", "1", "--no-save", *TINY])
    assert f"taking over the lock of pid {os.getpid()}" in p.stdout
    start = parallel.process_start(os.getpid())
    (out / ".lock").write_text(f"{socket.gethostname()} {os.getpid()} {start} 2026-12-01T10:00:00")
    main_error(["--model", model_451, "--dataset", gsm6, "--out", str(out), "--steps", "1", "--overwrite", *TINY],
               capsys, f"pid {os.getpid()} on {socket.gethostname()}, started 2026-12-01T10:00:00",
               f"if no run uses it, delete {out / '.lock'}")


def test_an_interrupted_overwrite_is_finished_and_never_splits_the_old_run(tmp_path, model_451, gsm6):
    out = str(tmp_path / "run")
    train(["--model", model_451, "--dataset", gsm6, "--out", out, "--steps", "2", "--save-every", "1", *TINY])
    before = snapshot(out)
    os.makedirs(os.path.join(out, ".moving"))  # killed after moving two of the old run's files
    for name in ("metrics.jsonl", "checkpoint-000001"):
        os.replace(os.path.join(out, name), os.path.join(out, ".moving", name))
    p = train(["--model", model_451, "--dataset", gsm6, "--out", out, "--steps", "1", "--overwrite", *TINY])
    assert f"moved the previous run in {out} to {out}.bak" in p.stdout
    assert snapshot(out + ".bak") == before and not os.path.exists(out + ".bak1")
    assert steps_of(out) == [1]


# ---------------------------------------------------------------------------------------------------------------
# Found by the round-2 sweep of new cases

def test_out_never_writes_over_or_moves_what_is_not_a_run(tmp_path, model_451, gsm6, capsys):
    model = tmp_path / "m"
    shutil.copytree(model_451, model)
    before = snapshot(str(model))
    for extra in ([], ["--overwrite"]):  # a model directory as --out: its config.json must survive
        main_error(["--model", str(model), "--dataset", gsm6, "--out", str(model), "--steps", "1", *TINY, *extra],
                   capsys, f"--out {model}: holds a model or a checkpoint (model.safetensors)")
    assert snapshot(str(model)) == before
    out = tmp_path / "run"  # --overwrite moves the old run's own files aside, and nothing else
    train(["--model", model_451, "--dataset", gsm6, "--out", str(out), "--steps", "1", *TINY])
    (out / "notes.txt").write_text("mine")
    (out / "metrics.jsonl.a1b2.tmp").write_text("{")  # an atomic write killed part-way
    train(["--model", model_451, "--dataset", gsm6, "--out", str(out), "--steps", "1", "--overwrite", *TINY])
    assert (out / "notes.txt").read_text() == "mine" and not (tmp_path / "run.bak" / "notes.txt").exists()
    assert not (out / "metrics.jsonl.a1b2.tmp").exists() and (tmp_path / "run.bak" / "metrics.jsonl").exists()


def test_overwrite_refuses_to_move_its_own_inputs(tmp_path, model_451, gsm6, capsys):
    out = str(tmp_path / "run")
    train(["--model", model_451, "--dataset", gsm6, "--out", out, "--steps", "1", *TINY])
    main_error(["--model", os.path.join(out, "checkpoint-000001"), "--dataset", gsm6, "--out", out, "--steps", "1",
                "--overwrite", *TINY], capsys, "is inside --out", "--overwrite would move")
    assert os.path.isdir(os.path.join(out, "checkpoint-000001"))


def test_lora_settings_are_fixed_for_a_run_and_merge_never_overwrites(tmp_path, model_451, gsm6, capsys):
    out = str(tmp_path / "run")
    train(["--model", model_451, "--dataset", gsm6, "--out", out, "--steps", "2", "--save-every", "1", "--lora", "2",
           *TINY])
    ckpt = copy_checkpoint(out, 1, str(tmp_path / "r"))
    for flag, value in (("--lora", "4"), ("--lora", "0"), ("--lora-alpha", "64")):
        main_error(["--resume", ckpt, flag, value, "--allow-recipe-change"], capsys,
                   f"{flag} {value}", "fixed for a run")
    full = str(tmp_path / "full")
    train(["--model", model_451, "--dataset", gsm6, "--out", full, "--steps", "1", *TINY])
    main_error(["--resume", os.path.join(full, "checkpoint-000001"), "--lora", "4", "--steps", "2",
                "--allow-recipe-change"], capsys,
               "--lora 4", "the run trains full weights")
    main_error(["--model", model_451, "--dataset", gsm6, "--lora-alpha", "8"], capsys, "pass --lora R too")
    adapter = os.path.join(out, "checkpoint-000002")
    before = snapshot(out)
    main_error(["--merge-lora", adapter, adapter], capsys, "exists; expected a new directory")
    main_error(["--merge-lora", model_451, str(tmp_path / "merged")], capsys, "not a LoRA adapter checkpoint")
    assert snapshot(out) == before


def test_best_checkpoint_survives_a_moved_run_and_keep_last(tmp_path, model_451, gsm6):
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                            for i in range(3)))
    out = str(tmp_path / "run")
    flags = [*TINY[:TINY.index("--eval-every")], "--answer-weight", "1", "--seed", "3", "--eval-dataset", str(held),
             "--eval-limit", "3", "--eval-max-new-tokens", "4", "--keep-last", "1"]
    train(["--model", model_451, "--dataset", gsm6, "--out", out, "--steps", "2", "--eval-every", "1", *flags])
    best = json.load(open(os.path.join(out, "best.json")))
    moved = str(tmp_path / "moved")
    os.rename(out, moved)
    train(["--resume", os.path.join(moved, "checkpoint-000002"), "--steps", "4", "--allow-recipe-change"])
    kept = json.load(open(os.path.join(moved, "best.json")))
    assert os.path.isdir(os.path.join(moved, kept["checkpoint"])) and kept["step"] >= best["step"]
