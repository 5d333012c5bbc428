"""The README's "Two commands", as a new user runs them: from a clean copy of the repository (the files git
tracks plus new ones it does not ignore) into a fresh virtual environment, the demo command exactly as written.

The second command (install with the dev extras, run the whole suite) is what CI runs (``.ci/run``), checked
here to be the same text, so every CI run executes it from a clean checkout; running it from inside the suite
would recurse. The demo test installs torch and the ``[hf]`` extra from the package index (about 1.5 minutes on 2
cores with pip's cache warm, as it is after CI's own install); without an index it fails, showing pip's output.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The bash blocks of the README's "## Two commands" section, in order."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("\n## Two commands", 1)[1]
    section = section.split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", section, re.S)


def clean_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone (plus uncommitted, not-ignored ones) would have them."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing defines the clean file set")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # a tracked file deleted in the work tree is gone from a commit of it too
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def test_readme_has_two_commands():
    demo, tests = readme_commands()
    assert demo.endswith(".venv/bin/halfbyte demo") and "python3 -m venv .venv" in demo
    assert tests in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines(), "CI runs the README's command"


def test_readme_demo_command(tmp_path):
    demo, _ = readme_commands()
    repo = clean_copy(tmp_path / "clone")
    assert not (repo / ".venv").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    # Proof of "no downloads": the Hub is off and its cache empty.
    env |= {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-hub-cache"), "PIP_NO_INPUT": "1"}
    proc = subprocess.run(["bash", "-c", demo], cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for expected in ("tiny FLUX.1-architecture pipeline", "FLUX.1-dev at full size", "image PSNR"):
        assert expected in proc.stdout, proc.stdout[-3000:]
    where = subprocess.run([str(repo / ".venv" / "bin" / "python"), "-c", "import halfbyte; print(halfbyte.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(repo.resolve()), where  # the copy's halfbyte, installed editable
