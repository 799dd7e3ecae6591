"""eojax command line: `eojax --help` lists the commands, `eojax COMMAND --help` a command's flags.

  eojax train  --config=configs/mae.py:runlocal --workdir=/tmp/mae [--config.total_steps=100 ...]
  eojax eval   --config=configs/mae.py:runlocal --workdir=/tmp/mae
  eojax stats  --config=configs/mae.py:runlocal      # per-band statistics of config.input, cached
  eojax export --config=configs/mae.py:runlocal --workdir=/tmp/mae   # per-window embeddings -> GeoTIFF
  eojax infer [FAMILY] --config=configs/diffusion.py:runlocal --workdir=/tmp/diff --prompt="a river"
  eojax config --config=configs/mae.py:runlocal      # every key with its value and type
  eojax verify --workdir=/tmp/mae                    # check a run's checkpoints

A user error (config, data, workdir, checkpoint) prints one line `eojax: error: ...` and exits with the
code of its kind (eojax/errors.py, README.md); `--verbose` or EOJAX_VERBOSE=1 adds its traceback and the
libraries' INFO logs. `python -m eojax.main ...` is the same program.
"""
from __future__ import annotations

import difflib
import json
import logging
import os
import re
import sys
import traceback

import ml_collections
from absl import flags
from ml_collections import config_flags

from eojax import config_lib, errors, hostmem

# name -> (one line of help, its flags besides --verbose and --config.KEY=VALUE overrides)
COMMANDS = {
    "train": ("train config.task in --workdir; resumes from its latest checkpoint", ("config", "workdir")),
    "eval": ("evaluate the latest checkpoint of --workdir (and the kept best on the test split); "
             "eojax eval [FAMILY] (vsat: also the model against its references)", ("config", "workdir", "output",
                                                                                  "seed")),
    "stats": ("per-band statistics of config.input (computed once, cached beside the data)", ("config",)),
    "export": ("per-window embeddings of the latest checkpoint -> one GeoTIFF per input raster",
               ("config", "workdir", "input", "output")),
    "infer": ("the family's inference on the latest checkpoint: eojax infer [FAMILY] (FAMILY, when "
              "given, must be the config's task)", ("config", "workdir", "prompt", "negative_prompt", "input",
                                                    "output", "num_samples", "seed")),
    "config": ("print the resolved config: every key with its value and type", ("config",)),
    "knn": ("k-NN accuracy (DINO's weighted vote) of an encoder's frozen features on a classify config's "
            "splits: the latest checkpoint of --workdir, else config.model.encoder_init", ("config", "workdir")),
    "verify": ("check the checkpoints of --workdir (complete, readable, checksums) without training",
               ("workdir",)),
    "downstream": ("images per --prompt=CLASS:PROMPT from --sd_folder or a diffusion run (--workdir), a "
                   "classifier trained on them alone, its accuracy on --real's test split -> downstream.json",
                   ("config", "workdir", "sd_folder", "real", "classifier", "prompt", "num_samples", "seed",
                    "output")),
    "data": ("datasets: `eojax data list`; `eojax data download NAME --root=DIR` downloads, verifies and unpacks "
             "one into DIR/NAME and prints the command that trains on it (eojax/data/download.py)", ("root", "mirror")),
    "zoo": ("published checkpoints by name (sensor, bands, licence, loader): `eojax zoo` lists them; `eojax zoo "
            "NAME|hf://ORG/REPO/FILE@REV` downloads one, checks its sha256 and prints its path", ()),
}
_METAVARS = {"config": "FILE[:ARG]", "workdir": "DIR", "prompt": "TEXT", "negative_prompt": "TEXT", "input": "FILE",
             "output": "DIR", "num_samples": "N", "seed": "N", "sd_folder": "DIR", "real": "DIR|CSV",
             "classifier": "FILE[:ARG]", "root": "DIR", "mirror": "URL"}
