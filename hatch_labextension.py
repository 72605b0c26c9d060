"""The build function the hatch build hook (hatch-jupyter-builder) calls for the JupyterLab extension.

A wheel or an sdist builds the extension (`jlpm install`, then `jlpm build:prod`: tsc and @jupyter/builder) into
trainorch_jupyter/labextension, which the wheel ships as shared data. An editable install (`make install`,
`pip install -e .`) skips it unless TRAINORCH_BUILD_LABEXTENSION=1: the notebook side and `make demo` do not need
the frontend, nor Node; `make labextension` builds it and links it into the venv for development.

Not part of the package (it is not in the wheel); hatch-jupyter-builder imports it from the project root.
"""

from __future__ import annotations

import logging
import os
from typing import Any

ENV = "TRAINORCH_BUILD_LABEXTENSION"


def build(target_name: str, version: str, **kwargs: Any) -> None:
    if version == "editable" and os.environ.get(ENV, "").strip().lower() not in ("1", "true", "yes", "on"):
        logging.getLogger(__name__).info(
            "editable install: the JupyterLab extension is not built (set %s=1 to build it, or run "
            "`make labextension`)", ENV)
        return
    from hatch_jupyter_builder import npm_builder

    npm_builder(target_name, version, **kwargs)
