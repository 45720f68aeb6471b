"""The README's two set-up commands: the second is exactly what CI runs (.ci/run), and every doc it links exists."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Set-up: two commands on a fresh machine", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_the_readme_test_command_is_what_ci_runs():
    commands = setup_commands()
    assert len(commands) == 2 and commands[0].startswith("pip install ") and "t2f-infer" in commands[0]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == commands[1], "the README's test command and .ci/run differ"


def test_every_linked_file_exists():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target:
                continue
            assert (doc.parent / target).exists(), f"{doc.name} links {target}, which does not exist"
