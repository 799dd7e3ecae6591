"""A local web page for prompt -> satellite image with the diffusion project's defaults: PNDM, guidance 7.5,
its negative prompt and prompt suffix, a seed.

  python -m eojax.diffusion.webui --sd_folder=DIR [--port 7860] [--host 127.0.0.1] [--steps 50]

DIR is a diffusers Stable Diffusion folder (eojax/diffusion/sd.py: e.g. SD-1.5 or the project's fine-tune
saved by sd.save). GET / is the form (prompt, negative prompt, steps, guidance, seed); POST /generate takes
those fields (form-encoded or JSON) and answers a PNG, or 400 with a one-line message naming the bad field.
The standard library's http.server, no web framework: one request at a time (the model holds the
accelerator), bound to 127.0.0.1 unless --host says otherwise (it has no authentication).

The image is sd.generate's (StableDiffusionPipeline's): the prompt + suffix and the negative prompt
through CLIP, latents drawn from jax.random.key(seed), the sampler with classifier-free guidance, the VAE
decode; its compiled program for --steps is made at start and reused for every request.
"""
from __future__ import annotations

import argparse
import html
import io
import json
import logging
import math
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, HTTPServer

import jax.numpy as jnp
import numpy as np

from eojax import zoo
from eojax.diffusion import sd as sd_lib

# The project's defaults (its inference notebook): PNDM, guidance 7.5, this negative prompt and suffix.
NEGATIVE_PROMPT = ("weird colors, low quality, jpeg artifacts, lowres, grainy, deformed structures, blurry, opaque, "
                   "low contrast, distorted details, details are low")
SUFFIX = " , 8k, best quality, high-resolution"
SAMPLER = "pndm"
GUIDANCE = 7.5
STEPS = 50
GUIDANCE_RANGE = (1.0, 30.0)
SEED_MAX = 2 ** 31 - 1
MAX_TEXT = 1000  # characters of a prompt (CLIP reads 77 tokens anyway)
MAX_BODY = 64 * 1024
FIELDS = ("prompt", "negative_prompt", "steps", "guidance", "seed")


class BadRequest(ValueError):
    """A request field that is missing, malformed or out of range (answered with 400 and this line)."""


