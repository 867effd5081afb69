"""The README's set-up commands are the ones CI runs, and what the README and docs/ document exists.

The README and the pages under docs/ are checked the same cheap way, so that moving a module, a
config, a flag or a section shows up here rather than in a newcomer's terminal:

- every relative link points to a file that exists, and every `#anchor` to a heading of it
  (benchmarks/README.md and data/README.md too);
- every `import` of a ```python block imports, every dotted `captioner.x.y` name resolves, every
  `captioner/...` or `conf/...` path in backticks exists;
- every `captioner <command>` is a command, and every `--flag` of it is in its `--help`;
- every `captioner train` / `captioner evaluate` command (bash block or inline) composes and parses
  (Hydra overrides and the typed configs; nothing runs), and every config group choice exists.
"""

from __future__ import annotations

import ast
import importlib
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*PAGES, ROOT / "benchmarks" / "README.md", ROOT / "data" / "README.md"]  # links only
IDS = [str(p.relative_to(ROOT)) for p in PAGES]

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
GROUPS = ("data", "model", "optim", "scheduler", "experiment")


def _ci_commands() -> list[str]:
    """The commands after the '# README: "Run the tests"' comment, up to the first blank line
    (after it, .ci/run reruns the numerical tests on other CPU kernels, which the README
    leaves to docs/reproducibility.md)."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    start = lines.index('# README: "Run the tests"')
    block = lines[start + 1 :]
    block = block[: block.index("")] if "" in block else block
    return [ln.strip() for ln in block if not ln.startswith("#")]


def test_ci_runs_the_readme_test_commands() -> None:
    commands = _ci_commands()
    assert commands, ".ci/run lost its README commands"
    block = README.split("Run the tests:", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [ln.strip() for ln in block.strip().splitlines()] == commands


def test_readme_set_up_installs_and_runs_the_demo() -> None:
    first = re.search(r"```bash\n(python3 -m venv[^\n]*)\n```", README)
    assert first, "the one-line install-and-train command is missing"
    assert "pip install -e ." in first.group(1) and "captioner train" in first.group(1)


# --- helpers -------------------------------------------------------------------------------------


def _prose(text: str) -> str:
    """The page without its fenced code blocks (a `# comment` in a bash block is no heading)."""
    return FENCE.sub("", text)


def _blocks(text: str, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang == language]


def _commands(text: str) -> list[str]:
    """The command lines of the page's ```bash blocks: continuations joined, comments dropped."""
    out = []
    for block in _blocks(text, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@cache
def _anchors(path: Path) -> frozenset[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", _prose(path.read_text()), re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return frozenset(anchors)


def _captioner_invocations(text: str) -> list[list[str]]:
    """`captioner CMD ARGS...` (also under `python -m` or torchrun) in the page's bash blocks and
    inline code: placeholders such as `<run>` made plain words, `[--optional]` brackets and
    `...` dropped (a Hydra list, 'ensemble=[a,b]', keeps its brackets)."""
    inline = re.findall(r"`((?:captioner|python -m captioner|torchrun) [^`]*)`", _prose(text))
    out = []
    for line in [*_commands(text), *(span.replace("\n", " ") for span in inline)]:
        for part in line.split("&&"):
            part = re.sub(r"\[(--?[^\]]*)\]", r"\1", re.sub(r"<[^>]*>", "x", part))
            words = [w.replace("...", "x") for w in shlex.split(part) if w != "..."]
            rest = words[words.index("captioner") + 1 :] if "captioner" in words else []
            if rest:
                out.append(rest)
    return out


# --- links ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("page", LINKED, ids=[str(p.relative_to(ROOT)) for p in LINKED])
def test_relative_links_point_to_existing_files_and_headings(page: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        name, _, anchor = target.partition("#")
        path = (page.parent / name).resolve() if name else page
        if not path.exists():
            broken.append(
                f"{target}: no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
            )
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


# --- names and paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_python_blocks_import(page: Path) -> None:
    for block in _blocks(page.read_text(), "python"):
        for node in ast.parse(block).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                exec(compile(ast.Module([node], []), str(page), "exec"), {})  # noqa: S102


def _resolve(dotted: str) -> object:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_dotted_names_and_paths_exist(page: Path) -> None:
    text = page.read_text()
    missing = []
    for dotted in sorted(set(re.findall(r"`(captioner(?:\.[A-Za-z_]\w*)+)", text))):
        try:
            _resolve(dotted)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{dotted}: {exc}")
    pattern = r"`((?:captioner|conf|benchmarks|notebooks|tests|docs|\.ci)/[\w./-]*\w)`"
    for path in sorted(set(re.findall(pattern, text))):
        if not (ROOT / path).exists():
            missing.append(f"{path}: no such file")
    for group, choice in sorted(set(re.findall(rf"\b({'|'.join(GROUPS)})=([A-Za-z_]\w*)", text))):
        if not (ROOT / "conf" / group / f"{choice}.yaml").is_file():
            missing.append(f"{group}={choice}: no conf/{group}/{choice}.yaml")
    assert not missing, "\n".join(missing)


# --- commands ------------------------------------------------------------------------------------


@cache
def _help(*command: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "captioner", *command, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 0, (
        f"captioner {' '.join(command)} --help failed:\n{run.stderr[-2000:]}"
    )
    return run.stdout


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_argparse_commands_and_flags_exist(page: Path) -> None:
    from captioner.cli import COMMANDS

    text = page.read_text()
    named = set(re.findall(r"`captioner (\w+)", text)) | {
        w[0] for w in _captioner_invocations(text)
    }
    assert named <= set(COMMANDS), f"not a captioner command: {sorted(named - set(COMMANDS))}"
    for words in _captioner_invocations(text):
        if words[0] in ("train", "evaluate"):
            continue
        command = words[:2] if words[0] == "prepare" else words[:1]
        flags = {w.split("=", 1)[0] for w in words if w.startswith("--")} - {"--help"}
        if not flags:
            continue
        usage = _help(*command)
        unknown = sorted(
            f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", usage)
        )
        assert not unknown, f"`captioner {' '.join(command)}` has no {unknown} ({page.name})"


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_train_and_evaluate_commands_compose_and_parse(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omegaconf import OmegaConf

    from captioner.configs.evaluate import EvaluateConfig
    from captioner.configs.hydra import compose
    from captioner.configs.training import parse_train_config
    from captioner.typed import from_dict

    for words in _captioner_invocations(page.read_text()):
        if words[0] not in ("train", "evaluate") or "--help" in words:
            continue
        overrides = words[1:]
        monkeypatch.chdir(tmp_path)
        for key, value in (o.split("=", 1) for o in overrides if "=" in o):
            if key in ("init_from", "resume"):  # the checkpoint a command starts from
                path = tmp_path / value if value.endswith(".pt") else tmp_path / value / "last.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
        cfg = compose(words[0], overrides)
        if words[0] == "train":
            parse_train_config(cfg)
        else:
            node = OmegaConf.to_container(cfg, resolve=True)
            from_dict(EvaluateConfig, {k: v for k, v in node.items() if k != "hydra"}, "")
