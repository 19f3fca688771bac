"""Benchmarks model.py and one LaTRO step against transformers on a real checkpoint: prints each number as it is
measured, then a table of all of them. transformers, the oracle, is imported only by the sections that compare.

    python tools/bench.py --model DIR [--sections sample,score,greedy,step,gpu] [--device cpu|cuda] [--out FILE]

  sample  new tokens/s sampling continuations of one GSM8K prompt, ours vs transformers, and the matmul limit.
  score   forward+backward of span log-probs: token_logprobs() vs a full log_softmax over (B, T, V) logits.
  greedy  greedy tokens of ours vs transformers on GSM8K questions, and ours batched vs unbatched.
  step    one LaTRO step, ours (train.py's per-step calls) vs the official pipeline (official_step): seconds per phase,
          peak memory, tokens and forward positions. In bf16 both train bf16 weights without autocast.
  gpu     a smoke run of train.py on one GPU: a random-weight model of a real model's shape (Llama-3.2-1B or
          SmolLM2-1.7B) with --model's tokenizer, one bf16 LaTRO step (sampling, scoring, backward, AdamW), a
          checkpoint and a resume to step 2; prints the measured peak (torch.cuda.max_memory_allocated) next to the
          memory plan of the same configuration (--gpu-lora R: with LoRA adapters). --device cpu runs the same
          steps on the CPU (peak = RSS, not comparable).

score and step run each variant in a fresh process, so that neither inherits the other's allocator state or peak.
"""
import argparse
import contextlib
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root
import data  # noqa: E402
import model as M  # noqa: E402

GSM8K = os.path.join(ROOT, "..", "shared", "data", "gsm8k", "test.jsonl")
PHASES = ("sample", "score", "backward", "optimizer")
MiB = 2**20
ROWS = []  # the table printed at the end


def report(label, ours, base="", ratio="", note=""):
    ROWS.append(f"{label:<22}{ours:>16}{base:>16}{ratio:>10}  {note}")
    print(ROWS[-1], flush=True)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """(seconds, result) of fn(); synchronises CUDA on both sides so the time covers the queued kernels."""
    sync(device)
    t = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t, result