def parse_request(fields: dict, max_steps: int, default_steps: int = STEPS) -> dict:
    """The form's fields (strings, or JSON values) -> checked generation settings; BadRequest names the
    first bad field. Absent fields take the project's defaults (steps: the server's); only the prompt is
    required."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise BadRequest(f"unknown field {unknown[0]!r}; fields: {', '.join(FIELDS)}")

    def text(name, default):
        value = fields.get(name, default)
        if not isinstance(value, str):
            raise BadRequest(f"{name} must be text")
        value = " ".join(value.split())
        if len(value) > MAX_TEXT:
            raise BadRequest(f"{name} is {len(value)} characters; at most {MAX_TEXT}")
        return value

    def number(name, kind, default, lo, hi):
        raw = fields.get(name, default)
        if isinstance(raw, str):
            raw = raw.strip() or str(default)
        try:
            value = kind(raw) if kind is float else _integer(raw)
        except (TypeError, ValueError):
            raise BadRequest(f"{name}={raw!r} is not {'a number' if kind is float else 'an integer'}") from None
        if not (math.isfinite(value) and lo <= value <= hi):
            raise BadRequest(f"{name}={raw} is out of range {lo}..{hi}")
        return value

    prompt = text("prompt", "")
    if not prompt:
        raise BadRequest("prompt is empty")
    return dict(prompt=prompt, negative_prompt=text("negative_prompt", NEGATIVE_PROMPT),
                steps=number("steps", int, default_steps, 1, max_steps),
                guidance=number("guidance", float, GUIDANCE, *GUIDANCE_RANGE),
                seed=number("seed", int, 0, 0, SEED_MAX))


def _integer(raw) -> int:
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ValueError(raw)
    return int(raw) if not isinstance(raw, str) else int(raw, 10)


class Generator:
    """A loaded Stable Diffusion folder called by one request at a time: images (H, W, 3) uint8.
    sd.generate keeps one compiled program per step count, so only a new step count compiles."""

    def __init__(self, sd: sd_lib.StableDiffusion, *, sampler: str = SAMPLER, suffix: str = SUFFIX, size: int = 0):
        self.sd, self.sampler, self.suffix = sd, sampler, suffix
        self.size = size or sd.configs["unet"].get("sample_size", 64) * sd.vae_scale
        if self.size % sd.vae_scale:
            raise ValueError(f"image size {self.size} is not divisible by the VAE's factor {sd.vae_scale}")
        sd_lib.sampler_settings(sd, sampler)  # an unknown sampler is named here, not at the first request
        self._lock = threading.Lock()

    def warmup(self, steps: int) -> float:
        """Compiles the pipeline for `steps` now (seconds taken), so the first request does not wait."""
        start = time.perf_counter()
        self("", steps=steps)
        return time.perf_counter() - start

    def __call__(self, prompt: str, negative_prompt: str = NEGATIVE_PROMPT, *, steps: int = STEPS,
                 guidance: float = GUIDANCE, seed: int = 0) -> np.ndarray:
        with self._lock:  # one generation at a time, whatever server runs it
            images = sd_lib.generate(self.sd, [prompt], negative_prompt, num_steps=steps, guidance_scale=guidance,
                                     seeds=[seed], sampler=self.sampler, height=self.size, width=self.size,
                                     suffix=self.suffix)
            return np.asarray(jnp.round(images[0] * 255.0), np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image  # eojax.viz's dependency

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def page(max_steps: int, default_steps: int, folder: str) -> str:
    """The form; its script posts the fields and shows the PNG (or the one-line error) under it."""
    e = html.escape
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>eojax: satellite image from a prompt</title>
<style>body{{font-family:sans-serif;max-width:44em;margin:2em auto}} label{{display:block;margin-top:.7em}}
textarea,input{{width:100%;box-sizing:border-box}} #error{{color:#b00}} img{{margin-top:1em;max-width:100%;
image-rendering:pixelated}}</style></head><body>
<h1>Satellite image from a prompt</h1>
<p>Stable Diffusion folder <code>{e(folder)}</code>; {e(SAMPLER.upper())} sampler; the suffix
<code>{e(SUFFIX)}</code> is added to the prompt.</p>
<form id="form" method="post" action="/generate">
<label>Prompt <textarea name="prompt" rows="2" required placeholder="many buildings and green trees are around a playground"></textarea></label>
<label>Negative prompt <textarea name="negative_prompt" rows="3">{e(NEGATIVE_PROMPT)}</textarea></label>
<label>Steps (1-{max_steps}) <input name="steps" type="number" min="1" max="{max_steps}" value="{default_steps}"></label>
<label>Guidance ({GUIDANCE_RANGE[0]:g}-{GUIDANCE_RANGE[1]:g}) <input name="guidance" type="number" step="0.5"
 min="{GUIDANCE_RANGE[0]:g}" max="{GUIDANCE_RANGE[1]:g}" value="{GUIDANCE:g}"></label>
<label>Seed <input name="seed" type="number" min="0" max="{SEED_MAX}" value="0"></label>
<p><button type="submit">Generate</button> <span id="status"></span></p></form>
<p id="error"></p><img id="image" alt="">
<script>
const form = document.getElementById("form");
form.addEventListener("submit", async (event) => {{
  event.preventDefault();
  const status = document.getElementById("status"), error = document.getElementById("error");
  status.textContent = "generating..."; error.textContent = "";
  const reply = await fetch("/generate", {{method: "POST", body: new URLSearchParams(new FormData(form))}});
  status.textContent = "";
  if (!reply.ok) {{ error.textContent = await reply.text(); return; }}
  document.getElementById("image").src = URL.createObjectURL(await reply.blob());
  status.textContent = "seed " + reply.headers.get("X-Seed") + ", " + reply.headers.get("X-Seconds") + " s";
}});
</script></body></html>
"""


