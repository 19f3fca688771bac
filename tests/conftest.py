"""Shared test fixtures: tiny random Hugging Face checkpoints built offline, in-process.

Nothing here touches the network: the tokenizers are trained on a built-in corpus with the
`tokenizers` library, and the models are random `transformers` models saved with
`save_pretrained`. These directories look like real hub checkpoints (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json, generation_config.json), so
`model.load` sees the same layout it would see for SmolLM2 or Llama-3.1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Tests must never reach the network. Set this before anything imports huggingface_hub,
# which reads it once at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------

# Small English + digits corpus, so BPE learns real multi-character merges
# ("the", " answer", "step", ...) on top of the 256 byte-level symbols.
_CORPUS_LINES = [
    "Let's think step by step.",
    "The answer is 18.",
    "The answer is 42.",
    "The final answer is 7.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May?",
    "Natalia sold 48/2 = 24 clips in May.",
    "Natalia sold 48+24 = 72 clips altogether in April and May.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "How much did she earn? She earned 12 * 50 / 60 = 10 dollars.",
    "First, we add the numbers. Then we multiply the result by two.",
    "If John has 3 apples and buys 5 more, he has 3 + 5 = 8 apples.",
    "A train travels 60 miles per hour for 3 hours, so it travels 180 miles.",
    "The sum of 15 and 27 is 42. The difference between 50 and 32 is 18.",
    "Question: What is 6 times 7? Answer: 6 * 7 = 42.",
    "Solve the problem and put the final answer after ####.",
    "#### 18",
    "#### 72",
    "We need to find the total number of apples, oranges and bananas.",
    "Therefore, the answer is 100. Let me check: 40 + 60 = 100.",
    "You are a helpful assistant. Please reason step by step.",
    "The user asks a question, and the assistant answers it.",
    "Each box holds 12 eggs, so 9 boxes hold 9 * 12 = 108 eggs.",
    "She has 1,234 dollars and spends 0.5 of it, which is 617 dollars.",
    "Hello world! How are you today? I am fine, thank you.",
    "There are 24 hours in a day and 60 minutes in an hour.",
    "The reasoning is correct, so the answer is 18.",
]
CORPUS = [line for _ in range(3) for line in _CORPUS_LINES]

CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]

# SmolLM2-135M-Instruct's template, verbatim.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-3.1-Instruct's template (tool-call branches included; they are not exercised by the
# tests but the template must still parse).
LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eom_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def _special_entry(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def build_tokenizer(out_dir, style: str = "chatml") -> str:
    """Write a small byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json) into out_dir.

    style="chatml": SmolLM2-135M-Instruct-like. Special tokens <|endoftext|>=0, <|im_start|>=1,
      <|im_end|>=2 come first; bos "<|im_start|>", eos and pad "<|im_end|>", unk "<|endoftext|>";
      digits split individually; no BOS is added on encode; the ChatML template lives inside
      tokenizer_config.json.
    style="spm": SentencePiece-style BPE as in Phi-3.5-mini / Mistral-7B ("\u2581" for spaces, byte-fallback
      tokens, <unk>=0 <s>=1 </s>=2, <s> added on encode), with Phi-3.5's chat tokens (rstrip) and template.
    style="llama3": Llama-3.1-Instruct-like. Special tokens come after the BPE vocabulary;
      the post-processor prepends <|begin_of_text|>; eos "<|eot_id|>", pad "<|end_of_text|>";
      the chat template is a separate chat_template.jinja file.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers, Regex

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = HFTokenizer(models.BPE())
    if style == "chatml":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=420,
            min_frequency=2,
            special_tokens=CHATML_SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(CORPUS, trainer=trainer)
        config = {
            "add_prefix_space": False,
            "added_tokens_decoder": {
                str(tok.token_to_id(t)): _special_entry(t) for t in CHATML_SPECIALS
            },
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": "<|im_start|>",
            "chat_template": CHATML_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "model_max_length": 8192,
            "pad_token": "<|im_end|>",
            "tokenizer_class": "GPT2Tokenizer",
            "unk_token": "<|endoftext|>",
            "vocab_size": tok.get_vocab_size(),
        }
    elif style == "llama3":
        # Llama-3's pre-tokenizer: a regex split (digits in groups of up to 3), then byte-level.
        pattern = (
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+"
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=440,
            min_frequency=2,
            special_tokens=[],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(CORPUS, trainer=trainer)
        tok.add_special_tokens(LLAMA3_SPECIALS)
        bos = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{bos}:0 $A:0",
                    pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                    special_tokens=[(bos, tok.token_to_id(bos))],
                ),
            ]
        )
        config = {
            "added_tokens_decoder": {
                str(tok.token_to_id(t)): _special_entry(t) for t in LLAMA3_SPECIALS
            },
            "bos_token": bos,
            "clean_up_tokenization_spaces": True,
            "eos_token": "<|eot_id|>",
            "model_input_names": ["input_ids", "attention_mask"],
            "model_max_length": 131072,
            "pad_token": "<|end_of_text|>",
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        (out / "chat_template.jinja").write_text(LLAMA3_TEMPLATE)
    elif style == "spm":
        tok, config = _spm_tokenizer()
        (out / "tokenizer.json").write_text(tok.to_str())
        tok = None
    else:
        raise ValueError(f"unknown tokenizer style {style!r}")

    if tok is not None:
        tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if k in config}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    return str(out)


