"""Where runs are recorded: the results store (the source of truth) and its W&B mirror."""
from ablate.tracking.secrets import scrub, scrub_text
from ablate.tracking.store import (
                                   FINISHED,
                                   CheckpointError,
                                   RunLocked,
                                   RunStore,
                                   atomic_write_bytes,
                                   run_folder_name,
                                   safe_name,
)
from ablate.tracking.wandb_logger import WandbMirror

__all__ = ["FINISHED", "CheckpointError", "RunLocked", "RunStore", "WandbMirror", "atomic_write_bytes",
           "run_folder_name", "safe_name", "scrub", "scrub_text"]