class WebUI(HTTPServer):
    """http.server's one-request-at-a-time server around a Generator."""

    def __init__(self, generator: Generator, host: str = "127.0.0.1", port: int = 7860, *, max_steps: int = 100,
                 default_steps: int = STEPS):
        self.generator, self.max_steps, self.default_steps = generator, max_steps, default_steps
        self.html = page(max_steps, default_steps, generator.sd.folder).encode()
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class _Handler(BaseHTTPRequestHandler):
    server: WebUI
    server_version = "eojax-webui"

    def log_message(self, format, *args):  # http.server writes to stderr; keep it in the log
        logging.info("webui %s " + format, self.address_string(), *args)

    def _send(self, code: int, body: bytes, kind: str, headers: dict | None = None):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _text(self, code: int, message: str):
        self._send(code, (message + "\n").encode(), "text/plain; charset=utf-8")

    def do_GET(self):
        if urllib.parse.urlsplit(self.path).path in ("/", "/index.html"):
            self._send(200, self.server.html, "text/html; charset=utf-8")
        else:
            self._text(404, f"no page {self.path}; the form is at /")

    def do_POST(self):
        if urllib.parse.urlsplit(self.path).path != "/generate":
            self._text(404, f"no endpoint {self.path}; POST to /generate")
            return
        try:
            settings = parse_request(self._fields(), self.server.max_steps, self.server.default_steps)
        except BadRequest as e:
            self._text(400, str(e))
            return
        start = time.perf_counter()
        try:
            image = self.server.generator(settings["prompt"], settings["negative_prompt"], steps=settings["steps"],
                                          guidance=settings["guidance"], seed=settings["seed"])
        except Exception as e:  # the server keeps serving; the page shows the one line
            logging.exception("webui: generation failed")
            self._text(500, f"generation failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
            return
        seconds = time.perf_counter() - start
        self._send(200, png_bytes(image), "image/png", {"X-Seed": str(settings["seed"]), "X-Seconds": f"{seconds:.2f}"})

    def _fields(self) -> dict:
        """The POST body's fields: JSON (Content-Type application/json) or form-encoded."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if not 0 <= length <= MAX_BODY:
            raise BadRequest(f"request body of {length} bytes; at most {MAX_BODY}")
        body = self.rfile.read(length)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("request body is not UTF-8") from None
        if self.headers.get("Content-Type", "").split(";")[0].strip() == "application/json":
            try:
                fields = json.loads(text or "{}")
            except json.JSONDecodeError as e:
                raise BadRequest(f"request body is not valid JSON: {e.msg} at character {e.pos}") from None
            if not isinstance(fields, dict):
                raise BadRequest("the JSON body must be an object of fields")
            return fields
        pairs = urllib.parse.parse_qs(text, keep_blank_values=True)
        repeated = [k for k, v in pairs.items() if len(v) > 1]
        if repeated:
            raise BadRequest(f"field {repeated[0]!r} is given {len(pairs[repeated[0]])} times")
        return {k: v[0] for k, v in pairs.items()}


def make_server(sd_folder: str, host: str = "127.0.0.1", port: int = 7860, *, steps: int = STEPS, max_steps: int = 100,
                sampler: str = SAMPLER, suffix: str = SUFFIX, size: int = 0, dtype: str = "float32",
                warmup: bool = True) -> WebUI:
    """Loads the folder (or zoo name / hf:// URL: eojax.zoo), compiles the pipeline for `steps` (warmup)
    and binds the server (port 0: any free)."""
    if not 1 <= steps <= max_steps:
        raise ValueError(f"--steps={steps} is outside 1..--max_steps={max_steps}")
    sd = sd_lib.load(zoo.resolve(sd_folder, "--sd_folder"), dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))
    generator = Generator(sd, sampler=sampler, suffix=suffix, size=size)
    if warmup:
        logging.info("webui: compiled the %d-step pipeline in %.1f s", steps, generator.warmup(steps))
    return WebUI(generator, host, port, max_steps=max_steps, default_steps=steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eojax.diffusion.webui", description=__doc__.split("\n\n")[0])
    p.add_argument("--sd_folder", required=True, help="diffusers Stable Diffusion folder, or zoo:stable-diffusion-v1-5")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only: no authentication)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--steps", type=int, default=STEPS, help="the form's default; compiled at start")
    p.add_argument("--max_steps", type=int, default=100)
    p.add_argument("--sampler", default=SAMPLER, help="pndm (the project's), ddim, ddpm or dpmpp_2m")
    p.add_argument("--suffix", default=SUFFIX, help="added to every prompt")
    p.add_argument("--size", type=int, default=0, help="image side in pixels (0: the UNet's sample_size x VAE factor)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--no_warmup", action="store_true", help="compile on the first request instead of at start")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        server = make_server(args.sd_folder, args.host, args.port, steps=args.steps, max_steps=args.max_steps,
                             sampler=args.sampler, suffix=args.suffix, size=args.size, dtype=args.dtype,
                             warmup=not args.no_warmup)
    except (OSError, ValueError, KeyError) as e:  # a missing folder, a refused scheduler, a taken port
        print(f"webui: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"serving {args.sd_folder} on {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