PHI35_SPECIALS = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
                  "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]

# Phi-3.5-mini-instruct's template, verbatim.
PHI35_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def _spm_tokenizer():
    """A SentencePiece-style BPE (Llama-2 / Phi-3.5 / Mistral family): "▁" for spaces, byte fallback
    tokens <0x00>..<0xFF>, <unk>=0 <s>=1 </s>=2, chat specials after the vocabulary."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers

    sp = "\u2581"
    # learn merges word by word, then serve without a pre-tokenizer, like the Llama-2 tokenizer.json
    trainer_tok = HFTokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend(sp), normalizers.Replace(" ", sp)])
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=sp, prepend_scheme="never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=2, special_tokens=[], show_progress=False)
    trainer_tok.train_from_iterator(CORPUS, trainer=trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t in learned["vocab"]:
        vocab.setdefault(t, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in learned["merges"]], unk_token="<unk>",
                                 byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(sp), normalizers.Replace(" ", sp)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(sp, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    # Phi-3.5's chat tokens swallow the whitespace after them (rstrip), except <|endoftext|>
    tok.add_tokens([AddedToken(t, normalized=False, special=True, rstrip=t != "<|endoftext|>") for t in PHI35_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
    )
    config = {
        "add_bos_token": True,  # agrees with the post-processor (transformers 5 and 4 then agree too)
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(tok.token_to_id(t)): {**_special_entry(t), "rstrip": t in PHI35_SPECIALS and t != "<|endoftext|>"}
            for t in ["<unk>", "<s>", "</s>"] + PHI35_SPECIALS
        },
        "bos_token": "<s>",
        "chat_template": PHI35_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    return tok, config


def tokenizer_ids(out_dir) -> dict:
    """Token ids of the special tokens in a tokenizer written by build_tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(Path(out_dir) / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in CHATML_SPECIALS + LLAMA3_SPECIALS + PHI35_SPECIALS + ["<s>", "</s>", "<unk>"]}
    ids = {t: i for t, i in ids.items() if i is not None}
    ids["vocab_size"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
}


