"""The interactive page (eojax/diffusion/webui.py), headless: the server on a free loopback port in a
thread, with the tiny random Stable Diffusion folder (tests/fixtures/sd_tiny, 32 x 32 images), driven by
urllib: the form, a PNG of the right size that equals sd.generate's image, and 400s with one line for bad
input."""
import io
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from eojax.diffusion import sd as sd_lib
from eojax.diffusion import webui

FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sd_tiny")
STEPS = 2


@pytest.fixture(scope="module")
def server():
    srv = webui.make_server(FOLDER, "127.0.0.1", 0, steps=STEPS, max_steps=20)  # port 0: any free one
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(10)


def _post(srv, fields, json_body=False):
    data = json.dumps(fields).encode() if json_body else urllib.parse.urlencode(fields).encode()
    req = urllib.request.Request(srv.url + "generate", data=data, method="POST",
                                 headers={"Content-Type": "application/json"} if json_body else {})
    return urllib.request.urlopen(req, timeout=60)


def _error(srv, fields, **kw):
    with pytest.raises(urllib.error.HTTPError) as err:
        _post(srv, fields, **kw)
    body = err.value.read().decode()
    assert body.endswith("\n") and "\n" not in body.rstrip("\n"), body  # one line
    return err.value.code, body.strip()


def test_the_server_binds_to_loopback_and_serves_the_form(server):
    assert server.server_address[0] == "127.0.0.1" and server.server_address[1] > 0
    with urllib.request.urlopen(server.url, timeout=10) as reply:
        assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/html")
        form = reply.read().decode()
    for name in webui.FIELDS:
        assert f'name="{name}"' in form
    assert 'action="/generate"' in form and "weird colors, low quality, jpeg artifacts" in form
    assert 'value="7.5"' in form and f'value="{STEPS}"' in form and 'max="20"' in form
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.url + "nothing", timeout=10)
    assert err.value.code == 404


def test_post_gives_sd_generates_png(server):
    """The project's defaults (negative prompt, suffix, PNDM, guidance 7.5) through the compiled pipeline
    give sd.generate's image for the same seed."""
    with _post(server, {"prompt": "an airport with two runways", "steps": STEPS, "seed": 3}) as reply:
        assert reply.status == 200 and reply.headers["Content-Type"] == "image/png" and reply.headers["X-Seed"] == "3"
        png = reply.read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = np.asarray(Image.open(io.BytesIO(png)))
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    sd = server.generator.sd
    want = sd_lib.generate(sd, ["an airport with two runways"], webui.NEGATIVE_PROMPT, num_steps=STEPS,
                           guidance_scale=7.5, seeds=[3], suffix=webui.SUFFIX, sampler="pndm")
    want = np.round(np.asarray(want[0]) * 255.0)
    assert np.abs(image.astype(np.float64) - want).max() <= 1.0  # rounding at a .5 boundary at most
    # JSON bodies too; another seed gives another image, the same program (no new compile).
    with _post(server, {"prompt": "an airport with two runways", "steps": STEPS, "seed": 4}, json_body=True) as reply:
        other = np.asarray(Image.open(io.BytesIO(reply.read())))
    assert other.shape == image.shape and not np.array_equal(other, image)
    assert list(server.generator.sd.programs) == [("pndm", STEPS, True), "decode"]  # compiled once, reused


@pytest.mark.parametrize("fields, message", [
    ({"prompt": "   "}, "prompt is empty"),
    ({"negative_prompt": "blurry"}, "prompt is empty"),
    ({"prompt": "a river", "steps": 0}, "steps=0 is out of range 1..20"),
    ({"prompt": "a river", "steps": 21}, "steps=21 is out of range 1..20"),
    ({"prompt": "a river", "steps": "two"}, "steps='two' is not an integer"),
    ({"prompt": "a river", "guidance": 31}, "guidance=31 is out of range 1.0..30.0"),
    ({"prompt": "a river", "guidance": "nan"}, "guidance=nan is out of range"),
    ({"prompt": "a river", "seed": -1}, "seed=-1 is out of range 0..2147483647"),
    ({"prompt": "a river", "colour": "red"}, "unknown field 'colour'"),
    ({"prompt": "x" * 1001}, "prompt is 1001 characters; at most 1000"),
])
def test_bad_input_is_a_400_with_one_line(server, fields, message):
    code, body = _error(server, fields)
    assert code == 400 and message in body, body


def test_bad_json_body_is_a_400(server):
    req = urllib.request.Request(server.url + "generate", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400 and "not valid JSON" in err.value.read().decode()


def test_cli_names_a_missing_folder_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "eojax.diffusion.webui", f"--sd_folder={tmp_path / 'none'}",
                           "--port", "0"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2 and proc.stderr.startswith("webui: error: Stable Diffusion folder")
    assert proc.stderr.count("\n") == 1, proc.stderr