_HELP_ARGS = ("-h", "--help", "-?", "--helpshort", "--helpfull")
# Libraries whose INFO lines (Orbax's ~100 per run, jax's accelerator probing) show only under --verbose.
_LIBRARY_LOGGERS = ("absl", "jax", "jaxlib", "orbax", "grain", "tensorstore", "etils")
EXIT_CODES = (
    (0, "success"),
    (errors.INTERNAL, "internal error (a bug: the traceback is printed)"),
    (errors.USAGE, "usage or config: unknown command, flag or key, an invalid value"),
    (errors.DATA, "data: a missing or unreadable input file, invalid pixel values"),
    (errors.CHECKPOINT, "checkpoint: missing, damaged, or written by a different model"),
    (errors.WORKDIR, "workdir: not a directory, not writable, no space left, in use by another run"),
    (errors.DIVERGED, "the loss became non-finite; the last good checkpoint is kept"),
    (errors.PREEMPTED, "preempted (SIGTERM / SIGINT): the step reached is saved; rerun the same command"),
    (errors.INTERRUPTED, "interrupted before anything was saved"),
)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mae.py:runlocal; "
                                          "its keys are overridden with --config.KEY=VALUE", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, pictures.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A text prompt (repeatable).")
_NEGATIVE_PROMPT = flags.DEFINE_string("negative_prompt", None, "What the samples are guided away from "
                                       "(default: the config's sampler.negative_prompt).")
_INPUT = flags.DEFINE_string("input", "", "An input file (e.g. a GeoTIFF to predict on).")
_OUTPUT = flags.DEFINE_string("output", "", "Output folder (default <workdir>/infer, <workdir>/features).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "Samples per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed of the inference.")
_SD_FOLDER = flags.DEFINE_string("sd_folder", "", "eojax downstream: a diffusers Stable Diffusion folder to "
                                  "generate with (sampler settings from --config's sampler block).")
_REAL = flags.DEFINE_string("real", "", "eojax downstream: the real chips, a folder of class folders or a CSV "
                            "(path,label[,split]); the classifier is tested on their test split.")
_CLASSIFIER = config_flags.DEFINE_config_file("classifier", None, "eojax downstream: a classify config replacing "
                                              "the default recipe (ResNet-18 from scratch, 64 px, 30 epochs); "
                                              "--classifier.KEY=VALUE overrides its keys", lock_config=True)
_ROOT = flags.DEFINE_string("root", "", "eojax data: the folder datasets are downloaded into (DIR/NAME).")
_MIRROR = flags.DEFINE_string("mirror", "", "eojax data: fetch URL/NAME/FILE instead of each file's own URL "
                              "(default $EOJAX_DATA_MIRROR).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "The libraries' INFO logs (Orbax, absl, jax) and the traceback "
                             "of a user error; also EOJAX_VERBOSE=1.")


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point: runs the command and exits with its code (errors.py)."""
    argv = list(sys.argv if argv is None else argv)
    verbose = _verbose_requested(argv)
    hostmem.tune_malloc()  # before jax is imported (--verbose logs what it did)
    try:
        code = _run(argv, verbose)
    except BaseException as e:  # every ending: KeyboardInterrupt and SystemExit (Preempted) too
        code = _report(e, verbose)
    sys.exit(code)


def _verbose_requested(argv: list[str]) -> bool:
    """--verbose, read before the flags are parsed: a parse error itself may need the traceback."""
    if os.environ.get("EOJAX_VERBOSE", "").lower() in ("1", "true", "yes", "on"):
        return True
    return any(a in ("--verbose", "--verbose=true", "--verbose=1", "--verbose=True") for a in argv[1:])


def _run(argv: list[str], verbose: bool) -> int:
    _quiet_libraries(verbose, before_jax=True)
    if any(a in _HELP_ARGS for a in argv[1:]):
        return _help(argv)
    positional = _parse_flags(argv)
    if positional[1:2] == ["data"]:  # eojax data list | download NAME: no config, no training
        from eojax.data import download
        return download.command(positional[2:], _ROOT.value, _MIRROR.value)
    if positional[1:2] == ["zoo"]:  # eojax zoo [NAME]: no config, no training
        from eojax import zoo
        _setup_logging(verbose or _VERBOSE.value)
        return zoo.command(positional[2:])
    verbose = verbose or _VERBOSE.value
    command, family = _command(positional)
    _setup_logging(verbose)
    if verbose and hostmem.status:
        logging.info(hostmem.status)
    return main(command, family)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parse of argv -> the positional arguments, with each way it can fail as a ConfigError."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise errors.ConfigError(_flag_error(e)) from e
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config lacks
        raise _unknown_key(e, argv) or e
    except OSError as e:  # an override on a config file that did not load
        raise errors.ConfigError(_config_load_error(e)) from e
    except SyntaxError as e:
        raise errors.ConfigError(f"{e.filename}:{e.lineno}: {e.msg}") from e


def _flag_error(e: flags.Error) -> str:
    """absl's message, with a config file's traceback reduced to its last line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) == 1:
        return lines[0]
    head = re.match(r"flag (--\S+): ", lines[0])
    cause = re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])
    return f"{head.group(1)}: {cause}" if head else f"{lines[0]} {cause}"