def rss(field="VmHWM"):
    """Bytes of a /proc/self/status field: VmHWM (the peak RSS) or VmRSS."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


class Meter:
    """Times phases (`with meter("score"): ...`) and records each one's peak memory above the state at construction
    (the loaded model, inputs and optimizer): torch.cuda.max_memory_allocated on CUDA, else the peak RSS, whose
    counter is reset to the current RSS through /proc/self/clear_refs (Linux >= 4.0)."""

    def __init__(self, device):
        self.device, self.cuda = device, torch.device(device).type == "cuda"
        gc.collect()
        self.base = self.reset()
        self.metric = "cuda_max_memory_allocated" if self.cuda else "rss"
        self.times, self.above, self.peak = {}, {}, 0

    def reset(self):
        sync(self.device)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() if self.cuda else rss("VmRSS")

    @contextlib.contextmanager
    def __call__(self, phase):
        self.reset()
        t = time.perf_counter()
        yield
        sync(self.device)
        self.times.setdefault(phase, []).append(time.perf_counter() - t)
        peak = torch.cuda.max_memory_allocated() if self.cuda else rss()
        self.above[phase] = max(self.above.get(phase, 0), peak - self.base)
        self.peak = max(self.peak, peak)


def run_worker(args, section, variant, dtype_name):
    """Runs one variant of the score or step section in a fresh process of this file, given the same flags; returns
    the result it printed."""
    worker = f"{section},{variant},{dtype_name}"
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args.argv, "--worker", worker],
                          capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {worker} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def load_hf(model_dir, device, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def gsm8k_prompts(tokenizer, path, n):
    """Token ids of the first n questions in the LaTRO prompt (chat template + CoT trigger)."""
    return [data.chat_prompt(tokenizer, ex) for ex in data.load_dataset(path, limit=n)]


def bench_sample(args, dtype_name):
    """New tokens/s of K samples of one prompt, ours vs transformers, and the matmul limit."""
    device, dtype, K, N = args.device, M.resolve_dtype(dtype_name, args.device), args.samples, args.new_tokens
    ours, tok = M.load(args.model, device=device, dtype=dtype)
    hf = load_hf(args.model, device, dtype)
    prompt = gsm8k_prompts(tok, args.data, 1)[0]
    ids = torch.tensor([prompt], device=device)

    def run_ours(compiled=False):  # stop=[]: no row ends early, every run decodes exactly K * N tokens
        out = M.generate(ours, [prompt], N, temperature=1.0, num_samples=K, stop=[], seed=0, compiled=compiled)
        return sum(len(r) for r in out)

    def run_hf():  # min_new_tokens masks EOS; top_k=0 and top_p=1 override generation_config: the plain softmax
        torch.manual_seed(0)
        out = hf.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N,
                          min_new_tokens=N, num_return_sequences=K, pad_token_id=tok.pad_id or 0)
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    runs = {"ours": run_ours, "transformers": run_hf}
    if args.compile:  # the warm-up run compiles the decoding step; the timed runs reuse it
        runs["ours_compiled"] = lambda: run_ours(compiled=True)
    r = {"dtype": dtype_name, "prompt_tokens": len(prompt), "samples": K, "new_tokens": N}
    for name, fn in runs.items():
        _, n_tokens = timed(fn, device)  # warm-up: allocator, kernel selection, lazy init
        assert n_tokens == K * N, f"{name} generated {n_tokens} tokens, expected {K * N}"
        times = [timed(fn, device)[0] for _ in range(args.sample_runs)]
        r[name] = {"tok_s": K * N / statistics.median(times), "times_s": times}
    hf_tok_s, target = r["transformers"]["tok_s"], ">= 2.5x" if dtype_name == "bfloat16" else ">= 1.5x"
    r["ratio"] = r["ours"]["tok_s"] / hf_tok_s
    for name, label in (("ours", f"sample {dtype_name} tok/s"), ("ours_compiled", "  compiled")):
        if name in r:
            report(label, f"{r[name]['tok_s']:.1f}", f"{hf_tok_s:.1f}", f"{r[name]['tok_s'] / hf_tok_s:.2f}x", target)
    r["matmul_limit_tok_s"] = limit = matmul_limit_tok_s(ours, K, device)
    r["fraction_of_limit"] = {name: r[name]["tok_s"] / limit for name in runs}
    report("  matmul limit", f"{limit:.1f}", note=", ".join(f"{k} {v:.0%}" for k, v in r["fraction_of_limit"].items()))
    return r


def matmul_limit_tok_s(model, rows, device, runs=5):
    """The decoding speed this machine's matmuls allow: a decoding step multiplies each row by every weight matrix
    (attention, MLP, lm_head) once; timed alone, without attention over the cache, norms or sampling, that is an
    upper bound on tokens/s."""
    mats = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith(("embed", "lm_head"))]
    mats.append(model.output_weight())
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], device=device, dtype=w.dtype) for w in mats}

    @torch.no_grad()
    def one_step():
        for w in mats:
            torch.nn.functional.linear(xs[w.shape[1]], w)

    timed(one_step, device)
    return rows / statistics.median(timed(one_step, device)[0] for _ in range(runs))


def full_logsoftmax_logprobs(model, tokens, starts, ends):
    """The naive baseline: materialise (B, T-1, V) logits and their fp32 log_softmax, gather, mask to the span."""
    lp = torch.log_softmax(model(tokens[:, :-1]).float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
    t = torch.arange(1, tokens.shape[1], device=tokens.device)
    return torch.nn.functional.pad(lp * ((t >= starts[:, None]) & (t < ends[:, None])), (1, 0))


def score_worker(args, variant, dtype_name):
    """One variant: loads the model and random tokens, then times forward+backward passes and records their peak
    memory above that loaded state."""
    device = args.device
    model, _ = M.load(args.model, device=device, dtype=M.resolve_dtype(dtype_name, device))
    if args.score_checkpoint:  # activation checkpointing as in training; the model has no dropout, so train() is safe
        model.train()
        model.checkpoint_layers = True
    B, T = args.score_batch, args.score_len
    tokens = torch.randint(0, model.args.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    starts, ends = torch.full((B,), args.score_start, device=device), torch.full((B,), T, device=device)
    score = M.token_logprobs if variant == "ours" else full_logsoftmax_logprobs
    meter = Meter(device)
    for _ in range(args.score_runs):
        with meter("score"):
            model.zero_grad(set_to_none=True)  # parameter grads are allocated inside the step, as in training
            lp = score(model, tokens, starts, ends)
            lp.sum().backward()
            sums, lp = lp.detach().sum(1), None
    times = meter.times["score"]
    return {"times_s": times, "time_s": statistics.median(times), "memory_metric": meter.metric,
            "peak_above_bytes": meter.above["score"], "row_logprob_sums": sums.double().cpu().tolist()}


def bench_score(args, dtype_name):
    """Forward + backward of span log-probs, fused vs a full log_softmax, each variant in a fresh process."""
    o, b = (run_worker(args, "score", v, dtype_name) for v in ("ours", "full_log_softmax"))
    diff = max(abs(x - y) for x, y in zip(o["row_logprob_sums"], b["row_logprob_sums"]))
    total = abs(sum(b["row_logprob_sums"]))
    r = {"dtype": dtype_name, "ours": o, "baseline": b, "memory_ratio": o["peak_above_bytes"] / b["peak_above_bytes"],
         "time_ratio": o["time_s"] / b["time_s"], "max_abs_diff_row_sums": diff, "baseline_abs_total": total}
    report(f"score {dtype_name} peak MiB", f"{o['peak_above_bytes'] / MiB:.0f}", f"{b['peak_above_bytes'] / MiB:.0f}",
           f"{r['memory_ratio']:.3f}", f"<= 0.25 ({o['memory_metric']} above the loaded model)")
    report(f"score {dtype_name} time s", f"{o['time_s']:.2f}", f"{b['time_s']:.2f}", f"{r['time_ratio']:.3f}",
           f"<= 1.0 (row log-prob sums: max |diff| {diff:.3g}, |total| {total:.4g})")
    # both compute the same quantity; bf16 rounds logits differently in the two paths, so allow more there
    tol = 1e-2 if dtype_name == "float32" else 1.0 * args.score_batch
    assert diff < tol, f"ours and the full log_softmax disagree by {diff} (tolerance {tol})"
    return r


def bench_greedy(args):
    """Greedy tokens, ours vs transformers and ours batched vs unbatched."""
    N = args.greedy_tokens
    ours, tok = M.load(args.model, device=args.device, dtype=torch.float32)
    hf = load_hf(args.model, args.device, torch.float32)
    prompts = gsm8k_prompts(tok, args.data, args.greedy_questions)
    eos = list(ours.args.eos_token_ids)
    single = [M.generate(ours, [p], N)[0] for p in prompts]  # stop=None: the model's end-of-turn ids
    batched = M.generate(ours, prompts, N)                   # all prompts, different lengths, one call
    # transformers on a batch of one: no padding, the row ends at (and includes) the EOS
    hf_rows = [hf.generate(torch.tensor([p], device=args.device), do_sample=False, max_new_tokens=N, eos_token_id=eos,
                           pad_token_id=tok.pad_id or eos[0])[0, len(p):].tolist() for p in prompts]
    first_diff = [None if s == h else next((j for j, (a, b) in enumerate(zip(s, h)) if a != b), min(len(s), len(h)))
                  for s, h in zip(single, hf_rows)]
    r = {"n": len(prompts), "identical": first_diff.count(None), "first_diff": first_diff,
         "batched_identical": sum(s == b for s, b in zip(single, batched))}
    report("greedy identical", f"{r['identical']}/{r['n']}", note="vs transformers" + (
        f"; first differing new token per question {first_diff}" if r["identical"] < r["n"] else ""))
    report("greedy batched", f"{r['batched_identical']}/{r['n']}", note="vs unbatched")
    return r


def ours_step(policy, reference, tokenizer, prompts, answers, cfg, seeds, meter):
    """What train.py runs per step for --method latro on one process (there the sampler is the policy), up to the
    optimizer step."""
    import latro
    with meter("sample"):
        ro = latro.sample(policy, tokenizer, prompts, answers, cfg, seeds=seeds)
    with meter("score"):
        terms = latro.compute_advantages(policy, reference, ro, cfg)
    with meter("backward"):
        loss = latro.backward_on_rollout(policy, ro, terms.advantages, cfg)["loss"]
    # forward positions: each micro-batch is one packed sequence (latro.pack), and the model reads tokens[:, :-1]
    positions = sum(mb.tokens.shape[1] - 1 for mb in latro.micro_batches(ro, cfg.micro_batch_size, cfg.num_samples))
    z = [ro.tokens[i, p:r].tolist() for i, (p, r) in enumerate(zip(ro.prompt_end.tolist(), ro.rationale_end.tolist()))]
    return {"rows": len(z), "generated_tokens": ro.sampled_tokens, "rationale_tokens": sum(map(len, z)),
            "answer_tokens": int((ro.answer_end - ro.rationale_end).sum()),
            "stop_rate": ro.stopped.float().mean().item(),
            "positions_score": 2 * positions, "positions_backward": positions, "loss": loss, "rationales": z,
            **{k: getattr(terms, k).tolist() for k in ("logp", "logp_ref", "reward", "advantages")}}


def official_logprob(model, ids, attention, start):
    """The official get_logprob_reward on left-padded rows: full (B, W, V) logits, their log_softmax, the gathered
    next-token log-probs summed from position `start` on. Position ids count real tokens only, as there."""
    logits = model(input_ids=ids, attention_mask=attention, position_ids=attention.cumsum(1) - attention).logits
    logprobs = torch.log_softmax(logits, dim=-1)
    del logits
    lp = torch.gather(logprobs[:, :-1], 2, ids[:, 1:, None])[..., 0]                  # lp[:, j] = log p(ids[:, j+1])
    del logprobs
    return (lp * (torch.arange(lp.shape[1], device=ids.device) >= start[:, None] - 1)).sum(1)


def left_padded(rows, width, pad_id, device):
    """(ids, attention mask) of token lists right-aligned in `width` columns, as the official pad_mask_rearrange."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):], attention[i, width - len(r):] = torch.tensor(r), 1
    return ids.to(device), attention.to(device)


