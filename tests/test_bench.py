"""bench.py --sections step end to end on a tiny model: both pipelines run a step in their own processes, and the
official baseline's no-grad log-probs (transformers, full logits + log_softmax on left-padded rows) agree with
model.py's fused scorer on the same tokens."""
import json
import os
import sys

import torch

import data
import model as M
from conftest import REPO_ROOT, run_command


def test_bench_step_section(tmp_path, tiny_llama_dir):
    K, L, n_questions = 2, 6, 2
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"{i} + {i}\n#### {2 * i}"})
                                 + "\n" for i in range(n_questions)))
    out = tmp_path / "step.json"
    # micro-batch 3 of 4 rows: the last micro-batch is short
    p = run_command([sys.executable, "tools/bench.py", "--sections", "step", "--device", "cpu", "--model", tiny_llama_dir,
                     "--step-data", str(questions), "--step-questions", str(n_questions), "-K", str(K), "-L", str(L),
                     "--step-micro-batch", "3", "--threads", "1", "--out", str(out)], cwd=REPO_ROOT,
                    env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "step fp32 total s" in p.stdout and "step fp32 over wts MiB" in p.stdout
    (r,) = json.loads(out.read_text())["step"]
    assert (r["dtype"], r["memory_metric"]) == ("float32", "rss")
    assert set(r["ratio"]) == {"time_sample", "time_score", "time_backward", "time_optimizer", "time_total",
                               "peak_above_weights", "peak"}
    rows = n_questions * K
    for name in ("ours", "official"):
        v = r[name]
        assert set(v["time_s"]) == {"sample", "score", "backward", "optimizer", "total"}
        assert abs(v["time_s"]["total"] - sum(v["time_s"][p] for p in ("sample", "score", "backward", "optimizer"))) < 1e-6
        assert v["weights_bytes"] > 0 and v["peak_bytes"] >= v["weights_bytes"] and v["peak_above_weights_bytes"] >= 0
        assert v["rows"] == rows and len(v["rationales"]) == rows and len(v["logp"]) == rows
        assert all(len(z) <= L for z in v["rationales"]) and v["rationale_tokens"] == sum(map(len, v["rationales"]))
        assert all(torch.isfinite(torch.tensor(v[k])).all() for k in ("logp", "logp_ref", "reward", "advantages"))
    assert r["official"]["generated_tokens"] == rows * L >= r["ours"]["generated_tokens"]
    # the official rows are as wide as prompt + L (+ answer): more forward positions than ours, never fewer
    assert r["official"]["positions_backward"] >= r["ours"]["positions_backward"]

    # Oracle: the official no-grad log pi(z|x), log pi_ref(z|x) (the same weights before the step) and its reward
    # (which starts one token early, at the last rationale token) against model.py's token_logprobs on the same
    # tokens, right-padded.
    policy, tokenizer = M.load(tiny_llama_dir, device="cpu", dtype=torch.float32)
    examples = data.load_dataset(str(questions), limit=n_questions)
    x = [data.chat_prompt(tokenizer, e) for e in examples for _ in range(K)]
    y = [tokenizer.encode(e.answer_text, add_special_tokens=False) + [tokenizer.eot_id] for e in examples for _ in range(K)]
    z = r["official"]["rationales"]
    tokens = M.pad_right([xi + zi + yi for xi, zi, yi in zip(x, z, y)], "cpu")
    z_start = torch.tensor([len(xi) for xi in x])
    y_start = z_start + torch.tensor([len(zi) for zi in z])
    # one thread, as the bench ran (--threads 1): fp32 sums in another order differ by up to 8e-4 on these sums
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            logp = M.token_logprobs(policy, tokens, z_start, y_start).sum(1)
            reward = M.token_logprobs(policy, tokens, y_start - 1, y_start + torch.tensor([len(yi) for yi in y])).sum(1)
    finally:
        torch.set_num_threads(threads)
    for key, ours in (("logp", logp), ("logp_ref", logp), ("reward", reward)):
        torch.testing.assert_close(torch.tensor(r["official"][key]), ours, rtol=0, atol=1e-4, msg=key)
    assert (reward < -1.0).all()  # a real answer span of a random model, not an empty one
