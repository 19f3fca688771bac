"""Benchmarks model.py against transformers on a real checkpoint. Prints numbers; asserts nothing about speed.

    python bench.py --model /path/to/SmolLM2-135M-Instruct [--sections sample,score,greedy] [--device cpu|cuda]
                    [--samples 16 --new-tokens 128 --threads N --out results.json]
    python bench.py --model /path/to/SmolLM2-135M-Instruct --sections step [-K 8 -L 128 --step-runs 1]

Sections:
  sample  new tokens/s sampling `--samples` continuations of one GSM8K chat prompt, ours vs transformers,
          float32 and bfloat16 (target: ours >= 1.5x).
  score   forward+backward of span log-probs: token_logprobs() vs a full log_softmax over (B, T, V) logits on
          the same model. Peak memory and time (target: memory <= 1/4, time no worse). Each variant runs in a
          fresh subprocess so that neither inherits the other's allocator state or peak.
  greedy  greedy tokens of ours vs transformers on the first GSM8K test questions, and ours batched vs unbatched.
  gpu     a smoke run of train.py on one GPU: a random-weight model of --gpu-shape (Llama-3.2-1B or SmolLM2-1.7B
          shaped, with --model's tokenizer), one bf16 LaTRO step (sampling, scoring, backward, AdamW), a checkpoint,
          and a resume to step 2; prints the measured peak (torch.cuda.max_memory_allocated) next to the memory plan
          of the same configuration. --device cpu runs the same steps on the CPU (peak = RSS, not comparable).
  reward  LaTRO's self-reward, mean log pi(y | x, z) over K sampled rationales, on the LAST --reward-questions of
          --reward-data (held out from a train.py run given --limit <file length - N>); run it on a model before
          and after training, with the same seed, to see whether training raised it on unseen questions.
  step    one full LaTRO step on the first --step-questions GSM8K train questions (K rationales of at most L tokens,
          --step-micro-batch rows per scoring/backward pass), ours vs the official pipeline, each in a fresh process.
          Ours is what train.py runs per step: latro.sample (per-question seeds), compute_advantages (policy and
          reference, no grad), backward_on_rollout, AdamW. The official pipeline (SalesforceAIResearch/LaTRO's
          LatroTrainer, rewritten here on transformers, see official_step) generates exactly L tokens for every
          row and scores log pi(z|x), log pi_ref(z|x), log pi(y|x,z) and then the loss through full logits +
          log_softmax on rows left-padded to the full length. Prints seconds per phase (sample, score, backward,
          optimizer), peak memory (RSS on CPU, torch.cuda.max_memory_allocated on CUDA) and that peak above the
          loaded weights, with rows, tokens and forward positions; the rationales differ (different samplers).
          --step-dtypes bfloat16: both pipelines load bf16 policy and reference weights and train them as such, no
          autocast (not train.py's bf16 recipe, which keeps fp32 master weights); float32 is the primary number.

transformers is the oracle here (requirements-dev.txt); it is imported lazily, only by the sections that compare.
"""
import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import data  # noqa: E402
import model as M  # noqa: E402

GSM8K = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "gsm8k", "test.jsonl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------------
# Helpers

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


def gsm8k_prompts(tokenizer, n, path):
    """Token ids of the first n GSM8K questions in the LaTRO prompt (data.py: chat template + CoT trigger)."""
    return [data.chat_prompt(tokenizer, ex) for ex in data.load_dataset(path, limit=n)]


