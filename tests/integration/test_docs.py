"""The docs run as written: every code block of the site, and every public example.

The site's pages are README.md (the front page, with the Quickstart) and the pages of
mkdocs.yml's nav, in nav order. Their ```python blocks are executed in an empty
directory: the README's first (they train the quickstart's run, `runs/exp1`), then each
page's blocks in order, each page in a namespace that starts as a copy of the README's (so
a page builds on the Quickstart's `model`, `x`, `y`, not on another page's variables; the
runs it writes stay on disk for the pages after it). The ```bash lines that start with
`weightwatch ` then run there through the CLI, and the docstring examples of the package
(doctests, and the fenced examples of public names) run against those same runs. A block
that must not run says so with another info string (```text, or ```python no-run).
"""

from __future__ import annotations

import doctest
import importlib
import io
import json
import os
import pkgutil
import re
import shlex
import shutil
import textwrap

import numpy as np
import pytest
import yaml

import keras_weightwatch
from keras_weightwatch.cli import main

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def nav_pages() -> list[str]:
    """The docs pages of mkdocs.yml's nav, in order, as paths from the repository root."""
    with open(os.path.join(ROOT, "mkdocs.yml"), encoding="utf-8") as f:
        config = yaml.safe_load(f)

    def walk(items):
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            if isinstance(value, list):
                yield from walk(value)
            else:
                yield os.path.join(config["docs_dir"], value)

    return list(walk(config["nav"]))


README = _read("README.md")
PAGES = ["README.md", *nav_pages()]  # the site, front page first
ARGUMENTS = _read(os.path.join("docs", "arguments.md"))


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def fences(text: str) -> list[str]:
    """The info string of every fenced block of a page (its opening fence's words)."""
    infos, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            if not inside:
                infos.append(line[3:].strip())
            inside = not inside
    return infos


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Runs every page's Python blocks in nav order; returns (directory, {page: namespace})."""
    import keras

    d = tmp_path_factory.mktemp("site")
    here = os.getcwd()
    os.chdir(d)
    keras.backend.clear_session()
    spaces: dict[str, dict] = {}
    try:
        for page in PAGES:
            ns = dict(spaces["README.md"]) if spaces else {}
            for n, code in enumerate(fenced(_read(page), "python")):
                exec(compile(code, f"{page} python block {n}", "exec"), ns)  # noqa: S102
            spaces[page] = ns
    finally:
        os.chdir(here)
    return d, spaces


@pytest.fixture(scope="module")
def readme(site):
    """(directory, the README's namespace): the Quickstart's model, x, y and run."""
    return site[0], site[1]["README.md"]


@pytest.fixture
def in_readme_dir(site):
    here = os.getcwd()
    os.chdir(site[0])
    yield site
    os.chdir(here)


def test_site_python_blocks_do_what_they_say(in_readme_dir):
    d, spaces = in_readme_dir
    ns = spaces["README.md"]
    run, model = ns["run"], ns["model"]
    assert run.epochs == list(range(20))
    for got, expected in zip(run.weights().values(), model.get_weights()):
        np.testing.assert_array_equal(got, expected)
    assert set(run.logs(3)) == {"loss", "mae"}
    # the numpy-alone reader of "The run directory" read the same array as load_run
    kernel = spaces["docs/run-directory.md"]["kernel"]
    np.testing.assert_array_equal(kernel, run.weights(3)["hidden/kernel"])
    # the diff block of "Comparing runs" compared exp1 and exp2
    t = spaces["docs/comparing.md"]["result"].tensor("hidden/kernel")
    assert t.name == "hidden/kernel" and t.status == "changed"
    # the fine-tuning block: one run, the adapters joining at the fine-tune's first step
    ft_ns = spaces["docs/fine-tuning.md"]
    tuned = ft_ns["tuned"]
    assert tuned.steps == list(range(-1, 6)) and [d.key for d in tuned.derived] == ["hidden/kernel"]
    assert [s.step for s in tuned.snapshots if "hidden/lora_kernel_b" in s.tensors] == [3, 4, 5]
    layer = ft_ns["ft"].get_layer("hidden")  # the effective kernel is layer.kernel
    np.testing.assert_allclose(ft_ns["effective"], np.asarray(layer.kernel), atol=1e-6)
    # the numpy-alone reader of the run format read every weight of the snapshot
    weights = spaces["docs/FORMAT.md"]["weights"]
    assert set(weights) == set(run.weights(3))
    np.testing.assert_array_equal(weights["hidden/kernel"], kernel)
    # the spectral page measured the run's kernels
    assert list(spaces["docs/SPECTRAL.md"]["result"].tensors) == ["hidden/kernel", "out/kernel"]


