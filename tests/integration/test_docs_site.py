"""`make docs` works: the site builds with warnings as errors, and what it generates is whole.

The build runs once here into a temporary directory (`mkdocs build --strict`, as `make docs`
and `make test` run it). The CLI page must hold every subcommand the parser has (a new one
appears without an edit), the API page every public name, and the hook's docstring check
must catch a public name without a docstring.
"""

from __future__ import annotations

import dataclasses
import html
import importlib.util
import os
import re
import subprocess
import sys
import types

import pytest

import keras_weightwatch
from keras_weightwatch.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", os.path.join(ROOT, "docs",
                                                                             "hooks.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "site"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "WARNING" not in re.sub(r"WARNING: All log messages.*", "", proc.stderr)
    return out


def _page(site, name: str) -> str:
    with open(site / name / "index.html", encoding="utf-8") as f:
        return f.read()


@pytest.mark.slow
def test_the_site_builds_with_every_page_of_the_nav(site):
    import yaml

    with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)

    def pages(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    for page in pages(config["nav"]):
        built = "index.html" if page == "index.md" else page[:-3] + "/index.html"
        assert (site / built).exists(), page
    # the Getting started page includes the README's two commands and Quickstart
    index = html.unescape(re.sub(r"<[^>]+>", "", (site / "index.html").read_text("utf-8")))
    assert "make demo" in index and "load_run(watch.run_dir)" in index and "--8<--" not in index


@pytest.mark.slow
def test_the_cli_page_holds_every_subcommand_and_option_of_the_parser(site):
    text = html.unescape(_page(site, "cli"))
    subcommands = _hooks().subcommands(build_parser())
    assert {"show", "verify", "diff", "drift", "spectral", "demo"} <= set(subcommands)
    for name, parser in subcommands.items():
        assert f'id="weightwatch-{name}"' in text, name
        assert f"usage: weightwatch {name}" in text, name
        for action in parser._actions:
            for option in action.option_strings:
                assert option in text, (name, option)


@pytest.mark.slow
def test_the_api_page_documents_every_public_name(site):
    text = _page(site, "api")
    for name in keras_weightwatch.__all__:
        if name != "__version__":
            assert f'id="keras_weightwatch.{name}"' in text, name
    for extra in ("keras_weightwatch.run.Derivation", "keras_weightwatch.spectral.spectral",
                  "keras_weightwatch.plot.top_k"):
        assert f'id="{extra}"' in text, extra
    # doctest examples render as code, not as prose
    assert '<code><span class="gp">&gt;&gt;&gt; </span>' in text


def test_a_public_name_without_a_docstring_is_reported():
    hooks = _hooks()
    fake = types.ModuleType("fake_public_api")

    class Documented:
        """Has a docstring."""

        def method(self):
            """So does this."""

        def bare(self):
            pass

        @property
        def value(self):
            return 1

        def _private(self):
            pass

    @dataclasses.dataclass
    class Record:  # a dataclass's generated __doc__ is its signature: no docstring
        x: int

    def function():
        pass

    def told():
        """Told."""

    fake.Documented, fake.Record, fake.function, fake.told = Documented, Record, function, told
    sys.modules["fake_public_api"] = fake
    try:
        missing = hooks.undocumented([f"fake_public_api.{n}" for n in
                                      ("Documented", "Record", "function", "told")])
    finally:
        del sys.modules["fake_public_api"]
    assert missing == ["fake_public_api.Documented.bare", "fake_public_api.Documented.value",
                       "fake_public_api.Record", "fake_public_api.function"]


def test_the_package_has_no_public_name_without_a_docstring():
    hooks = _hooks()
    paths = [f"keras_weightwatch.{n}" for n in hooks.api_names()]
    assert len(paths) >= 15
    assert hooks.undocumented(paths) == []
