"""ablate's version and distribution name, in one place (pyproject.toml reads the version from here).

The distribution is `ablate-vlm` (`pip install ablate-vlm`): the name `ablate` on the package index belongs to
another project. The import name, the command and the entry-point group are `ablate`.
"""

__version__ = "0.3.0"
DISTRIBUTION = "ablate-vlm"
