"""The docs say what the code is: the README's record reference is the one the record's definition generates, its
layout lists every module, install hints name the distribution, and nothing cites a file outside the repository."""

from __future__ import annotations

import ast
import re
import subprocess

from conftest import REPO

from ablate.measurement.record import REFERENCE_END, REFERENCE_START, reference_markdown
from ablate.version import DISTRIBUTION


def tracked_text_files() -> list:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / name for name in names if name.endswith((".py", ".md", ".toml", ".yaml", ".yml", ".txt", ".sh"))]


def test_the_readme_reference_is_the_generated_one():
    """`python -m ablate.measurement.record` writes the section; an edited record without it fails here."""
    readme = (REPO / "README.md").read_text()
    start, end = readme.index(REFERENCE_START), readme.index(REFERENCE_END) + len(REFERENCE_END)
    assert readme[start:end] + "\n" == reference_markdown()


def layout_paths() -> set[str]:
    """Every module the README's layout block names, as a repository path: file lines under their folders, and the
    `name.py` mentions in a folder line's description."""
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("## Layout") :].split("\n\n", 2)[2]
    stack: list[tuple[int, str]] = []
    found = set()
    for line in block.splitlines():
        if not line.strip():
            break
        indent = len(line) - len(line.lstrip())
        first = line.split()[0]
        if indent > 4 + 2 * len(stack) or not re.match(r"^[\w.]+/?$", first):  # a description's continuation
            folder = "/".join(name for _, name in stack)
        else:
            while stack and stack[-1][0] >= indent:
                stack.pop()
            folder = "/".join(name for _, name in stack)
            if first.endswith("/"):
                stack.append((indent, first.rstrip("/")))
                found.add(f"{folder}/{first.rstrip('/')}".lstrip("/"))
                folder = "/".join(name for _, name in stack)
            else:
                found.add(f"{folder}/{first}".lstrip("/"))
        found.update(f"{folder}/{name}".lstrip("/") for name in re.findall(r"\b(\w+\.py)\b", line))
    return found


def has_code(path) -> bool:
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body)


def test_the_layout_lists_every_module():
    listed = layout_paths()
    modules = {
        str(path.relative_to(REPO))
        for folder in ("ablate", "plugins", "experiments")
        for path in (REPO / folder).rglob("*.py")
        if path.name != "__init__.py" or has_code(path)
    }
    packages = {str(path.parent.relative_to(REPO)) for path in (REPO / "ablate").rglob("__init__.py")}
    missing = sorted((modules | packages) - listed)
    assert not missing, f"the README's layout does not list: {missing}"
    stale = sorted(path for path in listed if path.endswith(".py") and not (REPO / path).is_file())
    assert not stale, f"the README's layout lists modules that do not exist: {stale}"


def pip_install_targets(line: str) -> list[str]:
    """The requirements a line's `pip install ...` commands name (up to `&&`, `;`, `#`, a backtick or the end)."""
    targets = []
    for command in re.findall(r"pip install ([^&;#`\n]*)", line):
        targets += [word.strip("'\"") for word in command.split() if not word.startswith("-")]
    return targets


def test_install_hints_name_the_distribution():
    """`pip install ablate...` would install another project (the index's `ablate`): every hint says ablate-vlm."""
    found = [
        f"{path.relative_to(REPO)}: {line.strip()}"
        for path in tracked_text_files()
        if path.name != "test_docs.py"  # which holds a wrong hint on purpose, below
        for line in path.read_text().splitlines()
        for target in pip_install_targets(line)
        if re.fullmatch(r"ablate(\[.*\])?", target)
    ]
    assert not found, found
    assert pip_install_targets("x `pip install 'ablate[plot]'` y") == ["ablate[plot]"]  # the check can fail
    assert f"pip install '{DISTRIBUTION}[plot]'" in (REPO / "README.md").read_text()


def test_nothing_cites_a_file_outside_the_repository():
    found = [
        f"{path.relative_to(REPO)}:{number}"
        for path in tracked_text_files()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"shared/spec|\.\./shared", line) and path.name != "test_docs.py"
    ]
    assert not found, found
