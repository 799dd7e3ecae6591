"""Prompt writer: a GPT-2 fine-tuned with LoRA on remote-sensing captions writes one text-to-image prompt
per land-use class (the satellite-image diffusion project's prompt step; eojax/diffusion/prompt_writer.py).

  eojax train --config=configs/prompt_writer.py:gpt2=DIR --workdir=/tmp/eojax_pw
  eojax eval --config=configs/prompt_writer.py:gpt2=DIR --workdir=/tmp/eojax_pw      # held-out perplexity
  eojax infer prompt_writer --config=configs/prompt_writer.py:gpt2=DIR --workdir=/tmp/eojax_pw \\
      --prompt=airport --prompt="dense residential area" [--seed=0]   # -> /tmp/eojax_pw/infer/prompts.json

DIR is a local Hugging Face GPT-2 folder (config.json, model.safetensors, tokenizer.json or vocab.json +
merges.txt), e.g. distilgpt2 fetched once with `huggingface-cli download distilbert/distilgpt2 --local-dir
DIR --include '*.json' '*.txt' model.safetensors`; eojax never downloads it. The fine-tune is the project's:
LoRA r 16, alpha 32, dropout 0.05 on the attention c_attn kernels, the base frozen (eojax/lora.py).
Corpus (`corpus=` or --config.input.corpus): a .txt with one caption per line, an RSICD / COCO captions
.json or a metadata.jsonl; default the RSICD captions in $EOJAX_TEST_DATA/rsicd_captions (or
../shared/data) captions_val2017.json. Metric: eval/perplexity = exp(mean held-out token NLL).

`:runlocal` trains the tiny random GPT-2 of tests/fixtures/gpt2_tiny (2 x 64, vocabulary 300) with the
300-token BPE of tests/fixtures/prompt_corpus_bpe on the 144 captions of tests/fixtures/prompt_corpus.txt:
80 LoRA steps, ~30 s on a shared 2-core CPU (CLI, with compiling); held-out perplexity falls from ~740 (the random init) to ~107.

Arguments (comma separated): runlocal, gpt2=<folder>, corpus=<file>. Generation: config.generate
(template with {class}, temperature, top_k, max_new_tokens, the default classes).
"""
import os

from eojax import config_lib, optim

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FIXTURES = os.path.join(_REPO, "tests", "fixtures")
# RSICD's 30 scene classes, spelt as prompts read.
RSICD_CLASSES = (
    "airport", "bare land", "baseball field", "beach", "bridge", "center", "church", "commercial area",
    "dense residential area", "desert", "farmland", "forest", "industrial area", "meadow",
    "medium residential area", "mountain", "park", "parking lot", "playground", "pond", "port", "railway station",
    "resort", "river", "school", "sparse residential area", "square", "stadium", "storage tanks", "viaduct")


def _shared_data() -> str:
    return os.environ.get("EOJAX_TEST_DATA") or os.path.join(os.path.dirname(_REPO), "shared", "data")


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, runlocal=False, gpt2="", corpus="")
    config = config_lib.trainer_defaults()
    config.task = "prompt_writer"
    config.total_steps = 2_000
    config.batch_size = 32
    config.log_every = 50
    config.eval_every = 500
    config.eval_steps = 0  # the whole held-out split: perplexity over every held-out token
    config.checkpoint_every = 500
    config.best_metric = "perplexity"
    config.best_mode = "min"
    config.input = dict(
        corpus=arg.corpus or os.path.join(_shared_data(), "rsicd_captions", "captions_val2017.json"),
        max_len=64,           # tokens per caption row (eos + caption + eos); RSICD captions take ~10-30
        eval_fraction=0.1,    # held out by a hash of the image file name (.json) or the line (.txt)
    )
    config.model = dict(
        init_from=arg.gpt2,   # the local Hugging Face GPT-2 folder: sizes, weights and (by default) tokenizer
        tokenizer_dir="",     # '' = init_from's tokenizer files
        dropout=0.1,          # GPT-2's own (resid / embd / attn 0.1), as a Hugging Face model in train mode
        dtype="float32", param_dtype="float32",
    )
    config.lora.update(targets="c_attn", rank=16, alpha=32.0, dropout=0.05)  # the project's PEFT LoraConfig
    config.optim = optim.default_config()
    config.optim.update(name="adamw", lr=2e-4, schedule="linear", warmup_steps=100, weight_decay=0.0,
                        clip_norm=1.0)
    config.generate = dict(
        template="A satellite image of {class}",  # the LM continues this per class
        temperature=0.8,      # 0 = greedy
        top_k=40,             # sample among the k likeliest tokens; 0 = all
        max_new_tokens=32,
        classes=RSICD_CLASSES,  # used when neither --prompt nor --input names classes
    )
    if arg.runlocal:
        config.model.update(init_from=arg.gpt2 or os.path.join(_FIXTURES, "gpt2_tiny"),
                            tokenizer_dir="" if arg.gpt2 else os.path.join(_FIXTURES, "prompt_corpus_bpe"))
        config.input.update(corpus=arg.corpus or os.path.join(_FIXTURES, "prompt_corpus.txt"), eval_fraction=0.15)
        # lr 2e-2: of 5e-3 / 2e-2 / 5e-2, the best held-out perplexity after 80 steps (138 / 107 / 173).
        config_lib.make_runlocal(config, total_steps=80, checkpoint_every=80, eval_every=40, lr=2e-2,
                                 warmup_steps=5)
        config.eval_steps = 0
        config.generate.update(classes=("airport", "farmland", "forest", "river"), max_new_tokens=16)
    return config