def _unknown_key(e: BaseException, argv: list[str]) -> errors.ConfigError | None:
    """The override that named a key the config does not have, with ml_collections' suggestion when it
    made one; None when no --config.* flag names the key (then it is not an override's error)."""
    inner = e.args[0] if e.args else ""
    while isinstance(inner, BaseException):  # AttributeError(KeyError("'lrr'\nDid you mean ..."))
        inner = inner.args[0] if inner.args else ""
    text = str(inner)
    key = re.match(r"""\s*['"]?([^'"\n]+)""", text)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    for arg in argv[1:]:
        name, eq, value = arg.partition("=")
        parts = name[2:].split(".")
        if not name.startswith(("--config.", "--classifier.")) or not key or key.group(1) not in parts[1:]:
            continue
        where = parts.index(key.group(1), 1)
        message = f"unknown config key {'.'.join(parts[1:where + 1])!r} in {arg}"
        if suggestion:
            fixed = ".".join(parts[:where] + [suggestion.group(1)] + parts[where + 1:])
            return errors.ConfigError(f"{message}: did you mean --{fixed}{eq}{value}?")
        return errors.ConfigError(f"{message}; `eojax config --config=...` lists the keys")
    return None


def _config_load_error(e: OSError) -> str:
    """ml_collections' several-line "Failed loading config file" -> its errno line."""
    found = re.findall(r"\[Errno \d+\] (.*)", str(e))
    return f"--config: cannot load the config file: {found[-1] if found else errors.message(e)}"


def _command(positional: list[str]) -> tuple[str, str | None]:
    """-> (command, family); `infer` and `eval` take a family word (checked against config.task)."""
    words = positional[1:]
    if not words:
        raise errors.ConfigError("no command given; `eojax --help` lists them: " + ", ".join(COMMANDS))
    command = words[0]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise errors.ConfigError(f"unknown command {command!r}; {hint}commands: {', '.join(COMMANDS)}")
    if len(words) > (2 if command in ("infer", "eval") else 1):
        raise errors.ConfigError(f"eojax {command}: unexpected argument(s) {' '.join(words[1:])!r}")
    return command, (words[1] if len(words) == 2 else None)