def official_step(policy, reference, tokenizer, prompts, answers, cfg, seeds, meter):
    """One step of the official LatroTrainer (SalesforceAIResearch/LaTRO), rewritten on the same prompts, answers, K,
    L and micro-batch size: L new tokens for every row, the rationale cut, then every log-prob through full logits
    + log_softmax on rows padded to the full length: [x | L] for log pi(z|x) and log pi_ref(z|x), [x | L | y] for
    R = log pi(y|x,z) (which, as there, includes the last rationale token). Three no-grad forwards per micro-batch
    (policy, reference, reward), two with grad whose graphs are kept until one backward; the non-stop penalty, KL
    and RLOO as there. Departures from the official code:
      * generation: all rows in one call with the first question's seed (official: rollout batches, 16 rows by
        default), no output_scores (official stacks the (rows, L, V) scores, then discards them), and L tokens per
        row (official stops once every row of a rollout batch has emitted EOS; EOS still ends the rationale);
      * the cut: latro.cut_rationale (stop strings on decoded text), not token-id patterns; explicit attention masks,
        not padding found by pad_token_id;
      * scoring in training-size micro-batches (official: whole rollout batches), without output_hidden_states,
        gc.collect() or torch.cuda.empty_cache(); training micro-batches in order (official: a random permutation);
      * sft_penalty = cfg.answer_weight (1, as ours and the paper), not its default 0: the same work, since the
        official step runs the reward forward and backward either way."""
    import latro
    K, L, device = cfg.num_samples, cfg.max_rationale_tokens, policy.device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    answer_ids = [tokenizer.encode(a, add_special_tokens=False) + [tokenizer.eot_id] for a in answers]
    x = [p for p in prompts for _ in range(K)]                                  # queries.repeat_interleave(K)
    y = [a for a in answer_ids for _ in range(K)]
    n, Tq, Ty = len(x), max(map(len, prompts)), max(map(len, answer_ids))
    W1, W2 = Tq + L, Tq + L + Ty         # [query | response] and [query | response | final answer], full length
    micro_batches = [slice(i, i + cfg.micro_batch_size) for i in range(0, n, cfg.micro_batch_size)]
    with meter("sample"):
        q, q_mask = left_padded(x, Tq, pad, device)
        torch.manual_seed(seeds[0])
        # eos_token_id=None: exactly L new tokens per row (EOS stays sampleable; the cut ends the rationale there)
        out = policy.generate(input_ids=q, attention_mask=q_mask, do_sample=True, temperature=cfg.temperature,
                              top_k=0, top_p=1.0, max_new_tokens=L, eos_token_id=None, pad_token_id=pad)
        assert out.shape[1] == Tq + L
        eos = set(tokenizer.eos_ids)
        z, stopped = zip(*(latro.cut_rationale(r, tokenizer, cfg.stop_strings, eos) for r in out[:, Tq:].tolist()))
        stopped = torch.tensor(stopped, device=device)
        z_ids, z_mask = left_padded([xi + zi for xi, zi in zip(x, z)], W1, pad, device)
        r_ids, r_mask = left_padded([xi + zi + yi for xi, zi, yi in zip(x, z, y)], W2, pad, device)
        z_start = torch.tensor([W1 - len(zi) for zi in z], device=device)
        y_start = torch.tensor([W2 - len(yi) - 1 for yi in y], device=device)  # one early: the last rationale token
        del q, q_mask, out
    with meter("score"), torch.no_grad():
        logp, logp_ref, reward = (torch.zeros(n, device=device) for _ in range(3))
        for s in micro_batches:
            logp[s] = official_logprob(policy, z_ids[s], z_mask[s], z_start[s])
            logp_ref[s] = official_logprob(reference, z_ids[s], z_mask[s], z_start[s])
            reward[s] = official_logprob(policy, r_ids[s], r_mask[s], y_start[s])
        penalised = torch.where(stopped, reward, cfg.penalty_factor * reward.mean()) if cfg.nonstop_penalty else reward
        r = (penalised - cfg.beta * (logp - logp_ref)).view(-1, K)
        advantages = (r - (r.sum(1, keepdim=True) - r) / (K - 1)).flatten()   # RLOO: r_k - mean of the others
    with meter("backward"):
        loss = torch.zeros((), device=device)
        for s in micro_batches:
            rloo_loss = (-advantages[s] * official_logprob(policy, z_ids[s], z_mask[s], z_start[s])).mean()
            sft_loss = -official_logprob(policy, r_ids[s], r_mask[s], y_start[s]).mean()
            mb_loss = (rloo_loss + cfg.answer_weight * sft_loss) / len(micro_batches)  # accelerate's accumulation
            mb_loss.backward()
            loss += mb_loss.detach()
        loss = loss.item()
    return {"rows": n, "generated_tokens": n * L, "rationale_tokens": sum(map(len, z)),
            "answer_tokens": sum(map(len, y)), "stop_rate": stopped.float().mean().item(),
            "positions_score": n * (2 * W1 + W2), "positions_backward": n * (W1 + W2), "loss": loss, "rationales": z,
            "logp": logp.tolist(), "logp_ref": logp_ref.tolist(), "reward": reward.tolist(),
            "advantages": advantages.tolist()}


