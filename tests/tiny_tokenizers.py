"""Tiny tokenizers for the tests, trained offline in milliseconds on a built-in corpus with the `tokenizers` library,
laid out as the real models' hub files (tokenizer.json, tokenizer_config.json, chat template): SmolLM2's ChatML
byte-level BPE, Llama-3.1's byte-level BPE and Phi-3.5's SentencePiece-style BPE. The chat templates are the real ones, verbatim, in tests/data/.
"""

import json
from pathlib import Path

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

# The real models' chat templates, verbatim (Llama-3.1's tool-call branches are not exercised, but must parse).
DATA = Path(__file__).parent / "data"
CHATML_TEMPLATE = (DATA / "smollm2-135m-instruct.jinja").read_text()
LLAMA3_TEMPLATE = (DATA / "llama-3.1-instruct.jinja").read_text()
PHI35_TEMPLATE = (DATA / "phi-3.5-mini-instruct.jinja").read_text()


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