def test_every_code_block_of_the_site_runs_or_says_why_not():
    ran = {page: len(fenced(_read(page), "python")) for page in PAGES}
    assert sum(ran.values()) >= 8
    for page in ("README.md", "docs/run-directory.md", "docs/comparing.md",
                 "docs/fine-tuning.md", "docs/dashboard.md", "docs/SPECTRAL.md",
                 "docs/FORMAT.md"):
        assert ran[page] >= 1, page
    # every fence says what it is: run (python, bash's `weightwatch` lines), or shown only
    known = {"python", "bash", "text", "", "python no-run", "bash no-run"}
    for page in PAGES:
        assert set(fences(_read(page))) <= known, (page, set(fences(_read(page))) - known)


def _commands() -> list[str]:
    return [
        line.split("  #")[0].strip()
        for page in PAGES
        for block in fenced(_read(page), "bash")
        for line in block.splitlines()
        if line.startswith("weightwatch ")
    ]


def test_site_commands_run_and_succeed(in_readme_dir):
    lines = _commands()
    assert len(lines) >= 8
    for line in lines:
        out, err = io.StringIO(), io.StringIO()
        code = main(shlex.split(line)[1:], stdout=out, stderr=err)
        assert code == 0, (line, err.getvalue())
        if line.startswith("weightwatch diff") and "--json" in line:
            doc = json.loads(out.getvalue())
            assert {t["name"] for t in doc["tensors"]} == {"hidden/kernel", "hidden/bias"}
        if line.startswith("weightwatch verify runs/exp1"):
            assert out.getvalue().startswith("OK: 21 snapshots")


def test_every_public_name_has_an_example():
    missing = []
    for name in keras_weightwatch.__all__:
        if name == "__version__":
            continue
        doc = getattr(keras_weightwatch, name).__doc__ or ""
        if ">>>" not in doc and "```python" not in doc and "Example: see `" not in doc:
            missing.append(name)
    assert missing == []


def _modules():
    yield keras_weightwatch
    # every module, those of subpackages (keras_weightwatch.run, .compare) included
    for info in pkgutil.walk_packages(keras_weightwatch.__path__, prefix="keras_weightwatch."):
        yield importlib.import_module(info.name)


def test_doctests_of_every_module_pass(in_readme_dir):
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    tried, report = set(), []
    for module in _modules():
        for test in finder.find(module):
            if test.examples:
                runner.run(test, out=report.append)
                tried.add(test.name)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, "".join(report)
    # the examples of the public names are among them
    for name in ("load_run", "verify_run", "diff_runs", "drift", "TensorRecord",
                 "SnapshotRecord", "TensorDiff", "DiffResult", "WeightWatchWarning"):
        assert any(t.endswith("." + name) for t in tried), name


def test_fenced_examples_in_public_docstrings_run(readme, tmp_path):
    # on a copy of the README's runs, with its model, x and y in scope
    d, ns = readme
    shutil.copytree(d / "runs", tmp_path / "runs")
    here = os.getcwd()
    os.chdir(tmp_path)
    ran = 0
    try:
        for name in keras_weightwatch.__all__:
            doc = getattr(getattr(keras_weightwatch, name), "__doc__", "") or ""
            for code in fenced(doc, "python"):
                code = textwrap.dedent(code)
                exec(compile(code, f"{name} docstring", "exec"), dict(ns))  # noqa: S102
                ran += 1
    finally:
        os.chdir(here)
    assert ran >= 1