def step_worker(args, variant, dtype_name):
    """One pipeline: loads policy and reference (ours: model.load; official: transformers), then runs steps on the
    same questions, each with its step's seeds."""
    import latro
    import train
    device, dtype, ours = args.device, M.resolve_dtype(dtype_name, args.device), variant == "ours"
    examples = data.load_dataset(args.step_data, limit=args.step_questions)
    tokenizer = M.Tokenizer(M.resolve(args.model))
    prompts, answers = [data.chat_prompt(tokenizer, e) for e in examples], [e.answer_text for e in examples]
    cfg = latro.LatroConfig(num_samples=args.step_samples, max_rationale_tokens=args.step_tokens,
                            micro_batch_size=args.step_micro_batch, compiled=args.compile)
    policy, reference = ((M.load(args.model, device=device, dtype=dtype)[0] if ours
                          else load_hf(args.model, device, dtype)) for _ in range(2))
    reference.requires_grad_(False)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=train.PAPER["lr"], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0, fused=True)
    if args.compile and ours:  # compiled once outside the meter, as train.py --compile does (cf. the sample warm-up)
        M.generate(policy, prompts, cfg.max_rationale_tokens, num_samples=cfg.num_samples, compiled=True, stop=[])
    meter, steps = Meter(device), []
    for step in range(args.step_runs):
        seeds = [train.question_seed(args.seed, step, i) for i in range(len(examples))]
        steps.append((ours_step if ours else official_step)(policy, reference, tokenizer, prompts, answers, cfg,
                                                            seeds, meter))
        with meter("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    times = {**meter.times, "total": [sum(ts) for ts in zip(*meter.times.values())]}
    return {"memory_metric": meter.metric, "times_s": times,
            "time_s": {p: statistics.median(t) for p, t in times.items()}, "weights_bytes": meter.base,
            "peak_bytes": meter.peak, "peak_above_weights_bytes": max(meter.above.values()),
            "phase_peak_above_weights_bytes": meter.above, **steps[0], "losses": [s["loss"] for s in steps]}


def bench_step(args, dtype_name):
    """One LaTRO step, ours vs the official pipeline, each in a fresh process."""
    o, b = (run_worker(args, "step", v, dtype_name) for v in ("ours", "official"))
    q = {f"time_{p}": o["time_s"][p] / max(b["time_s"][p], 1e-12) for p in (*PHASES, "total")}
    q["peak_above_weights"] = o["peak_above_weights_bytes"] / max(b["peak_above_weights_bytes"], 1)
    q["peak"] = o["peak_bytes"] / max(b["peak_bytes"], 1)
    tag = "step " + {"float32": "fp32", "bfloat16": "bf16"}.get(dtype_name, dtype_name)
    for p in (*PHASES, "total"):
        report(f"{tag} {p} s", f"{o['time_s'][p]:.2f}", f"{b['time_s'][p]:.2f}", f"{q['time_' + p]:.3f}",
               f"vs official, median of {args.step_runs} step(s)")
    report(f"{tag} peak {'GPU' if o['memory_metric'].startswith('cuda') else 'RSS'} MiB",
           f"{o['peak_bytes'] / MiB:.0f}", f"{b['peak_bytes'] / MiB:.0f}", f"{q['peak']:.3f}", "vs official")
    report(f"{tag} over wts MiB", f"{o['peak_above_weights_bytes'] / MiB:.0f}",
           f"{b['peak_above_weights_bytes'] / MiB:.0f}", f"{q['peak_above_weights']:.3f}",
           f"peak above the loaded weights; stop rate {o['stop_rate']:.2f} / {b['stop_rate']:.2f}")
    for key, label in (("generated_tokens", "generated"), ("rationale_tokens", "rationale tok"),
                       ("answer_tokens", "answer tok"), ("positions_score", "no-grad pos"),
                       ("positions_backward", "grad pos")):
        report(f"{tag} {label}", o[key], b[key], f"{o[key] / max(b[key], 1):.3f}", f"{o['rows']} rows each")
    return {"dtype": dtype_name, "memory_metric": o["memory_metric"], "ours": o, "official": b, "ratio": q}


LLAMA = dict(model_type="llama", rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_size=2048,
             intermediate_size=8192, num_attention_heads=32)
GPU_SHAPES = {  # config.json fields; vocab and end-of-turn ids come from --model's tokenizer
    "llama-3.2-1b": dict(LLAMA, num_hidden_layers=16, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                         high_freq_factor=4.0, original_max_position_embeddings=8192)),
    "smollm2-1.7b": dict(LLAMA, num_hidden_layers=24, num_key_value_heads=32, max_position_embeddings=8192,
                         rope_theta=130000.0),
    "tiny": dict(LLAMA, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0),
}