def make_tiny_model(out_dir, arch: str = "llama", tokenizer_style: str = "chatml", seed: int = 0, **config_overrides) -> str:
    """Save a tiny random `transformers` checkpoint of `arch` (plus tokenizer files) into out_dir.

    Defaults: hidden 64, 2 layers, 4 heads, 2 kv heads (GQA), intermediate 128, untied
    embeddings, float32. Weights are drawn with std 0.15 and every norm weight and bias is
    perturbed too, so a loader that ignores a norm or a bias gives visibly different logits.
    """
    import transformers

    out = Path(out_dir)
    build_tokenizer(out, tokenizer_style)
    ids = tokenizer_ids(out)
    if tokenizer_style == "chatml":
        bos, eos, pad = ids["<|im_start|>"], ids["<|im_end|>"], ids["<|im_end|>"]
        gen_eos = eos  # SmolLM2's generation_config.json has a single int
        extra_gen = {}
    elif tokenizer_style == "spm":  # Phi-3.5-mini: generation_config lists <|end|>, <|assistant|>, <|endoftext|>
        bos, eos, pad = ids["<s>"], ids["<|endoftext|>"], ids["<|endoftext|>"]
        gen_eos = [ids["<|end|>"], ids["<|assistant|>"], ids["<|endoftext|>"]]
        extra_gen = {}
    else:
        bos, pad = ids["<|begin_of_text|>"], ids["<|end_of_text|>"]
        gen_eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
        eos = gen_eos
        extra_gen = {"do_sample": True, "temperature": 0.6, "top_p": 0.9}

    cfg_name, model_name = ARCHS[arch]
    kwargs = dict(
        vocab_size=ids["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.15,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    if arch == "phi3":
        kwargs["sliding_window"] = None
    kwargs.update(config_overrides)
    config = getattr(transformers, cfg_name)(**kwargs)

    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(out))

    gen = {"bos_token_id": bos, "eos_token_id": gen_eos, "pad_token_id": pad, **extra_gen}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return str(out)


def edit_config(model_dir, **changes) -> dict:
    """Rewrite keys of model_dir/config.json in place (value None deletes the key). Returns the new config."""
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg, indent=2))
    return cfg


# Llama-3.1's real rope scaling block.
LLAMA31_ROPE = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}


# Phi-3.5-style longrope with a tiny original context, so both factor sets are reachable in a test.
PHI3_LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "original_max_position_embeddings": 32,
    # head_dim 16 -> 8 factors each; distinct values so a swapped or misindexed list shows
    "short_factor": [1.0 + 0.1 * i for i in range(8)],
    "long_factor": [2.0 + 0.5 * i for i in range(8)],
}


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    """SmolLM2-like: llama, ChatML tokenizer, tied embeddings, GQA."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), arch="llama", tokenizer_style="chatml", tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory) -> str:
    """Llama-3.1-like: llama3 tokenizer (pad == an eos id), untied, llama3 rope scaling with a
    small original context (64) so that the scaling changes logits at short lengths."""
    return make_tiny_model(
        tmp_path_factory.mktemp("tiny_llama3"),
        arch="llama",
        tokenizer_style="llama3",
        seed=1,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        rope_parameters={**LLAMA31_ROPE, "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    )


@pytest.fixture(scope="session")
def tiny_phi3_dir(tmp_path_factory) -> str:
    """Phi-3.5-mini-like: phi3 (fused qkv / gate_up), longrope (original context 32, max 256), SentencePiece-style
    tokenizer with Phi-3.5's chat template."""
    return make_tiny_model(
        tmp_path_factory.mktemp("tiny_phi3"),
        arch="phi3",
        tokenizer_style="spm",
        seed=3,
        max_position_embeddings=256,
        original_max_position_embeddings=32,
        rope_parameters=dict(PHI3_LONGROPE),
    )


# Errors that mean the process group never came up (e.g. the port torchrun picked was taken before it was bound):
# a property of the machine, not of the code under test.
LAUNCH_ERRORS = ("Address already in use", "Connection reset by peer", "Connection refused", "DistNetworkError",
                 "RendezvousConnectionError", "connectFullMesh")


def run_command(cmd, **kwargs):
    """subprocess.run(cmd, capture_output=True, text=True, **kwargs), retried once if a torchrun launch failed
    while setting up its process group; any other failure is returned as is."""
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0 and "torch.distributed.run" in cmd and \
            any(e in result.stdout + result.stderr for e in LAUNCH_ERRORS):
        result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return result


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes tens of seconds; still run by CI (each under 2 minutes)")
