#!/usr/bin/env bash
# The API reference (pdoc, from the docstrings) and the guides in docs/*.md as HTML in site/ (or $1);
# open site/index.html. Fails listing every problem: a module that does not import, a pdoc warning,
# a `eojax.*` reference or a docs/*.md mention that names nothing. pdoc comes with the `docs` (and
# `test`) extras: bash scripts/setup.sh installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python scripts/api_docs.py "${1:-site}"