def random_checkpoint(shape, tokenizer_dir, out_dir, seed=0):
    """A Hugging Face checkpoint (bf16 safetensors and the given tokenizer's files) of a model of that shape with
    random weights: embeddings N(0, 0.02), a trained LM's scale; linear layers at torch's default init."""
    tokenizer = M.Tokenizer(M.resolve(tokenizer_dir))
    hf_config = dict(GPU_SHAPES[shape], vocab_size=tokenizer.vocab_size, eos_token_id=list(tokenizer.eos_ids))
    torch.manual_seed(seed)
    model = M.Transformer(M.ModelArgs.from_hf_config(hf_config), hf_config)
    torch.nn.init.normal_(model.embed_tokens.weight, std=0.02)
    return M.save(model.to(torch.bfloat16), tokenizer, out_dir)


def bench_gpu(args):
    """One bf16 step, a checkpoint and a resume of train.py on a random-weight model, measured against its plan."""
    work = tempfile.mkdtemp(prefix="latro-gpu-")
    ckpt = random_checkpoint(args.gpu_shape, args.model, os.path.join(work, "model"))
    prompt_tokens = max(map(len, gsm8k_prompts(M.Tokenizer(ckpt), args.data, args.gpu_questions)))
    flags = ["--dataset", args.data, "--limit", str(args.gpu_questions), "--device", args.device, "--dtype", "bfloat16",
             "--questions-per-step", str(args.gpu_questions), "--num-samples", str(args.samples),
             "--max-rationale-tokens", str(args.new_tokens), "--micro-batch-size", "4", "--lr", "1e-6", "--seed",
             str(args.seed), "--save-every", "1", "--gpu-memory", str(args.gpu_memory), "--plan-prompt-tokens",
             str(prompt_tokens), "--eval-every", "0", "--steps", "2"]
    flags += ["--lora", str(args.gpu_lora)] if args.gpu_lora else []

    def train(out_dir, *argv):  # train.py for 2 steps; returns its stdout and the losses it logged
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *argv, "--out", out_dir, *flags],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if proc.returncode != 0:
            sys.exit(f"bench.py gpu: train.py {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
        return proc.stdout, [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]

    stdout, rows = train(os.path.join(work, "run"), "--model", ckpt)
    print(stdout, flush=True)
    plan = re.search(r"^\s*(?:fits|does NOT fit): peak (\S+) GiB", stdout, re.M)  # the plan's verdict line
    # a resume from the step-1 checkpoint must reproduce step 2 (the run above wrote both)
    resumed_ckpt = os.path.join(work, "resumed", "checkpoint-000001")
    os.makedirs(os.path.dirname(resumed_ckpt))
    os.replace(os.path.join(work, "run", "checkpoint-000001"), resumed_ckpt)
    _, resumed = train(os.path.join(work, "resumed"), "--resume", resumed_ckpt)
    r = {"shape": args.gpu_shape, "lora": args.gpu_lora, "device": args.device, "prompt_tokens": prompt_tokens,
         "measured_peak_gib": max(row["peak_memory_gb"] for row in rows), "plan_peak_gib": plan and float(plan[1]),
         "step2_loss": rows[-1]["loss"], "resumed_step2_loss": resumed[-1]["loss"], "work_dir": work}
    report("gpu peak GiB", f"{r['measured_peak_gib']:.2f}", "n/a" if plan is None else f"{r['plan_peak_gib']:.2f}",
           note=f"measured vs plan ({args.gpu_shape}, {args.device})")
    report("gpu resume step-2 loss", f"{r['resumed_step2_loss']:.4f}", f"{r['step2_loss']:.4f}",
           note="resumed vs straight")
    return r


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local HF model directory (or an alias / hub id that model.load accepts)")
    p.add_argument("--data", default=GSM8K, help="GSM8K jsonl for the prompts (default: shared/data/gsm8k/test.jsonl)")
    p.add_argument("--sections", default="sample,score,greedy", help="any of sample,score,greedy,step,gpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float32,bfloat16", help="dtypes for the sample and score sections")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, the same for both sides")
    p.add_argument("--compile", action="store_true", help="sample: also time generate(compiled=True); step: use it")
    p.add_argument("--samples", type=int, default=16, help="sample and gpu sections: samples per prompt")
    p.add_argument("--new-tokens", type=int, default=128, help="sample and gpu sections: new tokens per sample")
    p.add_argument("--sample-runs", type=int, default=3, help="timed runs after one warm-up (median reported)")
    p.add_argument("--score-batch", type=int, default=16)
    p.add_argument("--score-len", type=int, default=512)
    p.add_argument("--score-start", type=int, default=200, help="first scored position (ends = --score-len)")
    p.add_argument("--score-runs", type=int, default=3, help="forward+backward runs per variant (median time)")
    p.add_argument("--score-checkpoint", action="store_true", help="activation checkpointing, as train.py can do")
    p.add_argument("--greedy-questions", type=int, default=5)
    p.add_argument("--greedy-tokens", type=int, default=200)
    p.add_argument("--step-data", default=GSM8K.replace("test.jsonl", "train.jsonl"), help="step section's questions")
    p.add_argument("--step-questions", type=int, default=4, help="step section: the first N questions of --step-data")
    p.add_argument("-K", "--step-samples", type=int, default=8, help="step section: rationales per question")
    p.add_argument("-L", "--step-tokens", type=int, default=128, help="step section: rationale length limit")
    p.add_argument("--step-micro-batch", type=int, default=4, help="step section: rows per scoring/backward pass")
    p.add_argument("--step-runs", type=int, default=1, help="step section: steps per pipeline, no warm-up (median)")
    p.add_argument("--step-dtypes", default="float32", help="step section: float32 and/or bfloat16")
    p.add_argument("--gpu-shape", choices=tuple(GPU_SHAPES), default="llama-3.2-1b")
    p.add_argument("--gpu-questions", type=int, default=2, help="questions per step in the gpu section")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB the gpu section's plan is checked against")
    p.add_argument("--gpu-lora", type=int, default=0, help="gpu section: train LoRA adapters of this rank (0 = full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write all results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one score or step variant (run_worker)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the workers get the same flags
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:  # one variant of the score or step section (run_worker)
        section, variant, dtype_name = args.worker.split(",")
        result = {"score": score_worker, "step": step_worker}[section](args, variant, dtype_name)
        return print("RESULT " + json.dumps(result), flush=True)
    sections = {"sample": (bench_sample, args.dtypes), "score": (bench_score, args.dtypes),
                "greedy": (bench_greedy, None), "step": (bench_step, args.step_dtypes), "gpu": (bench_gpu, None)}
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    dtypes = [d.strip() for d in f"{args.dtypes},{args.step_dtypes}".split(",") if d.strip()]
    for broken, error in [(not args.model, "--model is required"),
                          (set(names) - set(sections), f"--sections {args.sections}: expected any of "
                                                       f"{', '.join(sections)}"),
                          (set(dtypes) - {"float32", "bfloat16"}, "--dtypes / --step-dtypes: float32 or bfloat16"),
                          (not os.path.isfile(args.data), f"--data {args.data}: no such file (GSM8K jsonl)"),
                          (args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))),
                           f"--out {args.out}: its directory does not exist")]:
        if broken:  # before anything runs: a long benchmark must not fail at its end
            sys.exit(f"error: {error}")
    print(f"device {args.device}, threads {args.threads}, torch {torch.__version__}, model {args.model}", flush=True)
    report("section", "ours", "baseline", "ratio", "target / note")
    results = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "argv")}}
    for name in names:
        fn, dtypes = sections[name]
        results[name] = [fn(args, d.strip()) for d in dtypes.split(",") if d.strip()] if dtypes else fn(args)
    print("\n" + "\n".join(ROWS))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
