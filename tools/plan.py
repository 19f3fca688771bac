"""A memory plan: one training step and one sampling phase of a run, simulated on the CPU without weights or GPUs.

    python train.py --model llama-3.1-8b --plan --nproc 8 --gpu-memory 80

The model is built from its config.json under FakeTensorMode (shapes and dtypes, no data), and train.py's own code
runs on it as rank 0 of N on PyTorch's fake process group: parallel.build_models, the scoring forward and backward
of a micro-batch (latro.backward_micro_batch), AdamW, refresh_sampler, sampling (prefill and a decode step with the
KV cache at full length) and the no-grad scoring. FSDPMemTracker (sharded) or MemTracker records every allocation by
category; the frozen reference and the sampling copy, which no tracker owns, are counted from their tensors.

What it assumes:
  - worst-case lengths: every rationale runs to L tokens and is scored densely (fake tensors hold no values, so the
    data-dependent paths take their sync-free variants);
  - a GPU allocates the same tensors as the CPU simulation (the code is device-agnostic; bf16 autocast is CPU
    autocast here); the CUDA context, NCCL buffers and fragmentation are not seen, hence FIT_FRACTION;
  - a replica is simulated as its single-process model (DDP's reducer cannot run on fake tensors; its gradients are
    views of its buckets); AdamW's transients are not charged, except a sharded policy's foreach temporary.
"""
import os
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import parallel  # noqa: E402

GiB = 2 ** 30
FIT_FRACTION = 0.875  # 70 GiB of an 80 GiB card: room for the CUDA context, NCCL buffers and fragmentation
PROMPT_TOKENS = 250   # a long GSM8K chat prompt; with L = 500 and the answer, T = 760 tokens per scored row
ANSWER_TOKENS = 10

# The paper's models (and the CPU-sized default) as config.json dicts, so the plan works offline and for gated
# models. Only shapes matter to memory: Phi-3.5's longrope factors are placeholders of the right length.
CONFIGS = {
    "llama-3.1-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=131072,
        rope_theta=500000.0, tie_word_embeddings=False, eos_token_id=[128001, 128008, 128009],
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)),
    "mistral-7b": dict(
        model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=32768,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False, eos_token_id=2),
    "phi-3.5-mini": dict(
        model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, max_position_embeddings=131072,
        original_max_position_embeddings=4096, rope_theta=10000.0, sliding_window=262144,
        tie_word_embeddings=False, eos_token_id=[32000, 32001, 32007],
        rope_scaling=dict(type="longrope", short_factor=[1.0] * 48, long_factor=[1.0] * 48)),
    "smollm2-135m": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True, eos_token_id=2),
}
SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads")


def same_architecture(a, b):
    """Two config.json dicts describe the same network shape (how a local copy or a hub id is recognised)."""
    return all(a.get(k) == b.get(k) for k in SHAPE_KEYS)


def model_config(name_or_path):
    """-> (config.json dict, the alias it matches or None). Aliases, their hub ids and local directories are read
    without the network; any other hub id fetches config.json only."""
    import json
    import os
    from model import ALIASES
    if name_or_path in CONFIGS:
        return dict(CONFIGS[name_or_path]), name_or_path
    by_repo = {repo: alias for alias, repo in ALIASES.items() if alias in CONFIGS}
    if name_or_path in by_repo:
        return dict(CONFIGS[by_repo[name_or_path]]), by_repo[name_or_path]
    path = os.path.join(name_or_path, "config.json")
    if not os.path.isfile(path):
        if os.path.isdir(name_or_path) or name_or_path.count("/") != 1:
            raise FileNotFoundError(f"{path}: missing (--plan needs a config.json, an alias "
                                    f"({', '.join(CONFIGS)}) or a hub id)")
        from huggingface_hub import hf_hub_download
        try:
            path = hf_hub_download(name_or_path, "config.json", token=os.environ.get("HF_TOKEN"))
        except Exception as e:  # no network, unknown or gated repo: one line, not a traceback
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise ValueError(f"model {name_or_path!r}: could not fetch its config.json for the plan ({reason})") \
                from None
    with open(path) as f:
        hf_config = json.load(f)
    return hf_config, next((a for a, c in CONFIGS.items() if same_architecture(hf_config, c)), None)


# --------------------------------------------------------------------------------------------------------------
# Counting

