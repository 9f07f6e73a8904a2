"""What a user reads: README's two commands are what CI runs, and a CLI run's console shows what we print (the
injection report, the progress bar, the final metrics) without product tips, Lightning's upstream warnings or an
all-zero FLOPs table."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.readme_commands


def test_ci_runs_readme_commands_in_a_fresh_virtual_environment():
    readme_commands = _readme_commands()
    commands = readme_commands((ROOT / "README.md").read_text())
    assert commands == {
        "test": 'pip install -c constraints.txt -e ".[test]" && python -m pytest tests -q',
        "quickstart": "pip install -c constraints.txt -e . && lora-lightning fit --config configs/quickstart.yaml",
    }
    run = (ROOT / ".ci" / "run").read_text()
    assert ".ci/readme_commands.py" in run and '-m venv "$ENV_DIR/venv"' in run
    assert "--system-site-packages" not in run and "pytest" not in run.replace("pytest's", "")  # only README's
    with pytest.raises(ValueError, match="two one-line bash blocks"):
        readme_commands("## Two commands\n\n```bash\npip install -e .\n```\n\n## Next\n")


def test_cli_console_is_what_we_print(tmp_path, tiny_bert_dir, sst_files):
    """Lightning's defaults (progress bar, logger, checkpointing, model summary) left as they are."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 3, "default_root_dir": str(tmp_path / "run")},
        "model": {"backbone": tiny_bert_dir, "num_classes": 2, "adapter": {"r": 4}},
        "data": {
            "class_path": "lora_lightning.data.TextClassificationDataModule",
            "init_args": {"train_file": sst_files["train"], "val_file": sst_files["dev"], "batch_size": 4},
        },
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CI": "true"}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run([sys.executable, "-m", "lora_lightning.cli", "fit", "--config", "run.yaml"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "lora_lightning: lora (s=4) on 13 layers" in out and "trainable params:" in out
    assert "3/3" in out  # the progress bar (rich or tqdm)
    for noise in ("💡", "litlogger", "litmodels", "tensorboardX", "LeafSpec", "FLOPs", "Warning"):
        assert noise not in out, f"{noise!r} in the console:\n{out}"
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("final validation (step 3): val_acc=") and "val_f1=" in last and "val_loss=" in last
