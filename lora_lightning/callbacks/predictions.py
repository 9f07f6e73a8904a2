"""CompletionWriter: ``lora-lightning predict`` on a causal-LM config writes one JSON line per prompt.

Each line is the prompt row as read (every column of the prompts file, e.g. ``instruction`` / ``messages``
/ ``text``, and the answer column when present) plus ``"completion"``: the generated text up to the first EOS,
special tokens removed. Lines follow the prompts file's order. The file is written beside its final name and
renamed when prediction ends (a reader never sees half a file). Under several devices each rank writes its own
share to ``<stem>.rank<r>.jsonl``.

Works with any datamodule that has ``predict_rows`` (the rows, indexable) and ``decode(tokens) -> str``
(``CausalLMDataModule``), and a module whose ``predict_step`` returns {"index", "tokens"} (``LoRAModule``
with ``task: causal_lm``). ``LoRAModule`` adds one (output ``<default_root_dir>/predictions.jsonl``) unless
the Trainer already has one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from ..generation import generation_model, strip_after_eos


class CompletionWriter(BasePredictionWriter):
    """Write the completions of ``trainer.predict`` to a JSONL file.

    Args:
        output: the JSONL path; None = ``<trainer.default_root_dir>/predictions.jsonl``.
    """

    def __init__(self, output: Optional[Union[str, Path]] = None) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output) if output is not None else None
        self.path: Optional[Path] = None
        self._file: Any = None
        self.written = 0

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "predict_rows") or not callable(getattr(dm, "decode", None)):
            raise ValueError(
                "CompletionWriter needs a datamodule with predict_rows and decode() "
                "(lora_lightning.data.CausalLMDataModule)"
            )
        path = self.output or Path(trainer.default_root_dir) / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path.with_name(path.name + ".tmp"), "w", encoding="utf-8")
        self.written = 0
        eos = generation_model(pl_module).generation_config.eos_token_id
        tok_eos = getattr(getattr(dm, "tokenizer", None), "eos_token_id", None)
        self._eos = [*(eos if isinstance(eos, (list, tuple)) else [eos]), tok_eos]

    @override
    def write_on_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, prediction: Any, batch_indices: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        dm = trainer.datamodule
        for index, tokens in zip(prediction["index"].tolist(), prediction["tokens"].tolist()):
            row = dict(dm.predict_rows[int(index)])
            row["completion"] = dm.decode(strip_after_eos(tokens, self._eos))
            self._file.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            self.written += 1

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.path.with_name(self.path.name + ".tmp"), self.path)
        print(f"wrote {self.written} completions to {self.path}")
