"""docs/troubleshooting.md lists every error message the code can raise, in the code's own words."""

from __future__ import annotations

import re

from tests.conftest import ROOT
from tests.error_catalog import ErrorSite, error_sites

DOC = ROOT / "docs" / "troubleshooting.md"


def _pattern(*templates: str | None) -> re.Pattern:
    pieces = [re.escape(f) for t in templates for f in ErrorSite.fragments(t)]
    return re.compile(".*?".join(pieces))


def test_troubleshooting_lists_every_error_message_with_its_fix_in_the_codes_wording():
    lines = DOC.read_text(encoding="utf-8").splitlines()
    sites = error_sites()
    assert len(sites) > 100, "the catalogue reader found too few messages: is it still reading the code?"
    missing = [f"{s.module}:{s.line}: {s.message} / {s.hint}" for s in sites
               if not any(_pattern(s.template, s.hint_template).search(line) for line in lines)]
    assert not missing, "add these to docs/troubleshooting.md:\n" + "\n".join(missing)
