"""Print README's two commands, one a line: the install-and-test command, then the quickstart command.

They are the two ```bash blocks under README's "## Two commands" heading; .ci/run runs exactly these strings, so
README and CI cannot drift apart. Standard library only (it runs before anything is installed)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands(text: str) -> dict[str, str]:
    """{"test": ..., "quickstart": ...} from the README text; ValueError if the section is not as expected."""
    section = re.search(r"^## Two commands\n(.*?)(?=^## )", text, flags=re.S | re.M)
    if section is None:
        raise ValueError("README.md has no '## Two commands' section")
    blocks = [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", section.group(1), flags=re.S | re.M)]
    if len(blocks) != 2 or any("\n" in b for b in blocks):
        raise ValueError(f"README.md's '## Two commands' must hold two one-line bash blocks, found {blocks}")
    tests = [b for b in blocks if "pytest" in b]
    quick = [b for b in blocks if "lora-lightning fit" in b]
    if len(tests) != 1 or len(quick) != 1 or tests == quick:
        raise ValueError(f"expected one pytest command and one `lora-lightning fit` command, found {blocks}")
    return {"test": tests[0], "quickstart": quick[0]}


if __name__ == "__main__":
    try:
        commands = readme_commands(README.read_text(encoding="utf-8"))
    except ValueError as err:
        sys.exit(f".ci/readme_commands.py: {err}")
    print(commands["test"])
    print(commands["quickstart"])
