"""Where runs are recorded: the results store (the source of truth) and its W&B mirror."""
from ablate.tracking.store import FINISHED, RunStore, atomic_write_bytes, run_folder_name, safe_name
from ablate.tracking.wandb_logger import WandbMirror

__all__ = ["FINISHED", "RunStore", "WandbMirror", "atomic_write_bytes", "run_folder_name", "safe_name"]
