"""Stage processes: quiet libraries without importing them."""

import subprocess
import sys

QUIET = ("from transformers.utils import logging as hf_logging; import datasets; "
         "from huggingface_hub.utils import are_progress_bars_disabled; "
         "print(hf_logging.get_verbosity() == hf_logging.ERROR, hf_logging.is_progress_bar_enabled(), "
         "are_progress_bars_disabled(), datasets.is_progress_bar_enabled())")


def _run(code: str) -> list[str]:
    env = {"PATH": "/usr/bin:/bin"}  # none of the libraries' switches set by the caller
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return done.stdout.split()


def test_configure_logging_quiets_libraries_imported_later_without_importing_them():
    code = ("import sys; from qlorapipe.console import configure_logging; configure_logging(); "
            "print(any(m in sys.modules for m in ('transformers', 'datasets', 'torch'))); " + QUIET)
    assert _run(code) == ["False", "True", "False", "True", "False"]


def test_configure_logging_quiets_libraries_already_imported():
    code = "import transformers, datasets; from qlorapipe.console import configure_logging; configure_logging(); " + QUIET
    assert _run(code) == ["True", "False", "True", "False"]
