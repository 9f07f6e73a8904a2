"""AtomicCheckpointIO: Lightning checkpoints written crash-safely, and damaged ones named on load.

Lightning's ``TorchCheckpointIO`` serialises to memory and writes through an fsspec transaction, which puts the
bytes in a temporary file made by ``tempfile.mkstemp()`` (the system temp folder, not the checkpoint's) and
then ``shutil.move``s it over the checkpoint: without an fsync, a killed save leaves a checkpoint-sized file in
the temp folder for good, and when that folder is on another filesystem (a tmpfs ``/tmp``) the move is a copy
into the checkpoint itself, so a kill during it truncates the previous ``last.ckpt``.

This plugin writes ``<ckpt>.tmp-<id>`` beside the checkpoint, fsyncs it, ``os.replace``s it over the
checkpoint and fsyncs the folder (``lora_lightning.atomic.write_file``); the next save removes temporaries a
killed save left. A full disk raises an ``OSError`` naming the file, the bytes needed and the space free, with
the previous checkpoint intact. Loading a truncated or foreign file raises a ``ValueError`` naming the file.
Remote paths (``s3://`` ...) fall back to Lightning's own writer.

``lora-lightning fit`` uses it by default (``LoRALightningCLI``); with your own Trainer pass
``Trainer(plugins=[AtomicCheckpointIO()])``.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .atomic import write_file


def _is_local(path: Any) -> bool:
    protocol = get_filesystem(path).protocol
    return "file" in (protocol if isinstance(protocol, (tuple, list)) else (protocol,))


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-beside, fsync, rename saves and named errors for damaged files."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_file(Path(path), buffer.getbuffer())

    def load_checkpoint(
        self,
        path: Any,
        map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError, OSError) as err:
            if "Weights only load failed" in str(err) and _is_local(path) and zipfile.is_zipfile(path):
                raise  # a well-formed checkpoint holding objects weights_only refuses: not damage
            size = Path(path).stat().st_size if _is_local(path) and Path(path).is_file() else "?"
            raise ValueError(
                f"{path} is incomplete or not a PyTorch/Lightning checkpoint file ({size} bytes; "
                f"{type(err).__name__}: {err}). It was probably cut short (a killed copy or save, a full disk): "
                "resume from another checkpoint (e.g. the previous step's) or copy it again"
            ) from err


__all__ = ["AtomicCheckpointIO"]
