"""The Python code blocks of the docs' getting-started page and tutorials run, in order."""

import os
import re

import pytest

# Subprocesses, files and numpy: these run on the CPU whatever --device says.
pytestmark = pytest.mark.cpu_only

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs")
PAGES = [os.path.join(os.pardir, "README.md"), "index.md"] + [os.path.join("tutorials", n) for n in sorted(os.listdir(os.path.join(DOCS, "tutorials")))]
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


@pytest.mark.parametrize("page", PAGES)
def test_code_blocks_run(page, capsys):
    with open(os.path.join(DOCS, page)) as handle:
        blocks = BLOCK.findall(handle.read())
    assert blocks, f"{page} has no python code blocks"
    namespace = {"__name__": f"docs_{page}"}
    for index, code in enumerate(blocks):
        try:
            exec(compile(code, f"{page}[block {index}]", "exec"), namespace)
        except Exception as error:  # name the page and block
            raise AssertionError(f"{page}, python block {index} failed: {error!r}") from error
    printed = capsys.readouterr().out
    assert "False" not in printed.split(), f"{page}: a printed check is False:\n{printed}"


def test_docstrings_use_markdown_code_spans_not_sphinx_roles():
    # mkdocstrings renders docstrings as Markdown: a Sphinx role shows up literally on the API page.
    import pathlib
    import re

    role = re.compile(r":(class|func|meth|mod|attr|data|exc|obj):`")
    package = pathlib.Path(__file__).resolve().parent.parent / "ttconv"
    offenders = [f"{path.name}:{n}" for path in sorted(package.glob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if role.search(line)]
    assert not offenders, offenders
