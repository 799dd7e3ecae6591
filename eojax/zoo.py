"""Model zoo: the published checkpoints eojax reads, by name, and the one resolver of a weights source.

    resolve("zoo:prithvi-eo-2.0-300m")   -> the file, downloaded once into the Hugging Face cache
    resolve("hf://ORG/REPO/FILE@REV")     -> one file of a Hub repository at a revision (default main);
                                            hf://ORG/REPO@REV/FILE (huggingface_hub's order) too
    resolve("hf://ORG/REPO@REV")          -> the repository as a folder (GPT-2, Stable Diffusion)
    resolve("/weights/Prithvi_100M.pt")   -> unchanged: anything else is a local path

Every config key that names weights (SOURCE_KEYS) is resolved by `resolve_config` when the trainer sets
a run up (train.setup); weights.load, tasks.load_pretrained_parts, `eojax downstream --sd_folder`, the
web page and configs/vsat.py's pretrained GPT-2 call `resolve`. `eojax zoo` prints the table,
`eojax zoo NAME|hf://...` downloads one source, checks it and prints its path (docs/zoo.md).

Downloads are huggingface_hub's: its cache (HF_HUB_CACHE, HF_HOME), HF_HUB_OFFLINE=1 (the cache only),
HF_ENDPOINT (a mirror). Each file's sha256 is checked before anything reads it: against the digest
the zoo entry publishes (or the published prefix: torchgeo names its files after the first 8 hex digits
of theirs) and against the digest eojax recorded the first time it saw that file at that commit
(trust on first use: zoo_hashes.json in $EOJAX_CACHE, default ~/.cache/eojax). A file that does not
match is refused and moved aside, not deleted, to $EOJAX_CACHE/zoo_rejected/: the next online run
downloads it afresh.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tempfile

from eojax import errors

PREFIXES = ("zoo:", "hf://")
# Config keys that name weights, in every family that takes them (docs/zoo.md).
SOURCE_KEYS = ("init_from", "model.encoder_init", "model.init_from", "model.tokenizer_dir", "model.text_init_from",
               "model.sd_folder")
# An hf:// folder of a repository the zoo does not know: the files eojax's folder readers read.
FOLDER_PATTERNS = ("*.json", "*.txt", "*.safetensors")
_GPT2_FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer*.json")
_SD_FILES = ("model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
             "tokenizer/*.json", "text_encoder/config.json", "text_encoder/model.safetensors", "unet/config.json",
             "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors")


@dataclasses.dataclass(frozen=True)
class Entry:
    """A published checkpoint: where it is, how to check it, what it is, which eojax loader reads it."""
    name: str
    repo: str  # Hugging Face repository
    file: str | None  # None: the repository as a folder, the files `patterns` match
    revision: str  # a commit; "main" where none is published (the note says so)
    sha256: str  # published digest or prefix; "": none published (recorded on first download)
    sensor: str  # sensor and bands
    licence: str
    loads: str  # the eojax families that take it; "": no eojax loader reads it (the note says why)
    encoder: str | None = None  # eojax encoder and variant (checked against config.model's)
    variant: str | None = None
    patterns: tuple[str, ...] = ()  # a folder's files; names without wildcards must be there
    note: str = ""

    @property
    def url(self) -> str:
        return f"hf://{self.repo}{'/' + self.file if self.file else ''}@{self.revision}"


def _encoder(name, repo, file, revision, sha256, sensor, licence, encoder, variant, note):
    """An encoder that seg (config.init_from) and classify (model.encoder_init) import."""
    return Entry(name, repo, file, revision, sha256, sensor, licence, f"seg, classify: encoder {encoder} {variant}",
                 encoder, variant, note=note)


def _prithvi(name, repo, file, revision, variant, note, sha256=""):
    return _encoder(name, f"ibm-nasa-geospatial/{repo}", file, revision, sha256,
                    "HLS (L8/9 + S2): B2 B3 B4 B8A B11 B12", "Apache-2.0", "prithvi", variant, note)


def _satmae(name, file, sensor, loads, note, encoder="satmae"):
    return Entry(name, f"mubashir04/{file.removesuffix('.pth')}", file, "main", "", sensor,
                 "Apache-2.0 (techmn/satmae_pp)", loads, encoder if loads else None, "large" if loads else None,
                 note=note + "; " + _NO_COMMIT)


def _gpt2(name, repo, revision, corpus, licence):
    return Entry(name, repo, None, revision, "", f"text ({corpus}), GPT-2 BPE", licence,
                 "vsat (pretrained=), diffusion (model.text_init_from), prompt_writer (model.init_from)",
                 patterns=_GPT2_FILES, note="a folder; " + _PINNED.format("several projects' Hugging Face cache paths"))


_PINNED = "revision as pinned in public code ({})"
_NO_COMMIT = "no commit published: revision main"
_TL = ("the date / location encodings are left out (reported): eojax's Prithvi takes neither, and the "
       "reference adds them only when given")
_ANY = "any bands: kernels from wavelengths"
_CROMA = "S1 VV VH + S2 12 bands (no B10)"
_S2_10 = "S2 (fMoW-Sentinel): 10 bands B2-B8A B11 B12"
_RGB = "RGB (fMoW-RGB)"
_PLAIN = "SatMAE++'s plain ViT-L/16, 224 px (models_mae.py / models_vit.py)"

ENTRIES = (
    _prithvi("prithvi-eo-1.0-100m", "Prithvi-EO-1.0-100M", "Prithvi_EO_V1_100M.pt",
             "f3a9ea7a1723621b0aeceb4de993093704d712c5", "base",
             "ViT-B/16, 3 frames; formerly ibm-nasa-geospatial/Prithvi-100M (Prithvi_100M.pt); "
             + _PINNED.format("a deployment script's model table")),
    _prithvi("prithvi-eo-2.0-300m", "Prithvi-EO-2.0-300M", "Prithvi_EO_V2_300M.pt",
             "b2f2520ab889f42a25c5361ba18761fcb4ea44ad", "large",
             "ViT-L/16, 4 frames; " + _PINNED.format("allenai/olmoearth_pretrain")),
    _prithvi("prithvi-eo-2.0-300m-tl", "Prithvi-EO-2.0-300M-TL", "Prithvi_EO_V2_300M_TL.pt",
             "63adbd39c271da4c42f447e69b1a7c91a338cdc9", "large",
             f"ViT-L/16, 4 frames; {_TL}; revision and sha256 as pinned in two public projects",
             "3629cedfbb350faafcb0dac902ae0d3c927e25ce8d9e0024aa1276ec66956ddb"),
    _prithvi("prithvi-eo-2.0-600m", "Prithvi-EO-2.0-600M", "Prithvi_EO_V2_600M.pt",
             "87f15784813828dc37aa3197a143cd4689e4d080", "huge",
             "ViT-H/14, 4 frames; " + _PINNED.format("allenai/olmoearth_pretrain")),
    _prithvi("prithvi-eo-2.0-600m-tl", "Prithvi-EO-2.0-600M-TL", "Prithvi_EO_V2_600M_TL.pt",
             "3d72adc6dfc4cc3862bf4f41da8c83db267193c9", "huge",
             f"ViT-H/14, 4 frames; {_TL}; revision and sha256 as pinned in public code",
             "7b92c53b0204a76bb775bd8930f045e05776251caa8c83f7367ed0b75b594702"),
    _encoder("dofa-vit-base", "XShadow/DOFA", "DOFA_ViT_base_e100.pth", "main", "", _ANY, "CC-BY-4.0", "dofa",
             "base", "the file PANGAEA's configs/encoder/dofa.yaml downloads; " + _NO_COMMIT),
    _encoder("dofa-vit-large", "XShadow/DOFA", "DOFA_ViT_large_e100.pth", "main", "", _ANY, "CC-BY-4.0", "dofa",
             "large", _NO_COMMIT),
    _encoder("dofa-vit-base-torchgeo", "torchgeo/dofa", "dofa_base_patch16_224-a0275954.pth",
             "b8db318b64a90b9e085ec04ba8851233c5893666", "a0275954", _ANY, "CC-BY-4.0", "dofa", "base",
             "torchgeo's copy (DOFABase16_Weights.DOFA_MAE; sha256 prefix in the file name), DOFA's key names"),
    _encoder("dofa-vit-large-torchgeo", "torchgeo/dofa", "dofa_large_patch16_224-0ff904d3.pth",
             "b8db318b64a90b9e085ec04ba8851233c5893666", "0ff904d3", _ANY, "CC-BY-4.0", "dofa", "large",
             "torchgeo's copy (DOFALarge16_Weights.DOFA_MAE; sha256 prefix in the file name), DOFA's key names"),
    _encoder("croma-base", "antofuller/CROMA", "CROMA_base.pt", "main", "", _CROMA, "CC-BY-4.0", "croma", "base",
             "eojax reads the optical encoder; " + _NO_COMMIT),
    _encoder("croma-large", "antofuller/CROMA", "CROMA_large.pt", "main", "", _CROMA, "CC-BY-4.0", "croma",
             "large", "eojax reads the optical encoder; the file PANGAEA's configs/encoder/croma_optical.yaml "
                      "downloads; " + _NO_COMMIT),
    _encoder("croma-base-torchgeo", "torchgeo/croma", "CROMA_base-0238d814.pt",
             "387883f08af79d777167519c57cd826eda89a16f", "0238d814", _CROMA, "CC-BY-4.0", "croma", "base",
             "torchgeo's copy (CROMABase_Weights.CROMA_VIT; sha256 prefix in the file name)"),
    _encoder("croma-large-torchgeo", "torchgeo/croma", "CROMA_large-921e69ad.pt",
             "92cb1a0f4e34c6c01558baf070197c01255382f6", "921e69ad", _CROMA, "CC-BY-4.0", "croma", "large",
             "torchgeo's copy (CROMALarge_Weights.CROMA_VIT; sha256 prefix in the file name)"),
    _satmae("satmaepp-vitl-pretrain-fmow-sentinel", "checkpoint_ViT-L_pretrain_fmow_sentinel.pth", _S2_10,
            "satmae (init_from), classify, seg: encoder satmae large",
            "SatMAE++'s group-channel MAE, 96 px, patch 8"),
    _satmae("satmaepp-vitl-finetune-fmow-sentinel", "checkpoint_ViT-L_finetune_fmow_sentinel.pth", _S2_10,
            "classify (init_from, model.encoder_init): encoder satmae large",
            "SatMAE++'s fMoW-Sentinel classifier (62 classes); as encoder: encoder_args.learned_embed=True"),
    _satmae("satmaepp-vitl-pretrain-fmow-rgb", "checkpoint_ViT-L_pretrain_fmow_rgb.pth", _RGB,
            "mae (init_from); classify, seg: encoder mae large",
            f"{_PLAIN} MAE; the mae task loads its decoder too, not its multi-scale head (eojax's MAE has none)",
            encoder="mae"),
    _satmae("satmaepp-vitl-finetune-fmow-rgb", "checkpoint_ViT-L_finetune_fmow_rgb", _RGB,
            "classify (init_from, model.encoder_init): encoder mae large",
            f"{_PLAIN} fMoW-RGB classifier (62 classes): encoder_args.learned_embed=True (trained positions); "
            "the file name (no suffix) as a public loader lists it, read by its content", encoder="mae"),
    _gpt2("distilgpt2", "distilbert/distilgpt2", "2290a62682d06624634c1f46a6ad5be0f47f38aa", "OpenWebText",
          "Apache-2.0"),
    _gpt2("gpt2", "openai-community/gpt2", "607a30d783dfa663caf39e06633721c8d4cfcd7e", "WebText", "MIT"),
    Entry("stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5", None,
          "451f4fe16113bff5a5d2269ed5ad43b0592e9a14", "", "RGB (LAION), 512 px", "CreativeML OpenRAIL-M",
          "diffusion (model.sd_folder), eojax downstream --sd_folder", patterns=_SD_FILES,
          note="a folder: the float32 UNet, VAE and CLIP text encoder; the mirror of runwayml/stable-diffusion-v1-5; "
               + _PINNED.format("several projects' Hugging Face cache paths")),
)
ZOO = {e.name: e for e in ENTRIES}


# -- parsing ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Source:
    """What a zoo name or an hf:// URL asks for."""
    label: str  # as the user wrote it
    repo: str
    file: str | None
    revision: str
    sha256: str = ""
    patterns: tuple[str, ...] = ()


