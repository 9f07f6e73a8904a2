"""``python tests/fault_child.py <lora-lightning args>``: the CLI, SIGKILLed at the point ``LL_KILL_AT`` names.

    step:N           right after the N-th optimizer step (1-based) updated the weights, before Lightning's
                     hooks, checkpoints or logging of that batch ran
    adapter_save:N   inside the N-th adapter-directory save that replaces an existing one, between its two
                     renames (the old version moved aside, the new one not yet in place: the worst moment for
                     a reader)
    ckpt_save:N      in the middle of writing the N-th Lightning checkpoint file (half of its bytes written)

Used by tests/test_faults.py; the kill is a real SIGKILL (no cleanup, no finally blocks run).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    point, n = spec.split(":")
    n = int(n)
    count = [0]

    if point == "step":
        import torch

        def post(optimizer, args, kwargs):
            count[0] += 1
            if count[0] == n:
                _die()

        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(post)
    elif point == "adapter_save":
        from lora_lightning import atomic

        real = atomic.write_directory

        def write_directory(path, files):
            count[0] += Path(path).exists()  # count saves that replace an existing version
            if count[0] != n or not Path(path).exists():
                return real(path, files)
            real_rename = atomic.os.rename

            def rename(src, dst):
                real_rename(src, dst)
                if Path(str(dst)).name.startswith(Path(path).name + ".old-"):
                    _die()

            atomic.os.rename = rename
            return real(path, files)

        atomic.write_directory = write_directory
        import lora_lightning.callbacks.adapter_checkpoint as ac
        import lora_lightning.state as st

        ac.write_directory = st.write_directory = write_directory
    elif point == "ckpt_save":
        from lora_lightning import atomic

        real = atomic._write_and_fsync

        def write(file, data):
            if ".ckpt" in Path(file).name:
                count[0] += 1
                if count[0] == n:
                    with open(file, "wb") as f:
                        f.write(bytes(data[: len(data) // 2]))
                        f.flush()
                        os.fsync(f.fileno())
                    _die()
            return real(file, data)

        atomic._write_and_fsync = write
    else:
        raise ValueError(f"unknown LL_KILL_AT={spec!r}")


if __name__ == "__main__":
    if os.environ.get("LL_KILL_AT"):
        install(os.environ["LL_KILL_AT"])
    from lora_lightning.cli import main

    main()


try:
    from lightning.pytorch import Callback as _Callback

    class TraceBatches(_Callback):
        """Debug aid: print the step, batch index and a fingerprint of every training batch."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            ids = batch["input_ids"]
            print(f"TRACE step={trainer.global_step} epoch={trainer.current_epoch} batch={batch_idx} "
                  f"ids={int(ids.sum())}", flush=True)
except ImportError:  # pragma: no cover
    pass