def test_a_run_opened_by_a_relative_path_survives_a_chdir(site, tmp_path, monkeypatch):
    ns = site[1]["README.md"]  # load_run("runs/exp1") ran in the site's directory
    kernel = site[1]["docs/run-directory.md"]["kernel"]
    monkeypatch.chdir(tmp_path)  # an empty directory: no runs/ here
    np.testing.assert_array_equal(ns["run"].weights(3)["hidden/kernel"], kernel)
    assert ns["run"].verify().ok


def test_argument_table_lists_every_argument_of_weightwatch():
    import inspect

    from keras_weightwatch import WeightWatch

    table = ARGUMENTS[:ARGUMENTS.index("## Snapshots inside long epochs")]
    rows = re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)? \|", table, re.M)
    listed = {name for row in rows for name in row if name}
    params = set(inspect.signature(WeightWatch.__init__).parameters) - {"self"}
    assert listed == params
    # every argument but the ones that may hold credentials, which are never recorded
    from keras_weightwatch.settings import SECRET_OPTIONS

    assert SECRET_OPTIONS == {"storage_options"}
    assert set(WeightWatch("runs/unused").get_config()) == params - SECRET_OPTIONS


# The front page and the site: nothing the README said before it became a front page is
# lost (each of its former sections is a heading of a site page), and every link resolves.
FORMER_SECTIONS = [
    "Two commands", "What you see in TensorBoard", "Quickstart", "WeightWatch's arguments",
    "Snapshots inside long epochs: `batch_freq`", "Re-running a script", "The command line",
    "The run directory", "Comparing runs", "Fine-tuning with LoRA, searches and quantized models",
    "The WeightWatch tab", "Spectral health", "Saliency and gradients",
    "Backends and distributed training", "Sharded models", "Runs in a bucket", "Examples",
    "Overhead", "Reading weights: caveats", "Reliability", "License",
]


def _prose(text: str) -> str:
    """`text` without its fenced blocks (a `# comment` in a code block is no heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_readme_is_a_front_page_and_every_former_section_is_a_site_page():
    assert len(README.splitlines()) <= 200
    site_pages = PAGES[1:]
    headings = {h.strip() for page in site_pages
                for h in re.findall(r"^#+ (.+)$", _prose(_read(page)), re.M)}
    assert [s for s in FORMER_SECTIONS if s not in headings] == []
    # the front page links into the site from its table of what it shows
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", README))
    assert {"docs/tensorboard.md", "docs/arguments.md", "docs/comparing.md",
            "docs/dashboard.md", "docs/HEALTH.md", "docs/cli.md", "docs/api.md"} <= linked
    assert "weightwatch doctor" in README


def test_the_getting_started_page_includes_the_readme_sections_it_names():
    index = _read("docs/index.md")
    names = re.findall(r'^--8<-- "README.md:([\w-]+)"$', index, re.M)
    assert names == ["two-commands", "quickstart"]
    for name in names:
        start, end = f"<!-- --8<-- [start:{name}] -->", f"<!-- --8<-- [end:{name}] -->"
        assert README.count(start) == 1 and README.count(end) == 1, name
        assert README.index(start) < README.index(end)
    quickstart = README.split("[start:quickstart]")[1].split("[end:quickstart]")[0]
    assert fenced(quickstart, "python") == fenced(README, "python")[:1]


def test_relative_links_of_the_readme_and_the_docs_resolve():
    pages = PAGES + [os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                     if f.endswith(".md")]
    broken = []
    for page in sorted(set(pages)):
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(_read(page))):
            path = target.split("#")[0]
            if not path or "://" in target or target.startswith("mailto:"):
                continue
            if not os.path.exists(os.path.join(ROOT, os.path.dirname(page), path)):
                broken.append((page, target))
    assert broken == []