def tensor_bytes(*objs):
    """Bytes held by the tensors of modules / tensors / optimizers (each storage once; a DTensor's local shard)."""
    seen, total = set(), 0
    for t in _tensors(objs):
        t = t.to_local() if hasattr(t, "to_local") else t
        st = t.untyped_storage()
        key = (id(st), st.data_ptr() if not _is_fake(t) else id(st))
        if key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def _tensors(objs):
    for o in objs:
        if isinstance(o, torch.nn.Module):
            yield from o.parameters()
            yield from (b for b in o.buffers() if b is not None)
        elif isinstance(o, torch.optim.Optimizer):
            for state in o.state.values():
                yield from (t for t in state.values() if torch.is_tensor(t))
        elif torch.is_tensor(o):
            yield o


def _is_fake(t):
    from torch._subclasses.fake_tensor import is_fake
    return is_fake(t)


def kv_cache_bytes(caches):
    return sum(t.numel() * t.element_size() for t in caches.k + caches.v)


# Tracker categories (FSDPMemTracker's, then MemTracker's) -> the plan's rows
ROWS = ("params", "params gathered", "grads", "optimizer state", "reference", "sampler copy", "activations",
        "KV cache", "temporaries")
_CATEGORY = {"Sharded Param": "params", "Parameter": "params", "Unsharded Param": "params gathered",
             "All Gather": "params gathered", "Sharded Grad": "grads", "Unsharded Grad": "grads",
             "Reduce Scatter": "grads", "Gradient": "grads", "OptState": "optimizer state",
             "Optstate": "optimizer state", "Activation": "activations", "Temp": "temporaries",
             "Buffer": "temporaries", "Inputs": "temporaries", "Other": "temporaries"}


def peak_rows(tracker):
    """The tracker's peak snapshot, summed over devices, in the plan's rows (bytes)."""
    rows = dict.fromkeys(ROWS, 0)
    for snap in tracker.get_tracker_snapshot("peak").values():
        for name, nbytes in snap.items():
            if name in _CATEGORY:
                rows[_CATEGORY[name]] += nbytes
    return rows


# --------------------------------------------------------------------------------------------------------------
# The simulation