def is_remote(source) -> bool:
    """Whether `source` is a zoo name or an hf:// URL (else a local path)."""
    return isinstance(source, str) and source.startswith(PREFIXES)


def lookup(name: str, what: str = "zoo") -> Entry:
    """The entry `name`; an unknown name is a ConfigError listing the close ones."""
    if name in ZOO:
        return ZOO[name]
    close = difflib.get_close_matches(name, ZOO, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise errors.ConfigError(f"{what}: unknown zoo name {name!r}; {hint}`eojax zoo` lists them all")


def parse(source: str, what: str = "weights") -> Source:
    """zoo:NAME or hf://... -> Source, without touching the network; a ConfigError names a bad one."""
    if source.startswith("zoo:"):
        e = lookup(source[len("zoo:"):], f"{what}={source}")
        return Source(source, e.repo, e.file, e.revision, e.sha256, e.patterns)
    parts = source[len("hf://"):].split("/")
    revision = "main"
    if len(parts) >= 2 and "@" in parts[1]:  # huggingface_hub's hf://ORG/REPO@REV/FILE
        parts[1], revision = parts[1].split("@", 1)
    elif len(parts) >= 3 and "@" in parts[-1]:  # hf://ORG/REPO/FILE@REV
        parts[-1], revision = parts[-1].rsplit("@", 1)
    if len(parts) < 2 or not all(parts) or not revision or any("@" in p for p in parts):
        raise errors.ConfigError(f"{what}={source!r}: expected hf://ORG/REPO/FILE@REVISION (a file) or "
                                 "hf://ORG/REPO@REVISION (the repository as a folder)")
    repo, file = "/".join(parts[:2]), "/".join(parts[2:]) or None
    known = [e.patterns for e in ENTRIES if e.repo == repo and e.file is None]
    return Source(source, repo, file, revision, patterns=known[0] if known else FOLDER_PATTERNS)


# -- resolving ----------------------------------------------------------------------------------------
def resolve(source, what: str = "weights"):
    """The local path of `source` (a zoo name or hf:// URL: downloaded or found in the cache, every file's
    sha256 checked); any other value is returned unchanged."""
    if not is_remote(source):
        return source
    src = parse(source, what)
    path = _fetch(src)
    snapshot = path if src.file is None else path[: -len(src.file)].rstrip("/" + os.sep)
    commit = os.path.basename(snapshot) if os.path.basename(os.path.dirname(snapshot)) == "snapshots" else src.revision
    if src.file is not None:
        _check(src, commit, src.file, path, src.sha256)
        return path
    files = []
    for root, _, names in os.walk(path):
        files += [os.path.relpath(os.path.join(root, n), path).replace(os.sep, "/") for n in names]
    wanted = sorted(f for f in files if any(fnmatch.fnmatch(f, p) for p in src.patterns))
    missing = [p for p in src.patterns if not any(c in p for c in "*?[") and p not in wanted]
    if missing:  # offline, a partial snapshot; online, the repository lacks them
        hint = _how_to_download(src) if _offline() else f"{src.repo} has no such file at {src.revision}"
        raise errors.CheckpointError(f"{src.label}: the snapshot {path} lacks {', '.join(missing)}; {hint}")
    for rel in wanted:
        _check(src, commit, rel, os.path.join(path, rel), "")
    return path


def resolve_config(config):
    """`config`, or a copy of it with each SOURCE_KEYS value that is a zoo name or hf:// URL replaced
    by its local path. Every name and URL is checked, and a zoo encoder against config.model's, before
    anything is downloaded."""
    remote = {key: value for key in SOURCE_KEYS if is_remote(value := _get(config, key))}
    if not remote:
        return config
    for key, value in remote.items():
        parse(value, f"config.{key}")
    check_fits(config, remote)
    resolved = config.copy_and_resolve_references()
    for key, value in remote.items():
        path = resolve(value, f"config.{key}")
        *parents, last = key.split(".")
        node = resolved
        for p in parents:
            node = node[p]
        node[last] = path
        logging.info("config.%s=%s: %s", key, value, path)
    return resolved


def check_fits(config, remote: dict) -> None:
    """A zoo encoder given as config.init_from / model.encoder_init must be config.model's encoder
    (and variant, when the config names one), and must have an eojax loader."""
    model = config.get("model") or {}
    for key in ("init_from", "model.encoder_init"):
        source = remote.get(key, "")
        if not source.startswith("zoo:"):
            continue
        e = lookup(source[len("zoo:"):])
        if not e.loads:
            raise errors.ConfigError(f"config.{key}={source}: {e.note.split(';')[0]}")
        if e.encoder is None or "encoder" not in model:
            continue
        variant = model.get("encoder_variant")
        if model["encoder"] != e.encoder or (variant and e.variant and variant != e.variant):
            raise errors.ConfigError(
                f"config.{key}={source} is the {e.encoder} encoder, variant {e.variant}; config.model has "
                f"encoder={model['encoder']!r}, encoder_variant={variant!r}: set --config.model.encoder={e.encoder} "
                f"--config.model.encoder_variant={e.variant}")


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "get"):
            return None
        node = node.get(part)
    return node