def _setup_logging(verbose: bool) -> None:
    """eojax's INFO lines (metrics, resuming, mesh) on stderr above the progress bar; the libraries'
    only with --verbose (set in _run)."""
    from eojax import metric_writer  # imports jax: not needed for --help and usage errors
    handler = metric_writer.LogHandler()
    if verbose:
        handler.setFormatter(logging.Formatter("%(levelname).1s%(asctime)s %(filename)s:%(lineno)d] %(message)s",
                                               "%m%d %H:%M:%S"))
    else:
        handler.setFormatter(_BriefFormatter("%(levelname).1s%(asctime)s %(message)s", "%m%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    _quiet_libraries(verbose, before_jax=False)


class _BriefFormatter(logging.Formatter):
    """Log records without the tracebacks attached to them: when a checkpoint write fails, Orbax's and
    asyncio's background tasks each log the same error with its traceback (hundreds of lines); the
    error that ends the run is printed once, and --verbose shows them all."""

    def formatException(self, exc_info) -> str:
        return ""

    def formatStack(self, stack_info: str) -> str:
        return ""


def _quiet_libraries(verbose: bool, before_jax: bool) -> None:
    """The libraries' loggers at INFO under --verbose, else WARNING. jax's only once it is imported:
    jax takes its logger's level at import as `jax_logging_level` and then adds a handler of its own."""
    for name in _LIBRARY_LOGGERS:
        if not (before_jax and name.startswith("jax")):
            logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def _config() -> ml_collections.ConfigDict:
    config = _CONFIG.value
    if config is None:
        raise errors.ConfigError("--config is required, e.g. --config=configs/mae.py:runlocal")
    if not isinstance(config, ml_collections.ConfigDict):  # ml_collections defers a load failure
        try:
            config.lock()
        except OSError as e:
            raise errors.ConfigError(_config_load_error(e)) from e
    return config


def _workdir(command: str) -> str:
    if not _WORKDIR.value:
        raise errors.ConfigError(f"eojax {command} needs --workdir=DIR")
    return _WORKDIR.value if "://" in _WORKDIR.value else os.path.abspath(_WORKDIR.value)


def main(command: str, family: str | None = None) -> int:
    """Runs one command on the parsed flags; returns its exit code."""
    if command == "verify":
        workdir = _workdir(command)
        config_lib.check_workdir(workdir, create=False)
        from eojax import checkpoint
        return _print_verify(checkpoint.verify_run(workdir))

    config = _config()
    if command == "config":
        _print_config(config)
        config_lib.validate(config)  # printed first: the table shows what to fix
        return 0
    config_lib.validate(config)
    if family is not None and family not in (config.task, config.task.split("_")[0]):
        raise errors.ConfigError(f"eojax {command} {family}: the config trains task {config.task!r}, not {family!r}")

    if command == "downstream":  # --workdir is a diffusion run here, and optional (none with --sd_folder)
        return _downstream(config)

    if command == "stats":
        from eojax.data import pipeline
        print(json.dumps(pipeline.describe_stats(config.input), indent=2))
        return 0

    workdir = _workdir(command)
    config_lib.check_workdir(workdir, create=command in ("train", "knn"))
    from eojax import train  # imports jax: keep `--help` and usage errors fast
    if command == "knn":
        from eojax.classify import evaluate as classify_eval
        summary = {"knn": classify_eval.knn_command(config, workdir)}
    elif command == "train":
        result = train.train_and_evaluate(config, workdir)
        summary = {k: result[k] for k in ("train", "eval", "test", "best", "pictures")}
    elif command in ("export", "infer"):
        from eojax import tasks
        run, variables = train.load_for_inference(config, workdir)
        options = {"prompt": list(_PROMPT.value), "negative_prompt": _NEGATIVE_PROMPT.value, "input": _INPUT.value,
                   "num_samples": _NUM_SAMPLES.value,
                   "output": os.path.abspath(_OUTPUT.value or os.path.join(workdir, "infer" if command == "infer"
                                                                        else "features")),
                   "seed": _SEED.value}
        plug_in = tasks.require_plugin(run.task, command, f"eojax {command}")
        with run.scope():
            summary = {"features" if command == "export" else "infer": plug_in(run, variables, workdir, options)}
    else:
        summary = {"eval": train.evaluate_checkpoint(config, workdir)}
        from eojax import tasks
        run, variables = train.load_for_inference(config, workdir)
        family_eval = tasks.plugin(run.task, "eval")  # a family's own scoring, e.g. vsat's references
        if family_eval is not None:
            options = {"output": os.path.abspath(_OUTPUT.value or os.path.join(workdir, "eval")),
                       "seed": _SEED.value}
            with run.scope():
                summary[run.task.name] = family_eval(run, variables, workdir, options)
    print(json.dumps(summary, indent=2))
    return 0


def _downstream(config: ml_collections.ConfigDict) -> int:
    """`eojax downstream` (eojax.diffusion.downstream): prints its report."""
    workdir = _workdir("downstream") if _WORKDIR.value else None
    if workdir:
        config_lib.check_workdir(workdir, create=False)
    classifier = _CLASSIFIER.value
    if classifier is not None and not isinstance(classifier, ml_collections.ConfigDict):
        try:  # ml_collections defers a load failure
            classifier.lock()
        except OSError as e:
            raise errors.ConfigError(_config_load_error(e).replace("--config", "--classifier", 1)) from e
    from eojax.diffusion import downstream
    negative = flags.FLAGS["negative_prompt"].value if "negative_prompt" in flags.FLAGS else None
    options = {"sd_folder": _SD_FOLDER.value, "real": _REAL.value, "classifier": classifier,
               "prompt": list(_PROMPT.value), "negative_prompt": negative, "num_samples": _NUM_SAMPLES.value,
               "seed": _SEED.value, "output": _OUTPUT.value}
    print(json.dumps({"downstream": downstream.command(config, workdir, options)}, indent=2))
    return 0


def _print_config(config: ml_collections.ConfigDict) -> None:
    """One line per key: key, type, value (last: a long tuple does not push the columns apart)."""
    rows = list(config_lib.flat_items(config))
    key_width, type_width = (max(len(r[i]) for r in rows) for i in (0, 2))
    for key, value, kind in rows:
        print(f"{key:<{key_width}}  {kind:<{type_width}}  {value!r}")


def _print_verify(report) -> int:
    """verify_run's table; its exit status (errors.CHECKPOINT when a step is corrupt)."""
    print(report)
    return report.exit_code()


def _report(e: BaseException, verbose: bool) -> int:
    """Prints how the run ended; returns the exit code."""
    if isinstance(e, BrokenPipeError):  # `eojax config ... | head`: the reader left; say nothing
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit
        return 128 + 13  # as if killed by SIGPIPE, the shell's convention
    sys.stdout.flush()
    if isinstance(e, SystemExit):  # train.Preempted carries its message; sys.exit(n) passes through
        if getattr(e, "message", None):
            print(f"eojax: {e.message}", file=sys.stderr)
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return errors.INTERNAL
    code = errors.exit_code(e)
    if code == errors.INTERNAL or verbose:
        traceback.print_exception(e)
    if code == errors.INTERNAL:
        print(f"eojax: internal error: {errors.message(e)} (a bug: please report it with the traceback above)",
              file=sys.stderr)
    elif code == errors.INTERRUPTED:
        print("eojax: interrupted", file=sys.stderr)
    else:
        print(f"eojax: error: {errors.message(e)}", file=sys.stderr)
    return code


def _help(argv: list[str]) -> int:
    """`eojax --help`: the commands; `eojax COMMAND --help`: its flags (and, with --config, its keys)."""
    words = [a for a in argv[1:] if not a.startswith("-")]
    command = words[0] if words and words[0] in COMMANDS else None
    if command is None:
        print("usage: eojax COMMAND --config=FILE[:ARG] [--workdir=DIR] [--config.KEY=VALUE ...] [--verbose]\n")
        print("commands:")
        for name, (text, _) in COMMANDS.items():
            print(f"  {name:<8} {text}")
        print("\n`eojax COMMAND --help` shows a command's flags; `eojax config --config=FILE` lists the config keys.")
        print("\nexit codes:")
        for code, text in EXIT_CODES:
            print(f"  {code:<4} {text}")
        return 0
    text, names = COMMANDS[command]
    required = ("config",) if command == "downstream" else ("config", "workdir")  # downstream: --workdir or --sd_folder
    usage = " ".join(f"--{n}={_METAVARS[n]}" if n in required else f"[--{n}={_METAVARS[n]}]" for n in names)
    print(f"usage: eojax {command}{' [FAMILY]' if command == 'infer' else ''} {usage}"
          f"{' [--config.KEY=VALUE ...]' if 'config' in names else ''} [--verbose]\n\n{text}\n\nflags:")
    shown = [(f"--{n}={_METAVARS[n]}", flags.FLAGS[n].help) for n in names]
    if "config" in names:
        shown.append(("--config.KEY=VALUE", "override a config key, e.g. --config.optim.lr=3e-4 "
                                            "(`eojax config --config=FILE` lists them)"))
    shown.append(("--verbose", flags.FLAGS["verbose"].help))
    width = max(len(s) for s, _ in shown)
    for spec, help_text in shown:
        print(f"  {spec:<{width}}  {help_text}")
    if "--helpfull" in argv:
        print("\n" + flags.FLAGS.get_help())
    if "config" in names and any(a.startswith("--config=") for a in argv):
        _parse_flags([a for a in argv if a not in _HELP_ARGS])
        print("\nconfig keys:")
        _print_config(_config())
    return 0


if __name__ == "__main__":
    run()