def load_hf(model_dir, device, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss():
    """Resets the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0) and returns the current RSS in
    bytes; VmHWM minus this is then the peak this process reached above its state right now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") * 1024


def peak_rss():
    return _status_kb("VmHWM") * 1024


# ----------------------------------------------------------------------------------------------------------------
# 1. sample: tokens/s of K samples of one prompt

def bench_sample(args, dtype_name):
    dtype, device = DTYPES[dtype_name], args.device
    ours, tok = M.load(args.model, device=device, dtype=dtype)
    prompt = gsm8k_prompts(tok, 1, args.data)[0]
    K, N = args.samples, args.new_tokens

    def run_ours(compiled=False):
        # stop=[]: no row ends early, so every run decodes exactly K * N tokens
        out = M.generate(ours, [prompt], N, temperature=1.0, num_samples=K, stop=[], seed=0, compiled=compiled)
        return sum(len(r) for r in out)

    hf = load_hf(args.model, device, dtype)
    ids = torch.tensor([prompt], device=device)

    def run_hf():
        # min_new_tokens = max_new_tokens keeps EOS masked, so transformers also decodes exactly K * N tokens;
        # top_k=0 / top_p=1.0 override generation_config so both sample from the plain softmax.
        torch.manual_seed(0)
        out = hf.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=N,
                          min_new_tokens=N, num_return_sequences=K, pad_token_id=tok.pad_id or 0)
        return (out.shape[1] - ids.shape[1]) * out.shape[0]

    result = {"dtype": dtype_name, "prompt_tokens": len(prompt), "samples": K, "new_tokens": N}
    runs = (("ours", run_ours), ("transformers", run_hf))
    if args.compile:  # the warm-up run compiles the decoding step; the timed runs reuse it
        runs += (("ours_compiled", lambda: run_ours(compiled=True)),)
    for name, fn in runs:
        _, n_tokens = timed(fn, device)  # warm-up: allocator, kernel selection, lazy init
        times = [timed(fn, device)[0] for _ in range(args.sample_runs)]
        assert n_tokens == K * N, f"{name} generated {n_tokens} tokens, expected {K * N}"
        result[name] = {"tok_s": K * N / statistics.median(times), "times_s": times}
    result["ratio"] = result["ours"]["tok_s"] / result["transformers"]["tok_s"]
    print(f"sample {dtype_name}: ours {result['ours']['tok_s']:.1f} tok/s, transformers "
          f"{result['transformers']['tok_s']:.1f} tok/s, ratio {result['ratio']:.2f}x "
          f"(median of {args.sample_runs} after 1 warm-up)", flush=True)
    if args.compile:
        result["compiled_speedup"] = result["ours_compiled"]["tok_s"] / result["ours"]["tok_s"]
        print(f"sample {dtype_name}: ours compiled {result['ours_compiled']['tok_s']:.1f} tok/s, "
              f"{result['compiled_speedup']:.2f}x ours eager", flush=True)
    limit = matmul_limit_tok_s(ours, K, device)
    result["matmul_limit_tok_s"] = limit
    result["fraction_of_limit"] = {k: result[k]["tok_s"] / limit for k in ("ours", "ours_compiled", "transformers")
                                   if k in result}
    print(f"sample {dtype_name}: matmul limit {limit:.1f} tok/s (every weight matrix once per step at {K} rows, "
          f"timed alone); ours reaches {result['fraction_of_limit']['ours']:.0%} of it", flush=True)
    del ours, hf
    return result


def matmul_limit_tok_s(model, rows, device, runs=5):
    """The decoding speed this machine's matmuls allow: one decoding step multiplies `rows` activations by every
    weight matrix (attention, MLP, lm_head) once; timed alone, with nothing else (no attention over the cache, no
    norms, no sampling), that is an upper bound on tokens/s."""
    mats = [p for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith(("embed", "lm_head"))]
    mats.append(model.output_weight())
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], device=device, dtype=w.dtype) for w in mats}

    def one_step():
        with torch.no_grad():
            for w in mats:
                torch.nn.functional.linear(xs[w.shape[1]], w)

    timed(one_step, device)
    return rows / statistics.median(timed(one_step, device)[0] for _ in range(runs))


# ----------------------------------------------------------------------------------------------------------------
# 2. score: forward + backward of span log-probs, fused vs full log_softmax

def full_logsoftmax_logprobs(model, tokens, starts, ends):
    """The naive baseline: materialise (B, T-1, V) logits and their fp32 log_softmax, gather, mask to the span."""
    logits = model(tokens[:, :-1]).float()
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[:, 1:, None])[..., 0]          # (B, T-1)
    t = torch.arange(1, tokens.shape[1], device=tokens.device)
    mask = (t >= starts[:, None]) & (t < ends[:, None])
    return torch.nn.functional.pad(lp * mask, (1, 0))


def score_worker(cfg):
    """Runs in a fresh process: loads the model, then measures peak memory above the loaded state and the time of
    `runs` forward+backward passes. Prints one JSON line."""
    torch.set_num_threads(cfg["threads"])
    device, dtype = cfg["device"], DTYPES[cfg["dtype"]]
    model, _ = M.load(cfg["model"], device=device, dtype=dtype)
    if cfg["checkpoint"]:  # activation checkpointing as in training; the model has no dropout, so train() is safe
        model.train()
        model.checkpoint_layers = True
    g = torch.Generator().manual_seed(0)
    B, T = cfg["batch"], cfg["seq_len"]
    tokens = torch.randint(0, model.args.vocab_size, (B, T), generator=g).to(device)
    starts = torch.full((B,), cfg["start"], device=device)
    ends = torch.full((B,), T, device=device)
    score = M.token_logprobs if cfg["variant"] == "ours" else full_logsoftmax_logprobs

    def step():
        model.zero_grad(set_to_none=True)  # parameter grads are allocated inside the measured step, as in training
        lp = score(model, tokens, starts, ends)
        lp.sum().backward()
        return lp.detach().sum(1)

    # Memory: the peak over all runs, above the process with the model and inputs already loaded.
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    base_rss = reset_peak_rss()
    times = []
    for _ in range(cfg["runs"]):
        dt, sums = timed(step, device)
        times.append(dt)
    out = {"variant": cfg["variant"], "dtype": cfg["dtype"], "times_s": times, "time_s": statistics.median(times),
           "peak_rss_delta_bytes": peak_rss() - base_rss, "row_logprob_sums": sums.double().cpu().tolist()}
    if cuda:
        out["peak_cuda_delta_bytes"] = torch.cuda.max_memory_allocated() - base_cuda
    print("SCORE_RESULT " + json.dumps(out), flush=True)


def run_worker(section, cfg):
    """Runs this file with --{section}-worker cfg in a fresh process; returns the JSON line it printed."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--{section}-worker", json.dumps(cfg)],
                          capture_output=True, text=True)
    tag = f"{section.upper()}_RESULT "
    lines = [l for l in proc.stdout.splitlines() if l.startswith(tag)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{section} worker {cfg['variant']}/{cfg['dtype']} failed (rc {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(tag):])


def run_score_worker(args, variant, dtype_name):
    return run_worker("score", {"model": args.model, "device": args.device, "dtype": dtype_name, "variant": variant,
                                "threads": args.threads, "batch": args.score_batch, "seq_len": args.score_len,
                                "start": args.score_start, "runs": args.score_runs,
                                "checkpoint": args.score_checkpoint})


def bench_score(args, dtype_name):
    ours = run_score_worker(args, "ours", dtype_name)
    base = run_score_worker(args, "full_log_softmax", dtype_name)
    mem_key = "peak_cuda_delta_bytes" if "peak_cuda_delta_bytes" in ours else "peak_rss_delta_bytes"
    diff = max(abs(a - b) for a, b in zip(ours["row_logprob_sums"], base["row_logprob_sums"]))
    total = abs(sum(base["row_logprob_sums"]))
    result = {"dtype": dtype_name, "batch": args.score_batch, "seq_len": args.score_len, "start": args.score_start,
              "checkpoint_layers": args.score_checkpoint, "memory_metric": mem_key, "ours": ours, "baseline": base,
              "memory_ratio": ours[mem_key] / base[mem_key], "time_ratio": ours["time_s"] / base["time_s"],
              "max_abs_diff_row_sums": diff, "baseline_abs_total": total}
    print(f"score {dtype_name}: peak mem ours {ours[mem_key] / 2**20:.0f} MiB vs baseline {base[mem_key] / 2**20:.0f} "
          f"MiB (ratio {result['memory_ratio']:.3f}), time ours {ours['time_s']:.2f}s vs baseline "
          f"{base['time_s']:.2f}s (ratio {result['time_ratio']:.3f}), max |diff| of row log-prob sums {diff:.3g} "
          f"(|total| {total:.4g})", flush=True)
    # Sanity: both compute the same quantity; bf16 rounds logits differently in the two paths, so allow more there.
    tol = 1e-2 if dtype_name == "float32" else 1.0 * args.score_batch
    assert diff < tol, f"ours and the full log_softmax disagree by {diff} (tolerance {tol})"
    return result


# ----------------------------------------------------------------------------------------------------------------
# 3. greedy: token-for-token agreement with transformers, and batched == unbatched

def bench_greedy(args):
    device = args.device
    ours, tok = M.load(args.model, device=device, dtype=torch.float32)
    hf = load_hf(args.model, device, torch.float32)
    prompts = gsm8k_prompts(tok, args.greedy_questions, args.data)
    eos = list(ours.args.eos_token_ids)
    N = args.greedy_tokens

    def hf_greedy(p):
        out = hf.generate(torch.tensor([p], device=device), do_sample=False, max_new_tokens=N, eos_token_id=eos,
                          pad_token_id=tok.pad_id or eos[0])
        return out[0, len(p):].tolist()  # batch of one: no padding, the row ends at (and includes) the EOS

    single = [M.generate(ours, [p], N)[0] for p in prompts]  # stop=None: the model's end-of-turn ids
    batched = M.generate(ours, prompts, N)                   # all prompts, different lengths, one call
    reference = [hf_greedy(p) for p in prompts]
    rows = []
    for i, (p, s, b, r) in enumerate(zip(prompts, single, batched, reference)):
        first_diff = next((j for j, (x, y) in enumerate(zip(s, r)) if x != y), None if len(s) == len(r) else min(len(s), len(r)))
        rows.append({"question": i, "prompt_tokens": len(p), "ours_tokens": len(s), "hf_tokens": len(r),
                     "same_as_transformers": s == r, "first_diff": first_diff, "batched_same_as_single": b == s})
        print(f"greedy q{i}: prompt {len(p)} tok, ours {len(s)} new tok, transformers {len(r)}, identical={s == r}"
              + ("" if s == r else f" (first difference at new token {first_diff})")
              + f", batched==unbatched={b == s}", flush=True)
    result = {"questions": rows, "identical": sum(r["same_as_transformers"] for r in rows),
              "batched_identical": sum(r["batched_same_as_single"] for r in rows), "n": len(rows)}
    print(f"greedy: {result['identical']}/{len(rows)} identical to transformers, "
          f"{result['batched_identical']}/{len(rows)} batched identical to unbatched", flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------------
# 4. reward: mean self-reward on held-out questions (same code path as training: latro.sample,
# compute_advantages)

def bench_reward(args):
    import latro
    policy, tok = M.load(args.model, device=args.device, dtype=torch.float32)
    examples = data.load_dataset(args.reward_data)[-args.reward_questions:]
    cfg = latro.LatroConfig(num_samples=args.reward_samples, max_rationale_tokens=args.reward_tokens)
    rewards, stops, lengths = [], [], []
    for i in range(0, len(examples), 4):  # 4 questions per rollout keeps memory flat
        batch = examples[i:i + 4]
        ro = latro.sample(policy, tok, [data.chat_prompt(tok, e) for e in batch], [e.answer_text for e in batch], cfg,
                          seeds=[args.seed + i + j for j in range(len(batch))])
        terms = latro.compute_advantages(policy, policy, ro, cfg)
        rewards.append(terms.reward.mean().item() * len(batch))
        stops.append(ro.stopped.float().mean().item() * len(batch))
        lengths.append((ro.rationale_end - ro.prompt_end).float().mean().item() * len(batch))
    n = len(examples)
    result = {"questions": n, "samples": args.reward_samples, "max_rationale_tokens": args.reward_tokens,
              "mean_reward": sum(rewards) / n, "stop_rate": sum(stops) / n, "rationale_len": sum(lengths) / n}
    print(f"reward: mean log pi(y|x,z) {result['mean_reward']:.3f} nats over {n} held-out questions x K="
          f"{args.reward_samples} (stop rate {result['stop_rate']:.2f}, rationale {result['rationale_len']:.1f} tok)",
          flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------------
# 5. step: one full LaTRO step, ours (train.py's per-step calls) vs the official pipeline, each in a fresh process

STEP_PHASES = ("sample", "score", "backward", "optimizer")


class PhaseMeter:
    """Times the phases of a step and records each phase's peak memory above the state at construction (the loaded
    weights and optimizer, before its first step): torch.cuda.max_memory_allocated on CUDA, peak RSS otherwise."""

    def __init__(self, device):
        self.device, self.cuda = device, torch.device(device).type == "cuda"
        gc.collect()
        sync(device)
        self.load_peak_rss = peak_rss()      # since the process started: includes loading the weights
        self.base_cuda = torch.cuda.memory_allocated() if self.cuda else 0
        self.base_rss = reset_peak_rss()
        self.times = {p: [] for p in STEP_PHASES}
        self.peak_above = dict.fromkeys(STEP_PHASES, 0)
        self.peak_abs = 0

    def __call__(self, phase, fn):
        sync(self.device)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()
        dt, out = timed(fn, self.device)
        peak = torch.cuda.max_memory_allocated() if self.cuda else peak_rss()
        above = peak - (self.base_cuda if self.cuda else self.base_rss)
        self.times[phase].append(dt)
        self.peak_above[phase] = max(self.peak_above[phase], above)
        self.peak_abs = max(self.peak_abs, peak)
        return out

    def summary(self):
        totals = [sum(ts) for ts in zip(*self.times.values())]
        metric = "cuda_max_memory_allocated" if self.cuda else "rss"
        return {"memory_metric": metric, "times_s": {**self.times, "total": totals},
                "time_s": {**{p: statistics.median(t) for p, t in self.times.items()}, "total": statistics.median(totals)},
                "weights_bytes": self.base_cuda if self.cuda else self.base_rss, "load_peak_rss_bytes": self.load_peak_rss,
                "peak_bytes": self.peak_abs, "peak_above_weights_bytes": max(self.peak_above.values()),
                "phase_peak_above_weights_bytes": self.peak_above}


def ours_step(policy, reference, optimizer, tokenizer, prompts, answers, cfg, seeds, meter):
    """What train.py runs per step for --method latro on one process in float32 (there the sampler is the policy)."""
    import latro
    ro = meter("sample", lambda: latro.sample(policy, tokenizer, prompts, answers, cfg, seeds=seeds))
    terms = meter("score", lambda: latro.compute_advantages(policy, reference, ro, cfg))
    m = meter("backward", lambda: latro.backward_on_rollout(policy, ro, terms.advantages, cfg))
    meter("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
    # forward positions: each micro-batch is one packed sequence (latro.pack), and the model reads tokens[:, :-1]
    positions = sum(mb.tokens.shape[1] - 1 for mb in latro.micro_batches(ro, cfg.micro_batch_size, cfg.num_samples))
    z = [ro.tokens[i, p:r].tolist() for i, (p, r) in enumerate(zip(ro.prompt_end.tolist(), ro.rationale_end.tolist()))]
    return {"rows": len(z), "generated_tokens": ro.sampled_tokens, "rationale_tokens": sum(map(len, z)),
            "answer_tokens": int((ro.answer_end - ro.rationale_end).sum()), "stop_rate": ro.stopped.float().mean().item(),
            "positions_score": 2 * positions, "positions_backward": positions, "loss": m["loss"],
            "rationales": z, "logp": terms.logp.tolist(), "logp_ref": terms.logp_ref.tolist(),
            "reward": terms.reward.tolist(), "advantages": terms.advantages.tolist()}


def official_logprob(model, ids, attention, start):
    """The official get_logprob_reward on left-padded rows: logits at every position (B, W, V), their log_softmax,
    the gathered next-token log-probs, summed over the tokens at positions >= start. Position ids count real tokens
    only, as its forward() makes them."""
    logits = model(input_ids=ids, attention_mask=attention, position_ids=attention.cumsum(1) - attention).logits
    logprobs = torch.log_softmax(logits, dim=-1)
    del logits
    lp = torch.gather(logprobs[:, :-1], 2, ids[:, 1:, None])[..., 0]                  # lp[:, j] = log p(ids[:, j+1])
    del logprobs
    j = torch.arange(lp.shape[1], device=ids.device)
    return (lp * (j >= start[:, None] - 1)).sum(1)


def left_padded(rows, width, pad_id, device):
    """(ids, attention mask) of token lists right-aligned in `width` columns, as the official pad_mask_rearrange
    lays them out."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            attention[i, width - len(r):] = 1
    return ids.to(device), attention.to(device)


def official_step(policy, reference, optimizer, tokenizer, prompts, answers, cfg, seed, meter):
    """One step of the official LatroTrainer (SalesforceAIResearch/LaTRO), rewritten on the same prompts, answer
    tokens, K, L and micro-batch size: transformers generate to L new tokens for every row, the rationale cut, then
    every log-prob through full logits + log_softmax + gather on rows padded to the full length: [x | L] for
    log pi(z|x) and log pi_ref(z|x), [x | L | y] for R = log pi(y|x,z). Each no-grad micro-batch runs three
    forwards (policy, reference, reward) and each training micro-batch two (rationale, reward), both graphs kept
    until one backward, loss = mean(-A * log pi(z|x)) + alpha * mean(-R) over accumulation steps. R includes the
    last rationale token (the official context length is one short); the non-stop penalty, KL and RLOO are as there.
    Departures from the official code:
      * generation: all rows in one generate call (official: rollout batches, default 16 rows), without
        output_scores (official also returns and stacks the (rows, L, V) scores, then discards them), and
        eos_token_id=None so every row decodes L tokens (official stops once every row of a rollout batch has
        emitted EOS; EOS still ends the rationale at the cut here, as there);
      * the cut: latro.cut_rationale (stop strings on decoded text, as ours) instead of token-id stop patterns,
        and explicit attention masks instead of finding padding by pad_token_id;
      * scoring in micro-batches of the training micro-batch size (official: whole rollout batches), without
        output_hidden_states and without the gc.collect() / torch.cuda.empty_cache() calls;
      * training micro-batches in order (official: a random permutation; every row has the same width);
      * sft_penalty = cfg.answer_weight (1, as ours and the paper) instead of its default 0: the same work, since
        the official step runs the reward forward and backward either way."""
    import latro
    K, L, mb, device = cfg.num_samples, cfg.max_rationale_tokens, cfg.micro_batch_size, policy.device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    eos = set(tokenizer.eos_ids)
    answer_ids = [tokenizer.encode(a, add_special_tokens=False) + [tokenizer.eot_id] for a in answers]
    x = [p for p in prompts for _ in range(K)]                                  # queries.repeat_interleave(K)
    y = [a for a in answer_ids for _ in range(K)]
    n, Tq, Ty = len(x), max(map(len, prompts)), max(map(len, answer_ids))
    W1, W2 = Tq + L, Tq + L + Ty         # [query | response] and [query | response | final answer], full length

    def sample():
        q, qa = left_padded(x, Tq, pad, device)
        torch.manual_seed(seed)
        # Exactly L new tokens per row: eos_token_id=None turns off stopping (EOS stays sampleable; the cut below
        # ends the rationale there); the official loop generates until every row of a rollout batch has ended.
        out = policy.generate(input_ids=q, attention_mask=qa, do_sample=True, temperature=cfg.temperature, top_k=0,
                              top_p=1.0, max_new_tokens=L, eos_token_id=None, pad_token_id=pad)
        responses = out[:, Tq:].tolist()
        assert all(len(r) == L for r in responses)
        cut = [latro.cut_rationale(r, tokenizer, cfg.stop_strings, eos) for r in responses]
        z = [c[0] for c in cut]
        zr = left_padded([xi + zi for xi, zi in zip(x, z)], W1, pad, device)
        rr = left_padded([xi + zi + yi for xi, zi, yi in zip(x, z, y)], W2, pad, device)
        z_start = torch.tensor([W1 - len(zi) for zi in z], device=device)
        # the official reward context ends one token before the answer: R includes the last rationale token too
        y_start = torch.tensor([W2 - len(yi) - 1 for yi in y], device=device)
        return z, torch.tensor([c[1] for c in cut], device=device), zr, rr, z_start, y_start

    z, stopped, (zi, za), (ri, ra), z_start, y_start = meter("sample", sample)

    @torch.no_grad()
    def score():
        logp, logp_ref, reward = (torch.zeros(n, device=device) for _ in range(3))
        for i in range(0, n, mb):
            s = slice(i, i + mb)
            logp[s] = official_logprob(policy, zi[s], za[s], z_start[s])
            logp_ref[s] = official_logprob(reference, zi[s], za[s], z_start[s])
            reward[s] = official_logprob(policy, ri[s], ra[s], y_start[s])
        penalised = torch.where(stopped, reward, cfg.penalty_factor * reward.mean()) if cfg.nonstop_penalty else reward
        r = (penalised - cfg.beta * (logp - logp_ref)).view(-1, K)
        advantages = (r - (r.sum(1, keepdim=True) - r) / (K - 1)).flatten()   # RLOO: r_k - mean of the others
        return logp, logp_ref, reward, advantages

    logp, logp_ref, reward, advantages = meter("score", score)

    def backward():
        total, steps = torch.zeros((), device=device), -(-n // mb)
        for i in range(0, n, mb):
            s = slice(i, i + mb)
            rloo_loss = (-advantages[s] * official_logprob(policy, zi[s], za[s], z_start[s])).mean()
            sft_loss = -official_logprob(policy, ri[s], ra[s], y_start[s]).mean()
            loss = (rloo_loss + cfg.answer_weight * sft_loss) / steps            # accelerate's accumulation scaling
            loss.backward()
            total += loss.detach()
        return total.item()

    loss = meter("backward", backward)
    meter("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
    return {"rows": n, "generated_tokens": n * L, "rationale_tokens": sum(map(len, z)),
            "answer_tokens": sum(map(len, y)), "stop_rate": stopped.float().mean().item(),
            "positions_score": n * (2 * W1 + W2), "positions_backward": n * (W1 + W2), "loss": loss,
            "rationales": z, "logp": logp.tolist(), "logp_ref": logp_ref.tolist(), "reward": reward.tolist(),
            "advantages": advantages.tolist()}


def step_worker(cfg):
    """Runs in a fresh process: loads policy and reference (ours: model.load; official: transformers), then runs
    `runs` steps on the same questions (each with its step's seeds). Prints one JSON line."""
    import latro
    import train
    torch.set_num_threads(cfg["threads"])
    device, dtype = cfg["device"], DTYPES[cfg["dtype"]]
    examples = data.load_dataset(cfg["data"], limit=cfg["questions"])
    tokenizer = M.Tokenizer(M.resolve(cfg["model"]))
    prompts, answers = [data.chat_prompt(tokenizer, e) for e in examples], [e.answer_text for e in examples]
    lcfg = latro.LatroConfig(num_samples=cfg["samples"], max_rationale_tokens=cfg["tokens"],
                             micro_batch_size=cfg["micro_batch"], compiled=cfg.get("compile", False))
    if cfg["variant"] == "ours":
        policy, _ = M.load(cfg["model"], device=device, dtype=dtype)
        reference, _ = M.load(cfg["model"], device=device, dtype=dtype)
    else:
        policy, reference = load_hf(cfg["model"], device, dtype), load_hf(cfg["model"], device, dtype)
    reference.requires_grad_(False)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=train.PAPER["lr"], betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0, fused=True)
    if cfg.get("compile") and cfg["variant"] == "ours":
        # compile outside the meter, as a training run does once: the same rows and cache length as the step's
        # sampling (a warm-up run, like the sample section's)
        M.generate(policy, prompts, cfg["tokens"], temperature=1.0, num_samples=cfg["samples"], compiled=True, stop=[])
    meter = PhaseMeter(device)
    steps = []
    for step in range(cfg["runs"]):
        seeds = [train.question_seed(cfg["seed"], step, i) for i in range(len(examples))]
        if cfg["variant"] == "ours":
            steps.append(ours_step(policy, reference, optimizer, tokenizer, prompts, answers, lcfg, seeds, meter))
        else:
            steps.append(official_step(policy, reference, optimizer, tokenizer, prompts, answers, lcfg, seeds[0],
                                       meter))
    out = {"variant": cfg["variant"], "dtype": cfg["dtype"], **meter.summary(), **steps[0],
           "losses": [s["loss"] for s in steps]}
    print("STEP_RESULT " + json.dumps(out), flush=True)


def bench_step(args, dtype_name):
    cfg = {"model": args.model, "device": args.device, "dtype": dtype_name, "threads": args.threads,
           "data": args.step_data, "questions": args.step_questions, "samples": args.step_samples,
           "tokens": args.step_tokens, "micro_batch": args.step_micro_batch, "runs": args.step_runs, "seed": args.seed,
           "compile": args.compile}  # --compile: ours samples with the compiled decoding step (train.py --compile)
    ours = run_worker("step", {**cfg, "variant": "ours"})
    official = run_worker("step", {**cfg, "variant": "official"})
    ratio = {f"time_{p}": ours["time_s"][p] / max(official["time_s"][p], 1e-12) for p in (*STEP_PHASES, "total")}
    ratio["peak_above_weights"] = ours["peak_above_weights_bytes"] / max(official["peak_above_weights_bytes"], 1)
    ratio["peak"] = ours["peak_bytes"] / max(official["peak_bytes"], 1)
    result = {"dtype": dtype_name, "questions": args.step_questions, "samples": args.step_samples,
              "tokens": args.step_tokens, "micro_batch": args.step_micro_batch, "runs": args.step_runs,
              "memory_metric": ours["memory_metric"], "ours": ours, "official": official, "ratio": ratio}
    mib = 2**20
    for name, r in (("ours", ours), ("official", official)):
        t = r["time_s"]
        print(f"step {dtype_name} {name}: " + ", ".join(f"{p} {t[p]:.2f}s" for p in (*STEP_PHASES, "total")) +
              f"; peak {r['peak_bytes'] / mib:.0f} MiB ({r['memory_metric']}), {r['peak_above_weights_bytes'] / mib:.0f}"
              f" MiB above the loaded weights; {r['rows']} rows, {r['generated_tokens']} tokens generated, "
              f"{r['rationale_tokens']} rationale + {r['answer_tokens']} answer tokens scored, forward positions "
              f"{r['positions_score']} no-grad + {r['positions_backward']} with grad, stop rate {r['stop_rate']:.2f}",
              flush=True)
    print(f"step {dtype_name}: ours/official total time {ratio['time_total']:.3f}, peak above weights "
          f"{ratio['peak_above_weights']:.3f} (median of {args.step_runs} step(s), no warm-up)", flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Table and CLI

# ----------------------------------------------------------------------------------------------------------------
# gpu: one real bf16 step, a checkpoint and a resume of train.py, measured against its memory plan

GPU_SHAPES = {  # config.json fields; vocab and end-of-turn ids come from --model's tokenizer
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "smollm2-1.7b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=130000.0),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=2048,
                 rope_theta=10000.0),
}


def random_checkpoint(shape, tokenizer_dir, out_dir, seed=0):
    """A Hugging Face checkpoint (bf16 safetensors + --model's tokenizer files) of a `shape` model with random
    weights (embeddings N(0, 0.02) like a trained LM's scale; linear layers at torch's default init)."""
    tokenizer = M.Tokenizer(M.resolve(tokenizer_dir))
    cfg = dict(GPU_SHAPES[shape], vocab_size=tokenizer.vocab_size, eos_token_id=list(tokenizer.eos_ids))
    torch.manual_seed(seed)
    model = M.Transformer(M.ModelArgs.from_hf_config(cfg), cfg)
    torch.nn.init.normal_(model.embed_tokens.weight, std=0.02)
    return M.save(model.to(torch.bfloat16), tokenizer, out_dir)


def plan_peak_gib(stdout):
    """The plan's peak from train.py's printed plan ("fits: peak 12.34 GiB ..."), or None."""
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith(("fits: peak", "does NOT fit: peak")):
            return float(line.split("peak ")[1].split(" GiB")[0])
    return None


def bench_gpu(args):
    import tempfile
    work = tempfile.mkdtemp(prefix="latro-gpu-")
    ckpt = random_checkpoint(args.gpu_shape, args.model, os.path.join(work, "model"))
    tokenizer = M.Tokenizer(ckpt)
    examples = data.load_dataset(args.data, limit=args.gpu_questions)
    prompt_tokens = max(len(data.chat_prompt(tokenizer, ex)) for ex in examples)
    run_dir = os.path.join(work, "run")
    common = ["--dataset", args.data, "--limit", str(args.gpu_questions), "--device", args.device,
              "--dtype", "bfloat16", "--questions-per-step", str(args.gpu_questions), "--num-samples",
              str(args.samples), "--max-rationale-tokens", str(args.new_tokens), "--micro-batch-size", "4",
              "--lr", "1e-6", "--seed", str(args.seed), "--out", run_dir, "--save-every", "1",
              "--gpu-memory", str(args.gpu_memory), "--plan-prompt-tokens", str(prompt_tokens),
              "--eval-every", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    first = subprocess.run([sys.executable, os.path.join(here, "train.py"), "--model", ckpt, "--steps", "2", *common],
                           capture_output=True, text=True, env=env)
    print(first.stdout, flush=True)
    if first.returncode != 0:
        sys.exit(f"bench.py gpu: train.py failed:\n{first.stderr[-3000:]}")
    # a resume from the step-1 checkpoint must reproduce step 2 (the run above wrote both)
    resumed_dir = os.path.join(work, "resumed")
    os.makedirs(resumed_dir)
    os.replace(os.path.join(run_dir, "checkpoint-000001"), os.path.join(resumed_dir, "checkpoint-000001"))
    second = subprocess.run([sys.executable, os.path.join(here, "train.py"), "--resume",
                             os.path.join(resumed_dir, "checkpoint-000001"), "--steps", "2",
                             *[c if c != run_dir else resumed_dir for c in common]],
                            capture_output=True, text=True, env=env)
    if second.returncode != 0:
        sys.exit(f"bench.py gpu: resume failed:\n{second.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    resumed = [json.loads(line) for line in open(os.path.join(resumed_dir, "metrics.jsonl"))]
    return {"shape": args.gpu_shape, "device": args.device, "prompt_tokens": prompt_tokens,
            "measured_peak_gib": max(r["peak_memory_gb"] for r in rows), "plan_peak_gib": plan_peak_gib(first.stdout),
            "step2_loss": rows[-1]["loss"], "resumed_step2_loss": resumed[-1]["loss"], "work_dir": work}


def table(results):
    lines = ["", f"{'section':<22}{'ours':>16}{'baseline':>16}{'ratio':>10}  target"]
    for r in results.get("sample", []):
        target = ">= 2.5x" if r["dtype"] == "bfloat16" else ">= 1.5x"
        lines.append(f"{'sample ' + r['dtype'] + ' tok/s':<22}{r['ours']['tok_s']:>16.1f}"
                     f"{r['transformers']['tok_s']:>16.1f}{r['ratio']:>9.2f}x  {target}")
        if "ours_compiled" in r:
            c = r["ours_compiled"]["tok_s"]
            lines.append(f"{'  compiled':<22}{c:>16.1f}{r['transformers']['tok_s']:>16.1f}"
                         f"{c / r['transformers']['tok_s']:>9.2f}x  {target}")
        lines.append(f"{'  matmul limit':<22}{r['matmul_limit_tok_s']:>16.1f}{'':>16}{'':>10}  "
                     + ", ".join(f"{k} {v:.0%}" for k, v in r["fraction_of_limit"].items()))
    for r in results.get("score", []):
        k = r["memory_metric"]
        lines.append(f"{'score ' + r['dtype'] + ' peak MiB':<22}{r['ours'][k] / 2**20:>16.0f}"
                     f"{r['baseline'][k] / 2**20:>16.0f}{r['memory_ratio']:>10.3f}  <= 0.25")
        lines.append(f"{'score ' + r['dtype'] + ' time s':<22}{r['ours']['time_s']:>16.2f}"
                     f"{r['baseline']['time_s']:>16.2f}{r['time_ratio']:>10.3f}  <= 1.0")
    for r in results.get("step", []):
        o, b, q = r["ours"], r["official"], r["ratio"]
        tag = "step " + {"float32": "fp32", "bfloat16": "bf16"}.get(r["dtype"], r["dtype"])
        for p in (*STEP_PHASES, "total"):
            lines.append(f"{tag + ' ' + p + ' s':<22}{o['time_s'][p]:>16.2f}{b['time_s'][p]:>16.2f}"
                         f"{q['time_' + p]:>10.3f}  vs official")
        unit = "GPU" if r["memory_metric"].startswith("cuda") else "RSS"
        lines.append(f"{tag + ' peak ' + unit + ' MiB':<22}{o['peak_bytes'] / 2**20:>16.0f}"
                     f"{b['peak_bytes'] / 2**20:>16.0f}{q['peak']:>10.3f}  vs official")
        lines.append(f"{tag + ' over wts MiB':<22}{o['peak_above_weights_bytes'] / 2**20:>16.0f}"
                     f"{b['peak_above_weights_bytes'] / 2**20:>16.0f}{q['peak_above_weights']:>10.3f}  "
                     f"peak above the loaded weights")
        for key, label in (("generated_tokens", "generated"), ("positions_score", "no-grad pos"),
                           ("positions_backward", "grad pos")):
            lines.append(f"{tag + ' ' + label:<22}{o[key]:>16}{b[key]:>16}{o[key] / max(b[key], 1):>10.3f}  "
                         f"{o['rows']} rows each")
    if "greedy" in results:
        g = results["greedy"]
        lines.append(f"{'greedy identical':<22}{g['identical']:>14}/{g['n']}{'':>16}{'':>10}  vs transformers")
        lines.append(f"{'greedy batched':<22}{g['batched_identical']:>14}/{g['n']}{'':>16}{'':>10}  vs unbatched")
    if "gpu" in results:
        g = results["gpu"]
        plan = "n/a" if g["plan_peak_gib"] is None else f"{g['plan_peak_gib']:.2f}"
        lines.append(f"{'gpu peak GiB':<22}{g['measured_peak_gib']:>16.2f}{plan:>16}{'':>10}  measured vs plan "
                     f"({g['shape']}, {g['device']})")
        lines.append(f"{'gpu resume step-2 loss':<22}{g['resumed_step2_loss']:>16.4f}{g['step2_loss']:>16.4f}"
                     f"{'':>10}  resumed vs straight")
    if "reward" in results:
        lines.append(f"{'held-out reward':<22}{results['reward']['mean_reward']:>16.3f}  nats, mean log pi(y|x,z)")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local HF model directory (or an alias / hub id that model.load accepts)")
    p.add_argument("--data", default=GSM8K, help="GSM8K jsonl for the prompts (default: ../shared/data/gsm8k/test.jsonl)")
    p.add_argument("--sections", default="sample,score,greedy")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float32,bfloat16", help="dtypes for the sample and score sections")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, the same for both sides")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--compile", action="store_true", help="sample section: also time generate(compiled=True)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--sample-runs", type=int, default=3, help="timed runs after one warm-up (median reported)")
    p.add_argument("--score-batch", type=int, default=16)
    p.add_argument("--score-len", type=int, default=512)
    p.add_argument("--score-start", type=int, default=200, help="first scored position (ends = --score-len)")
    p.add_argument("--score-runs", type=int, default=3, help="forward+backward runs per variant (median time)")
    p.add_argument("--score-checkpoint", action="store_true", help="activation checkpointing, as train.py can do")
    p.add_argument("--greedy-questions", type=int, default=5)
    p.add_argument("--greedy-tokens", type=int, default=200)
    p.add_argument("--reward-data", default=GSM8K.replace("test.jsonl", "train.jsonl"))
    p.add_argument("--reward-questions", type=int, default=32, help="the last N questions of --reward-data")
    p.add_argument("--reward-samples", type=int, default=8, help="K rationales per question")
    p.add_argument("--reward-tokens", type=int, default=128, help="rationale length limit L")
    p.add_argument("--step-data", default=GSM8K.replace("test.jsonl", "train.jsonl"),
                   help="questions for the step section: the first --step-questions of this jsonl")
    p.add_argument("--step-questions", type=int, default=4)
    p.add_argument("-K", "--step-samples", type=int, default=8, help="step section: rationales per question")
    p.add_argument("-L", "--step-tokens", type=int, default=128, help="step section: rationale length limit")
    p.add_argument("--step-micro-batch", type=int, default=4, help="step section: rows per scoring/backward pass")
    p.add_argument("--step-runs", type=int, default=1, help="step section: steps per pipeline (median reported)")
    p.add_argument("--step-dtypes", default="float32",
                   help="step section: float32 and/or bfloat16 (bf16 weights for policy and reference, no autocast)")
    p.add_argument("--gpu-shape", choices=tuple(GPU_SHAPES), default="llama-3.2-1b")
    p.add_argument("--gpu-questions", type=int, default=2, help="questions per step in the gpu section")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB the gpu section's plan is checked against")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write all results as JSON here")
    p.add_argument("--score-worker", help=argparse.SUPPRESS)  # internal: one score variant in a fresh process
    p.add_argument("--step-worker", help=argparse.SUPPRESS)   # internal: one step pipeline in a fresh process
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.score_worker:
        return score_worker(json.loads(args.score_worker))
    if args.step_worker:
        return step_worker(json.loads(args.step_worker))
    if not args.model:
        sys.exit("bench.py: --model is required")
    torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    print(f"device {args.device}, threads {args.threads}, torch {torch.__version__}, model {args.model}", flush=True)
    results = {"config": {k: v for k, v in vars(args).items() if not k.endswith("_worker")}}
    for section in sections:
        if section == "sample":
            results["sample"] = [bench_sample(args, d) for d in dtypes]
        elif section == "score":
            results["score"] = [bench_score(args, d) for d in dtypes]
        elif section == "greedy":
            results["greedy"] = bench_greedy(args)
        elif section == "reward":
            results["reward"] = bench_reward(args)
        elif section == "gpu":
            results["gpu"] = bench_gpu(args)
        elif section == "step":
            results["step"] = [bench_step(args, d.strip()) for d in args.step_dtypes.split(",") if d.strip()]
        else:
            sys.exit(f"bench.py: unknown section {section!r} (sample, score, greedy, reward, gpu, step)")
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