def _hub_cache() -> str:
    """huggingface_hub's cache folder, read from the environment now (its constants are read at import)."""
    from huggingface_hub import constants
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def _offline() -> bool:
    from huggingface_hub import constants
    value = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def _how_to_download(src: Source) -> str:
    return (f"run `eojax zoo {src.label.removeprefix('zoo:')}` once online (without HF_HUB_OFFLINE=1), or copy "
            f"a Hugging Face cache that holds it to {_hub_cache()}")


def _fetch(src: Source) -> str:
    """The file's (or folder's) path in the Hugging Face cache; downloads what is missing unless offline.
    huggingface_hub writes a download under a temporary name and renames it once complete."""
    import huggingface_hub as hub
    from huggingface_hub import errors as hub_errors

    offline = _offline()
    kw = dict(revision=src.revision, cache_dir=_hub_cache(), local_files_only=offline,
              endpoint=os.environ.get("HF_ENDPOINT") or None)
    where = f"{src.repo}{'/' + src.file if src.file else ''}@{src.revision}"
    try:
        if src.file is not None:
            return hub.hf_hub_download(src.repo, src.file, **kw)
        return hub.snapshot_download(src.repo, allow_patterns=list(src.patterns), **kw)
    except hub_errors.LocalEntryNotFoundError:
        if offline:
            raise errors.CheckpointError(f"{src.label}: {where} is not in the Hugging Face cache {_hub_cache()} "
                                         f"and HF_HUB_OFFLINE is set; {_how_to_download(src)}") from None
        endpoint = kw["endpoint"] or hub.constants.ENDPOINT
        raise errors.CheckpointError(f"{src.label}: cannot download {where} from {endpoint} and it is not in "
                                     f"the cache {_hub_cache()}: check the network (or HF_ENDPOINT)") from None
    except (hub_errors.RepositoryNotFoundError, hub_errors.RevisionNotFoundError, hub_errors.EntryNotFoundError,
            hub_errors.HfHubHTTPError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise errors.CheckpointError(f"{src.label}: cannot download {where}: {reason}") from None


# -- hashes ---------------------------------------------------------------------------------------------
_DIGESTS: dict[tuple, str] = {}  # (real path, size, mtime) -> sha256: a file is hashed once per process


def cache_root() -> str:
    return os.environ.get("EOJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "eojax")


def hashes_path() -> str:
    """The trust-on-first-use record: {"REPO@COMMIT/FILE": sha256}."""
    return os.path.join(cache_root(), "zoo_hashes.json")


def sha256(path: str) -> str:
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        with open(real, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _DIGESTS[key]


def _recorded() -> dict:
    path = hashes_path()
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            table = json.load(f)
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
        return table
    except (OSError, ValueError) as e:
        raise errors.DataError(f"{path} (eojax's record of checkpoint digests) is not readable: {e}; delete it "
                               "to record the digests afresh") from None


def _record(key: str, digest: str) -> None:
    """Adds key -> digest to hashes_path(), written under a temporary name and renamed."""
    path = hashes_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = {**_recorded(), key: digest}
    fd, tmp = tempfile.mkstemp(prefix=".zoo_hashes.", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(dict(sorted(table.items())), f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _check(src: Source, commit: str, rel: str, path: str, published: str) -> None:
    """The file's sha256 against the published digest (or prefix) and the recorded one; a mismatch
    moves the file aside (unread) and raises CheckpointError; a first sight records the digest."""
    digest = sha256(path)
    key = f"{src.repo}@{commit}/{rel}"
    recorded = _recorded().get(key, "")
    for want, whose in ((published.lower(), "the zoo's published"), (recorded, f"the recorded ({hashes_path()})")):
        if want and not digest.startswith(want):
            aside = _set_aside(path, src, commit, rel, digest)
            raise errors.CheckpointError(
                f"{src.label}: {rel} has sha256 {digest}, not {whose} {want}: refused and moved to {aside} "
                "(the next online run downloads it again)")
    if not recorded:
        _record(key, digest)
        logging.info("%s: recorded sha256 %s of %s@%s/%s (checked on every later read)", src.label, digest,
                     src.repo, commit, rel)


def _set_aside(path: str, src: Source, commit: str, rel: str, digest: str) -> str:
    """Moves the file (the cache's blob behind a snapshot link) to zoo_rejected/ and drops the link."""
    folder = os.path.join(cache_root(), "zoo_rejected", src.repo.replace("/", "--"), commit, os.path.dirname(rel))
    os.makedirs(folder, exist_ok=True)
    dest = os.path.join(folder, f"{os.path.basename(rel)}.sha256-{digest[:16]}")
    shutil.move(os.path.realpath(path), dest)
    if os.path.lexists(path):
        os.unlink(path)
    _DIGESTS.clear()
    return dest


# -- the table and `eojax zoo` -----------------------------------------------------------------------------
def table() -> str:
    """The zoo as text: one row per entry (name, sensor and bands, licence, what loads it), its source
    and sha256 below, then the notes."""
    head = ("NAME", "SENSOR / BANDS", "LICENCE", "LOADS INTO")
    rows = [(e.name, e.sensor, e.licence, e.loads or "(no eojax loader: see its note)") for e in ENTRIES]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    lines = ["  ".join(f"{c:<{w}}" for c, w in zip(head, widths)) + "  " + head[3]]
    for e, row in zip(ENTRIES, rows):
        lines.append("  ".join(f"{c:<{w}}" for c, w in zip(row, widths)) + "  " + row[3])
        sha = e.sha256 if len(e.sha256) == 64 else (f"{e.sha256}... (published prefix)" if e.sha256 else
                                                     "not published: recorded on first download")
        lines.append(f"    {e.url}    sha256 {sha}")
    lines += ["", "notes:"] + [f"  {e.name}: {e.note}" for e in ENTRIES if e.note]
    lines += ["", "Use zoo:NAME (or its hf:// URL) wherever eojax takes weights; `eojax zoo NAME` downloads one, "
                  "checks it and prints its path. docs/zoo.md"]
    return "\n".join(lines)


def command(args: list[str]) -> int:
    """`eojax zoo`: the table; `eojax zoo NAME|hf://...`: that source's local path (downloaded, checked)."""
    if len(args) > 1:
        raise errors.ConfigError(f"eojax zoo takes at most one name, got {' '.join(args)!r}")
    if not args:
        print(table())
        return 0
    source = args[0] if is_remote(args[0]) else f"zoo:{args[0]}"
    print(resolve(source, "eojax zoo"))
    return 0
