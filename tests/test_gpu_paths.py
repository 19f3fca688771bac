"""CPU tests of fixes made for GPU runs: FusedLogProbs under autocast and its lm_head backward, concurrent dataset
writers, and the CPU-runnable part of bench.py's gpu smoke section."""
import json
import os
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

import data
from model import fused_logprobs


def oracle(h, weight, targets, temperature):
    """Plain fp32 log-softmax over the full (N, V) logits."""
    logits = F.linear(h.float(), weight.float()) / temperature
    return logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_head_backward_matches_a_plain_log_softmax(dtype):
    """Gradients of sum(g * logp) w.r.t. h and the lm_head weight, chunked (chunk 16 of 50 rows) vs one fp32
    log_softmax on the same (rounded) inputs. grad_w comes back in the weight's dtype."""
    torch.manual_seed(0)
    N, dim, V = 50, 24, 300
    h = torch.randn(N, dim).to(dtype).requires_grad_()
    w = (torch.randn(V, dim) * 0.3).to(dtype).requires_grad_()
    targets, g = torch.randint(0, V, (N,)), torch.randn(N)
    (fused_logprobs(h, w, targets, 0.7, chunk=16) * g).sum().backward()
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    (oracle(h32, w32, targets, 0.7) * g).sum().backward()
    assert w.grad.dtype == dtype and h.grad.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    torch.testing.assert_close(h.grad.float(), h32.grad, **tol)
    torch.testing.assert_close(w.grad.float(), w32.grad, **tol)


def test_backward_outside_autocast_matches_its_forward():
    """Forward under bf16 autocast with fp32 weights (the DDP path); a backward called after leaving autocast must
    recompute the same bf16 logits as the forward, i.e. give exactly the gradient of a backward inside it."""
    torch.manual_seed(0)
    N, dim, V = 40, 32, 200
    h0, w0 = torch.randn(N, dim), torch.randn(V, dim) * 0.3
    targets, g = torch.randint(0, V, (N,)), torch.randn(N)
    grads = []
    for backward_inside in (True, False):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (fused_logprobs(h, w, targets, chunk=16) * g).sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        grads.append((h.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    # and it is the bf16 computation, not an fp32 one: close to the fp32 oracle, but not equal to it
    h32, w32 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    (oracle(h32, w32, targets, 1.0) * g).sum().backward()
    torch.testing.assert_close(grads[1][1], w32.grad, rtol=0.05, atol=0.05)
    assert not torch.equal(grads[1][1], w32.grad)


def test_eight_concurrent_dataset_writers(tmp_path):
    """Eight writers of one cache file (8 ranks downloading at once), 20 rounds: none fails, the file is always one
    writer's complete body, and no temporary file is left behind."""
    dest = tmp_path / "gsm8k" / "train.jsonl"
    bodies = [(f'{{"question": "q{i}", "answer": "#### {i}"}}\n' * 20000).encode() for i in range(8)]
    errors = []

    def writer(i):
        for _ in range(20):
            try:
                data.write_atomic(dest, bodies[i])
            except Exception as e:  # noqa: BLE001 - every failure counts
                errors.append(repr(e))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert dest.read_bytes() in bodies
    assert sorted(p.name for p in dest.parent.iterdir()) == ["train.jsonl"]


def test_lm_head_backward_holds_no_fp32_copy_of_the_bf16_product():
    """bf16 weights (FSDP2's compute dtype): the backward's (V, dim) temporaries are the fp32 accumulator and one bf16
    product (6 bytes per weight), not also an fp32 copy of the product (10 bytes per weight). Measured with
    torch's MemTracker on real CPU tensors."""
    from torch.distributed._tools.mem_tracker import MemTracker
    torch.manual_seed(0)
    N, dim, V = 64, 256, 4096
    h = torch.randn(N, dim, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, dim) * 0.1).to(torch.bfloat16).requires_grad_()
    lp = fused_logprobs(h, w, torch.randint(0, V, (N,)), chunk=16)
    tracker = MemTracker()
    tracker.track_external(h, w, lp)
    with tracker:
        before = sum(snap["Total"] for snap in tracker.get_tracker_snapshot("current").values())
        lp.sum().backward()
        peak = sum(snap["Total"] for snap in tracker.get_tracker_snapshot("peak").values())
    per_weight = (peak - before) / (V * dim)
    assert per_weight < 8, per_weight


def test_bench_gpu_section_runs_its_steps_on_cpu(tmp_path, tiny_llama_dir):
    """bench.py --sections gpu with --device cpu and the tiny shape: a random-weight checkpoint with the given
    tokenizer, a bf16 run of 2 steps with its memory plan, and a resume from step 1 that reproduces step 2."""
    from conftest import REPO_ROOT, run_command
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} + {i}\n#### {2 * i}"})
                                 + "\n" for i in range(2)))
    out = tmp_path / "gpu.json"
    p = run_command([sys.executable, "tools/bench.py", "--sections", "gpu", "--device", "cpu", "--gpu-shape", "tiny",
                     "--model", tiny_llama_dir, "--data", str(questions), "--samples", "2", "--new-tokens", "6",
                     "--threads", "1", "--out", str(out)], cwd=REPO_ROOT,
                    env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    g = json.loads(out.read_text())["gpu"]
    assert g["plan_peak_gib"] is not None and g["plan_peak_gib"] > 0
    assert g["resumed_step2_loss"] == g["step2_loss"]
    cfg = json.loads(open(os.path.join(g["work_dir"], "model", "config.json")).read())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["dtype"]) == (64, 2, "bfloat16")
