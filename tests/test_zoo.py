"""The model zoo (eojax/zoo.py): zoo names and hf:// URLs resolved through huggingface_hub's cache, offline
(HF_HUB_OFFLINE=1, HF_HUB_CACHE / HF_HOME / EOJAX_CACHE in tmp_path; only loopback servers). Each
test writes the fixtures it needs into that cache as a download leaves them (blobs named by digest,
snapshot links, refs/main), so the real resolver, hash check and family loaders run. Encoders loaded
through a zoo name or URL give the reference's (PANGAEA's) features on the parity fixtures."""
import hashlib
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from huggingface_hub import constants as hub_constants
from safetensors.numpy import load_file

from eojax import errors, weights, zoo
from eojax.diffusion import sd as sd_lib
from eojax.models import encoders
from eojax.weights import common, gpt2 as gpt2_weights
from eojax.weights import prithvi as prithvi_weights
from helpers import ONE_DEVICE, REPO, load_config, xla_flags
from test_parity_dofa_croma import (dofa_fields, fixture, images_and_want, load_and_run, max_rel,
                                    seg_features_from)
from test_parity_prithvi_satmae import REF, abstract_params, prithvi, prithvi_outputs, rel

FIXTURES = os.path.join(REPO, "tests", "fixtures")
TOL = 1e-4
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, offline, and eojax's own cache beside it."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)  # read by huggingface_hub at its import
    monkeypatch.setenv("EOJAX_CACHE", str(tmp_path / "eojax"))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    return tmp_path / "hf" / "hub"


def online(monkeypatch, endpoint: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)


def publish(cache, repo: str, files: dict, revision: str = "main") -> str:
    """Writes {path in repo: bytes} as huggingface_hub leaves a download: blobs named by their digest,
    snapshots/<commit>/<path> links to them, refs/<revision> naming the commit. Returns the commit."""
    commit = revision if re.fullmatch("[0-9a-f]{40}", revision) else COMMIT
    root = cache / f"models--{repo.replace('/', '--')}"
    for path, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if revision != commit:
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / revision).write_text(commit)
    return commit


def folder_files(*folders) -> dict:
    """{path relative to its folder: bytes} of every file under the folders."""
    out = {}
    for folder in folders:
        for base, _, names in os.walk(folder):
            for n in names:
                full = os.path.join(base, n)
                out[os.path.relpath(full, folder)] = open(full, "rb").read()
    return out


def as_torch_file(safetensors_path: str) -> bytes:
    """The fixture's state dict saved by torch.save, as the published .pt / .pth files are."""
    torch = pytest.importorskip("torch")
    buf = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in load_file(safetensors_path).items()}, buf)
    return buf.getvalue()


# -- the table -----------------------------------------------------------------------------------------
def test_table_lists_every_entry_with_its_source_licence_and_loader():
    text = zoo.table()
    for e in zoo.ENTRIES:
        row = next(line for line in text.splitlines() if line.startswith(e.name + " "))
        assert e.licence in row and e.sensor in row and (e.loads or "no eojax loader") in row, row
        assert f"{e.url}    sha256 {e.sha256 or 'not published'}" in text, e.name
        # pinned commits are full hashes; "main" only where the note says none is published
        assert re.fullmatch("[0-9a-f]{40}", e.revision) or (e.revision == "main" and "revision main" in e.note)
        assert re.fullmatch("([0-9a-f]{8}|[0-9a-f]{64})?", e.sha256), e.name
        if e.encoder:  # the encoder and variant the entry names exist in eojax
            assert e.variant in encoders.variants(e.encoder), e.name
            assert f"encoder {e.encoder} {e.variant}" in e.loads
        else:
            assert e.file is None or not e.loads  # GPT-2 / SD folders, or no loader (the note says why)
    assert len(zoo.ZOO) == len(zoo.ENTRIES)  # names are unique
    asked = {"prithvi-eo-1.0-100m", "prithvi-eo-2.0-300m", "prithvi-eo-2.0-300m-tl", "prithvi-eo-2.0-600m",
             "prithvi-eo-2.0-600m-tl", "dofa-vit-base", "dofa-vit-large", "croma-base", "croma-large",
             "satmaepp-vitl-pretrain-fmow-sentinel", "satmaepp-vitl-finetune-fmow-sentinel",
             "satmaepp-vitl-finetune-fmow-rgb", "distilgpt2", "gpt2", "stable-diffusion-v1-5"}
    assert asked <= set(zoo.ZOO)


