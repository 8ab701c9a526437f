"""`tidings run MODULE:APP` on an app that needs an extra the environment lacks.

The trigger modules say which `pip install "tidings[...]"` fixes a missing dependency;
the CLI shows that line alone, not a traceback that ends with it under "fix it in your
code". An error of the app's own keeps its traceback.
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

import pytest

from tidings.cli.common import load_app
from tidings.errors import ConfigError

EXTRA_IMPORT = (
    """raise ImportError('the email trigger needs aiosmtpd: pip install "tidings[email]"')"""
)
EXTRA_CONFIG = """
from tidings.errors import ConfigError

raise ConfigError('cron schedules need cronsim: pip install "tidings[triggers]"')
"""
BUG = "x = {}['missing']\n"


def load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> str:
    name = f"app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(ConfigError) as raised:
            load_app(f"{name}:app")
    finally:
        sys.modules.pop(name, None)
    return str(raised.value)


@pytest.mark.parametrize(("source", "extra"), [(EXTRA_IMPORT, "email"), (EXTRA_CONFIG, "triggers")])
def test_a_missing_extra_is_named_with_its_fix_and_no_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, extra: str
) -> None:
    message = load(tmp_path, monkeypatch, source)
    assert "needs an optional extra" in message
    assert message.endswith(f'pip install "tidings[{extra}]"')
    assert "fix it in your code" not in message and "File " not in message


def test_an_error_in_the_app_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    message = load(tmp_path, monkeypatch, BUG)
    assert "fix it in your code" in message and "KeyError" in message and "File " in message