def simulate(hf_config, world, sharded, compute_dtype, num_samples, questions_per_step, max_rationale_tokens,
             micro_batch_size, checkpointing, temperature=1.0, prompt_tokens=PROMPT_TOKENS,
             answer_tokens=ANSWER_TOKENS, fake=True, sample_questions=0, lora=None):
    """Peak bytes per rank by category for the training, sampling and scoring phases of one step.

    hf_config: a config.json dict. fake=True: fake tensors on the fake process group (world ranks, this is rank 0).
    fake=False: real tensors on the current process group (a real run of the same steps, e.g. 2 gloo ranks, to
    check the simulation against). -> {"train": rows, "sample": rows, "score": rows (each {row: bytes}),
    "step": the optimizer step's peak in bytes, "seconds": wall time}"""
    import latro
    from model import ModelArgs
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch._subclasses.fake_tensor import FakeTensorMode

    t0 = time.time()
    owns_pg = fake and sharded and world > 1  # a replicated run is simulated as its single-process model
    if owns_pg:
        from torch.testing._internal.distributed.fake_pg import FakeStore
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        # the mesh is built outside fake mode: its setup reads real values
        mesh = parallel.device_mesh("cpu", world) if sharded else None
        args = ModelArgs.from_hf_config(hf_config)
        mode = FakeTensorMode() if fake else nullcontext()
        with mode:
            torch.manual_seed(0)
            # train.py's own model building; DDP cannot run on fake tensors, so a replica is its one-process model
            policy, sampler, reference = parallel.build_models(
                None, None, torch.device("cpu"), world if sharded else 1, compute_dtype, sharded, checkpointing,
                build=lambda _, dtype, wrap: (wrap or (lambda m: m))(_build(args, hf_config, dtype)), mesh=mesh,
                lora=lora)
            optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6, foreach=False)
            cfg = latro.LatroConfig(num_samples=num_samples, max_rationale_tokens=max_rationale_tokens,
                                    micro_batch_size=micro_batch_size, temperature=temperature)
            autocast = parallel.autocast(torch.device("cpu"), compute_dtype, sharded)
            with autocast:
                train_rows = _train_phase(policy, optimizer, sharded, cfg, prompt_tokens, answer_tokens,
                                          FSDPMemTracker if sharded else MemTracker)
            frozen = {"reference": tensor_bytes(reference),
                      "sampler copy": tensor_bytes(sampler) if sampler is not policy else 0}
            train_rows.update(frozen)
            # AdamW's step: params, the trained ones' gradients, the moments, the frozen models, and for a sharded
            # policy the foreach implementation's one transient, sqrt of the second moments (the size of the
            # trained params again); a replica's AdamW is fused (train.py), with no transient
            trained = tensor_bytes(*[q for q in policy.parameters() if q.requires_grad])
            step_peak = tensor_bytes(policy) + (2 if sharded else 1) * trained + tensor_bytes(optimizer) + \
                train_rows["reference"] + train_rows["sampler copy"]
            questions = min(sample_questions or questions_per_step // world, questions_per_step // world)
            sample_rows, score_rows = _sample_phases(policy, optimizer, sampler, reference, questions, cfg,
                                                     prompt_tokens, answer_tokens, MemTracker)
            sample_rows.update(frozen)
            score_rows.update(frozen)
    finally:
        if owns_pg:
            dist.destroy_process_group()
    return {"train": train_rows, "sample": sample_rows, "score": score_rows, "step": step_peak,
            "seconds": time.time() - t0}


def replica_lower_bound(hf_config, compute_dtype):
    """Bytes a replicated run holds before any activation: fp32 weights, gradients and AdamW's two moments (16 B per
    parameter), plus the reference and the sampling copy in the compute dtype. A replica over the limit on this
    alone needs no simulation."""
    from model import ModelArgs
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        n = sum(p.numel() for p in _build(ModelArgs.from_hf_config(hf_config), hf_config, torch.float32).parameters())
    low = compute_dtype.itemsize
    return 16 * n + (2 * low * n if compute_dtype != torch.float32 else low * n)


def _build(args, hf_config, dtype):
    """A Transformer created in `dtype` (fake tensors cannot be converted in place by .to())."""
    from model import Transformer
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return Transformer(args, hf_config)
    finally:
        torch.set_default_dtype(default)


def _scoring_batch(cfg, prompt_tokens, answer_tokens):
    """The first micro-batch of full-length rollout rows [x | z | y], packed as latro.micro_batches packs it."""
    import latro
    x, z, y = [1] * prompt_tokens, [1] * cfg.max_rationale_tokens, [1] * answer_tokens
    return latro.pack([(i, i // cfg.num_samples, x, z, y) for i in range(cfg.micro_batch_size)], None)


class _NoHook:
    def remove(self):
        pass


_NO_HOOK = _NoHook()


def _train_phase(policy, optimizer, sharded, cfg, prompt_tokens, answer_tokens, tracker_cls):
    """Two micro-batches (the peak: the second one's activations on top of the first one's gradients, whatever
    the sync rule), then AdamW's step, which creates the optimizer state."""
    import latro
    import parallel
    tracker = tracker_cls(policy, optimizer) if sharded else tracker_cls()
    if not sharded:
        tracker.track_external(policy, optimizer)
        for q in policy.parameters():  # LoRA's frozen base: no gradient to hook (MemTracker hooks every parameter)
            if not q.requires_grad:
                tracker._param_to_grad_hook_handles[q] = (_NO_HOOK, _NO_HOOK)
    policy.train()
    before_forward = parallel.grad_sync(policy)
    with tracker:
        for j in range(2):
            before_forward(j == 1)
            mb = _scoring_batch(cfg, prompt_tokens, answer_tokens)
            latro.backward_micro_batch(policy, mb, torch.zeros(len(mb.rows)), cfg, len(mb.rows), dense=True)
            tracker.reset_mod_stats()  # the trackers follow one call per module at a time; the peak is kept
        rows = peak_rows(tracker)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    rows["optimizer state"] = tensor_bytes(optimizer)
    return rows


@torch.no_grad()
def _sample_phases(policy, optimizer, sampler, reference, questions, cfg, prompt_tokens, answer_tokens,
                   tracker_cls):
    """-> (sampling rows, scoring rows). Sampling: refresh_sampler, the prefill of this rank's prompts and one
    decode step at the full cache length. Scoring: one no-grad micro-batch through the sampler (log pi(z|x) and the
    reward) and the reference. Training state that persists (fp32 params, optimizer state) is counted exactly;
    gradients are freed by then (zero_grad(set_to_none=True))."""
    import latro
    import parallel
    from model import decode_step, prefill, sample_next
    # MemTracker hooks the gradient of every parameter a module runs with, which torch refuses for frozen ones:
    # mark them trainable for the simulation (under no_grad this changes nothing else)
    resident = [m for m in (sampler, reference) if isinstance(m, torch.nn.Module)]  # LoRA's pi_ref is no module
    for m in resident:
        m.requires_grad_(True)
    frozen = tensor_bytes(*resident)

    def window():
        tracker = tracker_cls()
        tracker.track_external(*resident)  # resident all along: the peak is where the transients peak
        return tracker

    def rows_of(tracker):
        rows = peak_rows(tracker)
        # the tracker files the parameters a module runs with under params: besides the resident sampler and
        # reference (counted exactly by the caller) these are the reference's gathered blocks
        rows["params gathered"] += max(0, rows["params"] - frozen)
        rows["params"] = tensor_bytes(policy)
        rows["optimizer state"] = tensor_bytes(optimizer)
        return rows

    with window() as tracker:
        if sampler is not policy:
            parallel.refresh_sampler(sampler, policy)
        prompts = [[1] * prompt_tokens for _ in range(questions)]
        caches, logits = prefill(sampler, prompts, cfg.num_samples, cfg.max_rationale_tokens)
        tracker.reset_mod_stats()  # the trackers follow one call per module at a time; the peak is kept
        tokens = sample_next(logits, cfg.temperature)
        pos = torch.full(tokens.shape, prompt_tokens + cfg.max_rationale_tokens - 1)
        logits = decode_step(sampler, tokens, pos, caches, prompt_tokens + cfg.max_rationale_tokens)
        kv = kv_cache_bytes(caches)
        caches.select(torch.arange(3 * tokens.shape[0] // 4))  # generate() drops finished rows a quarter at a time
        sampling = rows_of(tracker)
        # the cache is alive from the prefill on and the tracker files it under activations; it is part of the
        # peak unless that was the sampler refresh (a small model's embedding gathered whole outweighs its cache)
        if sampling["activations"] >= kv:
            sampling["KV cache"] = kv
            sampling["activations"] -= kv
        del caches, logits, tokens
    with window() as tracker:
        mb = _scoring_batch(cfg, prompt_tokens, answer_tokens)
        latro.span_logprobs(sampler, mb, cfg.temperature, dense=True)
        tracker.reset_mod_stats()
        latro.span_logprobs(reference, mb, cfg.temperature, dense=True, answer=False)
        scoring = rows_of(tracker)
    return sampling, scoring


def total(rows):
    return sum(rows.values())


PHASES = (("train", "training"), ("sample", "sampling"), ("score", "scoring"))


def format_plan(result, title, gpu_memory_gib):
    """The plan as a table (GiB per GPU) and a verdict line."""
    lines = [title, f"  {'GiB per GPU (simulated)':<26}" + "".join(f"{name:>10}" for _, name in PHASES)]
    for row in ROWS:
        lines.append(f"  {row:<26}" + "".join(f"{result[k][row] / GiB:>10.2f}" for k, _ in PHASES))
    lines.append(f"  {'peak':<26}" + "".join(f"{total(result[k]) / GiB:>10.2f}" for k, _ in PHASES) +
                 f"   (optimizer step {result['step'] / GiB:.2f}; simulated in {result['seconds']:.1f}s)")
    if gpu_memory_gib:
        limit = FIT_FRACTION * gpu_memory_gib
        peak = peak_bytes(result) / GiB
        verdict = "fits" if peak <= limit else "does NOT fit"
        lines.append(f"  {verdict}: peak {peak:.4g} GiB vs {limit:.1f} GiB usable of {gpu_memory_gib:g} GiB "
                     f"({FIT_FRACTION:.0%}; the rest is for the CUDA context, NCCL and fragmentation)")
    return "\n".join(lines)


def peak_bytes(result):
    return max(max(total(result[k]) for k, _ in PHASES), result["step"])


def fits(result, gpu_memory_gib):
    return peak_bytes(result) <= FIT_FRACTION * gpu_memory_gib * GiB


# --------------------------------------------------------------------------------------------------------------
# What train.py asks of the plan

def plan_run(args, world, compute_dtype, sharded):
    """The memory plan of this run's configuration, simulated on the CPU: fake tensors, fake process
    group, no weights."""
    config, _ = model_config(args.model)  # the HF config.json of the model, as a dict
    return simulate(config, world, sharded, compute_dtype, args.num_samples, args.questions_per_step,
                    args.max_rationale_tokens, args.micro_batch_size,
                    checkpointing=parallel.checkpointing_on(args, sharded), temperature=args.temperature,
                    prompt_tokens=args.plan_prompt_tokens or PROMPT_TOKENS, sample_questions=args.sample_questions,
                    lora=args.lora and (args.lora, args.lora_alpha, args.lora_dropout))


def choose_sharding(args, world, gpu_memory_gib, compute_dtype):
    """--fsdp auto: FSDP2 when a replica would not fit, by the memory plan of the replicated run (only with a memory
    limit to plan against: a GPU, or --gpu-memory). -> (sharded, the plan of the replicated run or None)"""
    if world == 1 or args.fsdp != "auto" or args.lora:  # LoRA runs replicated
        return world > 1 and args.fsdp == "on" and not args.lora, None
    if gpu_memory_gib is None or args.no_plan:
        return False, None
    config, _ = model_config(args.model)
    if replica_lower_bound(config, compute_dtype) > FIT_FRACTION * gpu_memory_gib * GiB:
        return True, None  # weights, gradients and moments alone do not fit: no need to simulate the replica
    replicated = plan_run(args, world, compute_dtype, sharded=False)
    return not fits(replicated, gpu_memory_gib), replicated


def preflight_plan(args, rank, world, compute_dtype, sharded, gpu_memory):
    """The memory plan of a GPU run, printed in full by rank 0 before any model is loaded; simulated in a subprocess
    (`train.py --plan`: its fake process group must not meet this process's real one). -> a short summary for the
    preflight line."""
    if gpu_memory is None:
        return "no memory plan (CPU)"
    if args.no_plan or rank != 0:
        return "memory plan skipped (--no-plan)"
    train_py = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
    cmd = [sys.executable, train_py, "--plan", "--model", args.model, "--nproc", str(world),
           "--gpu-memory", str(gpu_memory), "--fsdp", "on" if sharded else "off",
           "--activation-checkpointing", "on" if parallel.checkpointing_on(args, sharded) else "off",
           "--dtype", str(compute_dtype)[6:], "--num-samples", str(args.num_samples),
           "--questions-per-step", str(args.questions_per_step), "--micro-batch-size", str(args.micro_batch_size),
           "--max-rationale-tokens", str(args.max_rationale_tokens), "--temperature", str(args.temperature)] + \
        (["--plan-prompt-tokens", str(args.plan_prompt_tokens)] if args.plan_prompt_tokens else [])
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return f"memory plan failed ({(p.stderr.strip().splitlines() or ['?'])[-1]})"
    print(p.stdout.rstrip(), flush=True)
    return p.stdout.strip().splitlines()[-1].strip().split(" (")[0]


def print_plan(args, world):
    """--plan: the memory plan of the run these (checked) flags describe, on `world` GPUs of --gpu-memory GiB."""
    compute_dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16  # planned for GPUs: bf16 by default
    gpu_memory = args.gpu_memory or 80.0
    sharded, replicated = choose_sharding(args, world, gpu_memory, compute_dtype)
    result = replicated if replicated is not None and not sharded else plan_run(args, world, compute_dtype, sharded)
    _, alias = model_config(args.model)
    title = (f"memory plan | {args.model}{f' ({alias})' if alias and alias != args.model else ''} | {args.recipe} "
             f"recipe: K={args.num_samples}, L={args.max_rationale_tokens}, {args.questions_per_step} questions/step, "
             f"micro-batch {args.micro_batch_size}" +
             (f", {args.sample_questions} question{'s' * (args.sample_questions > 1)} per sampling call"
              if args.sample_questions else "") +
             (f" | LoRA r={args.lora}" if args.lora else "") + f" | {world} x {gpu_memory:g} GiB | "
             f"{'FSDP2' if sharded else 'DDP' if world > 1 else 'single'} | {str(compute_dtype)[6:]} | "
             f"activation checkpointing {'on' if parallel.checkpointing_on(args, sharded) else 'off'} | "
             f"rank 0 of {world}")
    print(format_plan(result, title, gpu_memory), flush=True)