def test_cli_lists_the_zoo_and_resolves_a_name_offline(hub):
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    listing = subprocess.run([sys.executable, "-m", "eojax.main", "zoo"], env=env, capture_output=True, text=True,
                             cwd=REPO, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert all(e.url in listing.stdout for e in zoo.ENTRIES)
    missing = subprocess.run([sys.executable, "-m", "eojax.main", "zoo", "croma-base"], env=env,
                             capture_output=True, text=True, cwd=REPO, timeout=120)
    assert missing.returncode == errors.CHECKPOINT, missing.stderr
    (line,) = missing.stderr.splitlines()
    assert line.startswith("eojax: error: zoo:croma-base: ") and "`eojax zoo croma-base` once online" in line


# -- names and URLs ------------------------------------------------------------------------------------------
def test_unknown_name_lists_the_close_ones(hub):
    with pytest.raises(errors.ConfigError) as e:
        zoo.resolve("zoo:prithvi-eo-2.0-300", "config.init_from")
    message = str(e.value)
    assert "'prithvi-eo-2.0-300'" in message and "prithvi-eo-2.0-300m" in message and "eojax zoo" in message
    assert "\n" not in message


def test_url_forms():
    a = zoo.parse("hf://org/repo/sub/model.pt@abc")
    b = zoo.parse("hf://org/repo@abc/sub/model.pt")
    assert (a.repo, a.file, a.revision) == (b.repo, b.file, b.revision) == ("org/repo", "sub/model.pt", "abc")
    assert zoo.parse("hf://org/repo/model.pt").revision == "main"
    folder = zoo.parse("hf://stable-diffusion-v1-5/stable-diffusion-v1-5@abc")
    assert folder.file is None and folder.patterns == zoo.ZOO["stable-diffusion-v1-5"].patterns
    assert zoo.parse("hf://org/other@abc").patterns == zoo.FOLDER_PATTERNS
    for bad in ("hf://org", "hf://org/repo@", "hf://org//f.pt", "hf://org/repo/f.pt@"):
        with pytest.raises(errors.ConfigError, match="expected hf://ORG/REPO"):
            zoo.parse(bad, "config.init_from")
    assert zoo.resolve("/weights/Prithvi_100M.pt") == "/weights/Prithvi_100M.pt"  # local paths pass through


def test_missing_from_the_offline_cache_is_one_line_saying_how_to_download(hub):
    for source in ("zoo:croma-base", "hf://org/repo/model.pt@" + COMMIT):
        with pytest.raises(errors.CheckpointError) as e:
            zoo.resolve(source)
        message = str(e.value)
        assert "\n" not in message and "HF_HUB_OFFLINE" in message and "once online" in message, message
        assert str(hub) in message
    assert not os.path.exists(zoo.hashes_path())


def test_unreachable_hub_is_one_line_and_leaves_nothing(hub, monkeypatch):
    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    online(monkeypatch, f"http://127.0.0.1:{port}")
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub's retry back-off
    with pytest.raises(errors.CheckpointError) as e:
        zoo.resolve("zoo:dofa-vit-base")
    message = str(e.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message and "XShadow/DOFA/DOFA_ViT_base_e100.pth" in message
    left = [os.path.join(d, f) for d, _, names in os.walk(hub) for f in names if ".locks" not in d]
    assert left == [] and not os.path.exists(zoo.hashes_path())


# -- hashes --------------------------------------------------------------------------------------------------
def test_published_hash_mismatch_is_refused_unread_and_set_aside(hub):
    e = zoo.ZOO["prithvi-eo-2.0-300m-tl"]
    data = b"not the published Prithvi-EO-2.0 300M TL checkpoint"
    publish(hub, e.repo, {e.file: data}, e.revision)
    link = hub / f"models--{e.repo.replace('/', '--')}" / "snapshots" / e.revision / e.file

    class Unread:  # weights.load must refuse before the family's converter reads the file
        def load_pretrained_variables(self, *args):
            raise AssertionError("the converter read a refused file")

    with pytest.raises(errors.CheckpointError) as err:
        weights.load({}, f"zoo:{e.name}", Unread())
    message = str(err.value)
    digest = hashlib.sha256(data).hexdigest()
    assert digest in message and e.sha256 in message and "\n" not in message
    aside = message.split("moved to ")[1].split(" (")[0]
    assert aside.startswith(os.path.join(os.environ["EOJAX_CACHE"], "zoo_rejected"))
    assert open(aside, "rb").read() == data  # kept, not deleted
    assert not os.path.lexists(link)  # gone from the snapshot: the next online run downloads it afresh
    assert not os.path.exists(zoo.hashes_path())  # a refused file's digest is never recorded


def test_published_prefix_is_checked(hub, monkeypatch):
    """torchgeo's entries publish the first 8 hex digits of the sha256 (in the file name)."""
    data = b"a checkpoint"
    digest = hashlib.sha256(data).hexdigest()
    base = zoo.ZOO["croma-base-torchgeo"]
    publish(hub, base.repo, {base.file: data}, base.revision)
    for name, prefix in (("right-prefix", digest[:8]), ("wrong-prefix", "0238d814")):
        monkeypatch.setitem(zoo.ZOO, name, zoo.dataclasses.replace(base, name=name, sha256=prefix))
    assert open(zoo.resolve("zoo:right-prefix"), "rb").read() == data
    with pytest.raises(errors.CheckpointError, match="not the zoo's published 0238d814"):
        zoo.resolve("zoo:wrong-prefix")


def test_trust_on_first_use(hub):
    """No published digest: the first read records it, a later read of different bytes is refused."""
    url = f"hf://org/repo/model.safetensors@{COMMIT}"
    publish(hub, "org/repo", {"model.safetensors": b"first"}, COMMIT)
    path = zoo.resolve(url)
    assert open(path, "rb").read() == b"first"
    with open(zoo.hashes_path()) as f:
        assert json.load(f) == {f"org/repo@{COMMIT}/model.safetensors": hashlib.sha256(b"first").hexdigest()}
    assert zoo.resolve(url) == path  # checked again: still the same bytes
    blob = os.path.realpath(path)
    os.chmod(blob, 0o644)
    with open(blob, "wb") as f:
        f.write(b"tampered")
    with pytest.raises(errors.CheckpointError, match="not the recorded"):
        zoo.resolve(url)
    assert not os.path.lexists(path)


def test_download_from_a_loopback_hub(hub, monkeypatch):
    """Online, from a Hub on 127.0.0.1: a download whose digest is not the published one is refused and
    set aside; the next run downloads again, records the digest, and later runs work offline."""
    served = {"body": b"corrupted in transit"}
    gets = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            if self.path != "/org/repo/resolve/main/model.pt":
                self.send_error(404)
                return False
            self.send_response(200)
            self.send_header("Content-Length", str(len(served["body"])))
            self.send_header("ETag", f'"{hashlib.sha256(served["body"]).hexdigest()}"')
            self.send_header("X-Repo-Commit", COMMIT)
            self.end_headers()
            return True

        def do_GET(self):
            if self.do_HEAD():
                gets.append(self.path)
                self.wfile.write(served["body"])

        def log_message(self, *args):
            pass

    good = b"the published checkpoint"
    monkeypatch.setitem(zoo.ZOO, "loopback", zoo.Entry("loopback", "org/repo", "model.pt", "main",
                                                       hashlib.sha256(good).hexdigest(), "", "", "seg"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    online(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
    try:
        with pytest.raises(errors.CheckpointError, match="not the zoo's published") as e:
            zoo.resolve("zoo:loopback")
        aside = str(e.value).split("moved to ")[1].split(" (")[0]
        assert open(aside, "rb").read() == b"corrupted in transit"
        served["body"] = good
        path = zoo.resolve("zoo:loopback")
        assert open(path, "rb").read() == good and len(gets) == 2  # downloaded afresh
    finally:
        server.shutdown()
        server.server_close()
    with open(zoo.hashes_path()) as f:
        assert json.load(f) == {f"org/repo@{COMMIT}/model.pt": hashlib.sha256(good).hexdigest()}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert zoo.resolve("zoo:loopback") == path  # the cache alone, the server gone


# -- loading through the families' loaders ----------------------------------------------------------------------
def test_zoo_prithvi_dofa_croma_give_pangaeas_features(hub):
    """zoo:NAME of each published encoder, its file written as torch saves it (torch needed), through
    weights.common.load_encoder (the seg / classify encoders' loader): the reference's features."""
    names = {"prithvi": "prithvi-eo-1.0-100m", "dofa": "dofa-vit-base", "croma": "croma-base"}
    sources = {"prithvi": os.path.join(REF, "prithvi", "Prithvi_100M.safetensors"),
               "dofa": fixture("dofa")[2], "croma": fixture("croma")[2]}
    for family, name in names.items():
        e = zoo.ZOO[name]
        publish(hub, e.repo, {e.file: as_torch_file(sources[family])}, e.revision)
    path = zoo.resolve("zoo:prithvi-eo-1.0-100m")
    assert path.endswith("Prithvi_EO_V1_100M.pt")
    enc = prithvi(1)
    video, want = prithvi_outputs(1)
    params, _ = common.load_encoder(path, abstract_params(enc, 1, 1, *video.shape[2:]), enc)
    got = jax.jit(enc.apply)({"params": params}, video)
    assert max(rel(g, want[k]) for g, k in zip(got, want)) < TOL
    for family in ("dofa", "croma"):
        meta, arrays, _ = fixture(family)
        extra = dofa_fields(meta, input_bands=tuple(meta["bands"])) if family == "dofa" else {}
        got, want, _ = load_and_run(family, meta, arrays, zoo.resolve(f"zoo:{names[family]}"), **extra)
        assert max_rel(got, want) < TOL, family


def test_hf_url_through_a_seg_runs_init_from(hub):
    """config.init_from=hf://... on a seg run: weights.load resolves it, SegTask imports it (no torch)."""
    meta, arrays, path = fixture("croma")
    publish(hub, "eojax-test/croma-fixture", {"weights.safetensors": open(path, "rb").read()}, COMMIT)
    got = seg_features_from("croma", meta, arrays, f"hf://eojax-test/croma-fixture/weights.safetensors@{COMMIT}")
    assert max_rel(got, images_and_want(meta, arrays)[1]) < TOL


def test_gpt2_and_stable_diffusion_folders(hub):
    """zoo:distilgpt2 and zoo:stable-diffusion-v1-5 are snapshots of the files eojax reads: the tiny
    fixtures there load as they do from their own folders."""
    gpt2_files = folder_files(os.path.join(FIXTURES, "gpt2_tiny"), os.path.join(FIXTURES, "prompt_corpus_bpe"))
    publish(hub, "distilbert/distilgpt2", gpt2_files, zoo.ZOO["distilgpt2"].revision)
    folder = zoo.resolve("zoo:distilgpt2")
    want = gpt2_weights.load_params(os.path.join(FIXTURES, "gpt2_tiny"))
    got = gpt2_weights.load_params(folder)
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))
    assert gpt2_weights.load_tokenizer(folder)("a river").input_ids  # vocab.json + merges.txt are there

    sd_tiny = os.path.join(FIXTURES, "sd_tiny")
    publish(hub, "stable-diffusion-v1-5/stable-diffusion-v1-5", folder_files(sd_tiny),
            zoo.ZOO["stable-diffusion-v1-5"].revision)
    folder = zoo.resolve("zoo:stable-diffusion-v1-5")
    assert sd_lib.read_configs(folder) == sd_lib.read_configs(sd_tiny)
    with open(zoo.hashes_path()) as f:
        recorded = json.load(f)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert recorded[f"stable-diffusion-v1-5/stable-diffusion-v1-5@{zoo.ZOO['stable-diffusion-v1-5'].revision}/{unet}"] \
        == hashlib.sha256(open(os.path.join(sd_tiny, unet), "rb").read()).hexdigest()


def test_folder_missing_a_file_it_needs(hub):
    files = folder_files(os.path.join(FIXTURES, "gpt2_tiny"))  # no tokenizer files
    publish(hub, "openai-community/gpt2", files, zoo.ZOO["gpt2"].revision)
    with pytest.raises(errors.CheckpointError, match="lacks vocab.json, merges.txt"):
        zoo.resolve("zoo:gpt2")


# -- configs ---------------------------------------------------------------------------------------------------
def test_resolve_config_checks_names_and_encoders_before_downloading(hub, monkeypatch):
    config = load_config("seg", "encoder=prithvi,decoder=linear,mode=frozen", mesh=ONE_DEVICE)
    assert zoo.resolve_config(config) is config  # nothing remote: the same config
    no_loader = zoo.dataclasses.replace(zoo.ZOO["croma-base"], name="no-loader", loads="", encoder=None,
                                        variant=None, note="no eojax converter reads this layout; listed only")
    monkeypatch.setitem(zoo.ZOO, "no-loader", no_loader)
    cases = {"zoo:prithvi-eo-2.0-300n": "did you mean prithvi-eo-2.0-300m",
             "zoo:dofa-vit-base": "is the dofa encoder, variant base; config.model has encoder='prithvi'",
             "zoo:prithvi-eo-2.0-300m": "--config.model.encoder_variant=large",
             "zoo:satmaepp-vitl-pretrain-fmow-rgb": "is the mae encoder, variant large",
             "zoo:no-loader": "no eojax converter reads this layout"}
    for source, words in cases.items():
        config.init_from = source
        with pytest.raises(errors.ConfigError, match=re.escape(words)):
            zoo.resolve_config(config)
    assert not hub.exists()  # refused before any download

    e = zoo.ZOO["prithvi-eo-1.0-100m"]
    publish(hub, e.repo, {e.file: b"bytes"}, e.revision)
    config.init_from = "zoo:prithvi-eo-1.0-100m"
    resolved = zoo.resolve_config(config)
    assert resolved.init_from == str(hub / f"models--{e.repo.replace('/', '--')}" / "snapshots" / e.revision / e.file)
    assert config.init_from == "zoo:prithvi-eo-1.0-100m"  # the caller's config is unchanged


def test_prithvi_tl_encodings_are_reported_not_refused():
    """Prithvi-EO-2.0 TL files carry encoder.temporal_embed_enc / location_embed_enc scales: left out."""
    sd = {f"encoder.{k}": v for k, v in load_file(os.path.join(REF, "prithvi", "Prithvi_100M.safetensors")).items()}
    sd.update({"encoder.temporal_embed_enc.scale": np.ones(1, np.float32),
               "encoder.location_embed_enc.scale": np.ones(1, np.float32)})
    _, report = prithvi_weights.prithvi_from_torch(sd, prithvi(1))
    assert {"encoder.temporal_embed_enc.scale", "encoder.location_embed_enc.scale"} <= set(report["ignored"])
