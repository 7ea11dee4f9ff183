"""Universal checkpoints: per-rank safetensors pieces + a JSON manifest; load at any world
size and stage; consolidate to Hugging Face safetensors; read DeepSpeed checkpoints.

Files: save.py (what each rank writes), commit.py (crash-safe publication, crash recovery),
load.py (planning, validation, reading), verify.py (confined, bounded file checks),
manifest.py (the JSON format and its schema), dist_util.py (the checkpoint's own gloo group,
the arrival deadline), st_stream.py (streaming safetensors writer), async_save.py
(background saves), hf_export.py (consolidate: HF export), deepspeed_in.py (migration in),
optimizer_view.py (the one door to the layout API and the stage-3 units).
"""

from zeroshard.checkpoint.async_save import wait
from zeroshard.checkpoint.commit import CheckpointError
from zeroshard.checkpoint.hf_export import consolidate
from zeroshard.checkpoint.load import load_checkpoint
from zeroshard.checkpoint.save import save_checkpoint

__all__ = ["CheckpointError", "consolidate", "load_checkpoint", "save_checkpoint", "wait"]
