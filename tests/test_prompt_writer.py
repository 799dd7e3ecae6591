"""The diffusion project's prompt writer (eojax/diffusion/prompt_writer.py, configs/prompt_writer.py): a few
LoRA steps of the tiny GPT-2 fixture on the tiny caption corpus (tests/fixtures/prompt_corpus.txt, with the
300-token BPE of tests/fixtures/prompt_corpus_bpe): only the adapters move, the held-out perplexity is
exp(mean token NLL) recomputed in numpy from the model's logits, the infer plug-in writes one prompt per
class, and a missing corpus or GPT-2 folder is a one-line error."""
import json
import os
import random

import jax
import numpy as np
import pytest

from eojax import checkpoint as ckpt_lib
from eojax import errors, lora, tasks, train
from eojax.diffusion import prompt_writer as pw
from eojax.weights import gpt2 as gpt2_weights
from helpers import cli, load_config

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
GPT2_TINY = os.path.join(FIXTURES, "gpt2_tiny")
CORPUS = os.path.join(FIXTURES, "prompt_corpus.txt")
STEPS = 4


def _config(**overrides):
    small = {"total_steps": STEPS, "checkpoint_every": STEPS, "eval_every": 0, "best_metric": "",
             "optim.warmup_steps": 0}
    return load_config("prompt_writer", "runlocal", **{**small, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("prompt_writer"))
    config = _config()
    result = train.train_and_evaluate(config, workdir)
    run, variables = train.load_for_inference(config, workdir)
    return dict(config=config, workdir=workdir, result=result, run=run, variables=variables)


def test_config_is_the_projects_lora_fine_tune():
    config = load_config("prompt_writer", "gpt2=/some/distilgpt2")
    assert (config.lora.targets, config.lora.rank, config.lora.alpha, config.lora.dropout) == ("c_attn", 16, 32.0, 0.05)
    assert config.model.init_from == "/some/distilgpt2" and config.task == "prompt_writer"
    assert config.input.corpus.endswith(os.path.join("rsicd_captions", "captions_val2017.json"))
    local = load_config("prompt_writer", "runlocal")
    assert local.model.init_from == GPT2_TINY and local.input.corpus == CORPUS


def test_only_the_adapters_train(trained):
    state = trained["result"]["state"]
    assert int(state.step) == STEPS and np.isfinite(trained["result"]["train"]["loss"])
    base = ckpt_lib.host_numpy(state.params)["gpt2"]
    jax.tree.map(np.testing.assert_array_equal, base, gpt2_weights.load_params(GPT2_TINY))  # frozen, bit for bit
    kernels = lora.by_kernel(ckpt_lib.host_numpy(state.lora["adapters"]))
    assert sorted(kernels) == [f"gpt2/h_{i}/attn/c_attn/kernel" for i in range(2)]
    assert all(np.abs(k["b"]).max() > 0 for k in kernels.values())  # B starts at 0: every adapter moved
    assert float(state.lora["scale"]) == 2.0  # alpha 32 / r 16
    merged = trained["variables"][0]["gpt2"]["h_0"]["attn"]["c_attn"]["kernel"]
    assert not np.allclose(np.asarray(merged), base["h_0"]["attn"]["c_attn"]["kernel"])  # eval sees base + A B


def test_perplexity_is_exp_of_the_mean_heldout_token_nll(trained):
    """The trainer's eval against numpy: log-softmax of the model's float32 logits in float64, the NLL of
    each real next token (the closing eos included, padding and padded rows excluded), exp of the mean."""
    run, (params, _) = trained["run"], trained["variables"]
    spec = run.task.spec.info
    assert spec["heldout_rows"] > 0 and spec["train_rows"] + spec["heldout_rows"] == 144
    nll_sum, count = 0.0, 0
    for batch in run.input.eval(0, 1):
        logits = np.asarray(run.task.logits(params, batch["tokens"]), np.float64)
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        for i in range(len(batch["tokens"])):
            if batch["weight"][i] == 0:
                continue
            n = int(batch["lengths"][i]) - 1  # predicted tokens 1 .. length-1
            labels = batch["tokens"][i, 1:n + 1]
            nll_sum -= logp[i, np.arange(n), labels].sum()
            count += n
    want = np.exp(nll_sum / count)
    got = train.evaluate(run, trained["variables"])
    assert np.isfinite(got["perplexity"]) and 1.0 < got["perplexity"] < 2000
    np.testing.assert_allclose(got["perplexity"], want, rtol=1e-5)
    np.testing.assert_allclose(got["perplexity"], np.exp(got["loss"]), rtol=1e-12)
    np.testing.assert_allclose(trained["result"]["eval"]["perplexity"], want, rtol=1e-5)  # the run's final eval


def test_split_is_deterministic_and_keeps_an_images_captions_together(tmp_path):
    items = pw.read_corpus(CORPUS)
    train_a, held_a = pw.split_corpus(items, 0.15)
    lines = open(CORPUS).read().splitlines()
    random.Random(1).shuffle(lines)
    (tmp_path / "shuffled.txt").write_text("\n\n".join(lines) + "\n")  # reordered, blank lines between
    train_b, held_b = pw.split_corpus(pw.read_corpus(str(tmp_path / "shuffled.txt")), 0.15)
    assert sorted(held_a) == sorted(held_b) and sorted(train_a) == sorted(train_b) and not set(held_a) & set(train_a)
    # RSICD / COCO JSON: an image's captions (repeats dropped) share one side of the split.
    coco = {"images": [{"id": i, "file_name": f"forest_{i}.jpg"} for i in range(40)],
            "annotations": [{"image_id": i, "caption": c} for i in range(40)
                            for c in (f"forest number {i}", f"forest number {i}", f"many trees {i}")]}
    (tmp_path / "caps.json").write_text(json.dumps(coco))
    items = pw.read_corpus(str(tmp_path / "caps.json"))
    assert len(items) == 80  # 2 distinct captions per image
    tr, held = pw.split_corpus(items, 0.3)
    for i in range(40):
        assert (f"forest number {i}" in held) == (f"many trees {i}" in held)
    assert held and tr


def test_infer_writes_one_prompt_per_class(trained, tmp_path):
    run, variables = trained["run"], trained["variables"]
    write = tasks.require_plugin(run.task, "infer", "eojax infer")
    classes = tmp_path / "classes.txt"
    classes.write_text("forest\n\nriver\nforest\n")  # blanks and repeats dropped
    options = dict(prompt=["airport", "dense residential area"], input=str(classes), seed=7,
                   output=str(tmp_path / "out"))
    with run.scope():
        summary = write(run, variables, trained["workdir"], options)
        # Other classes, in another order (the same longest one: the same compiled generator).
        again = write(run, variables, trained["workdir"], dict(options, prompt=["river", "dense residential area"],
                                                               input="", output=str(tmp_path / "again")))
    with open(summary["file"]) as f:
        prompts = json.load(f)
    assert list(prompts) == ["airport", "dense residential area", "forest", "river"] and prompts == summary["prompts"]
    for name, text in prompts.items():
        assert text.startswith(f"A satellite image of {name}") and text.isprintable() and "\n" not in text
    assert again["prompts"]["river"] == prompts["river"]  # a class's prompt does not depend on the others
    assert (summary["temperature"], summary["top_k"], summary["seed"]) == (0.8, 40, 7)
    assert summary["downstream_flags"][0] == f"--prompt=airport:{prompts['airport']}"


def test_cli_infer_prompt_writer(trained, tmp_path):
    """`eojax infer prompt_writer --prompt=...` on the trained run: prompts.json {class: prompt}."""
    out = tmp_path / "cli"
    cli("infer", "prompt_writer:runlocal", trained["workdir"], "prompt_writer", "--prompt=farmland",
        "--prompt=beach", f"--output={out}", "--seed=1")
    prompts = json.loads((out / "prompts.json").read_text())
    assert sorted(prompts) == ["beach", "farmland"] and prompts["beach"].startswith("A satellite image of beach")


def _one_line_error(config, cls, match):
    with pytest.raises(cls, match=match) as err:
        train.setup(config)
    assert "\n" not in str(err.value)
    return err.value


def test_missing_corpus_and_gpt2_folder_are_one_line_errors(tmp_path):
    gone = str(tmp_path / "gone.txt")
    e = _one_line_error(_config(**{"input.corpus": gone}), errors.DataError, f"config.input.corpus={gone} does not exist")
    assert errors.exit_code(e) == errors.DATA
    _one_line_error(_config(**{"input.corpus": ""}), errors.ConfigError, "config.input.corpus is empty")
    missing = str(tmp_path / "no_gpt2")
    _one_line_error(_config(**{"model.init_from": missing}), errors.DataError,
                    f"config.model.init_from={missing}: no such GPT-2 folder")
    _one_line_error(load_config("prompt_writer", ""), errors.ConfigError,
                    r"config.model.init_from is empty.*configs/prompt_writer.py:gpt2=DIR")
    # The tiny GPT-2 fixture ships no tokenizer: named when it is the tokenizer folder.
    _one_line_error(_config(**{"model.tokenizer_dir": ""}), errors.DataError, "has no GPT-2 tokenizer files")
    (tmp_path / "empty.txt").write_text("\n  \n")
    _one_line_error(_config(**{"input.corpus": str(tmp_path / "empty.txt")}), errors.DataError, "holds no caption")
